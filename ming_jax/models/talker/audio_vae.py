"""The talker's AudioVAE (official `AudioVAE/`): acoustic latents <-> waveform, full and streaming decode, encoder.

    decode   latents [B, T, d]  -> fc1 -> linear x f upsampling in time (align_corners False)    [B, N = f T, H]
             -> causal Qwen2 -> iSTFT head: Linear(H, n_fft + 2) = (log-magnitude, phase) halves,
                magnitude = min(exp(.), 100), irfft(n_fft) x periodic Hann window, overlap-add every hop,
                "same" trim of (n_fft - hop) // 2 samples at both ends, divide by the overlap-added squared
                window (trimmed alike)                                                       wave [B, 1, N hop]
    stream   the same, chunk by chunk (`StreamState`, `decode_chunk`): the upsampler needs one latent of look-ahead,
             so each call holds its chunk back and emits the previous one (the first call emits nothing); the
             backbone continues from a KV cache; the iSTFT carries the last (n_fft - hop) samples of signal and of
             window envelope into the next call and trims only the stream's very start and end. The concatenation
             equals the full decode up to float rounding, and the per-call sample counts are the release's.
    encode   wave [B, L] -> frames of input_dim samples every hop_size (zero padded) -> fc1 (no bias) -> fc2
             -> causal Qwen2 (its first min(L_enc, 4) layers: `AudioVAEConfig.encoder_layers_run`) -> zero pad to a
             multiple of f frames, a learned cls token after every f frames -> 4-layer causal Qwen2 aggregator over
             the whole row -> the cls rows -> fc3 -> (mean, scale) halves; std = softplus(scale) + 1e-4;
             latent = mean + std * eps                                                    [B, ceil(T / f), d]
    trim_silence   the talker's trailing-silence hold on the decoded audio (host-side numpy, stateful per stream).

f = `patch_size` (4 in the release; -1: no upsampling / pooling), hop = `dec_kwargs.output_dim` (882 at 44.1 kHz),
n_fft = window = 4 hop. Both backbones are `ming_jax.models.qwen2.Qwen2Model`s run causally, as transformers'
Qwen2Model always masks. Streaming runs the decoder backbone on each call's new frames against its preallocated
`Qwen2Cache`: one compiled program per chunk length and stream phase, whatever the position in the stream.

Numerics: projections and backbones run in `runtime.dtype`; the iSTFT head (exp, trig, irfft, overlap-add, window
normalisation) and the encoder's posterior always run in float32. The Hann window is a stored parameter (the release
saves it as a buffer), kept in float32 and used as stored. Results come back in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.config.audio_vae import AudioVAEConfig, AudioVAEDecoderConfig, AudioVAEEncoderConfig
from ming_jax.config.runtime import Runtime
from ming_jax.layers.linear import Linear
from ming_jax.layers.norms import LayerNorm
from ming_jax.layers.params import fan_in_normal, normal, param, read
from ming_jax.models.qwen2 import Qwen2Cache, Qwen2Model

MAX_MAGNITUDE = 100.0  # the iSTFT head clips exp(log-magnitude) here
STD_FLOOR = 1e-4  # posterior std = softplus(scale) + STD_FLOOR
ENCODER_NORM_EPS = 1e-5  # torch LayerNorm default (the layer is stored but unused)


# --- pure math -------------------------------------------------------------------------------------------------------


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window of length n (torch.hann_window's default): 0.5 - 0.5 cos(2 pi k / n), k < n."""
    k = np.arange(n, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)).astype(np.float32)


def linear_upsample(x, factor: int):
    """x [B, T, C] -> [B, T * factor, C]: torch `nn.Upsample(scale_factor=factor, mode="linear",
    align_corners=False)` along time. Output j samples the input at max((j + 0.5) / factor - 0.5, 0), between
    neighbours i0 = floor(.) and min(i0 + 1, T - 1); the indices and weights are static (float32 as torch)."""
    t = x.shape[1]
    j = np.arange(t * factor, dtype=np.float32)
    src = np.maximum(np.float32(1.0 / factor) * (j + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), t - 1)
    i1 = np.minimum(i0 + 1, t - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)[None, :, None]
    w0 = (np.float32(1.0) - w1)
    return x[:, i0] * jnp.asarray(w0, x.dtype) + x[:, i1] * jnp.asarray(w1, x.dtype)


def overlap_add(frames, hop: int):
    """frames [..., N, W] with W a multiple of hop -> [..., (N - 1) hop + W]: frame n added at offset n * hop
    (torch `F.fold` with kernel W and stride hop)."""
    *lead, n, w = frames.shape
    if w % hop:
        raise ValueError(f"overlap_add: frame length {w} is not a multiple of the hop {hop}")
    r = w // hop
    parts = frames.reshape(*lead, n, r, hop)  # [..., N, r, hop]: the r hop-long pieces of each frame
    out = jnp.zeros((*lead, n + r - 1, hop), frames.dtype)
    for j in range(r):  # piece j of frame n lands in output block n + j
        out = out.at[..., j:j + n, :].add(parts[..., :, j, :])
    return out.reshape(*lead, (n + r - 1) * hop)


def spectrum_to_frames(head_out, window):
    """head_out [B, N, n_fft + 2] (log-magnitude half, phase half) -> windowed time frames [B, N, n_fft], float32.

    magnitude = min(exp(log-magnitude), 100); S = magnitude * (cos(phase) + i sin(phase)); frame = irfft(S, n_fft)
    (backward norm: 1 / n_fft) times the window. irfft ignores the imaginary parts of the DC and Nyquist bins."""
    n_fft = window.shape[0]
    x = head_out.astype(jnp.float32)
    log_mag, phase = jnp.split(x, 2, axis=-1)  # [B, N, n_fft / 2 + 1] each
    mag = jnp.minimum(jnp.exp(log_mag), MAX_MAGNITUDE)
    spec = jax.lax.complex(mag * jnp.cos(phase), mag * jnp.sin(phase))
    return jnp.fft.irfft(spec, n=n_fft, axis=-1) * window.astype(jnp.float32)


def _ola_with_envelope(frames, window, hop: int):
    """Overlap-added frames [B, (N - 1) hop + W] and overlap-added squared window [(N - 1) hop + W]."""
    n = frames.shape[-2]
    envelope = overlap_add(jnp.broadcast_to(jnp.square(window.astype(jnp.float32)), (n, window.shape[0])), hop)
    return overlap_add(frames, hop), envelope


def istft_same(frames, window, hop: int):
    """The whole-signal inverse STFT with "same" padding: frames [B, N, W] -> [B, (N - 1) hop + W - 2 pad],
    pad = (W - hop) // 2 (= N hop when W - hop is even), normalised by the window envelope."""
    y, env = _ola_with_envelope(frames, window, hop)
    pad = (window.shape[0] - hop) // 2
    end = y.shape[-1] - pad
    return y[..., pad:end] / env[pad:end]


def istft_stream(frames, window, hop: int, tails, last: bool):
    """One streaming call of the inverse STFT: frames [B, N, W] -> (audio [B, M], new tails).

    tails: None on the stream's first call, else (audio_tail [B, W - hop], envelope_tail [W - hop]) from the
    previous call, added onto this call's first W - hop samples. The first call trims the leading pad; every call
    keeps its last W - hop samples as the next tails and emits what precedes them, except the last call, which
    emits everything but the trailing pad. M = N hop - pad (first), N hop (middle), N hop + W - hop - pad (last);
    a first call that is also the last emits (N - 1) hop + W - 2 pad, as `istft_same`."""
    y, env = _ola_with_envelope(frames, window, hop)
    w = window.shape[0]
    pad, keep = (w - hop) // 2, w - hop
    if tails is None:
        y, env = y[..., pad:], env[pad:]
    else:
        y = y.at[..., :keep].add(tails[0])
        env = env.at[:keep].add(tails[1])
    new_tails = (y[..., y.shape[-1] - keep:], env[env.shape[-1] - keep:])
    end = y.shape[-1] - (pad if last else keep)
    return y[..., :end] / env[:end], new_tails


def frame_waveform(wave, input_dim: int, hop: int):
    """wave [B, L] -> frames [B, ceil(L / hop), input_dim]: frame t = samples t hop .. t hop + input_dim - 1 of the
    wave zero padded (or cut) to (ceil(L / hop) - 1) hop + input_dim samples."""
    length = wave.shape[-1]
    n = -(-length // hop)
    need = (n - 1) * hop + input_dim
    wave = jnp.pad(wave, ((0, 0), (0, need - length))) if need >= length else wave[:, :need]
    index = np.arange(n)[:, None] * hop + np.arange(input_dim)[None, :]  # [T, input_dim]
    return wave[:, index]


def latent_frames(cfg: AudioVAEConfig, lengths) -> np.ndarray:
    """The release's reported latent count per waveform (`encode_latent`'s frame_num): ceil(ceil(length /
    input_dim) / f), f = 1 without patches. (The encoder's own output has `latent_count` rows, from hop_size.)"""
    frames = -(-np.asarray(lengths, np.int64) // cfg.encoder.input_dim)
    return -(-frames // cfg.frames_per_latent)


def latent_count(cfg: AudioVAEConfig, length: int) -> int:
    """Rows the encoder emits for a length-L waveform: ceil(ceil(L / hop_size) / f)."""
    frames = -(-length // cfg.encoder.hop_size)
    return -(-frames // cfg.frames_per_latent)


def _hann_init(key, shape, dtype):
    return jnp.asarray(hann_window(shape[0]), dtype)


# --- modules ---------------------------------------------------------------------------------------------------------


class ISTFTHead(nnx.Module):
    """out: Linear(H, n_fft + 2); window [n_fft] (the release's Hann buffer, float32)."""

    def __init__(self, cfg: AudioVAEDecoderConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        self.hop = cfg.hop
        self.out = Linear(cfg.hidden_size, cfg.n_fft + 2, ("embed", None), param_dtype=runtime.param_dtype,
                          rngs=rngs)
        self.window = param(rngs, _hann_init, (cfg.n_fft,), (None,), jnp.float32)

    def frames(self, h):  # [B, N, H] -> windowed time frames [B, N, n_fft], float32
        return spectrum_to_frames(self.out(h), read(self.window, jnp.float32))


class AudioVAEDecoder(nnx.Module):
    """fc1: Linear(d, H), the causal Qwen2 backbone, the iSTFT head."""

    def __init__(self, cfg: AudioVAEConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        dec = cfg.decoder
        self.cfg = cfg
        self.runtime = runtime
        self.fc1 = Linear(dec.latent_dim, dec.hidden_size, (None, "embed"), param_dtype=runtime.param_dtype,
                          rngs=rngs)
        self.backbone = Qwen2Model(dec.backbone, runtime, rngs=rngs)
        self.head = ISTFTHead(dec, runtime, rngs=rngs)

    def intermediates(self, latents) -> dict:
        """latents [B, T, d] -> every stage of the full decode (names as the golden case's outputs)."""
        x = self.fc1(latents.astype(self.runtime.dtype))  # [B, T, H]
        up = linear_upsample(x, self.cfg.patch_size) if self.cfg.has_patch else x  # [B, N, H]
        with jax.named_scope("backbone"):
            h = self.backbone(up)  # causal
        with jax.named_scope("istft_head"):
            head = self.head.out(h)  # [B, N, n_fft + 2]
            frames = spectrum_to_frames(head, read(self.head.window, jnp.float32))
            wave = istft_same(frames, read(self.head.window, jnp.float32), self.head.hop)
        return dict(dec_fc1=x, dec_upsampled=up, dec_backbone=h, dec_head_linear=head, wave=wave[:, None, :])


class AudioVAEEncoder(nnx.Module):
    """fc1_kernel [input_dim, H] (no bias), fc2, backbone, aggregator + cls_embed [H] (with patches), fc3, and the
    stored-but-unused LayerNorm `norm` (the official forward never applies it)."""

    def __init__(self, cfg: AudioVAEConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        enc: AudioVAEEncoderConfig = cfg.encoder
        pdt = jnp.dtype(runtime.param_dtype)
        h = enc.hidden_size
        self.cfg = cfg
        self.runtime = runtime
        self.fc1_kernel = param(rngs, fan_in_normal(), (enc.input_dim, h), (None, "embed"), pdt)
        self.fc2 = Linear(h, h, (None, "embed"), param_dtype=pdt, rngs=rngs)
        self.backbone = Qwen2Model(enc.backbone, runtime, rngs=rngs)
        if cfg.has_patch:
            self.aggregator = Qwen2Model(enc.aggregator, runtime, rngs=rngs)
            self.cls_embed = param(rngs, normal(0.02), (h,), ("embed",), pdt)
        self.fc3 = Linear(h, 2 * enc.latent_dim, ("embed", None), param_dtype=pdt, rngs=rngs)
        self.norm = LayerNorm(h, eps=ENCODER_NORM_EPS, param_dtype=pdt, rngs=rngs)  # unused, as in the release

    def __call__(self, wave):
        """wave [B, L] -> the posterior's parameters [B, T_lat, 2 d] (mean half, pre-softplus scale half)."""
        cfg, enc, dt = self.cfg, self.cfg.encoder, self.runtime.dtype
        frames = frame_waveform(wave.astype(jnp.float32), enc.input_dim, enc.hop_size)  # [B, T, input_dim]
        x = jnp.einsum("bti,ih->bth", frames.astype(dt), read(self.fc1_kernel, dt))
        x = self.fc2(x)
        with jax.named_scope("backbone"):
            x = _first_layers(self.backbone, cfg.encoder_layers_run)(x)  # [B, T, H]
        if cfg.has_patch:
            f = cfg.patch_size
            b, t, h = x.shape
            n = -(-t // f)
            x = jnp.pad(x, ((0, 0), (0, n * f - t), (0, 0))).reshape(b, n, f, h)
            cls = jnp.broadcast_to(read(self.cls_embed, x.dtype), (b, n, 1, h))
            x = jnp.concatenate([x, cls], axis=2).reshape(b, n * (f + 1), h)  # a cls after every f frames
            with jax.named_scope("aggregator"):
                x = self.aggregator(x).reshape(b, n, f + 1, h)[:, :, -1]  # [B, T_lat, H]: the cls rows
        return self.fc3(x)


class AudioVAE(nnx.Module):
    """encoder + decoder, parameter paths as `ming_jax.weights.audio_vae.audio_vae_table` names them."""

    def __init__(self, cfg: AudioVAEConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        self.encoder = AudioVAEEncoder(cfg, runtime, rngs=rngs)
        self.decoder = AudioVAEDecoder(cfg, runtime, rngs=rngs)


def _first_layers(backbone: Qwen2Model, n: int) -> Qwen2Model:
    """`backbone` itself, or a view of it holding only its first n stacked layers (same final norm)."""
    if n == backbone.cfg.num_hidden_layers:
        return backbone
    graphdef, state = nnx.split(backbone)
    flat = [(p, v.replace(v.get_value()[:n]) if p[0] == "layers" else v) for p, v in nnx.to_flat_state(state)]
    view = nnx.merge(graphdef, nnx.from_flat_state(flat))
    view.cfg = backbone.cfg.replace(num_hidden_layers=n)  # the stack's depth as the view holds it
    return view


# --- checks ----------------------------------------------------------------------------------------------------------


def check_latents(cfg: AudioVAEConfig, shape, what: str = "latents") -> None:
    d = cfg.decoder.latent_dim
    if len(shape) != 3 or shape[-1] != d:
        raise ValueError(f"AudioVAE {what}: expected [B, T, {d}] (latent width {d}), got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"AudioVAE {what}: empty input, shape {tuple(shape)}")


def check_waveform(shape) -> None:
    if len(shape) != 2:
        raise ValueError(f"AudioVAE waveform: expected a 2-D [B, L] array, got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"AudioVAE waveform: empty input, shape {tuple(shape)}")


# --- full decode, encode ---------------------------------------------------------------------------------------------


@nnx.jit(static_argnames=("everything",))
def _decode(model: AudioVAE, latents, everything: bool = False):
    out = model.decoder.intermediates(latents)
    return out if everything else out["wave"]


def decode(model: AudioVAE, latents):
    """latents [B, T, d] -> waveform [B, 1, N hop] float32, N = f T (one sample more when the hop is odd: the
    "same" trim is (3 hop) // 2 at each end); the release's `AudioVAE.decode` without a cache. Compiles once per
    shape and dtype."""
    latents = jnp.asarray(latents)
    check_latents(model.cfg, latents.shape)
    return _decode(model, latents)


def decode_intermediates(model: AudioVAE, latents) -> dict:
    """The full decode's stages: dec_fc1 [B, T, H], dec_upsampled / dec_backbone [B, N, H], dec_head_linear
    [B, N, n_fft + 2] (runtime dtype) and wave [B, 1, N hop] (float32)."""
    latents = jnp.asarray(latents)
    check_latents(model.cfg, latents.shape)
    return _decode(model, latents, everything=True)


@nnx.jit
def _encoder_params(model: AudioVAE, wave):
    return model.encoder(wave)


def encoder_params(model: AudioVAE, wave):
    """wave [B, L] -> fc3's output [B, T_lat, 2 d] (the official `Encoder.forward(...)[0]`), float32."""
    wave = jnp.asarray(wave)
    check_waveform(wave.shape)
    return _encoder_params(model, wave).astype(jnp.float32)


def encode(model: AudioVAE, wave, *, key=None, noise=None, lengths=None):
    """The release's `encode_latent`: wave [B, L] -> (latent, mean, std [B, T_lat, d] float32, frames [B] int32).

    latent = mean + std * eps with eps = `noise` ([B, T_lat, d], ours; the release's torch draw is [B, d, T_lat])
    or N(0, 1) drawn from `key`; give exactly one. frames = ceil(ceil(length / input_dim) / f) per row from
    `lengths` [B] (default: L for every row); like the release, the encoder itself sees the whole padded batch."""
    wave = jnp.asarray(wave)
    check_waveform(wave.shape)
    cfg = model.cfg
    if (key is None) == (noise is None):
        raise ValueError("AudioVAE encode: pass exactly one of key= (draw the noise) or noise= (given)")
    b, length = wave.shape
    shape = (b, latent_count(cfg, length), cfg.encoder.latent_dim)
    if noise is not None and tuple(np.shape(noise)) != shape:
        raise ValueError(f"AudioVAE encode: noise must be [B, T_lat, d] = {shape}, got {tuple(np.shape(noise))}")
    lengths = np.full((b,), length) if lengths is None else np.asarray(lengths)
    if lengths.shape != (b,) or np.any(lengths <= 0) or np.any(lengths > length):
        raise ValueError(f"AudioVAE encode: lengths must be [B] = [{b}] in 1 .. {length}, got {lengths.tolist()}")
    params = encoder_params(model, wave)
    d = cfg.encoder.latent_dim
    mean, scale = params[..., :d], params[..., d:]
    std = jax.nn.softplus(scale) + STD_FLOOR
    noise = jax.random.normal(key, shape, jnp.float32) if noise is None else jnp.asarray(noise, jnp.float32)
    frames = jnp.asarray(latent_frames(cfg, lengths), jnp.int32)
    return mean + std * noise, mean, std, frames


# --- streaming decode ------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StreamState:
    """Everything a streaming decode carries between calls (the release's `past_key_values` and `stream_state`).

    cache: the decoder backbone's `Qwen2Cache` (its `length` = frames already through the backbone = the next
    query position); held [B, n, d]: the latents of the chunk the upsampler holds back (None before the first
    chunk); history [B, 1, d]: the last latent already upsampled (None until the first emission); audio_tail
    [B, n_fft - hop] / window_tail [n_fft - hop]: the iSTFT's overlap carried into the next call (None until the
    first emission). None fields change the pytree's structure, so each stream phase compiles once.
    """

    cache: Qwen2Cache
    held: jax.Array | None = None
    history: jax.Array | None = None
    audio_tail: jax.Array | None = None
    window_tail: jax.Array | None = None

    @classmethod
    def create(cls, model: AudioVAE, batch: int, max_latents: int) -> StreamState:
        """An empty stream of `batch` rows with room for `max_latents` latents (their frames fill the cache)."""
        if batch <= 0 or max_latents <= 0:
            raise ValueError(f"StreamState: batch={batch} and max_latents={max_latents} must be positive")
        return cls(Qwen2Cache.create(model.cfg.decoder.backbone, batch, max_latents * model.cfg.frames_per_latent,
                                     model.runtime.dtype))

    @property
    def batch(self) -> int:
        return self.cache.valid.shape[0]

    @property
    def capacity(self) -> int:  # backbone frames the cache holds
        return self.cache.max_len


def _upsample_step(cfg: AudioVAEConfig, fc1, held, history, x, last: bool):
    """The release's streaming upsampler on raw latents (fc1 is per position, so it commutes with the slicing):
    the frames to emit now, [B, f * n_emitted, H].

    The held chunk p is upsampled with one latent of look-ahead (the new chunk's first) and, after the first
    emission, one latent of history before it, and only p's own f * len(p) frames are kept: exactly the full
    upsampling's frames for p. The last call also emits the new chunk (history = p's last latent, no look-ahead,
    so the end clamps as in the full decode). A first call that is also the last upsamples its chunk whole."""
    f = cfg.patch_size
    up = lambda z: linear_upsample(fc1(z), f)
    if held is None:
        return up(x)
    n, look = held.shape[1], x[:, :1]
    if history is None:
        frames = up(jnp.concatenate([held, look], axis=1))[:, :n * f]
    else:
        frames = up(jnp.concatenate([history, held, look], axis=1))[:, f:f + n * f]
    if last:
        frames = jnp.concatenate([frames, up(jnp.concatenate([held[:, -1:], x], axis=1))[:, f:]], axis=1)
    return frames


@nnx.jit(static_argnames=("last",))
def _stream_step(model: AudioVAE, state: StreamState, chunk, last: bool):
    """One emitting call: (audio [B, 1, M], the next state). Holding a first chunk back happens on the host."""
    dec, cfg = model.decoder, model.cfg
    fc1 = lambda z: dec.fc1(z.astype(model.runtime.dtype))
    if cfg.has_patch:
        frames = _upsample_step(cfg, fc1, state.held, state.history, chunk, last)  # [B, N, H]
        held, history = chunk, (None if state.held is None else state.held[:, -1:])
    else:
        frames, held, history = fc1(chunk), None, None
    # causal over the cache; the first emission meets an empty cache: a prefill (causal mask, kernel-friendly)
    h, cache = dec.backbone(frames, cache=state.cache, prefill=state.audio_tail is None)
    window = read(dec.head.window, jnp.float32)
    tails = None if state.audio_tail is None else (state.audio_tail, state.window_tail)
    audio, (audio_tail, window_tail) = istft_stream(dec.head.frames(h), window, dec.head.hop, tails, last)
    new = StreamState(cache, held, history, audio_tail, window_tail)
    return audio[:, None, :], new


def _frames_emitted(cfg: AudioVAEConfig, state: StreamState, n: int, last: bool) -> int:
    if not cfg.has_patch:
        return n
    held = 0 if state.held is None else state.held.shape[1]
    return cfg.patch_size * (held + n if last else held)


def decode_chunk(model: AudioVAE, state: StreamState, chunk, last: bool):
    """One call of the release's streaming decode (`AudioVAE.decode(chunk, past_key_values, use_cache=True,
    stream_state, last_chunk)`): chunk [B, n, d] -> (audio [B, 1, M] float32, the next state; None after `last`).

    With patches, a call emits the PREVIOUS chunk's audio (the first call emits M = 0) and the last call also
    flushes its own; the concatenation of all calls equals `decode` of the concatenated latents. Raises ValueError
    on a bad chunk, a batch other than the state's, or a stream longer than the state's cache (checked on the host:
    one scalar read of the cache length per call; this is a host-side driver around the jitted step)."""
    chunk = jnp.asarray(chunk)
    cfg = model.cfg
    check_latents(cfg, chunk.shape, "chunk")
    if chunk.shape[0] != state.batch:
        raise ValueError(f"AudioVAE decode_chunk: chunk batch {chunk.shape[0]} != the stream's {state.batch}")
    if cfg.has_patch and state.held is None and not last:  # held back for look-ahead: nothing to emit yet
        return jnp.zeros((chunk.shape[0], 1, 0), jnp.float32), dataclasses.replace(state, held=chunk)
    new_frames = _frames_emitted(cfg, state, chunk.shape[1], last)
    used = int(state.cache.length)
    if used + new_frames > state.capacity:
        raise ValueError(f"AudioVAE decode_chunk: {used} + {new_frames} frames exceed the stream's cache of "
                         f"{state.capacity} frames (StreamState.create(max_latents=...))")
    if state.audio_tail is None and new_frames * cfg.decoder.hop < cfg.decoder.pad and not last:
        raise ValueError(f"AudioVAE decode_chunk: a first emission of {new_frames} frame(s) is shorter than the "
                         f"iSTFT overlap (the release fails here too); send more latents per chunk")
    audio, new_state = _stream_step(model, state, chunk, last)
    return audio, (None if last else new_state)


def decode_stream(model: AudioVAE, latents, chunk_sizes) -> list:
    """Decode latents [B, T, d] as a stream of chunks of `chunk_sizes` latents (summing to T; the last one with
    last=True): the list of per-call audio arrays [B, 1, M_i]."""
    latents = jnp.asarray(latents)
    check_latents(model.cfg, latents.shape)
    sizes = [int(s) for s in chunk_sizes]
    if not sizes or min(sizes) <= 0 or sum(sizes) != latents.shape[1]:
        raise ValueError(f"AudioVAE decode_stream: chunk sizes {sizes} must be positive and sum to T = "
                         f"{latents.shape[1]}")
    state = StreamState.create(model, latents.shape[0], latents.shape[1])
    out, start = [], 0
    for i, n in enumerate(sizes):
        audio, state = decode_chunk(model, state, latents[:, start:start + n], last=i == len(sizes) - 1)
        out.append(audio)
        start += n
    return out


# --- the talker's trailing-silence hold (host side) -------------------------------------------------------------------


@dataclasses.dataclass
class SilenceState:
    """What `trim_silence` carries between the chunks of one stream: `held`, quiet audio withheld until speech
    resumes (or cut to the tail length at the end), and `pending`, samples past the last whole analysis window."""

    held: list = dataclasses.field(default_factory=list)
    pending: list = dataclasses.field(default_factory=list)


def trim_silence(speech, sample_rate: int, state: SilenceState | None = None, last_chunk: bool = True, *,
                 threshold: float = 1e-3, tail_seconds: float = 0.3):
    """The talker's `silence_holder`, applied to each decoded chunk (or once, with last_chunk=True, to a whole
    utterance): speech [..., L] numpy -> (speech to play [..., M], state).

    Audio is scored in back-to-back windows of 0.1 s (mean |x| over the window and the leading dims); audio after
    the last window scoring above `threshold` is treated as trailing silence. A chunk with no loud window is held
    back whole; otherwise the held audio and the chunk up to the end of its last loud window are emitted, plus
    `tail_seconds` more on the last chunk (at most what the chunk holds); samples short of a whole window wait in
    `pending` for the next chunk (and are dropped at the end). A stream that ends in silence emits its held audio
    cut to `tail_seconds`.

    Two behaviours of the release are reproduced as they are: when nothing is held, a chunk's quiet end past its
    last loud window is dropped rather than held; when something is held, the emitted audio's samples past the
    chunk's cut point (counted from the start of the held audio) are ALSO kept as held audio, so they can be
    emitted a second time.
    """
    speech = np.asarray(speech)
    state = SilenceState() if state is None else SilenceState(list(state.held), list(state.pending))
    if speech.shape[-1] == 0:
        if last_chunk:
            raise ValueError("trim_silence: an empty last chunk (the release asserts against it)")
        return speech, state
    window = int(sample_rate * 0.1)
    tail = int(tail_seconds * sample_rate)
    empty = speech[..., :0]
    if state.pending:
        speech = np.concatenate([*state.pending, speech], axis=-1)
        state.pending = []
    if speech.shape[-1] < window:
        state.pending.append(speech)
        if last_chunk:
            return np.concatenate(state.held + state.pending, axis=-1)[..., :tail], state
        return empty, state
    whole = (speech.shape[-1] // window) * window  # back-to-back windows: step = size
    if speech.shape[-1] > whole:
        state.pending.append(speech[..., whole:])
        speech = speech[..., :whole]
    lead = speech.shape[:-1]
    scores = np.abs(speech.reshape(*lead, whole // window, window)).mean(axis=-1)
    scores = scores.reshape(-1, whole // window).mean(axis=0)  # [windows]
    loud = np.nonzero(scores > threshold)[0]
    if loud.size == 0:
        state.held.append(speech)
        if last_chunk:
            return np.concatenate(state.held + state.pending, axis=-1)[..., :tail], state
        return empty, state
    cut = int(loud[-1]) * window + window + (tail if last_chunk else 0)
    out = np.concatenate([*state.held, speech[..., :cut]], axis=-1)
    state.held = [out[..., cut:]] if cut < out.shape[-1] else []
    return out, state

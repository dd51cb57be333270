"""Audio tower of Ming-flash-omni 2.0: a Whisper encoder and a conv projector into the LLM's embedding space.

Data flow for one prompt batch (the processor's "wrapped" layout, several clips concatenated per row):

    feats [B, T, n_mels], lengths [B, N]         clips back to back in each row, lengths 0-padded on the right
      -> unwrap: one row per clip, zero-padded to the LONGEST clip          [S, Tmax, n_mels]
      -> WhisperEncoder: conv(k3) + GELU, conv(k3, s2) + GELU, + sinusoid table, pre-LN blocks, final LN
                                                                             [S, T', D],  T' = (Tmax - 1) // 2 + 1
      -> AudioProjector: conv(ds_kernel_size, ds_stride), then (mlp_depth - 1) x [GELU, Linear]
                                                                             [S, L', H]
      -> wrap: each clip's first L_s frames, concatenated per row again      [B, sum_s L_s, H]
      -> L2-normalise every frame (norm_query_embeds)

Facts of the official implementation this reproduces (on purpose; they change numbers):
* Clips are padded with zero mel frames to the longest clip of the whole batch and the encoder attends over the
  padding (there is no attention mask), so a short clip's features depend on the longest clip's length. We pad to
  exactly that length, never to a bucket.
* The projector's conv also reads the encoder's outputs at padded frames next to a clip's end.
* A clip keeps L_s = projector_frames(encoder_frames(T_s)) frames. The official code slices the ENCODER output with
  the same L_s (not with the encoder's own length) when it re-wraps it; `AudioFeatures.encoder_wrapped` does too.

Lengths are data, but they decide shapes: `clip_layout` turns concrete lengths into gather indices on the host, and
the traced part (`AudioTower.__call__`, jitted by `encode_audio`) only gathers with them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax import sharding
from ming_jax.config.audio import AudioConfig, WhisperEncoderConfig
from ming_jax.config.runtime import Runtime
from ming_jax.pallas.attention.reference import attend
from ming_jax.layers.mlp import GeluMLP
from ming_jax.layers.norms import LayerNorm
from ming_jax.layers.linear import Linear
from ming_jax.layers.norms import l2_normalize
from ming_jax.layers.params import fan_in_normal, param, read, zeros



# Logical names of a [clips or batch rows, frames, width] activation: under a mesh the clips are split like a batch
# (`sharding.constrain_even`: only when they divide the batch axes), so that each chip encodes its own clips instead
# of every chip running all of them with model-dim-sharded weights and all-reducing every activation.
_CLIPS = ("batch", None, "act_embed")


# --- pure math -------------------------------------------------------------------------------------------------------


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's positional table [length, channels]: sin of all frequencies, then cos (float32, as torch builds it).

    Frequencies are geometric from 1 to 1 / max_timescale over channels // 2 steps. The release stores this table in
    its checkpoint (`audio.positional_embedding`), and loading takes the stored values; this only seeds a fresh model.
    """
    half = channels // 2
    step = np.log(max_timescale) / (half - 1)
    inv = np.exp((-step * np.arange(half)).astype(np.float32))  # [C/2]
    t = np.arange(length)[:, None].astype(np.float32) * inv[None, :]  # [length, C/2]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def conv1d(x, kernel, bias, *, stride: int, padding: int):
    """x [N, T, Cin], kernel [K, Cin, Cout], bias [Cout] -> [N, (T + 2p - K) // stride + 1, Cout] (zero padding)."""
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=(stride,), padding=[(padding, padding)],
                                     dimension_numbers=("NWC", "WIO", "NWC"),
                                     preferred_element_type=jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


# --- encoder ----------------------------------------------------------------------------------------------------------


class WhisperAttention(nnx.Module):
    """Bidirectional multi-head self-attention; the key projection has no bias (as in whisper)."""

    def __init__(self, cfg: WhisperEncoderConfig, *, param_dtype, rngs: nnx.Rngs):
        d, n, h = cfg.n_state, cfg.n_head, cfg.head_dim
        qkv_axes = ("embed", "heads", "head_dim")
        self.q_kernel = param(rngs, fan_in_normal(), (d, n, h), qkv_axes, param_dtype)
        self.q_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"), param_dtype)
        self.k_kernel = param(rngs, fan_in_normal(), (d, n, h), qkv_axes, param_dtype)
        self.v_kernel = param(rngs, fan_in_normal(), (d, n, h), qkv_axes, param_dtype)
        self.v_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"), param_dtype)
        self.o_kernel = param(rngs, fan_in_normal((0, 1)), (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        self.o_bias = param(rngs, zeros, (d,), ("embed",), param_dtype)

    def __call__(self, x):  # x [B, T, D]
        dt = x.dtype
        q = jnp.einsum("btd,dnh->btnh", x, read(self.q_kernel, dt)) + read(self.q_bias, dt)
        k = jnp.einsum("btd,dnh->btnh", x, read(self.k_kernel, dt))
        v = jnp.einsum("btd,dnh->btnh", x, read(self.v_kernel, dt)) + read(self.v_bias, dt)
        o = attend(q, k, v, None)  # [B, T, N, H]; no mask: every frame, padding included, is attended
        return jnp.einsum("btnh,nhd->btd", o, read(self.o_kernel, dt)) + read(self.o_bias, dt)


class WhisperBlock(nnx.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x erf-GELU MLP."""

    def __init__(self, cfg: WhisperEncoderConfig, *, param_dtype, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.attn_ln = LayerNorm(cfg.n_state, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = WhisperAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp_ln = LayerNorm(cfg.n_state, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = GeluMLP(cfg.n_state, cfg.mlp_dim, approximate=False, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):  # [B, T, D]
        with jax.named_scope("whisper_block"):
            x = x + self.attn(self.attn_ln(x))
            return x + self.mlp(self.mlp_ln(x))


def _run_blocks(x, blocks: WhisperBlock):
    """The stacked blocks as one `nnx.scan`. The body is built per call on purpose: jax caches the trace of a scan
    body by function identity, and a module-level body would hide `weight_hook`s installed after its first trace."""

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block: WhisperBlock):
        return sharding.constrain_even(block(x), _CLIPS)

    return run(x, blocks)


class WhisperEncoder(nnx.Module):
    """Mel frames [S, T, n_mels] -> encoder states [S, (T - 1) // 2 + 1, n_state]; the rows are independent.

    Unlike stock whisper (fixed 3000 mel frames), any T with (T - 1) // 2 + 1 <= n_ctx is accepted; the sinusoid
    table is sliced to the clip. Blocks are stacked on a leading `layers` axis and run with `nnx.scan`.
    """

    def __init__(self, cfg: WhisperEncoderConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d, m = cfg.n_state, cfg.n_mels
        self.conv1_kernel = param(rngs, fan_in_normal((0, 1)), (3, m, d), (None, None, "embed"), param_dtype)
        self.conv1_bias = param(rngs, zeros, (d,), ("embed",), param_dtype)
        self.conv2_kernel = param(rngs, fan_in_normal((0, 1)), (3, d, d), (None, None, "embed"), param_dtype)
        self.conv2_bias = param(rngs, zeros, (d,), ("embed",), param_dtype)
        table = lambda key, shape, dtype: jnp.asarray(sinusoids(*shape), dtype)  # noqa: E731
        self.positional_embedding = param(rngs, table, (cfg.n_ctx, d), (None, "embed"), param_dtype)

        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return WhisperBlock(cfg, param_dtype=param_dtype, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.ln_post = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, mels):
        cfg = self.cfg
        if mels.ndim != 3 or mels.shape[-1] != cfg.n_mels:
            raise ValueError(f"whisper encoder: expected mel frames [S, T, {cfg.n_mels}], got {mels.shape}")
        frames = (mels.shape[1] - 1) // 2 + 1
        if frames > cfg.n_ctx:
            raise ValueError(f"whisper encoder: {mels.shape[1]} mel frames give {frames} positions, more than "
                             f"n_ctx={cfg.n_ctx} (longest clip: {2 * cfg.n_ctx} frames)")
        dt = mels.dtype
        with jax.named_scope("whisper_stem"):
            x = jax.nn.gelu(conv1d(mels, read(self.conv1_kernel, dt), read(self.conv1_bias), stride=1,
                                   padding=1), approximate=False)  # [S, T, D]
            x = jax.nn.gelu(conv1d(x, read(self.conv2_kernel, dt), read(self.conv2_bias), stride=2,
                                   padding=1), approximate=False)  # [S, T', D]
            x = x + read(self.positional_embedding, dt)[:frames]
        x = _run_blocks(sharding.constrain_even(x, _CLIPS), self.blocks)
        return self.ln_post(x)


# --- projector -------------------------------------------------------------------------------------------------------


class AudioProjector(nnx.Module):
    """Encoder states [S, T', D] -> [S, L', H]: Conv1d(D, H, ds_kernel_size, ds_stride, padding k // 2), then
    (mlp_depth - 1) x [erf-GELU, Linear(H, H)]. With mlp_depth 1 it is the conv alone (no activation)."""

    def __init__(self, cfg: AudioConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        k, d, h = cfg.ds_kernel_size, cfg.encoder.n_state, cfg.out_dim
        self.conv_kernel = param(rngs, fan_in_normal((0, 1)), (k, d, h), (None, "embed", "mlp"), param_dtype)
        self.conv_bias = param(rngs, zeros, (h,), ("mlp",), param_dtype)
        self.linears = nnx.List([Linear(h, h, ("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)
                                 for _ in range(cfg.mlp_depth - 1)])

    def __call__(self, x):
        cfg = self.cfg
        with jax.named_scope("audio_projector"):
            x = conv1d(x, read(self.conv_kernel, x.dtype), read(self.conv_bias), stride=cfg.ds_stride,
                       padding=cfg.ds_kernel_size // 2)  # [S, L', H]
            for dense in self.linears:
                x = dense(jax.nn.gelu(x, approximate=False))
            return x


# --- wrapped clips ---------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClipLayout:
    """Gather indices between the wrapped layout and one row per clip, built on the host by `clip_layout`.

    S clips in total, the longest Tmax mel frames; W = the widest row's total output frames.
    """

    clip_row: np.ndarray  # [S] batch row of each clip
    clip_frame: np.ndarray  # [S, Tmax] frame index into its row (clamped where not valid)
    clip_valid: np.ndarray  # [S, Tmax] frame belongs to the clip (else zero padding)
    out_clip: np.ndarray  # [B, W] which clip each wrapped output frame comes from
    out_frame: np.ndarray  # [B, W] frame index inside that clip's padded output
    out_valid: np.ndarray  # [B, W] False on the right padding of shorter rows
    out_lengths: np.ndarray  # [B, Nmax] int64 output frames per clip (0-padded), Nmax = most clips in a row


def clip_layout(lengths, n_frames: int, cfg: AudioConfig) -> ClipLayout:
    """Concrete per-row clip lengths [B, N] (the processor's `audio_feats_lengths`) -> `ClipLayout`.

    A row's clips end at its first 0; a non-zero length after a 0, negative lengths, rows whose clips overrun
    `n_frames`, and clips too long for the positional table are errors, as is a batch without any clip.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 2 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"audio lengths must be an integer array [batch, clips], got {lengths.dtype} "
                         f"{lengths.shape}")
    if (lengths < 0).any():
        raise ValueError(f"audio lengths must be >= 0, got {lengths.tolist()}")
    rows, starts, lens = [], [], []
    per_row: list[list[int]] = []
    for b, row in enumerate(lengths):
        n = int(np.argmax(row == 0)) if (row == 0).any() else len(row)
        if (row[n:] != 0).any():
            raise ValueError(f"audio lengths row {b} {row.tolist()}: a clip length follows a 0 (clips must be "
                             "packed to the left)")
        if int(row.sum()) > n_frames:
            raise ValueError(f"audio lengths row {b} {row.tolist()} sum to {int(row.sum())} frames, but the "
                             f"features have only {n_frames}")
        offsets = np.concatenate([[0], np.cumsum(row[:n])[:-1]]) if n else np.zeros(0, np.int64)
        rows += [b] * n
        starts += offsets.tolist()
        lens += row[:n].tolist()
        per_row.append([cfg.output_frames(int(t)) for t in row[:n]])
    if not lens:
        raise ValueError("audio lengths hold no clip (all zero)")
    t_max = max(lens)
    if cfg.encoder_frames(t_max) > cfg.encoder.n_ctx:
        raise ValueError(f"an audio clip of {t_max} mel frames is longer than the encoder's positional table "
                         f"allows ({cfg.max_mel_frames} frames, n_ctx={cfg.encoder.n_ctx})")
    t = np.arange(t_max)
    lens_a = np.asarray(lens)
    clip_valid = t[None, :] < lens_a[:, None]  # [S, Tmax]
    clip_frame = np.where(clip_valid, np.asarray(starts)[:, None] + t[None, :], 0)

    width = max(sum(r) for r in per_row)
    n_max = max(len(r) for r in per_row)
    out_clip = np.zeros((len(per_row), width), np.int32)
    out_frame = np.zeros((len(per_row), width), np.int32)
    out_valid = np.zeros((len(per_row), width), bool)
    out_lengths = np.zeros((len(per_row), n_max), np.int64)
    s = 0
    for b, row in enumerate(per_row):
        p = 0
        for j, n in enumerate(row):
            out_clip[b, p:p + n] = s
            out_frame[b, p:p + n] = np.arange(n)
            out_valid[b, p:p + n] = True
            out_lengths[b, j] = n
            p += n
            s += 1
    return ClipLayout(np.asarray(rows, np.int32), clip_frame.astype(np.int32), clip_valid, out_clip, out_frame,
                      out_valid, out_lengths)


def unwrap_clips(feats, layout: ClipLayout):
    """[B, T, C] wrapped -> [S, Tmax, C], one clip per row, zero-padded."""
    segs = feats[layout.clip_row[:, None], layout.clip_frame]  # [S, Tmax, C]
    return jnp.where(layout.clip_valid[..., None], segs, jnp.zeros((), feats.dtype))


def wrap_clips(clips, layout: ClipLayout):
    """[S, L, C] one clip per row -> [B, W, C]: each clip's first `out_lengths` frames, back to back, 0-padded."""
    out = clips[layout.out_clip, layout.out_frame]  # [B, W, C]
    return jnp.where(layout.out_valid[..., None], out, jnp.zeros((), clips.dtype))


# --- the tower --------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AudioFeatures:
    embeds: jax.Array  # [B, W, H] what the LLM receives (L2-normalised when norm_query_embeds)
    lengths: jax.Array  # [B, Nmax] int64 tokens per clip
    encoder_padded: jax.Array  # [S, T', D] encoder output, one zero-padded clip per row
    encoder_wrapped: jax.Array  # [B, W, D] encoder output re-wrapped with the projector's lengths (official)
    projected: jax.Array  # [B, W, H] projector output re-wrapped, before normalisation


class AudioTower(nnx.Module):
    """Whisper encoder + projector: the module whose parameters `ming_jax.weights.audio.audio_table` names."""

    def __init__(self, cfg: AudioConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        pdt = jnp.dtype(runtime.param_dtype)
        self.encoder = WhisperEncoder(cfg.encoder, param_dtype=pdt, rngs=rngs)
        self.projector = AudioProjector(cfg, param_dtype=pdt, rngs=rngs)

    def __call__(self, feats, layout: ClipLayout) -> AudioFeatures:
        """feats [B, T, n_mels] wrapped; `layout` from `clip_layout(lengths, T, cfg)`. Traceable."""
        cfg = self.cfg
        if feats.ndim != 3 or feats.shape[-1] != cfg.encoder.n_mels:
            raise ValueError(f"audio features: expected [batch, frames, {cfg.encoder.n_mels}] mel features, got "
                             f"{feats.shape}")
        with jax.named_scope("audio_tower"):
            clips = unwrap_clips(feats.astype(self.runtime.dtype), layout)  # [S, Tmax, M]
            enc = self.encoder(sharding.constrain_even(clips, _CLIPS))  # [S, T', D]
            proj = sharding.constrain_even(self.projector(enc), _CLIPS)  # [S, L', H]
            projected = sharding.constrain_even(wrap_clips(proj, layout), _CLIPS)  # [B, W, H]
            embeds = l2_normalize(projected) if cfg.norm_query_embeds else projected
        return AudioFeatures(embeds.astype(feats.dtype), jnp.asarray(layout.out_lengths), enc,
                             wrap_clips(enc, layout), projected)


@nnx.jit
def _tower(model: AudioTower, feats, layout: ClipLayout) -> AudioFeatures:
    return model(feats, layout)


def encode_audio(model: AudioTower, feats, lengths) -> AudioFeatures:
    """The official `extract_audio_feature`: wrapped mel features [B, T, n_mels] and clip lengths [B, N] (concrete)
    -> `AudioFeatures`. Compiles once per distinct (B, T, clip layout) shape."""
    feats = jnp.asarray(feats)
    if feats.ndim != 3 or feats.shape[-1] != model.cfg.encoder.n_mels:
        raise ValueError(f"audio features: expected [batch, frames, {model.cfg.encoder.n_mels}] mel features, got "
                         f"{feats.shape}")
    lengths = np.asarray(lengths)
    if lengths.ndim == 2 and lengths.shape[0] != feats.shape[0]:
        raise ValueError(f"audio lengths {lengths.shape} and features {feats.shape} disagree on the batch size")
    layout = clip_layout(lengths, feats.shape[1], model.cfg)
    # The lengths are host data: hand back the int64 array itself rather than its traced (int32) copy.
    return dataclasses.replace(_tower(model, feats, layout), lengths=layout.out_lengths)

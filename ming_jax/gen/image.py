"""Image generation and editing, as the release runs it, jitted:

    prompt (+ input images)  --condition-->  caption [B, N, Dc]     thinker forward + query tokens + connector
    seeded latents  --denoise (one lax.scan over the steps)-->  latents     Z-Image DiT, CFG as one batch of two
    latents  --VAE decode-->  image in [0, 1]  -> uint8

Classifier-free guidance: v = pos + g (pos - neg) with the all-zero negative caption (through the DiT wrapper's
caption handling, like the positive one), applied when g > 1 (diffusers' rule); g is traced, so another guidance
value does not recompile. Editing: the reference image is VAE-encoded (posterior mode, shifted and scaled) and given
to every DiT call as a second frame (`ref_x`).

Progress: the denoising loop reports each finished step to the listeners installed with `progress_listener` (a
`jax.debug.callback` to one module-level dispatcher, so the compiled loop never depends on who listens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.config.image_gen import ImageGenConfig
from ming_jax.config.llm import LLMConfig
from ming_jax.gen import flow_match
from ming_jax.models import inputs as multimodal
from ming_jax.models.image_gen import condition as cond_lib
from ming_jax.models.image_gen.condition import ImageGenHead, QueryPrompt
from ming_jax.models.image_gen.glyph import append_glyph_rows, encode_glyphs
from ming_jax.models.image_gen.dit import ZImageDiT
from ming_jax.models.image_gen.vae import AutoencoderKL, decode as vae_decode, encode_mode, postprocess
from ming_jax.models.llm import BailingMoeV2
from ming_jax.processors import glyph as glyph_lib

if TYPE_CHECKING:
    from ming_jax.checkpoint.glyph import GlyphBranch

# --- progress -------------------------------------------------------------------------------------------------------

_LISTENERS: list[Callable[[int, int], None]] = []


def _step_done(step, total):
    for fn in list(_LISTENERS):
        fn(int(step), int(total))


@contextlib.contextmanager
def progress_listener(fn: Callable[[int, int], None]) -> Iterator[None]:
    """Call `fn(step, total)` after each denoising step of loops run while the context is open."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


# --- the condition ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConditionInputs:
    prompt: QueryPrompt
    prepared: multimodal.Prepared  # the thinker's inputs (query rows hold zero features until the head fills them)
    query_flat: np.ndarray  # [B * Q] flat (b * S + s) positions of every query token, all scales, batch order
    grids: np.ndarray  # [n, 3] llm grids in prompt order (input images and query blocks)
    glyph_ids: np.ndarray | None = None  # [B, L] ByT5 byte ids of the text to render (None: no glyph rows)
    glyph_mask: np.ndarray | None = None  # [B, L] 0 / 1


def prepare_glyphs(glyph, prompt_texts) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The release's glyph inputs: the text to render of each chat-formatted prompt (`glyph_texts`: the last quoted
    span), byte-tokenized to byt5.json's max length; (None, None) when no prompt of the batch asks for text (the
    release then adds no rows) or there is no glyph branch."""
    if glyph is None or prompt_texts is None:
        return None, None
    texts = glyph_lib.glyph_texts(list(prompt_texts))
    if not glyph_lib.uses_glyphs(texts):
        return None, None
    tok = glyph.tokenizer()
    if tok.vocab_size > glyph.t5.vocab_size:
        raise ValueError(f"the glyph tokenizer has {tok.vocab_size} ids but the ByT5 embedding only "
                         f"{glyph.t5.vocab_size} rows")
    return tok(texts, glyph.config.max_length)


PROMPT_BUCKET = 64  # prompts (query block included) are right-padded to a multiple of this: one thinker program
# per bucket, not per prompt length (padding is masked out and sits after every real token, so nothing changes)


def prepare_condition(llm: LLMConfig, head: ImageGenHead | cond_lib.ImageGenHeadConfig, input_ids, attention_mask=None,
                      image_embeds=None, image_grid_thw=None, *, glyph=None, prompt_texts=None,
                      bucket: int = PROMPT_BUCKET) -> ConditionInputs:
    """Host side: append the query block(s), right-pad to a multiple of `bucket`, and place the thinker's inputs.
    `image_embeds` [n, D] are the input images' projected ViT rows (batch order), with their `image_grid_thw`.
    With a glyph branch (`ImageGenerator.glyph`) and the chat-formatted `prompt_texts` (one per row), the ByT5
    inputs too (`prepare_glyphs`). `attention_mask` None means every token is real."""
    cfg = head.cfg if isinstance(head, ImageGenHead) else head
    if llm.image_patch_token is None or llm.image_start_token != llm.image_patch_token + 1:
        raise ValueError(f"image generation needs the release's token layout image_start_token == image_patch_token "
                         f"+ 1 (the query block opens with <imagePatch> + 1); this LLM config has image_patch_token="
                         f"{llm.image_patch_token}, image_start_token={llm.image_start_token}")
    qp = cond_lib.append_query_block(cfg, input_ids, attention_mask, llm.image_patch_token)
    qp = cond_lib.pad_right(qp, bucket, 0 if llm.pad_token_id is None else llm.pad_token_id)
    grids = cond_lib.interleave_image_grids(qp, image_grid_thw, llm.image_patch_token)
    b, s = qp.input_ids.shape
    n_query = cfg.num_query_tokens
    patch = (qp.input_ids == llm.image_patch_token) & qp.attention_mask
    n_input = patch.sum(axis=1) - n_query  # each row's input-image patch rows
    given = 0 if image_embeds is None else int(np.asarray(image_embeds).shape[0])
    if n_input.sum() != given:
        raise ValueError(f"the prompts hold {int(n_input.sum())} input-image patch tokens but {given} image_embeds "
                         f"rows were given")
    width = llm.hidden_size
    if image_embeds is not None and (np.ndim(image_embeds) != 2 or np.shape(image_embeds)[1] != width):
        raise ValueError(f"image_embeds must be [rows, {width}] (the thinker width), got {np.shape(image_embeds)}")
    emb = np.zeros((0, width), np.float32) if image_embeds is None else np.asarray(image_embeds, np.float32)
    rows, used = [], 0
    for i in range(b):  # feature rows in flat prompt order: a row's input images, then its query tokens
        rows += [emb[used:used + n_input[i]], np.zeros((n_query, width), np.float32)]
        used += int(n_input[i])
    mm = multimodal.MultimodalInputs(image_embeds=np.concatenate(rows), image_grid_thw=grids)
    prep = multimodal.prepare(llm, qp.input_ids, qp.attention_mask, mm)
    query_flat = (np.arange(b)[:, None] * s + np.stack([np.flatnonzero(g) for g in qp.gen_mask])).reshape(-1)
    if prompt_texts is not None and len(prompt_texts) != b:
        raise ValueError(f"{len(prompt_texts)} prompt texts for a batch of {b}")
    g_ids, g_mask = prepare_glyphs(glyph, prompt_texts)
    return ConditionInputs(qp, prep, query_flat.astype(np.int32), grids, g_ids, g_mask)


def _condition_body(thinker: BailingMoeV2, head: ImageGenHead, arrays, query_flat, last_index, *, taps: bool):
    input_ids, attention_mask, positions, modality, features, feature_index = arrays
    b, s = input_ids.shape
    x = thinker.embed_tokens(input_ids, features, feature_index)
    d = x.shape[-1]
    queries = jnp.tile(head.query_tokens(x.dtype), (b, 1))  # [B * Q, D]
    x = x.reshape(b * s, d).at[query_flat].set(queries).reshape(b, s, d)
    out = thinker(x, positions, attention_mask=attention_mask, modality=modality,
                  logits_at=None if taps else jnp.zeros((b,), jnp.int32))
    hidden = jnp.take_along_axis(out.hidden, last_index[:, :, None], axis=1)  # [B, N, D]
    condition = head.condition(hidden)
    if not taps:
        return condition, None
    h_in = head.proj_in(hidden.astype(head.runtime.dtype))
    h_conn = head.connector(h_in, causal=False)
    return condition, dict(inputs_embeds=x, llm_final_hidden=out.hidden, llm_logits=out.logits, query_hidden=hidden,
                           proj_in=h_in, connector_out=h_conn, proj_out=head.proj_out(h_conn))


@functools.partial(jax.jit, static_argnames=("g_thinker", "g_head", "taps"))
def _condition(g_thinker, s_thinker, g_head, s_head, arrays, query_flat, last_index, *, taps):
    return _condition_body(nnx.merge(g_thinker, s_thinker), nnx.merge(g_head, s_head), arrays, query_flat,
                           last_index, taps=taps)


def condition(thinker: BailingMoeV2, head: ImageGenHead, inputs: ConditionInputs, *, taps: bool = False):
    """The condition [B, N, Dc] (L2-normalised rows); with `taps`, also the intermediates (thinker input embeddings,
    final hidden states, logits, query rows, proj_in, connector output, proj_out)."""
    g_t, s_t = nnx.split(thinker)
    g_h, s_h = nnx.split(head)
    p = inputs.prepared
    arrays = (p.input_ids, p.attention_mask, p.positions, p.modality, p.features, p.feature_index)
    return _condition(g_t, s_t, g_h, s_h, arrays, jnp.asarray(inputs.query_flat),
                      jnp.asarray(inputs.prompt.last_scale_index), taps=taps)


# --- denoising ------------------------------------------------------------------------------------------------------


def latent_shape(batch: int, channels: int, height: int, width: int, vae_scale: int) -> tuple[int, int, int, int]:
    """The pipeline's latent size: 2 * (H // (2 * vae_scale)) x 2 * (W // (2 * vae_scale))."""
    q = 2 * vae_scale
    if height % q or width % q:
        raise ValueError(f"image size {height}x{width} must be a multiple of {q} (2 x the VAE's scale factor "
                         f"{vae_scale}) in both dimensions")
    return batch, channels, 2 * (height // q), 2 * (width // q)


def initial_latents(key, shape) -> jax.Array:
    """Seeded N(0, 1) latents (float32). The release draws torch's generator; parity tests inject its draw."""
    return jax.random.normal(key, shape, jnp.float32)


def _denoise_body(graphdef, state, caption, negative, latents, sigmas, times, guidance, ref, *, cfg: bool,
                  record: bool):
    b = latents.shape[0]
    n = times.shape[0]
    dt = nnx.merge(graphdef, state).runtime.dtype
    cap = jnp.concatenate([caption, negative]) if cfg else caption
    ref_in = None if ref is None else (jnp.concatenate([ref, ref]) if cfg else ref)[:, :, None].astype(dt)

    def step(carry, i):
        x, params = carry  # the parameters ride in the carry: nnx modules do not cross trace levels, so the DiT is
        # merged from this scan's own tracers (the loop passes them through unchanged)
        x_in = x[:, :, None].astype(dt)  # [B, C, 1, h, w]
        if cfg:
            x_in = jnp.concatenate([x_in, x_in])
        t = jnp.broadcast_to(times[i], (x_in.shape[0],))
        dit = nnx.merge(graphdef, params)
        out = dit(x_in, t, cap.astype(dt), None, ref_in)  # [B', C, 1, h, w]
        out32 = out[:, :, 0].astype(jnp.float32)
        v = out32[:b] + guidance * (out32[:b] - out32[b:]) if cfg else out32
        x = x + (sigmas[i + 1] - sigmas[i]) * (-v)
        jax.debug.callback(_step_done, i + 1, n)
        return (x, params), ((out, x) if record else None)

    (x, _), trace = jax.lax.scan(step, (latents.astype(jnp.float32), state), jnp.arange(n))
    return x, trace


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "record"))
def _denoise(graphdef, state, caption, negative, latents, sigmas, times, guidance, ref, *, cfg, record):
    return _denoise_body(graphdef, state, caption, negative, latents, sigmas, times, guidance, ref, cfg=cfg,
                         record=record)


def denoise(dit: ZImageDiT, caption, latents, sched: flow_match.Schedule, *, guidance: float = 2.0, negative=None,
            ref_latent=None, record: bool = False):
    """Run the sampler: caption [B, L, Dc] (the DiT wrapper's output), latents [B, C, h, w] float32 noise.

    negative: the unconditional caption (default zeros, i.e. `caption * 0` before the wrapper's identity MLP; pass
    the wrapped zeros when the ToClip MLP is on). ref_latent [B, C, h, w]: the editing reference (VAE space).
    Returns the final latents, and with `record` (raw DiT outputs [N, B', C, 1, h, w], latents after each step
    [N, B, C, h, w])."""
    caption = jnp.asarray(caption)
    if negative is None:
        negative = jnp.zeros_like(caption)
    use_cfg = bool(guidance > 1.0)
    graphdef, state = nnx.split(dit)
    x, trace = _denoise(graphdef, state, caption, jnp.asarray(negative, caption.dtype), jnp.asarray(latents),
                        jnp.asarray(sched.sigmas), jnp.asarray(sched.model_times), jnp.float32(guidance),
                        None if ref_latent is None else jnp.asarray(ref_latent), cfg=use_cfg, record=record)
    return (x, trace) if record else x


# --- the whole path -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageGenerator:
    """The image-generation components of a release, loaded: thinker + head + DiT + VAE (+ the ByT5 glyph branch
    when the release has byt5/: `ming_jax.checkpoint.glyph.GlyphBranch`)."""

    cfg: ImageGenConfig
    thinker: BailingMoeV2
    head: ImageGenHead
    dit: ZImageDiT
    vae: AutoencoderKL
    glyph: "GlyphBranch | None" = None

    def captions(self, inputs: ConditionInputs):
        """(positive, negative) captions for the DiT: the condition, the glyph rows after it when the inputs have
        them (the negative gets zeros there), both through the DiT wrapper's caption handling."""
        cond, _ = condition(self.thinker, self.head, inputs)
        negative = jnp.zeros_like(cond)
        if inputs.glyph_ids is not None:
            if self.glyph is None:
                raise ValueError("the inputs carry glyph ids but this generator has no glyph branch")
            rows = encode_glyphs(self.glyph.encoder, self.glyph.mapper, inputs.glyph_ids, inputs.glyph_mask)
            cond, negative = append_glyph_rows(cond, negative, rows)
        return _wrap(self.head, cond), _wrap(self.head, negative)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _wrap_jit(graphdef, state, x):
    return nnx.merge(graphdef, state).caption(x)


def _wrap(head: ImageGenHead, x):
    g, s = nnx.split(head)
    return _wrap_jit(g, s, x)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, latents):
    return postprocess(vae_decode(nnx.merge(graphdef, state), latents))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, image):
    return encode_mode(nnx.merge(graphdef, state), image)


def decode_images(vae: AutoencoderKL, latents) -> jax.Array:
    """DiT-space latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1]."""
    g, s = nnx.split(vae)
    return _decode(g, s, jnp.asarray(latents))


def encode_reference(vae: AutoencoderKL, image) -> jax.Array:
    """A reference image [B, 3, H, W] in [-1, 1] -> DiT-space latents (posterior mode, shifted and scaled)."""
    g, s = nnx.split(vae)
    return _encode(g, s, jnp.asarray(image))


def to_uint8(images) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8, rounded as PIL conversion of the release's output."""
    x = np.asarray(images, np.float32)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def generate(gen: ImageGenerator, inputs: ConditionInputs, *, height: int, width: int, steps: int = 30,
             guidance: float = 2.0, seed: int = 0, reference=None) -> np.ndarray:
    """Prompt(s) -> uint8 images [B, H, W, 3]. reference [1 | B, 3, H, W] in [-1, 1]: edit that image (its size is
    the output size)."""
    caption, negative = gen.captions(inputs)
    b = caption.shape[0]
    shape = latent_shape(b, gen.cfg.dit.in_channels, height, width, gen.cfg.vae.scale_factor)
    ref = None
    if reference is not None:
        reference = np.asarray(reference, np.float32)
        if reference.ndim != 4 or reference.shape[0] not in (1, b) or reference.shape[1] != 3 or \
                reference.shape[2:] != (height, width):
            raise ValueError(f"reference image must be [1 or {b}, 3, {height}, {width}] in [-1, 1], got "
                             f"{reference.shape}")
        lo, hi = float(reference.min()), float(reference.max())
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:  # a [0, 255] or unnormalised image would edit silently wrong
            raise ValueError(f"reference image values lie in [{lo:.3g}, {hi:.3g}]; expected [-1, 1] "
                             f"(`ming_jax.processors.image_gen.reference_pixels` makes them)")
        ref = encode_reference(gen.vae, reference)
        if ref.shape[0] == 1 and b > 1:
            ref = jnp.repeat(ref, b, axis=0)
    sched = flow_match.schedule(gen.cfg.scheduler, steps, (shape[2] // 2) * (shape[3] // 2))
    latents = initial_latents(jax.random.key(seed), shape)
    final = denoise(gen.dit, caption, latents, sched, guidance=guidance, negative=negative, ref_latent=ref)
    return to_uint8(decode_images(gen.vae, final))


def from_loaded(loaded, glyph=None) -> ImageGenerator:
    """The image generator of a `ming_jax.checkpoint.restore.load(path, components=["llm", "image_gen"])` result,
    with the glyph branch `glyph` (`ming_jax.checkpoint.glyph.load_glyph(path)`) when the release has one."""
    if "image_gen" not in loaded.parts:
        raise ValueError(f"{loaded.path}: image generation was not loaded (loaded: {', '.join(loaded.parts)}); load "
                         f"with components including 'llm' and 'image_gen'")
    m = loaded.modules
    return ImageGenerator(loaded.parts["image_gen"].config, loaded.llm, m["image_head"], m["dit"], m["vae"], glyph)


def random_generator(cfg: ImageGenConfig, thinker: BailingMoeV2, runtime=None, *, seed: int = 0) -> ImageGenerator:
    """Random image-generation components around `thinker` (demos and tests without a checkpoint)."""
    rngs = nnx.Rngs(seed)
    head = ImageGenHead(cfg.head, thinker.cfg.hidden_size, cfg.connector, runtime, rngs=rngs)
    return ImageGenerator(cfg, thinker, head, ZImageDiT(cfg.dit, runtime, rngs=rngs), AutoencoderKL(cfg.vae, runtime,
                                                                                                      rngs=rngs))

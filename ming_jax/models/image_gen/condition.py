"""The image condition: learned query tokens read out of the thinker, through the Qwen2 connector, to the caption the
Z-Image DiT attends to.

    prompt ids  ->  + <image> q_1 .. q_{s*s} </image> per scale, after each row's last real token   (host, numpy)
                ->  one thinker forward: the query rows embed the learned tokens, route through the image gate and
                    sit at the release's 3-D rope positions (a 1 x s*s image grid after the 2x2 merge)
                ->  final-norm hidden states at the LAST scale's query rows
                ->  proj_in -> connector (Qwen2, every layer bidirectional, 1-D positions 0..N-1) -> proj_out
                ->  L2 normalise                                                      = the condition [B, N, Dc]
    caption     =   L2 normalise x 1000 (when `text_encoder_norm`) -> identity or the ToClip MLP     (the DiT wrapper)

The negative (unconditional) caption of classifier-free guidance is all zeros, as the release passes it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.config.image_gen import CLIP_MLP_HIDDEN, CLIP_MLP_OUT, ImageGenHeadConfig
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.config.runtime import Runtime
from ming_jax.layers.linear import Linear
from ming_jax.layers.norms import LayerNorm, l2_normalize
from ming_jax.layers.params import param, read
from ming_jax.models.qwen2 import Qwen2Model


def _unit_rows(key, shape, dtype):
    """The release initialises query tokens as L2-normalised Gaussian rows (the checkpoint overwrites them)."""
    x = jax.random.normal(key, shape, jnp.float32)
    return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)


class ClipMLP(nnx.Module):
    """The DiT wrapper's optional caption MLP (`use_identity_mlp: false`): Linear -> LayerNorm -> ReLU -> Linear ->
    LayerNorm, to the fixed Z-Image caption width."""

    def __init__(self, in_dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(in_dim, CLIP_MLP_HIDDEN, ("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.ln1 = LayerNorm(CLIP_MLP_HIDDEN, eps=1e-5, axis_name="norm", param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(CLIP_MLP_HIDDEN, CLIP_MLP_OUT, ("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)
        self.ln2 = LayerNorm(CLIP_MLP_OUT, eps=1e-5, axis_name="norm", param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.ln2(self.fc2(jax.nn.relu(self.ln1(self.fc1(x)))))


class ImageGenHead(nnx.Module):
    """What sits between the thinker and the DiT: `queries[j]` [s_j^2, D_llm] per scale, `proj_in`, the connector,
    `proj_out`, and (without the identity MLP) `clip_mlp`."""

    def __init__(self, cfg: ImageGenHeadConfig, llm_hidden: int, connector: Qwen2Config,
                 runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        pdt = jnp.dtype(runtime.param_dtype)
        self.queries = nnx.List([param(rngs, _unit_rows, (s * s, llm_hidden), (None, "embed"), pdt)
                                 for s in cfg.img_gen_scales])
        self.proj_in = Linear(llm_hidden, connector.hidden_size, ("embed", "mlp"), param_dtype=pdt, rngs=rngs)
        self.connector = Qwen2Model(connector, runtime, rngs=rngs, lm_head=True)  # a CausalLM checkpoint
        self.proj_out = Linear(connector.hidden_size, cfg.diffusion_c_input_dim, ("mlp", "embed"),
                               param_dtype=pdt, rngs=rngs)
        self.clip_mlp = None if cfg.use_identity_mlp else ClipMLP(cfg.diffusion_c_input_dim, param_dtype=pdt,
                                                                  rngs=rngs)

    def query_tokens(self, dtype=None):
        """All scales' query tokens in block order [sum s^2, D_llm]."""
        return jnp.concatenate([read(q, dtype) for q in self.queries], axis=0)

    def condition(self, query_hidden):
        """query_hidden [B, N, D_llm] (final-norm thinker states at the last scale's query rows) -> [B, N, Dc]."""
        dt = self.runtime.dtype
        x = self.proj_in(query_hidden.astype(dt))
        x = self.connector(x, causal=False)  # all-ones mask: every query token sees every other
        return l2_normalize(self.proj_out(x))

    def caption(self, condition):
        """The DiT wrapper's caption: [B, L, Dc] -> [B, L, caption_dim] (`wrap_caption`)."""
        return wrap_caption(condition, text_encoder_norm=self.cfg.text_encoder_norm, clip_mlp=self.clip_mlp)


def wrap_caption(x, *, text_encoder_norm: bool, clip_mlp: ClipMLP | None = None):
    """What the release's DiT wrapper does to every caption it is handed, positive and negative: L2 normalise and
    scale by 1000 (`text_encoder_norm`), then the identity or the ToClip MLP. A zero row stays zero through the
    normalisation (as torch's F.normalize), so the all-zero negative caption is only moved by the MLP's biases."""
    if text_encoder_norm:
        x = l2_normalize(x) * jnp.asarray(ImageGenHeadConfig.CAPTION_SCALE, x.dtype)
    return x if clip_mlp is None else clip_mlp(x)


# --- the query block in the prompt (host side) -------------------------------------------------------------------


@dataclasses.dataclass
class QueryPrompt:
    input_ids: np.ndarray  # [B, S + sum(s^2 + 2)] the prompt with the query block(s) after each row's real tokens
    attention_mask: np.ndarray  # [B, S'] bool
    gen_mask: np.ndarray  # [B, S'] bool: True at every query token of every scale
    last_scale_index: np.ndarray  # [B, N_last] positions of the last scale's query tokens in each row
    grids: np.ndarray  # [n_scales, 3] the llm grid of each query block, (1, 2, 2 s^2) as the release passes it


def append_query_block(cfg: ImageGenHeadConfig, input_ids, attention_mask, image_patch_token: int) -> QueryPrompt:
    """The release's `append_input_ids_with_multiscale_learnable_tokens`: for each scale s, `<image>` (patch + 1),
    s*s `<imagePatch>`, `</image>` (patch + 2), inserted after each row's real tokens (before its right padding).
    Rows must be right-padded: a mask with a 0 before a 1 is refused (the release would insert mid-prompt)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    n_real = mask.sum(axis=1)
    if not (mask == (np.arange(ids.shape[1])[None] < n_real[:, None])).all():
        raise ValueError("image generation needs right-padded prompts (every row's real tokens first)")
    block, gen = [], []
    for s in cfg.img_gen_scales:
        block += [image_patch_token + 1] + [image_patch_token] * (s * s) + [image_patch_token + 2]
        gen += [False] + [True] * (s * s) + [False]
    block_ids, block_gen = np.asarray(block, ids.dtype), np.asarray(gen, bool)
    rows_ids, rows_mask, rows_gen = [], [], []
    for b in range(ids.shape[0]):
        p = int(n_real[b])
        rows_ids.append(np.concatenate([ids[b, :p], block_ids, ids[b, p:]]))
        rows_mask.append(np.concatenate([mask[b, :p], np.ones(len(block), bool), mask[b, p:]]))
        rows_gen.append(np.concatenate([np.zeros(p, bool), block_gen, np.zeros(ids.shape[1] - p, bool)]))
    new_ids, new_mask, gen_mask = np.stack(rows_ids), np.stack(rows_mask), np.stack(rows_gen)
    last = cfg.img_gen_scales[-1] ** 2
    index = np.stack([np.flatnonzero(g)[-last:] for g in gen_mask]).astype(np.int32)
    grids = np.asarray([[1, 2, 2 * s * s] for s in cfg.img_gen_scales], np.int64)
    return QueryPrompt(new_ids, new_mask, gen_mask, index, grids)


def pad_right(prompt: QueryPrompt, multiple: int, pad_id: int) -> QueryPrompt:
    """The same prompts right-padded (masked out) to a multiple of `multiple` slots: fixed shapes for jit. Padding
    after every real token changes nothing the causal thinker computes at the real tokens."""
    if multiple < 1:
        raise ValueError(f"bucket multiple {multiple} must be >= 1")
    b, s = prompt.input_ids.shape
    extra = -s % multiple
    if not extra:
        return prompt
    pad = lambda a, v: np.pad(a, ((0, 0), (0, extra)), constant_values=v)  # noqa: E731
    return dataclasses.replace(prompt, input_ids=pad(prompt.input_ids, pad_id), attention_mask=pad(
        prompt.attention_mask, False), gen_mask=pad(prompt.gen_mask, False))


def interleave_image_grids(prompt: QueryPrompt, input_grids, image_patch_token: int) -> np.ndarray:
    """The llm grids in prompt order: each row's input images (their `image_grid_thw` rows, in batch order) and then
    its query blocks. [n, 3]."""
    input_grids = np.zeros((0, 3), np.int64) if input_grids is None else np.asarray(input_grids, np.int64).reshape(-1, 3)
    out, used = [], 0
    n_scales = len(prompt.grids)
    for b in range(prompt.input_ids.shape[0]):
        ids, real = prompt.input_ids[b], prompt.attention_mask[b]
        starts = np.flatnonzero((ids[:-1] == image_patch_token + 1) & (ids[1:] == image_patch_token) & real[1:])
        n_input = len(starts) - n_scales
        if n_input < 0 or used + n_input > len(input_grids):
            raise ValueError(f"batch row {b}: {max(n_input, 0)} input image block(s), but image_grid_thw has "
                             f"{len(input_grids) - used} row(s) left")
        out += list(input_grids[used:used + n_input]) + list(prompt.grids)
        used += n_input
    if used != len(input_grids):
        raise ValueError(f"image_grid_thw has {len(input_grids)} rows but the prompts hold {used} input images")
    return np.asarray(out, np.int64).reshape(-1, 3)

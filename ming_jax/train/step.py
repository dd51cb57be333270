"""The train step of the BailingMoeV2 backbone: loss, gradients, one AdamW update, the MoE bias update.

    graphdef, state = init_state(model, cfg)             # trainable / frozen split, float32 AdamW moments
    step = jax.jit(make_train_step(graphdef, cfg), donate_argnums=0)
    state, metrics = step(state, batch)

A batch is a dict of arrays (what `ming_jax.train.data` yields; B rows of T tokens):
  input_ids [B, T] int, targets [B, T] int (the next token of each position), loss_mask [B, T] (0: no loss, e.g.
  prompt tokens and padding; weights are allowed), segment_ids [B, T] int (0 = padding, 1, 2, ... = documents
  packed in a row, attending only within themselves), positions [B, T] (per-document token index) or [3, B, T]
  (the 3-D video-rope rows of `ming_jax.models.inputs.prepare`), and optionally modality [B, T] (the router of each
  token: TEXT / VISION / AUDIO), features [F, D] + feature_index [F] (media embeddings scattered into the flat
  b * T + t positions; an index outside [0, B*T) drops the row, so padded feature slots point at B*T), and
  optionally images for the vision tower, run inside the step (so it trains, or stays frozen by `TrainConfig`):
  pixel_values [B, P, patch_dim] in P patch slots per row with their layout patch_rows / patch_cols /
  patch_segment_ids [B, P] and patch_pos_index / patch_pos_weight [B, P, 4] (`ming_jax.models.vision.PackedLayout`),
  and vision_index [B, P / merge**2] (the row's token each merged image token fills; T: none). The model is then an
  `OmniModel` (its `llm`, `vision`, `vision_proj`); a `BailingMoeV2` takes text and feature rows.

The loss is the mean cross-entropy over the batch's loss tokens (+ z_loss * mean logsumexp^2, + the optional
sequence-wise balance loss, averaged per micro-batch). Micro-batches (every `grad_accum`-th row, so each device
keeps its rows) are scanned, each normalised by the whole batch's token count, and their gradients summed in
float32, so the cross-entropy and z-loss terms do not depend on `grad_accum`. Trainable parameters (`TrainConfig.trains`) get gradients and AdamW state; the rest (frozen parameters
and every router's `expert_bias`) ride along in `state.frozen`; the bias update writes the latter after the
optimizer step from the step's expert loads (`ming_jax.moe.balance`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ming_jax import sharding
from ming_jax.layers.norms import l2_normalize
from ming_jax.layers.params import LoraParam, LoraWeight, QuantizedParam
from ming_jax.models.omni import OmniModel
from ming_jax.models.vision import PackedLayout
from ming_jax.moe import balance
from ming_jax.train import loss as losses
from ming_jax.train.config import TrainConfig
from ming_jax.train.optimizer import make_optimizer, schedule

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
# Images for the vision tower inside the step (`ming_jax.train.data` with a MediaConfig), all or none of them.
PATCH_KEYS = ("pixel_values", "patch_rows", "patch_cols", "patch_pos_index", "patch_pos_weight", "patch_segment_ids",
              "vision_index")
OPTIONAL_KEYS = ("modality", "features", "feature_index") + PATCH_KEYS
_BIAS_SUFFIX = ("moe", "router", "expert_bias")


def path_keys(path) -> tuple[str, ...]:
    """A tree path's keys as strings ('moe_layers', 'moe', 'router', 'kernel'); attribute hops (a Variable's value)
    left out."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path
                 if not isinstance(k, jax.tree_util.GetAttrKey))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # trainable parameters
    frozen: nnx.State  # everything else the model holds (frozen parameters, expert biases)
    opt_state: Any  # the optax state over `params` (float32 moments)
    # float32 master copy of `params` when they are stored in a lower precision (None when they are float32):
    # the update is applied to it and `params` are its rounding, so updates below a bf16 ulp accumulate
    master: nnx.State | None = None


def split_model(model: nnx.Module, cfg: TrainConfig):
    """-> (graphdef, trainable State, frozen State) of a model by `cfg.trains` over its parameter paths. A
    `freeze` / `train_only` pattern that matches no parameter path is an error (a typo would train everything).

    The stored values of quantized weights (`QuantizedParam`: int8 / fp8 + scales) never train. A model with LoRA
    adapters (`ming_jax.lora`) trains only their factors (`LoraParam`) when `cfg.adapters_only` (the default):
    the base is frozen, and the optimizer holds state for the adapters alone. Merged adapters are refused (their
    delta is already in the frozen base, so their factors would get no gradient)."""
    paths = ["/".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    unmatched = [p for p in cfg.freeze + cfg.train_only if not any(re.search(p, path) for path in paths)]
    if unmatched:
        raise ValueError(f"TrainConfig: parameter pattern(s) {unmatched} match no parameter path (paths look like "
                         f"{paths[0]!r}, {paths[-1]!r})")
    quantized, lora, merged = set(), False, []
    for p, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedParam):
            quantized.update({tuple(p) + ("qvalue",), tuple(p) + ("scale",)})
        elif isinstance(node, LoraWeight):
            lora = True
            if node.merged:
                merged.append("/".join(map(str, p)))
    if merged:
        raise ValueError(f"train: LoRA adapters {merged[:4]} are merged into the base; unmerge_lora first")
    only_adapters = lora and cfg.adapters_only
    if only_adapters and cfg.bias_update_rate:
        raise ValueError(f"train: bias_update_rate={cfg.bias_update_rate} with LoRA adapters; the experts' biases "
                         "belong to the frozen base (a PEFT adapter could not carry their change): set "
                         "bias_update_rate=0 for a LoRA run")

    def trains(path, value):
        return (isinstance(value, nnx.Param) and tuple(path) not in quantized
                and (isinstance(value, LoraParam) or not only_adapters) and cfg.trains("/".join(map(str, path))))

    graphdef, params, frozen = nnx.split(model, trains, ...)
    if not jax.tree.leaves(params):
        raise ValueError("TrainConfig: no parameter is trainable (freeze / train_only exclude every parameter"
                         + (", and quantized weights never train" if quantized else "") + ")")
    return graphdef, params, frozen


def _f32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _needs_master(params) -> bool:
    return any(jnp.dtype(a.dtype) != jnp.float32 for a in jax.tree.leaves(params))


def init_state(model: nnx.Module, cfg: TrainConfig, tx: optax.GradientTransformation | None = None):
    """-> (graphdef, TrainState) with the optimizer initialised from float32 views of the trainable parameters (so
    both AdamW moments are float32 whatever the parameter dtype). The state holds the model's own arrays: a step
    jitted with the state donated consumes them (copy what you want to keep)."""
    graphdef, params, frozen = split_model(model, cfg)
    tx = make_optimizer(cfg, params) if tx is None else tx
    opt_state = tx.init(_f32(params))
    master = _f32(params) if _needs_master(params) else None
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, frozen, opt_state, master)


def abstract_state(abstract_model: nnx.Module, cfg: TrainConfig, tx: optax.GradientTransformation | None = None):
    """(graphdef, TrainState of ShapeDtypeStructs, tx) for an abstract model (`create_abstract`): what AOT compiles
    and what a checkpoint restores into; nothing is allocated."""
    graphdef, params, frozen = split_model(abstract_model, cfg)
    tx = make_optimizer(cfg, params) if tx is None else tx
    opt = jax.eval_shape(lambda p: tx.init(_f32(p)), params)
    master = jax.eval_shape(_f32, params) if _needs_master(params) else None
    return graphdef, TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, frozen, opt, master), tx


def state_shardings(state: TrainState, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    """NamedShardings of a TrainState: parameters by their logical axes, each AdamW moment like its parameter,
    step and optimizer counters replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_shard = sharding.variable_shardings(state.params, mesh, rules)
    o_shard = optax.tree_map_params(tx, lambda _, s: s, state.opt_state, p_shard,
                                    transform_non_params=lambda _: replicated)
    return TrainState(replicated, p_shard, sharding.variable_shardings(state.frozen, mesh, rules), o_shard,
                      None if state.master is None else p_shard)


def check_batch(batch: dict, *, grad_accum: int = 1, vocab_size: int | None = None) -> None:
    """Host-side checks of a batch's keys, shapes and values, each problem named (call before the jitted step)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    unknown = sorted(set(batch) - set(BATCH_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise ValueError(f"train batch: missing {missing}, unknown {unknown} (keys: {BATCH_KEYS} + optional "
                         f"{OPTIONAL_KEYS})")
    b, t = batch["input_ids"].shape
    for k in ("targets", "loss_mask", "segment_ids") + (("modality",) if "modality" in batch else ()):
        if tuple(batch[k].shape) != (b, t):
            raise ValueError(f"train batch: {k} has shape {tuple(batch[k].shape)}, input_ids {(b, t)}")
    if tuple(batch["positions"].shape) not in ((b, t), (3, b, t)):
        raise ValueError(f"train batch: positions has shape {tuple(batch['positions'].shape)}; expected {(b, t)} "
                         f"or {(3, b, t)}")
    if ("features" in batch) != ("feature_index" in batch):
        raise ValueError("train batch: features and feature_index come together")
    if "features" in batch and batch["features"].shape[:1] != batch["feature_index"].shape:
        raise ValueError(f"train batch: features {tuple(batch['features'].shape)} vs feature_index "
                         f"{tuple(batch['feature_index'].shape)}")
    patch = [k for k in PATCH_KEYS if k in batch]
    if patch and len(patch) != len(PATCH_KEYS):
        raise ValueError(f"train batch: image keys come together; missing {sorted(set(PATCH_KEYS) - set(patch))}")
    if patch:
        pix = batch["pixel_values"]
        if pix.ndim != 3 or pix.shape[0] != b:
            raise ValueError(f"train batch: pixel_values has shape {tuple(pix.shape)}; expected [{b}, slots, "
                             "patch_dim]")
        p = pix.shape[1]
        want = dict(patch_rows=(b, p), patch_cols=(b, p), patch_segment_ids=(b, p), patch_pos_index=(b, p, 4),
                    patch_pos_weight=(b, p, 4))
        for k, shape in want.items():
            if tuple(batch[k].shape) != shape:
                raise ValueError(f"train batch: {k} has shape {tuple(batch[k].shape)}, expected {shape}")
        vi = batch["vision_index"]
        if vi.ndim != 2 or vi.shape[0] != b or not vi.shape[1] or p % vi.shape[1]:
            raise ValueError(f"train batch: vision_index has shape {tuple(vi.shape)}; expected [{b}, slots / "
                             f"merge**2] for {p} patch slots")
        for k in ("patch_rows", "patch_cols", "patch_segment_ids", "patch_pos_index", "vision_index"):
            if np.asarray(batch[k]).dtype.kind not in "iu":
                raise ValueError(f"train batch: {k} must be integers, got {np.asarray(batch[k]).dtype}")
        v = np.asarray(vi)
        if v.size and (v.min() < 0 or v.max() > t):
            raise ValueError(f"train batch: vision_index outside [0, {t}] ({t}: no token)")
    if b % grad_accum:
        raise ValueError(f"train batch of {b} rows does not split into grad_accum={grad_accum} micro-batches")
    for k in ("input_ids", "targets", "segment_ids", "positions") + tuple(
            k for k in ("modality", "feature_index") if k in batch):
        if np.asarray(batch[k]).dtype.kind not in "iu":
            raise ValueError(f"train batch: {k} must be integers, got {np.asarray(batch[k]).dtype}")
    if vocab_size is not None:
        for k in ("input_ids", "targets"):
            v = np.asarray(batch[k])
            if v.size and (v.min() < 0 or v.max() >= vocab_size):
                raise ValueError(f"train batch: {k} outside [0, {vocab_size}) (min {v.min()}, max {v.max()}); "
                                 "a target without loss goes with loss_mask 0, not -100")
    weights = np.asarray(batch["loss_mask"])
    if weights.size and weights.min() < 0:
        raise ValueError("train batch: negative loss_mask weights")
    seg = np.asarray(batch["segment_ids"])
    if seg.size and (seg.min() < 0 or seg.max() > t):
        raise ValueError(f"train batch: segment_ids outside [0, {t}]")


def _micro_batches(batch: dict, a: int) -> dict:
    """Rows r -> micro-batch r % a, local row r // a (strided, so a device's contiguous rows serve every micro-batch);
    feature indices re-based per micro-batch (rows of other micro-batches point out of range)."""
    b, t = batch["input_ids"].shape
    split = lambda x, axis=0: jnp.moveaxis(  # noqa: E731
        x.reshape(x.shape[:axis] + (b // a, a) + x.shape[axis + 1:]), axis + 1, 0)
    out = {k: split(batch[k]) for k in ("input_ids", "targets", "loss_mask", "segment_ids") + tuple(
        k for k in ("modality",) + PATCH_KEYS if k in batch)}  # image keys are per row (vision_index row-local)
    pos = batch["positions"]
    out["positions"] = split(pos, axis=pos.ndim - 2)
    if "features" in batch:
        idx = batch["feature_index"].astype(jnp.int32)
        row, col = idx // t, idx % t
        inside = (idx >= 0) & (idx < b * t)
        local = (row // a) * t + col  # [F]
        m = jnp.arange(a)[:, None]
        out["feature_index"] = jnp.where(inside[None] & (row[None] % a == m), local[None], (b // a) * t)  # [a, F]
        out["features"] = jnp.broadcast_to(batch["features"], (a,) + batch["features"].shape)
    return out


def language_model(model) -> nnx.Module:
    """The BailingMoeV2 a train step runs: the model itself, or an `OmniModel`'s `llm`."""
    return model.llm if isinstance(model, OmniModel) else model


def _image_embeddings(model, mb: dict):
    """The packed images of a micro-batch through the vision tower and projector, L2-normalised (the omni
    model's image embeddings): [b, P / merge**2, D]."""
    if not isinstance(model, OmniModel) or model.vision is None:
        raise ValueError("train batch holds images (pixel_values) but the model has no vision tower: train an "
                         "OmniModel with a vision config")
    layout = PackedLayout(mb["patch_rows"].astype(jnp.int32), mb["patch_cols"].astype(jnp.int32),
                          mb["patch_pos_index"].astype(jnp.int32), mb["patch_pos_weight"].astype(jnp.float32),
                          mb["patch_segment_ids"].astype(jnp.int32))
    out = model.vision.packed(mb["pixel_values"], layout)
    hidden = out[0] if model.vision.use_deepstack else out
    with jax.named_scope("vision_projector"):
        proj = model.vision_proj(hidden)
        # Merged rows of empty slots can be exact zeros, whose L2 norm has a NaN gradient; they fill no token.
        used = mb["vision_index"] < mb["input_ids"].shape[1]
        return l2_normalize(jnp.where(used[..., None], proj, jnp.ones((), proj.dtype)))


def _forward_losses(model, mb: dict, cfg: TrainConfig):
    """One micro-batch -> (nll sum, z sum, balance-loss term, loads [Lm, R, E] or None)."""
    ids = mb["input_ids"]
    b, t = ids.shape
    llm = language_model(model)
    llm_cfg = llm.cfg
    x = llm.embed_tokens(ids)
    d = x.shape[-1]
    if "features" in mb:
        x = x.reshape(b * t, d).at[mb["feature_index"]].set(mb["features"].astype(x.dtype), mode="drop")
        x = x.reshape(b, t, d)
    if "pixel_values" in mb:
        emb = _image_embeddings(model, mb)  # [b, P / merge**2, D]
        vi = mb["vision_index"].astype(jnp.int32)
        flat = jnp.where(vi < t, jnp.arange(b, dtype=jnp.int32)[:, None] * t + vi, b * t)  # b * t: dropped
        x = x.reshape(b * t, d).at[flat.reshape(-1)].set(emb.reshape(-1, d).astype(x.dtype), mode="drop")
        x = x.reshape(b, t, d)
    x = sharding.constrain(x, ("batch", "seq", "act_embed"))
    pos = mb["positions"]
    pos = jnp.broadcast_to(pos[None], (3, b, t)) if pos.ndim == 2 else pos
    modality = mb.get("modality")
    segments = mb["segment_ids"].astype(jnp.int32)
    routed = llm_cfg.num_moe_layers > 0
    out = llm(x, pos.astype(jnp.int32), attention_mask=segments, modality=modality, collect=routed)
    nll, z = losses.chunked_cross_entropy(llm.head_weight(), out.hidden, mb["targets"], mb["loss_mask"], cfg.loss_chunk)
    if not routed:
        return nll, z, jnp.zeros((), jnp.float32), None
    r = out.routing  # experts [Lm, B*T, K], logits [Lm, B*T, E]
    valid = (segments > 0).reshape(-1)
    router = (jnp.zeros((b * t,), jnp.int32) if modality is None or llm_cfg.num_routers == 1
              else modality.reshape(-1).astype(jnp.int32))
    loads = losses.expert_loads(jax.lax.stop_gradient(r.experts), llm_cfg.num_experts, router,
                                llm_cfg.num_routers, valid)
    aux = jnp.zeros((), jnp.float32)
    if cfg.seq_aux_loss:
        seq_id = (jnp.arange(b)[:, None] * (t + 1) + segments).reshape(-1)  # one id per (row, document): ids <= t
        aux = losses.sequence_balance_loss(r.experts, r.logits, seq_id, valid, llm_cfg.num_experts,
                                           llm_cfg.num_experts_per_tok, b * (t + 1))
    return nll, z, aux, loads


def make_grad_fn(graphdef, cfg: TrainConfig) -> Callable:
    """(params, frozen, batch) -> (float32 gradients of the step's objective w.r.t. params, sums): the micro-batch
    loop of the step. sums: total (the objective), nll / z (weighted sums over the batch's loss tokens), aux (the
    balance-loss term, averaged over micro-batches), loads [Lm, R, E] (when the model has MoE layers), denom (the
    batch's loss-token count the sums are divided by)."""

    def grads_and_sums(params, frozen, batch):
        a = cfg.grad_accum
        denom = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        micro = _micro_batches(batch, a)

        def micro_loss(params, frozen, mb):
            # Fresh Variables for the frozen leaves, created at this (differentiated) trace level like the params':
            # nnx transforms inside the model refuse a graph mixing Variables of two trace levels.
            model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))
            nll, z, aux, loads = _forward_losses(model, mb, cfg)
            total = (nll + cfg.z_loss * z) / denom + cfg.seq_aux_loss * aux / a
            return total, (nll, z, aux, loads)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, mb):
            grads, sums = carry
            (total, (nll, z, aux, loads)), g = grad_fn(params, frozen, mb)
            grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
            new = dict(total=total, nll=nll, z=z, aux=aux / a)
            if loads is not None:
                new["loads"] = loads
            return (grads, jax.tree.map(jnp.add, sums, new)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        sums0 = {k: jnp.zeros((), jnp.float32) for k in ("total", "nll", "z", "aux")}
        llm_cfg = language_model(nnx.merge(graphdef, params, frozen)).cfg  # static: the module's config
        if llm_cfg.num_moe_layers:
            sums0["loads"] = jnp.zeros((llm_cfg.num_moe_layers, llm_cfg.num_routers, llm_cfg.num_experts))
        if a == 1:
            (grads, sums), _ = accumulate((zeros, sums0), jax.tree.map(lambda x: x[0], micro))
        else:
            (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), micro)
        sums["denom"] = denom
        return grads, sums

    return grads_and_sums


def make_train_step(graphdef, cfg: TrainConfig, tx: optax.GradientTransformation | None = None) -> Callable:
    """(TrainState, batch) -> (TrainState, metrics): one optimizer step over the whole batch (jit it; donate the
    state). `tx` defaults to `make_optimizer(cfg, params)`, built from the traced parameters' metadata.

    metrics: loss (mean next-token cross-entropy), z_loss and balance_loss (the mean terms before their
    coefficients), total (what was differentiated), grad_norm (before clipping), learning_rate (of this step),
    tokens (loss tokens), expert_load [Lm, R, E] (tokens per MoE layer, router and expert) when the model has MoE
    layers."""
    grads_and_sums = make_grad_fn(graphdef, cfg)

    def step(state: TrainState, batch: dict):
        opt = make_optimizer(cfg, state.params) if tx is None else tx
        grads, sums = grads_and_sums(state.params, state.frozen, batch)
        grad_norm = optax.tree.norm(grads)
        masters = _f32(state.params) if state.master is None else state.master
        updates, opt_state = opt.update(grads, state.opt_state, masters)  # float32 arithmetic throughout
        masters = jax.tree.map(jnp.add, masters, updates)
        params = jax.tree.map(lambda p, m: m.astype(p.dtype), state.params, masters)
        frozen = state.frozen
        if "loads" in sums and cfg.bias_update_rate:
            frozen = _update_biases(frozen, sums["loads"], cfg.bias_update_rate)
        denom = sums["denom"]
        metrics = dict(loss=sums["nll"] / denom, z_loss=sums["z"] / denom, balance_loss=sums["aux"],
                       total=sums["total"], grad_norm=grad_norm, learning_rate=schedule(cfg)(state.step),
                       tokens=denom)
        if "loads" in sums:
            metrics["expert_load"] = sums["loads"]
        return TrainState(state.step + 1, params, frozen, opt_state, None if state.master is None else masters), metrics

    return step


def _update_biases(frozen: nnx.State, loads, rate: float) -> nnx.State:
    """Every router's expert bias [Lm, R, E] (the stacked MoE layers') moved by the balancing rule."""
    found = []

    def one(path, leaf):
        keys = path_keys(path)
        if keys[-3:] == _BIAS_SUFFIX:
            found.append(keys)
            if leaf.shape != loads.shape:
                raise ValueError(f"expert bias {'/'.join(keys)} has shape {leaf.shape}, loads {loads.shape}")
            return balance.update_bias(leaf, loads, rate)
        return leaf

    out = jax.tree_util.tree_map_with_path(one, frozen)
    if len(found) != 1:
        raise ValueError(f"expected one stacked expert-bias leaf, found {['/'.join(k) for k in found]}")
    return out


def active_flops_per_token(llm_cfg, seq: int) -> float:
    """Training FLOPs per token on active parameters: 6 x (active matmul parameters) + the attention scores /
    values (12 x layers x heads x head_dim x seq / 2, causal). The embedding lookup is not a matmul."""
    c = llm_cfg
    d, hd = c.hidden_size, c.head_dim
    attn = d * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * d
    dense = 3 * d * c.intermediate_size
    moe = 3 * d * c.moe_intermediate_size * (c.num_experts_per_tok + c.num_shared_experts) + c.num_routers * d * c.num_experts
    matmul = c.num_layers * attn + c.num_dense_layers * dense + c.num_moe_layers * moe + d * c.vocab_size
    attention = 12 * c.num_layers * c.num_heads * hd * seq / 2
    return 6.0 * matmul + attention


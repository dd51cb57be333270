"""The train step against independent references.

* The official PyTorch backward: loss and the gradient of every parameter of the release's BailingMoeV2ForCausalLM
  (tiny config, float32) on a text batch and on a multimodal batch (image / audio / video features at their
  placeholders, 3-D positions, all three routers), from `tests/data/train_reference` (made by
  `tools/make_train_reference.py` with the official code; see its README for the blob ids). Our gradients are
  mapped to official names with the weight table's export transforms, which are linear.
* torch.optim.AdamW (+ clip_grad_norm_) for the optimizer update.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ming_jax.checkpoint import restore
from ming_jax.models import inputs as multimodal
from ming_jax.parity import golden, numerics
from ming_jax.parity.cases.llm_backbone import multimodal_inputs
from ming_jax.train import batch as train_batch
from ming_jax.train import step as train_step
from ming_jax.train.config import TrainConfig
from ming_jax.weights import llm as llm_weights
from ming_jax.weights import table as weight_table

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "train_reference")


@pytest.fixture(scope="module")
def case():
    return golden.load_case(REFERENCE)


def _batch(case, tag: str, cfg) -> dict:
    x = {k.split(".", 1)[1]: v for k, v in case.inputs.items() if k.startswith(tag + ".")}
    mm = multimodal_inputs(x) if "query_embeds_image" in x else None
    prep = multimodal.prepare(cfg, x["input_ids"], mm=mm)
    return train_batch.from_labels(prep, x["labels"])


def _official_grads(model, grads) -> dict:
    """Our gradient tree -> {official name: array} through the weight table (expert biases: zero, untrained)."""
    arrays = {path: np.zeros(shape, np.float32) for path, shape in weight_table.param_shapes(model).items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        arrays[".".join(train_step.path_keys(path))] = np.asarray(leaf)
    return weight_table.export_arrays(llm_weights.llm_table(model.cfg), arrays)


@pytest.mark.parametrize("tag", ["text", "mm"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_loss_and_every_gradient_match_the_official_backward(case, tag, grad_accum):
    if tag == "mm" and grad_accum > 1:
        pytest.skip("the multimodal batch has one row")
    model = restore.load_tensors(case.config, case.weights, components=("llm",), source=case.path).llm
    cfg = TrainConfig(grad_accum=grad_accum, bias_update_rate=0.0, loss_chunk=7)  # 7: a ragged last chunk
    graphdef, params, frozen = train_step.split_model(model, cfg)
    batch = _batch(case, tag, model.cfg)
    if tag == "mm":
        assert {"modality", "features", "feature_index"} <= set(batch) and batch["positions"].shape[0] == 3
        assert len(np.unique(batch["modality"])) == 3  # text, vision and audio routers all take tokens
    grads, sums = jax.jit(train_step.make_grad_fn(graphdef, cfg))(params, frozen, batch)
    rows = [numerics.compare(f"{tag}.loss", np.asarray(sums["nll"] / sums["denom"]), case.outputs[f"{tag}.loss"])]
    ours = _official_grads(model, grads)
    want = {k.split(".grad.", 1)[1]: v for k, v in case.outputs.items() if k.startswith(f"{tag}.grad.")}
    assert sorted(ours) == sorted(set(want) | {k for k in ours if k.endswith("expert_bias")})
    rows += [numerics.compare(f"{tag}.grad.{k}", ours[k], want[k]) for k in sorted(want)]
    assert numerics.all_ok(rows), numerics.report([r for r in rows if not r.ok])
    # the routers' kernels and the routed experts take real gradients (the release's inference code blocks them)
    assert np.abs(want["model.layers.1.mlp.gate.weight"]).max() > 0
    assert np.abs(want["model.layers.1.mlp.experts.0.up_proj.weight"]).max() > 0


def test_packed_rows_equal_separate_documents(case):
    """Two documents packed in one row (segment ids, per-document positions) give the loss and gradients of the
    same documents as separate (padded) rows."""
    model = restore.load_tensors(case.config, case.weights, components=("llm",), source=case.path).llm
    cfg = TrainConfig(bias_update_rate=0.0)
    graphdef, params, frozen = train_step.split_model(model, cfg)
    sep = _batch(case, "text", model.cfg)  # documents A, B: 2 rows x 24
    cut, n = 15, 24
    cat = lambda k: np.concatenate([sep[k][0], sep[k][1, :cut]])[None]  # noqa: E731  A then B[:cut]
    packed = dict(input_ids=cat("input_ids"), targets=cat("targets"), loss_mask=cat("loss_mask"),
                  segment_ids=np.r_[np.ones(n), np.full(cut, 2)].astype(np.int32)[None],
                  positions=np.r_[np.arange(n), np.arange(cut)].astype(np.int32)[None])
    pad = lambda k: np.stack([sep[k][0], np.r_[sep[k][1, :cut], np.zeros(n - cut)]]).astype(sep[k].dtype)  # noqa
    two = dict(input_ids=pad("input_ids"), targets=pad("targets"), loss_mask=pad("loss_mask"),
               segment_ids=np.stack([np.ones(n), np.r_[np.ones(cut), np.zeros(n - cut)]]).astype(np.int32),
               positions=np.stack([np.arange(n), np.r_[np.arange(cut), np.zeros(n - cut)]]).astype(np.int32))
    fn = jax.jit(train_step.make_grad_fn(graphdef, cfg))
    g_packed, s_packed = fn(params, frozen, packed)
    g_two, s_two = fn(params, frozen, two)
    assert float(s_packed["denom"]) == float(s_two["denom"]) > 10
    numerics.assert_close("loss", s_packed["nll"] / s_packed["denom"], s_two["nll"] / s_two["denom"])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_packed)[0], jax.tree.leaves(g_two)):
        numerics.assert_close("/".join(train_step.path_keys(path)), a, b)


def test_adamw_update_matches_torch():
    """Four steps of our optimizer (clipping, AdamW, decay on matrices only, warmup schedule) against
    torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW with one parameter group per decay setting."""
    torch = pytest.importorskip("torch")
    from flax import nnx

    from ming_jax.train.optimizer import make_optimizer, schedule

    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10, b1=0.8, b2=0.9, eps=1e-6,
                      weight_decay=0.3, max_grad_norm=0.5)
    rng = np.random.default_rng(0)
    shapes = {"w": (5, 4), "scale": (4,), "stack": (3, 4, 2), "scales": (3, 4)}

    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.asarray(rng.standard_normal(shapes["w"]), jnp.float32), out_sharding=("a", "b"), eager_sharding=False)
            self.scale = nnx.Param(jnp.asarray(rng.standard_normal(shapes["scale"]), jnp.float32),
                                   out_sharding=("b",), eager_sharding=False)
            self.stack = nnx.Param(jnp.asarray(rng.standard_normal(shapes["stack"]), jnp.float32),
                                   out_sharding=("layers", "b", "c"), eager_sharding=False)  # a matrix per layer
            self.scales = nnx.Param(jnp.asarray(rng.standard_normal(shapes["scales"]), jnp.float32),
                                    out_sharding=("layers", "b"), eager_sharding=False)  # a vector per layer

    params = nnx.state(M(), nnx.Param)
    tx = make_optimizer(cfg, params)
    opt = tx.init(params)
    tp = {k: torch.tensor(np.asarray(params[k][...]), requires_grad=True) for k in shapes}
    topt = torch.optim.AdamW([{"params": [tp["w"], tp["stack"]], "weight_decay": cfg.weight_decay},
                              {"params": [tp["scale"], tp["scales"]], "weight_decay": 0.0}],
                             lr=1.0, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    assert float(schedule(cfg)(0)) == 0.0  # warmup starts at 0: step 0 moves nothing, steps 1-3 compare updates
    for step in range(4):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        g_state = jax.tree.map(lambda p: p, params)
        for k in shapes:
            g_state[k].set_value(jnp.asarray(grads[k]))
        updates, opt = tx.update(g_state, opt, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for k in shapes:
            tp[k].grad = torch.from_numpy(grads[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), cfg.max_grad_norm)
        for group in topt.param_groups:
            group["lr"] = float(schedule(cfg)(step))
        topt.step()
        for k in shapes:
            numerics.assert_close(f"step {step} {k}", params[k][...], tp[k].detach().numpy())


def test_grad_accumulation_rebases_media_rows(case):
    """Two multimodal rows (media features scattered into both) with grad_accum 2 give the gradients of
    grad_accum 1: each micro-batch receives exactly its own rows' features; padded feature slots (index B*T) and
    negative indices are dropped, not wrapped."""
    model = restore.load_tensors(case.config, case.weights, components=("llm",), source=case.path).llm
    one = _batch(case, "mm", model.cfg)
    t = one["input_ids"].shape[1]
    two = {k: np.concatenate([v, v], axis=-2 if k == "positions" else 0) for k, v in one.items()
           if k not in ("features", "feature_index")}
    n = len(one["feature_index"])
    two["features"] = np.concatenate([one["features"], one["features"][::-1], np.ones((2, one["features"].shape[1]),
                                                                                      np.float32)])
    two["feature_index"] = np.concatenate([one["feature_index"], one["feature_index"][::-1] + t,
                                           [2 * t, -1]]).astype(np.int32)  # row 1 gets the same rows; 2 dropped
    assert len(two["features"]) == 2 * n + 2
    grads = {}
    for a in (1, 2):
        cfg = TrainConfig(grad_accum=a, bias_update_rate=0.0)
        graphdef, params, frozen = train_step.split_model(model, cfg)
        grads[a], sums = jax.jit(train_step.make_grad_fn(graphdef, cfg))(params, frozen, two)
        numerics.assert_close(f"loss a={a}", sums["nll"] / sums["denom"], case.outputs["mm.loss"])
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(grads[2])[0], jax.tree.leaves(grads[1])):
        numerics.assert_close("/".join(train_step.path_keys(path)), x, y)
    # both rows repeat the reference row, so the mean loss and its gradients are the reference's
    ours = _official_grads(model, grads[2])
    numerics.assert_close("lm_head grad", ours["lm_head.weight"], case.outputs["mm.grad.lm_head.weight"])


def test_sequence_balance_loss_matches_a_numpy_reference():
    """DeepSeek-V3 eq. 17-20 written out per sequence in numpy (f_i = E / (K T) * count, P_i = mean normalised
    affinity), summed over layers, averaged over sequences; padding excluded."""
    from ming_jax.train.loss import sequence_balance_loss

    rng = np.random.default_rng(0)
    layers, n, e, k = 2, 12, 8, 2
    logits = rng.standard_normal((layers, n, e)).astype(np.float32)
    experts = np.stack([np.argsort(-logits[i] + rng.standard_normal((n, e)), -1)[:, :k] for i in range(layers)])
    seq = np.array([0, 0, 0, 1, 1, 1, 1, 5, 5, 5, 5, 5])
    valid = np.ones(n, bool)
    valid[[2, 11]] = False
    want = []
    for sid in np.unique(seq):
        rows = (seq == sid) & valid
        if not rows.any():
            continue
        total = 0.0
        for i in range(layers):
            s = 1 / (1 + np.exp(-logits[i][rows]))
            p = (s / s.sum(-1, keepdims=True)).mean(0)
            f = np.bincount(experts[i][rows].reshape(-1), minlength=e) * e / (k * rows.sum())
            total += (f * p).sum()
        want.append(total)
    got = sequence_balance_loss(jnp.asarray(experts), jnp.asarray(logits), jnp.asarray(seq), jnp.asarray(valid), e, k,
                                num_segments=8)
    numerics.assert_close("seq balance loss", np.asarray(got), np.asarray(np.mean(want), np.float32))

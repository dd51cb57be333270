"""LoRA / QLoRA (`ming_jax.lora`): a fresh adapter changes nothing, merge / unmerge, gradients by the chain rule
through the merged weight, a tiny run lowers the loss with optimizer state for the adapters only (float and int8
base), exact resume, the PEFT export checked against the official tensors through our own loader, the train CLI,
and the refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from ming_jax import lora, quant
from ming_jax.checkpoint import restore
from ming_jax.config.llm import LLMConfig
from ming_jax.layers.params import LoraParam, QuantizedParam
from ming_jax.models import llm
from ming_jax.parity import golden, numerics
from ming_jax.processors import prompt as prompt_lib
from ming_jax.train import data as data_lib
from ming_jax.train import loop
from ming_jax.train import step as train_step
from ming_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ("attention", "mlp", "shared_expert", "experts")
T = 8
SMALL = LLMConfig.tiny(num_layers=2)  # one dense layer, one (scanned) MoE layer: every kind of target, less to compile


def _inputs(cfg, b=2, t=T, seed=1):
    ids = jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)
    return ids, jnp.broadcast_to(jnp.arange(t), (3, b, t))


_forward = nnx.jit(lambda m, i, p: m(m.embed_tokens(i), p).logits)


def _randomize_b(model, seed=3, std=0.05):
    """Non-zero B factors (a fresh adapter's are zero), so that the adapters change the model."""
    for k, w in enumerate(lora.adapters(model).values()):
        w.lora_b.set_value(std * jax.random.normal(jax.random.key(seed + k), w.lora_b.shape, w.lora_b.dtype))


def _batch(cfg, b=4, t=16, seed=0):
    """A learnable batch: every row the same short cycle of tokens."""
    rng = np.random.default_rng(seed)
    cycle = rng.integers(0, cfg.vocab_size, 5)
    ids = np.tile(cycle, (b, t // 5 + 2))[:, :t + 1]
    return dict(input_ids=ids[:, :-1].astype(np.int32), targets=ids[:, 1:].astype(np.int32),
                loss_mask=np.ones((b, t), np.float32), segment_ids=np.ones((b, t), np.int32),
                positions=np.broadcast_to(np.arange(t), (b, t)).astype(np.int32))


def _values(tree) -> dict:
    return {"/".join(map(str, p)): np.array(v.get_value()) for p, v in nnx.to_flat_state(tree)}


# ------------------------------------------------------------------------------------------------- the model


def test_fresh_adapters_change_nothing_merge_and_unmerge():
    cfg = SMALL
    model = llm.create(cfg, host=True)
    ids, pos = _inputs(cfg)
    ref = np.asarray(_forward(model, ids, pos))
    base = _values(nnx.state(model, nnx.Param))
    lora.add_lora(model, lora.LoraConfig(4, 8.0, ALL), seed=1)
    assert set(lora.adapters(model)) == {
        "dense_layers.0.attn.qkv", "dense_layers.0.attn.out", "dense_layers.0.mlp.gate", "dense_layers.0.mlp.up",
        "dense_layers.0.mlp.down", "moe_layers.attn.qkv", "moe_layers.attn.out", "moe_layers.moe.shared.gate",
        "moe_layers.moe.shared.up", "moe_layers.moe.shared.down", "moe_layers.moe.w_gate", "moe_layers.moe.w_up",
        "moe_layers.moe.w_down"}
    w = model.moe_layers.moe.w_gate  # [L, E, D, F] -> A [L, E, D, r], B [L, E, r, F], axis names kept
    assert w.lora_a.shape == (1, 16, 128, 4) and w.lora_b.shape == (1, 16, 4, 32)
    assert w.lora_a.get_metadata()["out_sharding"] == ("layers", "experts", "expert_embed", "lora_rank")
    assert model.dense_layers[0].attn.qkv.lora_b.get_metadata()["out_sharding"] == (
        "lora_rank", "kv_heads", "qkv", "head_dim")
    np.testing.assert_array_equal(np.asarray(_forward(model, ids, pos)), ref)  # B = 0

    _randomize_b(model)
    adapted = np.asarray(_forward(model, ids, pos))
    assert numerics.compare("adapted", adapted, ref).rel > 1e-2, "the adapters change the logits"
    lora.merge_lora(model)
    numerics.assert_close("merged logits", np.asarray(_forward(model, ids, pos)), adapted)
    lora.unmerge_lora(model)
    numerics.assert_close("unmerged logits", np.asarray(_forward(model, ids, pos)), adapted)
    # unmerge: base = fl(fl(base + d) - d), at most one float32 rounding of each step off the original
    for path, w in lora.adapters(model).items():
        b0 = base[path.replace(".", "/")]
        d = np.asarray(w.delta())
        bound = 2 * np.finfo(np.float32).eps * (np.abs(b0) + np.abs(d))
        assert (np.abs(np.asarray(w.base.get_value()) - b0) <= bound).all(), path
    lora.remove_lora(model)  # unmerged adapters dropped: the original model
    np.testing.assert_allclose(np.asarray(_forward(model, ids, pos)), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_lora_gradients_are_the_chain_rule_through_the_merged_weight():
    """dL/dA = s G B^T, dL/dB = s A^T G, with G = dL/dW the gradient of the plain model at W = base + s A B."""
    cfg = SMALL
    model = llm.create(cfg, host=True)
    lora.add_lora(model, lora.LoraConfig(3, 6.0, ALL), seed=2)
    _randomize_b(model)
    tcfg = TrainConfig(bias_update_rate=0.0)
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg).items()}
    graphdef, params, frozen = train_step.split_model(model, tcfg)
    grads, _ = jax.jit(train_step.make_grad_fn(graphdef, tcfg))(params, frozen, batch)
    grads = _values(grads)
    ws = {p: (np.asarray(w.lora_a.get_value()), np.asarray(w.lora_b.get_value()), w.n_in, w.scale)
          for p, w in lora.adapters(model).items()}

    plain = lora.remove_lora(nnx.clone(model), merge=True)
    targets = tuple("^" + p.replace(".", "/") + "$" for p in ws)
    g2, p2, f2 = train_step.split_model(plain, tcfg.replace(train_only=targets))
    g_w, _ = jax.jit(train_step.make_grad_fn(g2, tcfg))(p2, f2, batch)
    g_w = _values(g_w)
    for path, (a, b, n_in, s) in ws.items():
        g = g_w[path.replace(".", "/")]
        n_lead = a.ndim - 1 - n_in
        lead, r = a.shape[:n_lead], a.shape[-1]
        g3 = g.reshape(lead + (int(np.prod(a.shape[n_lead:-1])), -1))  # [lead..., I, O]
        a3, b3 = a.reshape(lead + (-1, r)), b.reshape(lead + (r, -1))
        want_a = s * np.einsum("...io,...ro->...ir", g3, b3).reshape(a.shape)
        want_b = s * np.einsum("...ir,...io->...ro", a3, g3).reshape(b.shape)
        numerics.assert_close(f"{path} dA", grads[path.replace(".", "/") + "/lora_a"], want_a)
        numerics.assert_close(f"{path} dB", grads[path.replace(".", "/") + "/lora_b"], want_b)


# ------------------------------------------------------------------------------------------------ training


def _train(model, steps, lr=1e-2):
    tcfg = TrainConfig(learning_rate=lr, warmup_steps=1, total_steps=steps, bias_update_rate=0.0, weight_decay=0.0)
    graphdef, state = train_step.init_state(model, tcfg)
    step = jax.jit(train_step.make_train_step(graphdef, tcfg), donate_argnums=0)
    batch = _batch(model.cfg)
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.parametrize("qtype", [None, "int8"])
def test_lora_run_lowers_the_loss_training_only_the_adapters(qtype):
    cfg = SMALL
    model = llm.create(cfg, host=True)
    if qtype:
        quant.quantize_model(model, qtype)
        with pytest.raises(ValueError, match="quantized routed-expert stack"):
            lora.add_lora(nnx.clone(model), lora.LoraConfig(4, targets=("experts",)))
    lora.add_lora(model, lora.LoraConfig(8, 16.0), seed=0)
    if qtype:
        assert isinstance(model.moe_layers.attn.qkv.base, QuantizedParam)
        with pytest.raises(ValueError, match="quantized bases"):
            lora.merge_lora(model)
    frozen_before = _values(nnx.state(model, nnx.Param))
    frozen_before = {k: v for k, v in frozen_before.items() if not k.endswith(("lora_a", "lora_b"))}
    state, losses = _train(model, 15, lr=2e-2)
    print(f"{qtype or 'float'} base: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0], losses[::3]
    # only the adapter factors are trainable, and the optimizer's moments are exactly theirs
    trained = _values(state.params)
    assert trained and all(k.endswith(("/lora_a", "/lora_b")) for k in trained)
    assert all(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(state.params))
    n_lora = sum(v.size for v in trained.values())
    assert n_lora == lora.param_count(model)
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * n_lora
    after = _values(state.frozen)  # the base did not move (expert biases: balancing is off)
    for k, v in frozen_before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


@pytest.mark.slow
def test_lora_run_resumes_exactly(tmp_path):
    """A 2-step run saving every step; its copy without the step-2 checkpoint resumes from step 1 to the same state."""
    cfg_llm = SMALL
    data = data_lib.write_sample(tmp_path / "d.jsonl", n=32, seed=1)
    spec = {"stand_in": prompt_lib.tiny_special_ids(cfg_llm)}
    lcfg = lora.LoraConfig(4, 8.0)

    def run(workdir):
        data_cfg = data_lib.TrainData(paths=(data,), seq_len=32, batch_size=2, seed=3)
        train_cfg = TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=4, bias_update_rate=0.0)
        run_cfg = loop.RunConfig(workdir=str(workdir), steps=2, log_every=1, save_every=1, keep=3,
                                 tensorboard=False, progress=False, async_save=False)
        return loop.run(lambda mesh, rules: lora.add_lora(llm.create(cfg_llm, seed=5, host=True), lcfg, seed=1),
                        lora.add_lora(llm.create_abstract(cfg_llm), lcfg), train_cfg, data_cfg, spec, run_cfg,
                        meta={"model": "small", "lora": lcfg.to_json()})

    full = run(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "2")
    rest = run(tmp_path / "split")
    assert full.resumed_from is None and rest.resumed_from == 1
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in full.history[1:]]
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(rest.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(k.endswith(("lora_a", "lora_b")) for k in _values(rest.state.params))


# ----------------------------------------------------------------------------------------------- PEFT export


def test_peft_export_applied_to_the_official_tensors_gives_our_logits(golden_dir, tmp_path):
    """Independent check of the names and layouts: W_official + (alpha / r) B @ A on the golden case's official
    state dict, loaded through the weight table, gives the logits of our adapted model."""
    case = golden.load_case(golden_dir / "llm_backbone")
    official = {k: np.asarray(v) for k, v in case.weights.items()}
    model = restore.load_tensors(case.config, official, components=("llm",)).llm
    lora.add_lora(model, lora.LoraConfig(4, 8.0, ALL + ("lm_head",)), seed=4)
    _randomize_b(model, std=0.02)
    ids, pos = _inputs(model.cfg, t=12)
    ours = np.asarray(_forward(model, ids, pos))

    dst = lora.export_peft(model, str(tmp_path / "adapter"))
    assert sorted(os.listdir(dst)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads(open(os.path.join(dst, "adapter_config.json")).read())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    tensors = load_file(os.path.join(dst, "adapter_model.safetensors"))
    modules = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in tensors})
    linear = sorted(k[:-len(".weight")] for k in official if official[k].ndim == 2 and "gate.weight" not in k
                    and "word_embeddings" not in k)
    assert modules == linear, "every official Linear but the routers and the embedding, and nothing else"
    assert all(re.fullmatch(config["target_modules"], m) for m in modules)
    assert not any(re.fullmatch(config["target_modules"], k[:-len(".weight")]) for k in official
                   if k[:-len(".weight")] not in modules)
    modified = dict(official)
    scale = config["lora_alpha"] / config["r"]
    for m in modules:
        a, b = tensors[f"base_model.model.{m}.lora_A.weight"], tensors[f"base_model.model.{m}.lora_B.weight"]
        w = official[m + ".weight"]
        assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4), m
        modified[m + ".weight"] = w + scale * b @ a
    theirs = np.asarray(_forward(restore.load_tensors(case.config, modified, components=("llm",)).llm, ids, pos))
    numerics.assert_close("logits: PEFT-applied official weights vs our adapters", theirs, ours)


# ------------------------------------------------------------------------------------------------- CLI, errors


@pytest.mark.slow
def test_cli_trains_qlora_and_exports_the_adapter(tmp_path):
    """One short `train --lora_rank --quantize int8` run (resume is the library's: test_lora_run_resumes_exactly)."""
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "ming_jax.train", f"--workdir={work}", "--preset=tiny", "--batch_size=2",
           "--seq_len=32", "--log_every=1", "--warmup_steps=1", "--steps=2", "--lora_rank=4", "--lora_alpha=8",
           "--lora_targets=attention,shared_expert", "--quantize=int8", "--notensorboard"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LoRA r=4 alpha=8" in r.stdout and "base int8 frozen" in r.stdout, r.stdout
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["loss"]) for row in rows)
    tensors = load_file(str(work / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_B.weight" in tensors
    assert not (work / "export").exists()


def test_bad_settings_are_refused():
    cfg = LLMConfig.tiny()
    for bad in (dict(rank=0), dict(rank=4, alpha=0.0), dict(rank=4, targets=("(",))):
        with pytest.raises(ValueError, match="LoraConfig"):
            lora.LoraConfig(**bad)
    abstract = llm.create_abstract(cfg)
    with pytest.raises(ValueError, match="matches no parameter path"):
        lora.add_lora(abstract, lora.LoraConfig(4, targets=("attn\\.nothing$",)))
    with pytest.raises(ValueError, match="not a projection"):
        lora.add_lora(abstract, lora.LoraConfig(4, targets=("^embed$",)))
    lora.add_lora(abstract, lora.LoraConfig(4))
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.add_lora(abstract, lora.LoraConfig(4, targets=("attention",)))
    with pytest.raises(ValueError, match="abstract"):
        lora.merge_lora(abstract)
    with pytest.raises(ValueError, match="bias_update_rate"):
        train_step.split_model(abstract, TrainConfig())
    model = lora.add_lora(llm.create(cfg, host=True), lora.LoraConfig(2, targets=("mlp",)))
    with pytest.raises(ValueError, match="not merged"):
        lora.unmerge_lora(model)
    lora.merge_lora(model)
    with pytest.raises(ValueError, match="already merged"):
        lora.merge_lora(model)
    with pytest.raises(ValueError, match="merged into the base"):
        train_step.split_model(model, TrainConfig(bias_update_rate=0.0))
    with pytest.raises(ValueError, match="the checkpoint was written with lora="):  # resume with other adapters
        loop._check_resume({"lora": lora.LoraConfig(4).to_json()}, {"lora": lora.LoraConfig(8).to_json()})
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.export_peft(llm.create_abstract(cfg), "/nonexistent/never-written")

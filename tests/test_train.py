"""Training behaviour: a tiny model overfits a packed multimodal batch, the expert-bias rule against a numpy
recomputation of the loads, exact resume, a crash mid-save, the CLI end to end (train -> resume -> generate)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ming_jax.checkpoint import restore
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.config.modality import AUDIO, TEXT, VISION
from ming_jax.models import inputs as multimodal
from ming_jax.models import llm as model_lib
from ming_jax.parity import golden
from ming_jax.parity.cases.llm_backbone import multimodal_inputs
from ming_jax.processors import prompt as prompt_lib
from ming_jax.train import batch as train_batch
from ming_jax.train import checkpoint as ckpt
from ming_jax.train import data as data_lib
from ming_jax.train import loop
from ming_jax.train import step as train_step
from ming_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "tests", "data", "train_reference")


def _mm_packed(case, cfg):
    """Two documents in one row: the reference's multimodal prompt (image, audio, video features, 3-D positions,
    three routers) then its first text row; loss on every text target."""
    x = {k.split(".", 1)[1]: v for k, v in case.inputs.items() if k.startswith("mm.")}
    prep = multimodal.prepare(cfg, x["input_ids"], mm=multimodal_inputs(x))
    mm = train_batch.from_labels(prep, np.where(prep.modality == TEXT, x["input_ids"], -100))
    ids = case.inputs["text.input_ids"][:1]
    text = train_batch.from_labels(multimodal.prepare(cfg, ids), ids)
    s1 = mm["input_ids"].shape[1]
    cat = lambda k: np.concatenate([mm[k], text[k]], axis=-1)  # noqa: E731
    pos_text = text["positions"] + mm["positions"].max() + 1 - text["positions"].min()  # any offset: rope is relative
    return dict(input_ids=cat("input_ids"), targets=cat("targets"), loss_mask=cat("loss_mask"),
                segment_ids=np.concatenate([mm["segment_ids"], 2 * text["segment_ids"]], -1),
                positions=np.concatenate([mm["positions"], pos_text], -1),
                modality=np.concatenate([mm["modality"], np.full_like(text["input_ids"], TEXT)], -1),
                features=mm["features"], feature_index=mm["feature_index"]), s1


def test_tiny_model_overfits_a_packed_multimodal_batch():
    case = golden.load_case(REFERENCE)
    model = restore.load_tensors(case.config, case.weights, components=("llm",), source=case.path).llm
    batch, _ = _mm_packed(case, model.cfg)
    assert set(np.unique(batch["modality"])) == {TEXT, VISION, AUDIO}
    cfg = TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=200, seq_aux_loss=1e-4, z_loss=1e-4)
    bias0 = np.array(model.moe_layers.moe.router.expert_bias[...])  # a copy: the step donates the model's arrays
    graphdef, state = train_step.init_state(model, cfg)
    step = jax.jit(train_step.make_train_step(graphdef, cfg), donate_argnums=0)
    losses = []
    for _ in range(60):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    loads = np.asarray(m["expert_load"])  # every router took tokens, and the bias of each moved
    assert (loads.sum(-1) > 0).all()
    bias = np.asarray(state.frozen["moe_layers"]["moe"]["router"]["expert_bias"][...])
    assert (np.abs(bias - bias0).max(-1) > 0).all()


@pytest.mark.slow
def test_bias_update_follows_the_loads_of_each_router():
    """One step's expert-bias change equals rate * sign(mean - load) with loads recounted in numpy from the
    model's own routing (collect=True), per MoE layer and router; a router without tokens keeps its bias."""
    cfg_llm = LLMConfig.tiny()
    model = model_lib.create(cfg_llm, seed=1)
    rng = np.random.default_rng(0)
    b, t = 2, 16
    ids = rng.integers(0, 900, (b, t)).astype(np.int32)
    modality = np.where(rng.random((b, t)) < 0.3, VISION, TEXT).astype(np.int32)  # no audio tokens
    seg = np.ones((b, t), np.int32)
    seg[1, 12:] = 0  # padding takes no load
    batch = dict(input_ids=ids, targets=np.roll(ids, -1, 1), loss_mask=(seg > 0).astype(np.float32),
                 segment_ids=seg, positions=np.broadcast_to(np.arange(t), (b, t)).astype(np.int32),
                 modality=modality)
    rate = 0.01
    cfg = TrainConfig(bias_update_rate=rate, learning_rate=1e-3)
    bias0 = np.asarray(model.moe_layers.moe.router.expert_bias[...])
    out = model(model.embed_tokens(ids), np.broadcast_to(batch["positions"][None], (3, b, t)),
                attention_mask=seg, modality=modality, collect=True)
    experts = np.asarray(out.routing.experts)  # [Lm, B*T, K]
    graphdef, state = train_step.init_state(model, cfg)
    state, _ = jax.jit(train_step.make_train_step(graphdef, cfg))(state, batch)
    bias1 = np.asarray(state.frozen["moe_layers"]["moe"]["router"]["expert_bias"][...])
    valid = seg.reshape(-1) > 0
    for j in range(experts.shape[0]):
        for r in range(3):
            rows = valid & (modality.reshape(-1) == r)
            load = np.bincount(experts[j][rows].reshape(-1), minlength=cfg_llm.num_experts).astype(np.float64)
            want = bias0[j, r] + rate * np.sign(load.mean() - load)
            np.testing.assert_allclose(bias1[j, r], want, rtol=0, atol=1e-7)
            if r == AUDIO:
                np.testing.assert_array_equal(bias1[j, r], bias0[j, r])


def _tiny_run(workdir, steps, data_path, *, save_every=2):
    cfg_llm = LLMConfig.tiny()
    spec = {"stand_in": prompt_lib.tiny_special_ids(cfg_llm)}
    data_cfg = data_lib.TrainData(paths=(data_path,), seq_len=64, batch_size=2, seed=3)
    train_cfg = TrainConfig(learning_rate=1e-3, warmup_steps=2, total_steps=8, grad_accum=2)
    run_cfg = loop.RunConfig(workdir=str(workdir), steps=steps, log_every=1, save_every=save_every, keep=5,
                             tensorboard=False, progress=False)
    return loop.run(lambda mesh, rules: model_lib.create(cfg_llm, seed=5), model_lib.create_abstract(cfg_llm),
                    train_cfg, data_cfg, spec, run_cfg, meta={"model": "tiny"})


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    data = data_lib.write_sample(tmp_path / "d.jsonl", n=64, seed=1)
    full = _tiny_run(tmp_path / "full", 6, data)
    first = _tiny_run(tmp_path / "split", 3, data, save_every=3)
    rest = _tiny_run(tmp_path / "split", 6, data)
    assert first.resumed_from is None and rest.resumed_from == 3
    assert [r["loss"] for r in full.history] == [r["loss"] for r in first.history + rest.history]
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(rest.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


_KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import jax
    from orbax.checkpoint._src.path import atomicity
    from ming_jax.config.llm import LLMConfig
    from ming_jax.models import llm as model_lib
    from ming_jax.train import checkpoint as ckpt, step as train_step
    from ming_jax.train.config import TrainConfig

    directory, reference = sys.argv[1], sys.argv[2]
    _, state = train_step.init_state(model_lib.create(LLMConfig.tiny(), seed=2), TrainConfig())
    c = ckpt.Checkpointer(directory, save_every=1, keep=3, async_save=True)
    c.save(1, state, data={"pos": 1}, force=True)
    c.wait()
    np.savez(reference, *[np.asarray(x) for x in jax.tree.leaves(state)])
    def die(*args, **kwargs):  # the save's data is written; the process dies before the rename that publishes it
        os.kill(os.getpid(), signal.SIGKILL)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    state = jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, state)
    c.save(2, state, data={"pos": 2}, force=True)
    c.wait()
    print("not killed")
""")


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path):
    directory, reference = tmp_path / "ck", tmp_path / "ref.npz"
    r = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(directory), str(reference)], capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-3000:]
    assert any(p.name.startswith("2.") for p in directory.iterdir()), "the kill came mid-save of step 2"
    c = ckpt.Checkpointer(str(directory))
    assert c.all_steps() == [1]
    _, abstract, _ = train_step.abstract_state(model_lib.create_abstract(LLMConfig.tiny()), TrainConfig())
    state, data, _ = c.restore(abstract)
    c.close()
    assert data == {"pos": 1} and int(state.step) == 0
    want = np.load(reference)
    for i, leaf in enumerate(jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(leaf), want[f"arr_{i}"])
    assert not any(p.name.startswith("2.") for p in directory.iterdir()), "the partial save is cleaned up"


@pytest.mark.slow
def test_cli_trains_resumes_and_exports_for_generate(tmp_path):
    work = tmp_path / "run"
    base = [sys.executable, "-m", "ming_jax.train", f"--workdir={work}", "--preset=tiny", "--batch_size=2",
            "--seq_len=64", "--log_every=1", "--save_every=2", "--warmup_steps=1", "--schedule_steps=6"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(base + ["--steps=2", "--noexport"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(base + ["--steps=3"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 2" in r.stdout
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in rows)
    assert list((work / "tensorboard").iterdir())
    # a changed data setting is refused instead of silently breaking the stream
    r = subprocess.run(base + ["--steps=4", "--seed=9"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode != 0 and "the checkpoint was written with seed=0" in r.stderr, r.stderr[-2000:]
    # the export loads with the library loader and generates through the CLI
    loaded = restore.load(str(work / "export"), components=("llm",)).llm
    assert isinstance(loaded, model_lib.BailingMoeV2)
    r = subprocess.run([sys.executable, "-m", "ming_jax.generate", f"--checkpoint={work / 'export'}",
                        "--prompt=reverse: ab", "--max_new_tokens=4"], capture_output=True, text=True, env=env,
                       cwd=REPO)
    assert r.returncode == 0 and "+++" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("flagfile", sorted(f for f in os.listdir(os.path.join(REPO, "configs", "train"))))
def test_train_config_files_parse_and_build(flagfile):
    """Every shipped run config names only flags the CLI defines, with values it accepts, and its --freeze /
    --train_only patterns match parameters of the model (a pattern that matches nothing is an error)."""
    import copy

    from absl import flags

    from ming_jax.cli import train as train_cli

    fv = flags.FlagValues()  # copies: parsing must not touch the process-wide FLAGS
    for flag in flags.FLAGS.get_flags_for_module(train_cli.__name__):
        fv[flag.name] = copy.deepcopy(flag)
    fv(["train", f"--flagfile={os.path.join(REPO, 'configs', 'train', flagfile)}"])
    steps = fv["schedule_steps"].value or fv["steps"].value
    cfg = TrainConfig(warmup_steps=min(fv["warmup_steps"].value, steps - 1), total_steps=steps,
                      freeze=tuple(fv["freeze"].value), train_only=tuple(fv["train_only"].value))
    train_step.split_model(model_lib.create_abstract(LLMConfig.tiny()), cfg)


def test_unmatched_freeze_pattern_is_refused():
    with pytest.raises(ValueError, match="match no parameter"):
        train_step.split_model(model_lib.create_abstract(LLMConfig.tiny()), TrainConfig(freeze=("experts_typo",)))


@pytest.mark.slow
def test_bf16_parameters_train_through_a_float32_master():
    """Stored bf16, updated in float32: updates far below a bf16 ulp accumulate in the master, the parameters are
    its rounding, and after enough steps they move (rounding each update into bf16 would leave them in place)."""
    cfg_llm = LLMConfig.tiny()
    model = model_lib.create(cfg_llm, Runtime(param_dtype="bfloat16"), seed=0)
    cfg = TrainConfig(learning_rate=1e-4, warmup_steps=0, total_steps=200, weight_decay=0.0, max_grad_norm=None)
    graphdef, state = train_step.init_state(model, cfg)
    assert state.master is not None
    scale0 = np.array(state.params["final_norm"]["scale"][...].astype(np.float32))  # ~1: bf16 ulp 2^-7
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 900, (2, 17)).astype(np.int32)
    batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=np.ones((2, 16), np.float32),
                 segment_ids=np.ones((2, 16), np.int32), positions=np.broadcast_to(np.arange(16), (2, 16)).astype(
                     np.int32))
    step = jax.jit(train_step.make_train_step(graphdef, cfg), donate_argnums=0)
    for _ in range(80):
        state, _ = step(state, batch)
    master = np.asarray(state.master["final_norm"]["scale"][...])
    stored = state.params["final_norm"]["scale"][...]
    assert stored.dtype == np.dtype("bfloat16") and master.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(stored), master.astype(stored.dtype))
    moved = np.abs(master - scale0)
    assert moved.max() > 2 ** -8, "80 steps of ~1e-4 (each below half a bf16 ulp) accumulated past it"
    assert (np.asarray(stored.astype(np.float32)) != scale0).any()


def test_resume_tolerates_a_torn_metrics_line(tmp_path):
    data = data_lib.write_sample(tmp_path / "d.jsonl", n=32, seed=1)
    _tiny_run(tmp_path / "run", 2, data)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # a process killed mid-append
    rest = _tiny_run(tmp_path / "run", 3, data)
    assert rest.resumed_from == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_from_labels_masks_padding_on_both_sides():
    """Left-padded rows: no position of the padding takes loss, and the first real token is not a target."""
    cfg_llm = LLMConfig.tiny()
    ids = np.array([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    b = train_batch.from_labels(multimodal.prepare(cfg_llm, ids, mask), ids)
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 1, 1, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(b["targets"][0, 2:4], [6, 7])

"""Sharded training on 8 host CPU devices: a run checkpointed under one mesh resumes under another (orbax reads
each new shard's slice), and both follow the single-device run.

Needs 8 host devices: `tests/multidevice.py` asks for them on import, and runs this file again in a subprocess when
another module started jax first (a whole-suite run).
"""

import multidevice  # first: asks for 8 host devices before jax starts
import jax
import numpy as np

from ming_jax import sharding
from ming_jax.config.llm import LLMConfig
from ming_jax.models import llm as model_lib
from ming_jax.parity import numerics
from ming_jax.processors import prompt as prompt_lib
from ming_jax.train import data as data_lib
from ming_jax.train import loop
from ming_jax.train.config import TrainConfig

multi = multidevice.multi
test_suite_in_subprocess = multidevice.suite_in_subprocess(__file__)


def _run(workdir, steps, data_path, mesh=None, rules="fsdp"):
    cfg = LLMConfig.tiny()
    spec = {"stand_in": prompt_lib.tiny_special_ids(cfg)}
    data_cfg = data_lib.TrainData(paths=(data_path,), seq_len=64, batch_size=8, seed=0)
    train_cfg = TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=4)
    run_cfg = loop.RunConfig(workdir=str(workdir), steps=steps, log_every=1, save_every=2, keep=3, mesh=mesh,
                             rules=rules, tensorboard=False, progress=False)
    return loop.run(lambda mesh, rules: model_lib.create(cfg, seed=4), model_lib.create_abstract(cfg), train_cfg,
                    data_cfg, spec, run_cfg, meta={"model": "tiny"})


@multi
def test_resume_onto_another_mesh_follows_the_single_device_run(tmp_path):
    data = data_lib.write_sample(tmp_path / "d.jsonl", n=64, seed=2)
    ref = _run(tmp_path / "ref", 4, data)
    a = _run(tmp_path / "run", 2, data, mesh="fsdp=8", rules="fsdp")
    b = _run(tmp_path / "run", 4, data, mesh="fsdp=4,tensor=2", rules="fsdp_tp")
    assert b.resumed_from == 2
    # restored and updated under the new mesh: the embedding is split by the fsdp_tp rules on (fsdp=4, tensor=2)
    embed = b.state.params["embed"][...]
    assert embed.sharding.spec == sharding.logical_to_spec(("vocab", "embed"), sharding.ShardingRules.preset("fsdp_tp"))
    assert len(embed.sharding.device_set) == 8
    losses = [r["loss"] for r in a.history + b.history]
    assert len(losses) == len(ref.history) == 4
    for got, want in zip(losses, [r["loss"] for r in ref.history]):
        numerics.assert_close("loss", np.float32(got), np.float32(want))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(b.state.params)[0], jax.tree.leaves(ref.state.params)):
        numerics.assert_close(jax.tree_util.keystr(path), np.asarray(x), np.asarray(y))

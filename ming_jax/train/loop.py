"""The training loop: data -> jitted, sharded train step -> metrics (progress bar, JSONL, TensorBoard) ->
checkpoints; resumes from the newest checkpoint of its work directory, exactly.

    result = train_loop.run(model_fn, abstract_model, train_cfg, data_cfg, tokenizer_spec, run_cfg)

`model_fn(mesh, rules)` builds the starting model on the run's mesh (None, None without one: random init, or a
converted / release checkpoint) and is called only when
the work directory holds no checkpoint; `abstract_model` (`create_abstract`) gives the structure a checkpoint is
restored into. Work directory layout:

    <workdir>/checkpoints/<step>/{state,data,meta}   orbax (`ming_jax.train.checkpoint`)
    <workdir>/metrics.jsonl                          one JSON object per logged step
    <workdir>/tensorboard/                           TensorBoard event files (tensorboardX)
    <workdir>/export/                                the final model as a release-format folder (`export_dir`)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file
from tensorboardX import SummaryWriter
from tqdm import tqdm

from ming_jax import sharding
from ming_jax.moe import balance
from ming_jax.config.modality import GATE_NAMES
from ming_jax.train import checkpoint as ckpt
from ming_jax.train import data as data_lib
from ming_jax.train import step as train_step
from ming_jax.train.config import TrainConfig
from ming_jax.weights import llm as llm_weights
from ming_jax.weights import table as weight_table

# Peak dense bf16 FLOP/s per chip, from the vendors' spec sheets; MFU is reported only for these.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str
    steps: int  # total optimizer steps of the run (a resumed run continues up to this)
    log_every: int = 10
    save_every: int = 500
    keep: int = 3
    async_save: bool = True
    mesh: str | None = None  # e.g. "fsdp=8" or "fsdp=16,expert=4" (None: one device, no mesh)
    rules: str = "fsdp"  # sharding preset used with `mesh`
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float | None = None  # per chip; default from PEAK_FLOPS by device kind (None there: no MFU)

    def __post_init__(self):
        if self.steps < 1 or self.log_every < 1:
            raise ValueError(f"RunConfig: steps={self.steps} and log_every={self.log_every} must be >= 1")


@dataclasses.dataclass
class Result:
    state: train_step.TrainState
    graphdef: Any
    history: list[dict]  # the logged rows of this invocation
    resumed_from: int | None
    stopped_early: bool  # preemption


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return flops
    return None


def maybe_initialize_distributed(force: bool = False) -> bool:
    """`jax.distributed.initialize()` for a run of several processes (one per TPU host): when `force` (the CLI's
    --distributed, for TPU pod slices, where jax finds the coordinator from the TPU metadata) or when
    JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES / JAX_PROCESS_ID: any other cluster). Returns whether
    it did."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        n, pid = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(address, None if n is None else int(n), None if pid is None else int(pid))
        return True
    if force:
        jax.distributed.initialize()
        return True
    return False


def global_batch(batch: dict, mesh, rules) -> dict:
    """This host's rows -> global arrays on the mesh (rows split by the `batch` rule; media features replicated).
    Without a mesh: plain device arrays. Several hosts: each host's devices must hold their own 1/P of the rows,
    which holds when the batch axes (data / fsdp / expert) are laid out host-major and no `tensor` axis spans
    hosts (`make_mesh`'s layouts)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    if "features" in batch and jax.process_count() > 1:
        raise NotImplementedError("media features in a multi-host batch: feature_index is host-local and the "
                                  "rows of the hosts are not gathered yet")
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if k in ("features", "feature_index"):
            names = (None,) * v.ndim
        else:
            names = ((None, "batch", None) if v.ndim == 3 else ("batch",) + (None,) * (v.ndim - 1))
        global_shape = list(v.shape)
        b_axis = names.index("batch") if "batch" in names else None
        if b_axis is not None:
            global_shape[b_axis] *= jax.process_count()
        s = sharding.named_sharding(mesh, rules, names, tuple(global_shape), what=f"batch {k}")
        out[k] = jax.make_array_from_process_local_data(s, v, tuple(global_shape))
    return out


def load_metrics(metrics: dict, llm_cfg) -> dict:
    """MaxVio per MoE layer and router (routers that took tokens), and its mean, from `expert_load`."""
    loads = np.asarray(metrics["expert_load"])  # [Lm, R, E]
    vio = np.asarray(balance.max_violation(loads))  # [Lm, R]
    out = {}
    used = loads.sum(-1) > 0
    for j in range(loads.shape[0]):
        for r in range(loads.shape[1]):
            if used[j, r]:
                out[f"maxvio/layer{j + llm_cfg.num_dense_layers}/{GATE_NAMES[r] if loads.shape[1] > 1 else 'gate'}"] = (
                    float(vio[j, r]))
    out["maxvio/mean"] = float(vio[used].mean()) if used.any() else 0.0
    return out


def _step_of(line: str) -> int | None:
    """The step of a metrics row, None for an empty or torn line (a process killed mid-append)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class _Metrics:
    """JSONL rows (rewritten on resume to drop rows past the restored step) + optional TensorBoard scalars."""

    def __init__(self, workdir: epath.Path, resumed_step: int | None, tensorboard: bool):
        self.path = workdir / "metrics.jsonl"
        self.primary = jax.process_index() == 0
        if self.primary and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if resumed_step is not None and _step_of(line) is not None and _step_of(line) <= resumed_step]
            tmp = workdir / "metrics.jsonl.tmp"
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        self.tb = None
        if tensorboard and self.primary:
            self.tb = SummaryWriter(os.fspath(workdir / "tensorboard"), purge_step=(
                None if resumed_step is None else resumed_step + 1))

    def write(self, row: dict) -> None:
        if not self.primary:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def run(model_fn: Callable[[Any, Any], nnx.Module], abstract_model: nnx.Module, train_cfg: TrainConfig,
        data_cfg: data_lib.TrainData, tokenizer_spec, run_cfg: RunConfig, *, meta: dict | None = None) -> Result:
    workdir = epath.Path(run_cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = rules = None
    if run_cfg.mesh:
        mesh = sharding.make_mesh(run_cfg.mesh)
        rules = sharding.ShardingRules.preset(run_cfg.rules)
        _check_accumulation(mesh, rules, data_cfg.batch_size * jax.process_count(), train_cfg.grad_accum)
    graphdef, abstract, tx = train_step.abstract_state(abstract_model, train_cfg)
    shardings = None if mesh is None else train_step.state_shardings(abstract, tx, mesh, rules)
    now_meta = _meta(meta, 0, data_cfg)
    checkpointer = ckpt.Checkpointer(os.fspath(workdir / "checkpoints"), save_every=run_cfg.save_every,
                                     keep=run_cfg.keep, async_save=run_cfg.async_save)
    it = bar = metrics_out = None
    stop = _StopSignal()
    try:
        resumed = checkpointer.latest_step()
        if resumed is not None:  # the settings first: a changed run fails here, before anything is restored
            _check_resume(checkpointer.restore_meta(resumed), now_meta)
        it = data_lib.make_iterator(data_cfg, tokenizer_spec)
        if resumed is not None:
            target = abstract if shardings is None else jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
            state, data_states, _ = checkpointer.restore(target, resumed)
            _restore_data_state(it, data_states)
        else:
            _, state = train_step.init_state(model_fn(mesh, rules), train_cfg, tx)
            if shardings is not None:
                state = jax.device_put(state, shardings)
        replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        jitted = jax.jit(train_step.make_train_step(graphdef, train_cfg, tx), donate_argnums=(0,),
                         out_shardings=None if shardings is None else (shardings, replicated))
        metrics_out = _Metrics(workdir, resumed, run_cfg.tensorboard)
        start = int(resumed or 0)
        if run_cfg.progress and jax.process_index() == 0:
            bar = tqdm(total=run_cfg.steps, initial=start, unit="step", dynamic_ncols=True)
        logger = _Logger(abstract_model.cfg, data_cfg.seq_len, run_cfg, metrics_out, bar)
        history, stopped = [], False
        with sharding.use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext():
            for step in range(start, run_cfg.steps):
                batch = next(it)
                train_step.check_batch(batch, grad_accum=train_cfg.grad_accum,
                                       vocab_size=abstract_model.cfg.vocab_size)
                logger.count(batch)
                state, metrics = jitted(state, global_batch(batch, mesh, rules))
                done = step + 1
                if done % run_cfg.log_every == 0 or done == run_cfg.steps:
                    history.append(logger.log(done, metrics))
                if bar is not None:
                    bar.update(1)
                preempted = checkpointer.reached_preemption(done) or stop.requested
                if done == run_cfg.steps or preempted or checkpointer.should_save(done):
                    checkpointer.save(done, state, data=_data_states(it), meta=_meta(meta, done, data_cfg),
                                      force=True)
                if preempted:
                    stopped = True
                    break
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        checkpointer.close()
        if metrics_out is not None:
            metrics_out.close()
        if it is not None and hasattr(it, "close"):
            it.close()
    return Result(state, graphdef, history, resumed, stopped)


class _Logger:
    """Tokens/s between logged steps, the metrics row (scalars, MaxVio, MFU), the progress bar's postfix."""

    def __init__(self, llm_cfg, seq: int, run_cfg: RunConfig, out: "_Metrics", bar):
        self.llm_cfg, self.out, self.bar = llm_cfg, out, bar
        self.flops_tok = train_step.active_flops_per_token(llm_cfg, seq)
        self.peak = run_cfg.peak_flops or peak_flops(jax.devices()[0])
        self.t_last, self.tokens = time.perf_counter(), 0

    def count(self, batch) -> None:
        self.tokens += int(np.prod(batch["input_ids"].shape)) * jax.process_count()

    def log(self, step: int, metrics) -> dict:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t_last, 1e-9)
        self.t_last, self.tokens = now, 0
        row = {"step": step, "tokens_per_s": rate}
        row.update({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
        if "expert_load" in metrics:
            row.update(load_metrics(metrics, self.llm_cfg))
        if self.peak:
            row["mfu"] = self.flops_tok * rate / (self.peak * jax.device_count())
        self.out.write(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{rate:,.0f}",
                                 **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
        return row


class _StopSignal:
    """SIGTERM (what a preempted VM or a job scheduler sends) -> save at the end of the current step and stop.
    orbax's preemption policy covers multi-host TPU through JAX's preemption sync; this covers a single host."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _data_states(it) -> dict:
    """Every process's iterator state ({"<process index>": state}); JSON checkpoint items are written by process 0
    only, so the states are gathered (as bytes) first."""
    own = json.dumps(it.get_state(), sort_keys=True).encode()
    if jax.process_count() == 1:
        return {"0": json.loads(own)}
    n = int(multihost_utils.process_allgather(np.asarray(len(own))).max())
    padded = np.frombuffer(own.ljust(n, b" "), np.uint8)
    every = multihost_utils.process_allgather(padded)  # [P, n]
    return {str(i): json.loads(bytes(row).decode()) for i, row in enumerate(np.asarray(every))}


def _restore_data_state(it, states: dict) -> None:
    key = str(jax.process_index())
    if key not in states:
        raise ValueError(f"resume: the checkpoint holds data iterator states of processes {sorted(states)}, not of "
                         f"process {key}; resume with the same number of hosts")
    it.set_state(states[key])


def _check_accumulation(mesh, rules, global_rows: int, grad_accum: int) -> None:
    """Each micro-batch takes every grad_accum-th row: the rows of one batch shard must split evenly, or every
    micro-step reshards."""
    names = rules.mesh_axes("batch")
    shards = int(np.prod([mesh.shape[a] for a in names if a in mesh.shape]))
    if global_rows % shards or (global_rows // shards) % grad_accum:
        raise ValueError(f"a global batch of {global_rows} rows over {shards} batch shards does not give each shard "
                         f"a multiple of grad_accum={grad_accum} rows")


def _meta(meta: dict | None, step: int, data_cfg) -> dict:
    out = dict(meta or {})
    out.update(step=step, saved_at=time.time(), seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size,
               worker_count=data_cfg.worker_count, seed=data_cfg.seed, labels=data_cfg.labels,
               thinking=data_cfg.thinking, overlong=data_cfg.overlong, processes=jax.process_count())
    return out


RESUME_KEYS = ("model", "data_paths", "seq_len", "batch_size", "worker_count", "seed", "labels", "thinking",
               "overlong", "processes", "train", "runtime", "lora", "quantize")


def _check_resume(saved: dict, now: dict) -> None:
    """A resumed run continues the saved one: same model source, data stream, optimizer settings (the schedule
    included) and dtypes."""
    for key in RESUME_KEYS:
        if key in saved and key in now and saved[key] != now[key]:
            raise ValueError(f"resume: the checkpoint was written with {key}={saved[key]!r}, this run has "
                             f"{now[key]!r}; it would not continue the saved run (keep the settings, e.g. "
                             "--schedule_steps when extending --steps, or use a new --workdir)")


def trained_model(result: Result) -> nnx.Module:
    """The model of a run's final state (trained parameters + frozen ones and the balanced expert biases)."""
    return nnx.merge(result.graphdef, result.state.params, result.state.frozen)


def export_release(model, dst: str, *, tokenizer_spec=None, overwrite: bool = True) -> str:
    """Write `model` (a BailingMoeV2) as a release-format folder: config.json, model.safetensors under the official
    names (the weight table's export), and the tokenizer (tokenizer.json) when `tokenizer_spec` gives one; the
    folder appears complete or not at all (written beside, then renamed; a failure removes the partial folder).
    `python -m ming_jax.generate --checkpoint dst` loads it. Gathers the whole model on this host: one host only,
    and for the full-size model convert the orbax checkpoint instead."""
    if jax.process_count() > 1:
        raise ValueError("export_release gathers the model on one host; with several processes export from the "
                         "checkpoint instead")
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial.", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        tensors = weight_table.export_state_dict(model, llm_weights.llm_table(model.cfg))
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        official = model.cfg.to_official()
        official["torch_dtype"] = model.runtime.param_dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(official, f, indent=2, sort_keys=True)
        if tokenizer_spec is not None:
            tok = data_lib.tokenizer_from_spec(tokenizer_spec)
            if hasattr(tok, "save"):
                tok.save(tmp)
            else:
                for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                    src = os.path.join(os.fspath(tokenizer_spec), name)
                    if os.path.exists(src):
                        shutil.copy(src, tmp)
        if os.path.exists(dst):  # the old folder moves aside only once the new one is complete
            old = tmp + ".old"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return dst

"""The release (PyTorch safetensors shards) -> our orbax checkpoint, streamed tensor by tensor with bounded parallel
reads under a byte budget (not one tensor at a time); and back.

    plan = plan_conversion(src)          # every check that needs no tensor data: raises naming every problem
    convert(src, dst)                    # plan, then stream: `workers` threads each read a tensor, re-lay it out
                                         # and write its slot, while at most `read_bytes` of tensors are in
                                         # flight; written batches of `flush_bytes` commit in the background
    export_official(ckpt, dst)           # our checkpoint -> official names, size-limited shards + index

What a conversion guarantees, in the order it checks:
* the source folder is sound: config.json readable, the index (if any) well-formed and naming only shards that
  exist, every shard header parseable and every tensor's bytes inside its file (a truncated download fails here,
  before anything is written), index and shard headers agreeing tensor by tensor;
* every source tensor is consumed exactly once: it belongs to one sub-model (by name prefix) and matches exactly
  one rule of that sub-model's table (`ming_jax.weights`); tensors of a sub-model not asked for are skipped and
  listed, tensors of no known sub-model are an error; sub-folders (talker, image generation: not implemented in
  ming_jax) are skipped and listed, never silently dropped;
* every parameter slice is filled exactly once (`Table.plan` + `Table.check_coverage`), each tensor's shape after
  its layout transform equals the slice the config implies, every tensor has a floating dtype and all tensors that
  stack into one parameter share it;
* memory stays bounded whatever the checkpoint size: up to `workers` tensors are read concurrently, each with
  `preadv` into its own buffer, but a byte budget admits a read only while at most `read_bytes` of tensors are
  being read and re-laid out (a tensor larger than the budget waits and runs alone); each is handed to its zarr
  slot and kept only until its batch commits; written data waits in a tensorstore transaction of at most
  `flush_bytes` before it is compressed and committed (one commit in flight while the next batch fills). Peak:
  about read_bytes + 2 x flush_bytes + twice the largest tensor (its buffer and its re-laid-out copy), i.e.
  ~1 GB + 2 x 1.3 GB for the release's embedding, independent of the checkpoint's total size;
  `benchmarks/convert.py` measures it and `tests/test_convert_memory.py` asserts that peak RSS stays flat as the
  source grows;
* the output appears atomically: everything is written under `DST.partial/` and renamed to DST when complete. An
  interrupted run leaves `DST.partial/` with a journal of committed tensors; re-running the same conversion resumes
  from it (a different source or different options restart from scratch).

Layout changes (experts stacked into [L, E, ...], fused qkv regrouped, conv kernels transposed) are the tables'
named transforms; nothing here knows a tensor by name. The reverse export applies the inverse transforms, so
torch -> orbax -> torch is bit-exact (and checked against the CRC32 of every source tensor kept in the manifest).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorstore as ts

from ming_jax import quant
from ming_jax.checkpoint import manifest as mf
from ming_jax.checkpoint import folders, orbax_tree
from ming_jax.checkpoint.safetensors import (INDEX_FILE, CheckpointError, SourceCheckpoint, TensorInfo,
                                             _FLOATING, _listing)
from ming_jax.config.base import ConfigError
from ming_jax.models import registry
from ming_jax.weights.table import Assignment, WeightError

DTYPE_FLAGS = {"bf16": "bfloat16", "f32": "float32", "bfloat16": "bfloat16", "float32": "float32"}
# Quantized checkpoints (`ming_jax.quant`): the LLM's projections stored as int8 / float8_e4m3fn values + float32
# scales (`<param>.qvalue`, `<param>.scale`), every other parameter in bfloat16. "int8:128" / "fp8:128": sub-channel.
QUANT_FLAGS = quant.QTYPES


def quant_config(dtype: str | None) -> quant.QuantConfig | None:
    """The QuantConfig a --dtype asks for ("int8", "fp8", "fp8:128", ...), None for a float dtype."""
    if dtype is None or dtype in DTYPE_FLAGS:
        return None
    try:
        return quant.QuantConfig.parse(dtype)
    except ValueError:
        raise ConversionError(f"dtype={dtype!r}; choose bf16 or f32 (or leave it unset to keep the source dtypes), "
                              "or int8 / fp8 for quantized weights (int8:BLOCK / fp8:BLOCK: sub-channel scales)"
                              ) from None


# One error type for an unusable source, option or destination: the message names the problem.
ConversionError = CheckpointError


# --- the plan -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One source tensor's trip: where it is, where it goes, and the dtype it is stored in."""

    info: TensorInfo
    assignment: Assignment
    store_dtype: str
    quant: quant.Target | None = None  # quantized: the whole leaf's Target; the slot is quantized on its own


@dataclasses.dataclass
class Plan:
    source: SourceCheckpoint
    components: list[str]
    leaves: list[orbax_tree.LeafSpec]
    items: list[Item]  # in file order (shard, offset): sequential reads
    skipped_tensors: dict[str, list[str]]  # component not asked for -> its tensors
    skipped_folders: list[tuple[str, int, int]]
    broken: dict[str, str]  # component -> why its configs cannot be used (not converted)
    options: dict

    @property
    def nbytes(self) -> int:
        return sum(i.info.nbytes for i in self.items)

    @property
    def quant_config(self) -> quant.QuantConfig | None:
        q = self.options.get("quantization")
        return None if q is None else quant.QuantConfig.from_json(q)

    def summary(self) -> str:
        lines = [f"source {self.source.path}: {len(self.source.tensors)} tensors in {len(self.source.shards)} "
                 f"shard(s), {_gb(sum(t.nbytes for t in self.source.tensors.values()))}",
                 f"converting {', '.join(self.components)}: {len(self.items)} tensors, {_gb(self.nbytes)} -> "
                 f"{len(self.leaves)} parameters"]
        for comp, names in self.skipped_tensors.items():
            lines.append(f"skipping component {comp} (not requested): {len(names)} tensors, "
                         f"{_gb(sum(self.source.tensors[n].nbytes for n in names))}")
        for comp, why in self.broken.items():
            lines.append(f"skipping component {comp}: {why}")
        for name, size, files in self.skipped_folders:
            lines.append(f"skipping sub-folder {name}/ ({files} files, {_gb(size)}): {_folder_kind(name)}")
        for f in self.source.unindexed_files:
            lines.append(f"ignoring {f}: not referenced by {INDEX_FILE}")
        return "\n".join(lines)


def _folder_kind(name: str) -> str:
    planned = registry.PLANNED_FOLDERS.get(name)
    if planned:
        return registry.PLANNED[planned]
    if name in registry.IMAGE_GEN_WEIGHT_FOLDERS or name in folders.config_only_folders():
        return "image generation: not requested (--components), or its folders are incomplete"
    if name == registry.TALKER_FOLDER:
        return "speech generation (talker): not requested (--components), or its configs are incomplete"
    return "not part of the models ming_jax implements"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _dummy(shape: Sequence[int]) -> np.ndarray:
    """A zero-stride stand-in of `shape`: transforms run on it for their output shape without touching data."""
    return np.broadcast_to(np.zeros((), np.bool_), tuple(shape))


def plan_conversion(src: str | SourceCheckpoint, *, dtype: str | None = None,
                    components: Sequence[str] | None = None) -> Plan:
    """Every check that needs no tensor data; raises naming all problems found, writes nothing."""
    qcfg = quant_config(dtype)  # raises for an unknown dtype
    source = src if isinstance(src, SourceCheckpoint) else folders.open_source(src, components)
    store = "bfloat16" if qcfg else DTYPE_FLAGS.get(dtype) if dtype else None
    try:
        comps = registry.describe(source.config, sections=folders.image_gen_sections(source.path),
                                  speech=folders.talker_sections(source.path))
        chosen = registry.select(comps, components)
    except ConfigError as e:
        problems = [p for p in (folders.image_gen_problem(source.path), folders.talker_problem(source.path)) if p]
        raise ConversionError(str(e) + (f" ({'; '.join(problems)})" if problems else "")) from None

    owner: dict[str, str] = {}
    orphans = []
    for name in source.tensors:
        owners = [c.name for c in comps.values() if c.owns(name)]
        if len(owners) > 1:
            raise ConversionError(f"tensor {name} belongs to several components {owners}: prefix table bug")
        if owners:
            owner[name] = owners[0]
        else:
            orphans.append(name)
    if orphans:
        raise ConversionError(f"{len(orphans)} tensor(s) belong to no component of this release "
                              f"({', '.join(comps)}): {_listing(sorted(orphans))}")

    items, leaves = [], []
    skipped = {c: sorted(n for n, o in owner.items() if o == c) for c in comps if c not in chosen}
    skipped = {c: v for c, v in skipped.items() if v}
    problems: list[str] = []
    targets: dict[str, quant.Target] = {}
    for cname in chosen:
        comp = comps[cname]
        comp.table.check_coverage(comp.shapes)
        if qcfg is not None and cname in quant.COMPONENTS:
            for key, module in comp.modules.items():
                targets.update({f"{key}.{p}": t for p, t in quant.plan(module, qcfg).items()})
        names = [n for n, o in owner.items() if o == cname]
        try:
            assignments = comp.table.plan(names)
            # the non-parameter buffers the config fixes (the talker's rope inv_freq): small, read and checked now
            comp.table.check_constants({n: source.read(source.tensors[n])[0] for n in names
                                        if n in comp.table.constants})
        except WeightError as e:
            raise WeightError(f"{cname}: {e}") from None
        by_leaf: dict[str, list[Assignment]] = {}
        for a in assignments:
            by_leaf.setdefault(a.path, []).append(a)
        for path, group in by_leaf.items():
            full = comp.shapes[path]
            n_lead = len(group[0].index)
            codes = {}
            for a in group:
                info = source.tensors[a.official]
                want = full[n_lead:]
                try:
                    got = tuple(a.transform.to_ours(_dummy(info.shape)).shape)
                except ValueError as e:
                    got = f"an error ({e})"
                if got != want:
                    problems.append(f"{a.official}: shape {list(info.shape)} -> {got} after {a.transform.name}, but "
                                    f"{path} needs {want} (config and weights disagree)")
                codes.setdefault(info.value_dtype, []).append(a.official)
            bad = [c for c in codes if c not in _FLOATING]
            if bad:
                problems += [f"{n}: dtype {c} is not a floating dtype" for c in bad for n in codes[c]]
                continue
            if len(codes) > 1:
                main = max(codes, key=lambda c: len(codes[c]))
                odd = [f"{n} ({c})" for c, ns in codes.items() if c != main for n in ns]
                problems.append(f"{path} stacks {len(group)} tensors of mixed dtypes: {_listing(odd, 6)} while the "
                                f"others are {main}")
                continue
            leaf_dtype = store or _FLOATING[next(iter(codes))]
            target = targets.get(path)
            if target is not None:
                if min(target.contract) < n_lead:
                    raise ConversionError(f"{path}: quantized over axes {target.contract}, but its first {n_lead} "
                                          "axes are filled one tensor at a time")
                leaves.append(orbax_tree.LeafSpec(path + ".qvalue", tuple(full), str(qcfg.dtype), n_lead))
                leaves.append(orbax_tree.LeafSpec(path + ".scale", target.scale_shape, "float32", n_lead))
            else:
                leaves.append(orbax_tree.LeafSpec(path, tuple(full), leaf_dtype, n_lead))
            items += [Item(source.tensors[a.official], a, leaf_dtype, target) for a in group]
    if problems:
        raise WeightError(f"{len(problems)} problem(s) with the source tensors: " + "; ".join(problems[:12]) +
                          (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else ""))
    items.sort(key=lambda i: (i.info.shard, i.info.offset))
    leaves.sort(key=lambda leaf: leaf.path)
    kept = folders.config_only_folders() if "image_gen" in chosen else set()
    if "talker" in chosen and registry.release_kind(source.config) == "talker":
        kept |= {f[0] for f in source.subfolders()}  # a bare talker folder: llm/, data/, ... are copied as they are
    broken = {c: p.problem for c, p in comps.items() if p.problem}
    options = {"dtype": store, "components": chosen}
    if qcfg is not None:
        options["quantization"] = quant.manifest_entry(qcfg, targets)
    return Plan(source, chosen, leaves, items, skipped, [f for f in source.subfolders() if f[0] not in kept], broken,
                options)


# --- progress ---------------------------------------------------------------------------------------------------------


class Progress:
    """Bytes done / total, rate and ETA on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self._last = time.perf_counter()

    def update(self, nbytes: int, what: str = "") -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and now - self._last >= (0.25 if self.tty else 10.0):
            self._last = now
            self._draw(now, what)

    def _draw(self, now: float, what: str) -> None:
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 24)
        text = (f"{self.label} [{bar:<24}] {100 * frac:5.1f}% {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                f"{rate / 1e6:7.1f} MB/s ETA {_hms(eta)}  {what[-60:]}")
        self.stream.write(("\r" + text + "\x1b[K") if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> float:
        elapsed = time.perf_counter() - self.t0
        if self.enabled:
            self._draw(time.perf_counter(), "done")
            if self.tty:
                self.stream.write("\n")
        return elapsed


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "--:--:--"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --- converting -------------------------------------------------------------------------------------------------------

_STATE = "convert_state.json"
_JOURNAL = "journal.jsonl"


def _partial_dir(dst: str) -> str:
    return os.path.normpath(dst) + ".partial"


def convert(src: str, dst: str, *, dtype: str | None = None, components: Sequence[str] | None = None,
            compression: str | None = "zstd", flush_bytes: int = 256 << 20, workers: int | None = None,
            read_bytes: int = 256 << 20, overwrite: bool = False, restart: bool = False, progress: bool = True,
            log: Callable[[str], None] | None = None) -> mf.Manifest:
    """Convert the release at `src` into our checkpoint at `dst` (see the module docstring for the guarantees).

    `dtype` (bf16 / f32) casts every parameter; None keeps each tensor's dtype; int8 / fp8 (int8:BLOCK, fp8:BLOCK
    for sub-channel scales) quantizes the LLM's projections (`ming_jax.quant`: each official tensor's slot quantized
    on its own as it streams, in bounded chunks, so memory stays as bounded as a float conversion) and stores the
    rest in bfloat16. `components` picks sub-models (default: all the config describes). An unfinished earlier run into the same `dst` is resumed, unless its
    source or options differ or `restart` is set. `dst` must not exist unless `overwrite`.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if os.path.exists(dst) and not overwrite:
        raise ConversionError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    plan = plan_conversion(src, dtype=dtype, components=components)
    log(plan.summary())
    tmp = _partial_dir(dst)
    state = {"format": mf.FORMAT, "source": plan.source.fingerprint(), "options": dict(plan.options,
                                                                                         compression=compression)}
    done = _resume_state(tmp, state, restart, log)
    params_dir = os.path.join(tmp, mf.PARAMS_DIR)
    writer = orbax_tree.TreeWriter(params_dir, plan.leaves, compression=compression)
    todo = [i for i in plan.items if i.info.name not in done]
    bar = Progress(sum(i.info.nbytes for i in todo), "convert", enabled=progress)
    journal = open(os.path.join(tmp, _JOURNAL), "a")
    try:
        _stream(plan, writer, todo, done, flush_bytes, bar, journal, workers or min(4, os.cpu_count() or 1),
                read_bytes)
    finally:
        journal.close()
        plan.source.close()
    elapsed = bar.close()
    missing = [i.info.name for i in plan.items if i.info.name not in done]
    if missing:  # cannot happen unless the journal was edited: refuse to publish an incomplete checkpoint
        raise ConversionError(f"{len(missing)} tensor(s) were never written: {_listing(missing)}")
    writer.finish()
    manifest = _manifest(plan, done, compression)
    mf.write_json(os.path.join(tmp, mf.MANIFEST_FILE), manifest.to_json())
    shutil.copyfile(plan.source.config_path, os.path.join(tmp, mf.CONFIG_FILE))
    if "image_gen" in plan.components:  # its sub-configs (and byt5/): a converted folder describes itself
        folders.copy_sections(plan.source.path, tmp)
    if "talker" in plan.components:  # the talker's configs, tokenizer, voices, speaker model
        folders.copy_talker_files(plan.source.path, tmp)
    for f in (_STATE, _JOURNAL):
        os.remove(os.path.join(tmp, f))
    _publish(tmp, dst, overwrite)
    log(f"wrote {dst}: {len(plan.items)} tensors, {_gb(plan.nbytes)} in {elapsed:.1f} s")
    return manifest


def _resume_state(tmp: str, state: dict, restart: bool, log) -> dict[str, int]:
    """{tensor name: crc32} already committed by an interrupted run of this same conversion (else start clean)."""
    state_path = os.path.join(tmp, _STATE)
    if os.path.isdir(tmp):
        previous = None
        if os.path.exists(state_path):
            try:
                with open(state_path) as f:
                    previous = json.load(f)
            except (OSError, json.JSONDecodeError):
                previous = None
        if not restart and previous == state:
            done = {}
            with open(os.path.join(tmp, _JOURNAL)) as f:
                for line in f:
                    try:
                        done.update(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line cut by the interruption: its batch is simply redone
            log(f"resuming the interrupted conversion in {tmp}: {len(done)} tensors already written")
            return done
        log(f"removing {tmp} left by an earlier run ({'--restart' if restart else 'different source or options'})")
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    mf.write_json(state_path, state)
    open(os.path.join(tmp, _JOURNAL), "w").close()
    return {}


class _ByteBudget:
    """At most `capacity` bytes of tensors being read / re-laid out at once; a bigger tensor waits to run alone."""

    def __init__(self, capacity: int):
        self.capacity = self.free = capacity
        self.cond = threading.Condition()

    def take(self, n: int) -> int:
        n = min(n, self.capacity)
        with self.cond:
            self.cond.wait_for(lambda: self.free >= n)
            self.free -= n
        return n

    def give(self, n: int) -> None:
        with self.cond:
            self.free += n
            self.cond.notify_all()


def _stream(plan: Plan, writer: orbax_tree.TreeWriter, todo: list[Item], done: dict[str, int], flush_bytes: int,
            bar: Progress, journal, workers: int, read_bytes: int) -> None:
    """Read, re-layout and write every pending tensor, `workers` tensors at a time (reads overlap; the layout
    copies - mostly transposes - run in parallel: numpy and tensorstore release the GIL).

    Written data collects in one tensorstore transaction per batch of `flush_bytes`; a closed batch is committed by
    a single committer thread (compression + OCDBT write) while the next batch fills, and a batch is closed only
    after the previous commit finished, so at most two batches are buffered. Each committed batch is appended to
    the journal: what an interrupted run can skip.
    """
    budget = _ByteBudget(read_bytes)
    bar_lock = threading.Lock()

    def work(item: Item, txn: ts.Transaction) -> tuple[str, int]:
        info, a = item.info, item.assignment
        taken = budget.take(info.nbytes)
        try:
            value, crc = plan.source.read(info)
            if item.quant is not None:  # this slot's values and scale rows, from the source precision
                q = quant.quantize_slot(a.transform.to_ours(value), item.quant, plan.quant_config, len(a.index))
                writer.write(a.path + ".qvalue", a.index, np.ascontiguousarray(q.qvalue), txn).copy.result()
                writer.write(a.path + ".scale", a.index, np.ascontiguousarray(q.scale), txn).copy.result()
            else:
                value = np.ascontiguousarray(a.transform.to_ours(value).astype(mf.np_dtype(item.store_dtype),
                                                                               copy=False))
                writer.write(a.path, a.index, value, txn).copy.result()
        finally:
            budget.give(taken)
        with bar_lock:
            bar.update(info.nbytes, info.name)
        return info.name, crc

    def commit(txn: ts.Transaction, futures: list) -> dict[str, int]:
        crcs = dict(f.result() for f in futures)
        txn.commit_async().result()
        return crcs

    def settle(job) -> None:
        if job is not None:
            crcs = job.result()
            journal.write(json.dumps(crcs) + "\n")
            journal.flush()
            done.update(crcs)

    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="convert")
    committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="commit")
    job = None
    try:
        txn, futures, pending = ts.Transaction(), [], 0
        for item in todo:
            if len(futures) >= 4 * workers:  # keep the queue short: the budget, not the queue, bounds memory
                futures[-4 * workers].result()
            futures.append(pool.submit(work, item, txn))
            pending += item.info.nbytes
            if pending >= flush_bytes:
                settle(job)
                job = committer.submit(commit, txn, futures)
                txn, futures, pending = ts.Transaction(), [], 0
        settle(job)
        job = None
        if futures:
            settle(committer.submit(commit, txn, futures))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        committer.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    committer.shutdown()


def _manifest(plan: Plan, crcs: Mapping[str, int], compression) -> mf.Manifest:
    tensors = {i.info.name: {"dtype": i.info.dtype, "shape": list(i.info.shape), "crc32": crcs[i.info.name]}
               for i in plan.items}
    return mf.Manifest(
        components=plan.components,
        params={leaf.path: {"shape": list(leaf.shape), "dtype": leaf.dtype} for leaf in plan.leaves},
        source={"path": os.path.abspath(plan.source.path), "tensors": tensors,
                "nbytes": plan.nbytes},
        skipped={"components": {c: len(v) for c, v in plan.skipped_tensors.items()},
                 "folders": [{"name": n, "bytes": b, "files": f, "why": _folder_kind(n)}
                             for n, b, f in plan.skipped_folders],
                 "unindexed_files": plan.source.unindexed_files},
        options={"dtype": plan.options["dtype"], "compression": compression,
                 **({"quantization": plan.options["quantization"]} if "quantization" in plan.options else {})})


def _publish(tmp: str, dst: str, overwrite: bool) -> None:
    """Rename the finished `tmp` into place (the old `dst`, if replaced, is removed only after)."""
    _fsync_dir(tmp)
    old = None
    if os.path.exists(dst):
        if not overwrite:
            raise ConversionError(f"{dst} appeared while converting; the result is left in {tmp}")
        old = os.path.normpath(dst) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    if old:
        shutil.rmtree(old)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

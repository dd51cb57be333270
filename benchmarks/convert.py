"""Converter throughput and peak memory on a synthetic multi-shard release of at least 8 GB.

    JAX_PLATFORMS=cpu python -m benchmarks.convert [--gb 8] [--dir /tmp] [--json out.json]

Builds a bf16 LLM-only release with the real model's tensor shapes where they matter (hidden 4096, 64 experts of
width 1024 per MoE layer: 8 MB expert slices, as in Ling-flash-2.0; a 268 MB embedding and LM head) and enough MoE
layers to pass `--gb`, in 2 GB shards with an index. Then, each in a child process timed with `os.wait4` (so the
peak RSS is that child's alone): `tools/convert_torch.py` with zstd and without compression, and the reverse
export, which also verifies every tensor bit-exact against the source CRC32. The source pages are evicted
(fsync + POSIX_FADV_DONTNEED) before each run so reads come from disk, not the page cache. Everything is written in
one scratch folder on a filesystem with room for it (checked with `shutil.disk_usage`) and deleted at the end.

Reports GB/s (source bytes / wall time) and peak RSS next to the two numbers that bound it: the largest single
tensor and the commit batch (`--flush_size`, two batches may be in flight).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import app, flags

_GB = flags.DEFINE_float("gb", 8.0, "Minimum size of the synthetic release in GB (1e9 bytes).")
_DIR = flags.DEFINE_string("dir", None, "Scratch location (default: the first of /tmp, $HOME, cwd with room).")
_JSON = flags.DEFINE_string("json", None, "Results path (default: <scratch parent>/ming_jax_convert_bench.json).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the scratch folder.")
_MODES = flags.DEFINE_list("modes", ["zstd", "none", "reverse"], "Runs: zstd / none (conversion compression), "
                           "reverse (export of the zstd checkpoint).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_BYTES = 2 * 10**9


def release_config(min_bytes: float):
    """An LLM-only config with release-sized tensors and as many MoE layers as `min_bytes` needs."""
    from ming_jax.config.llm import LLMConfig

    base = dict(vocab_size=32768, hidden_size=4096, intermediate_size=9216, num_heads=32, num_kv_heads=4,
                head_dim=128, moe_intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                num_shared_experts=1, n_group=8, topk_group=4, first_k_dense_replace=1, router_type="MultiRouter")
    for layers in range(2, 64):
        cfg = LLMConfig(num_layers=layers, **base)
        if sum(t.nbytes for t in official_tensors(cfg)) >= min_bytes:
            return cfg
    raise ValueError(f"{min_bytes} bytes needs more than 64 layers")


def official_tensors(cfg):
    """Every official tensor (name, bf16, shape) of `cfg`, derived from the table and our parameter shapes."""
    from ming_jax.checkpoint import convert, safetensors
    from ming_jax.models import llm as model_lib
    from ming_jax import weights
    from ming_jax.weights.llm import llm_table

    shapes = weights.param_shapes(model_lib.create_abstract(cfg))
    out = []
    for rule in llm_table(cfg).rules:
        for v in rule.instances():
            full = shapes[rule.path(v)]
            shape = rule.transform.to_official(convert._dummy(full[len(rule.slot(v)):])).shape
            out.append(safetensors.OutTensor(rule.name(v), np.dtype(ml_dtypes.bfloat16), tuple(shape)))
    return out


def build_release(path: str, cfg) -> tuple[int, int, int]:
    """Write the shards (streamed, one tensor at a time); returns (bytes, tensors, largest tensor bytes)."""
    from ming_jax.checkpoint import safetensors

    tensors = official_tensors(cfg)
    pool = np.random.default_rng(0).standard_normal(64 << 20, np.float32).astype(ml_dtypes.bfloat16)  # 128 MB
    cursor = [0]

    def fetch(t):
        n = math.prod(t.shape)
        reps = -(-n // pool.size)
        start = cursor[0] % pool.size
        cursor[0] += 7919 * 1031  # a different window of the pool for each tensor
        flat = np.concatenate([pool[start:], pool] * reps)[:n] if reps > 1 or start + n > pool.size else \
            pool[start:start + n]
        return flat.reshape(t.shape)

    safetensors.write_sharded(path, tensors, fetch, SHARD_BYTES)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_official(), f)
    return sum(t.nbytes for t in tensors), len(tensors), max(t.nbytes for t in tensors)


def evict(path: str) -> None:
    """Drop our own files' pages from the page cache so the next run reads from disk."""
    for root, _, names in os.walk(path):
        for n in names:
            fd = os.open(os.path.join(root, n), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(args: list[str]) -> dict:
    """Run the CLI in a child process; wall time and that child's own peak RSS (`os.wait4` on its pid)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "convert_torch.py"), *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, not by Popen: its rusage is the child's alone
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        err.seek(0)
        text = err.read()
    if proc.returncode:
        raise RuntimeError(f"convert_torch {' '.join(args)} failed:\n{text[-4000:]}")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "log": text.strip().splitlines()[-1]}


def pick_dir(need: int) -> str:
    candidates = [_DIR.value] if _DIR.value else ["/tmp", os.path.expanduser("~"), os.getcwd()]
    for c in candidates:
        if c and os.path.isdir(c) and shutil.disk_usage(c).free > need:
            return c
    raise RuntimeError(f"no location with {need / 1e9:.0f} GB free among {candidates} (df -h)")


def main(argv):
    del argv
    cfg = release_config(_GB.value * 1e9)
    size = sum(t.nbytes for t in official_tensors(cfg))
    parent = pick_dir(int(3.2 * size))  # source + one checkpoint + one export at a time, with slack
    print(f"free space in {parent}: {shutil.disk_usage(parent).free / 1e9:.0f} GB; release {size / 1e9:.2f} GB "
          f"({cfg.num_layers} layers, {cfg.num_experts} experts)")
    scratch = tempfile.mkdtemp(prefix="ming_jax_convert_bench_", dir=parent)
    src, ck = os.path.join(scratch, "release"), os.path.join(scratch, "ckpt")
    os.makedirs(src)
    results = {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
               "scratch": scratch, "runs": []}
    try:
        t0 = time.perf_counter()
        nbytes, n_tensors, largest = build_release(src, cfg)
        results.update(release_bytes=nbytes, tensors=n_tensors, shards=len(os.listdir(src)) - 2,
                       largest_tensor_bytes=largest, flush_bytes=256 << 20, build_s=time.perf_counter() - t0)
        print(f"built {n_tensors} tensors, {nbytes / 1e9:.2f} GB in {results['shards']} shards in "
              f"{results['build_s']:.0f} s")
        for mode in _MODES.value:
            if mode in ("zstd", "none"):
                shutil.rmtree(ck, ignore_errors=True)
                evict(src)
                r = run_child(["--src", src, "--dst", ck, "--compression", mode, "--quiet"])
                r["output_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ck) for f in fs)
                r["name"] = f"convert ({mode})"
            elif mode == "reverse":
                if not os.path.isdir(ck):
                    raise app.UsageError("reverse needs a conversion run before it in --modes")
                back = os.path.join(scratch, "back")
                shutil.rmtree(src)  # room for the export; the checkpoint's CRC32s stand in for the source
                evict(ck)
                r = run_child(["--reverse", "--src", ck, "--dst", back, "--quiet"])
                r["output_bytes"] = sum(os.path.getsize(os.path.join(back, f)) for f in os.listdir(back))
                r["name"] = "reverse export (+ CRC32 check)"
                shutil.rmtree(back)
            else:
                raise app.UsageError(f"unknown mode {mode!r}")
            r["gb_per_s"] = nbytes / 1e9 / r["wall_s"]
            results["runs"].append(r)
            print(f"{r['name']}: {r['wall_s']:.1f} s, {r['gb_per_s']:.3f} GB/s, peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} GiB")
    finally:
        if not _KEEP.value:
            shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(table(results))
    out = _JSON.value or os.path.join(parent, "ming_jax_convert_bench.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nresults: {out}")


def table(results: dict) -> str:
    rows = [f"release: {results['release_bytes'] / 1e9:.2f} GB, {results['tensors']} tensors, {results['shards']} "
            f"shards; largest tensor {results['largest_tensor_bytes'] / 2**20:.0f} MiB; commit batch "
            f"{results['flush_bytes'] / 2**20:.0f} MiB",
            f"| {'run':<32} | {'wall s':>7} | {'GB/s':>6} | {'peak RSS GiB':>12} | {'output GB':>9} |",
            f"|{'-' * 34}|{'-' * 9}|{'-' * 8}|{'-' * 14}|{'-' * 11}|"]
    for r in results["runs"]:
        rows.append(f"| {r['name']:<32} | {r['wall_s']:7.1f} | {r['gb_per_s']:6.3f} | "
                    f"{r['peak_rss_bytes'] / 2**30:12.2f} | {r['output_bytes'] / 1e9:9.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    app.run(main)

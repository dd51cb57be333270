"""The converter's memory does not grow with the checkpoint: peak RSS of a conversion, measured in a child process,
is flat from a ~2.5 GB to a ~4.3 GB synthetic release, and within the bound the converter's docstring states.

The converter streams tensors with bounded parallel reads under a byte budget (`read_bytes`) and commits written
data in batches of `flush_bytes` (at most two in flight), so its peak is set by those two budgets and the largest
tensor (the 268 MB embedding / LM head here, the same in both releases), not by the total. The releases are
`benchmarks/convert.py`'s generator (bf16, hidden 4096, 64 experts of width 1024: 2 and 3 layers), built in a child
so that the measured process is the converter alone.

Budgets of 64 MiB (instead of the CLI's 256 MB) make the peak reproducible: on 2 cores the two sizes' peaks agreed to
within 10 MiB in every run (735-858 MiB), where the defaults gave 1124-1259 MiB (2.5 GB) and 1263-1431 MiB (4.3 GB)
from run to run (which tensors the reader threads and the committer happen to hold together): bounded, but too noisy
for a 300 MB bar. The baseline (interpreter, imports, a 6 MB conversion) is ~213 MiB. 1-2 min on 2 cores (the
machine's load decides); ~7 GB of scratch disk at a time (one release + its checkpoint, deleted before the next).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES_GB = (2, 4)  # minimum source sizes; the generator rounds up to whole MoE layers (~2.55 and ~4.26 GB)
FLAT_BYTES = 300 * 2**20  # allowed growth of the peak between the two sizes
BUDGET = 64 * 2**20  # --read_size and --flush_size


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _build(src: str, gb: float) -> tuple[int, int]:
    """benchmarks/convert.py's synthetic LLM release of at least `gb` GB into `src`, in a child process (its flags
    and its 128 MB source pool stay out of this one). Returns (source bytes, largest tensor bytes)."""
    code = ("import sys; from benchmarks import convert as b; "
            f"n, _, big = b.build_release({src!r}, b.release_config({gb} * 1e9)); print(n, big)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    n, big = r.stdout.split()[-2:]
    return int(n), int(big)


def _peak_rss_of_conversion(src: str, dst: str) -> tuple[int, float]:
    """`python -m ming_jax.convert` in a child; (its own peak RSS in bytes from `os.wait4`, wall seconds)."""
    args = [sys.executable, "-m", "ming_jax.convert", "--src", src, "--dst", dst, "--compression", "none",
            "--workers", "2", "--read_size", f"{BUDGET}", "--flush_size", f"{BUDGET}", "--quiet"]
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here: the rusage is the converter's alone
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        err.seek(0)
        log = err.read()
    assert proc.returncode == 0, log[-4000:]
    return usage.ru_maxrss * 1024, wall  # ru_maxrss is in KiB on Linux


@pytest.mark.slow
def test_conversion_peak_rss_is_flat_as_the_source_grows(tmp_path, golden_dir):
    need = 8 * 10**9  # the larger release + its uncompressed checkpoint, with slack
    free = shutil.disk_usage(tmp_path).free
    if free < need:
        pytest.fail(f"{tmp_path} has {free / 1e9:.1f} GB free; this test needs {need / 1e9:.0f} GB "
                    "(point pytest's --basetemp at a larger disk)")
    tiny = tmp_path / "tiny"  # baseline: the same program on the 6 MB golden backbone
    tiny.mkdir()
    for f in ("config.json", "weights.safetensors"):
        shutil.copyfile(golden_dir / "llm_backbone" / f, tiny / f)
    baseline, _ = _peak_rss_of_conversion(str(tiny), str(tmp_path / "tiny_ckpt"))
    results = []
    for gb in SIZES_GB:
        src, dst = tmp_path / f"release_{gb}", tmp_path / f"ckpt_{gb}"
        src.mkdir()
        nbytes, largest = _build(str(src), gb)
        peak, wall = _peak_rss_of_conversion(str(src), str(dst))
        assert (dst / "ming_jax.json").is_file()  # a published checkpoint (its manifest)
        results.append((nbytes, largest, peak, wall))
        shutil.rmtree(src)
        shutil.rmtree(dst)
    report = f"baseline {baseline / 2**20:.0f} MiB; " + "; ".join(
        f"source {n / 1e9:.2f} GB (largest tensor {big / 2**20:.0f} MiB): peak RSS {p / 2**20:.0f} MiB in {w:.0f} s"
        for n, big, p, w in results)
    print(report)
    (small, _, peak_small, _), (large, largest, peak_large, _) = results
    assert large > 1.6 * small, report  # the source really grew
    assert peak_large - peak_small < FLAT_BYTES, report
    # convert.py's stated bound: read_bytes + 2 x flush_bytes + twice the largest tensor (10% slack for "about")
    bound = BUDGET + 2 * BUDGET + 2 * largest
    for _, _, peak, _ in results:
        assert peak - baseline < 1.1 * bound, report

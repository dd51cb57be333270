"""Every command of README.md and docs/*.md marked runnable runs, on a fresh clone of this repository.

The marker is an HTML comment on the line before a ```bash fence (invisible on GitHub):

    <!-- runnable -->            the block runs as one bash script (set -euo pipefail) from the clone's root
    <!-- runnable: libtpu -->    ... and needs libtpu (compiles for TPU): without it the block fails, unless
                                 MING_NO_LIBTPU=1, where it is skipped saying so (as tests/tpu_compile.py does)

Only cheap commands are marked (the tiny presets, the golden cases); commands that need a real checkpoint, a TPU or
minutes are shown unmarked. Not marked although tiny: `python -m ming_jax.imagine` without a checkpoint, which
compiles the thinker, the DiT sampler and the VAE (about 40 s of CPU; tests/test_imagine_cli.py runs it). The clone is `git clone --local` of this checkout's HEAD plus its uncommitted changes
to tracked files (untracked files are not in it, as they would not be in a fresh clone); `python` is this
interpreter (the blocks do not set up a virtualenv), JAX_PLATFORMS=cpu, and ../shared beside the clone points to
the shared data of this checkout (the golden cases: MING_GOLDEN_DIR, or ../shared/golden), so the documents' relative
paths work unchanged. `./run.sh` sets up a virtualenv and is therefore not marked; `./run.sh ARGS` is
`python -m ming_jax.generate ARGS` (checked here), which the README runs marked.
"""

import concurrent.futures
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

from conftest import GOLDEN_DIR
from tpu_compile import need_libtpu
import xla_env

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<needs>[\w, ]+))?\s*-->\s*$")
NEEDS = {"libtpu"}
WORKERS = max(1, min(4, os.cpu_count() or 1))


def runnable_blocks(text: str, where: str) -> list[tuple[str, int, str, set[str]]]:
    """(document, line, bash script, requirements) of each marked block; a marker not followed by a ```bash
    fence, or an unknown requirement, is an error."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if not m:
            if "runnable" in line and line.lstrip().startswith("<!--"):
                raise ValueError(f"{where}:{i + 1}: malformed runnable marker {line!r}")
            continue
        needs = {n.strip() for n in (m.group("needs") or "").split(",") if n.strip()}
        if needs - NEEDS:
            raise ValueError(f"{where}:{i + 1}: unknown requirement(s) {sorted(needs - NEEDS)} (known: {NEEDS})")
        if i + 1 >= len(lines) or lines[i + 1].strip() != "```bash":
            raise ValueError(f"{where}:{i + 1}: a runnable marker must be followed by a ```bash fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{where}:{i + 2}: unclosed ```bash fence")
        out.append((where, i + 2, "\n".join(lines[i + 2:end]), needs))
    return out


def _blocks():
    blocks = []
    for doc in DOCS:
        blocks += runnable_blocks((REPO / doc).read_text(), doc)
    return blocks


BLOCKS = _blocks()


def test_markers_parse():
    assert runnable_blocks("<!-- runnable -->\n```bash\necho hi\n```\n", "x") == [("x", 2, "echo hi", set())]
    assert runnable_blocks("<!-- runnable: libtpu -->\n```bash\na\nb\n```", "x") == [("x", 2, "a\nb", {"libtpu"})]
    for bad in ("<!-- runnable -->\n```python\nx\n```", "<!-- runnable -->\n\n```bash\nx\n```",
                "<!-- runnable: gpu -->\n```bash\nx\n```", "<!-- runnable! -->",
                "<!-- runnable -->\n```bash\nx"):
        with pytest.raises(ValueError):
            runnable_blocks(bad, "x")


def test_readme_opens_with_the_quick_start_and_marks_a_job_per_screen():
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split()[0] for line in first.strip().splitlines()] == ["./run.sh", "./test.sh"]
    assert 'exec python -m ming_jax.generate "$@"' in (REPO / "run.sh").read_text()  # ./run.sh ARGS = generate ARGS
    marked = "\n".join(script for doc, _, script, _ in BLOCKS if doc == "README.md")
    for job in ("ming_jax.convert", "ming_jax.generate", "--image", "ming_jax.batch", "ming_jax.tts",
                "ming_jax.train", "ming_jax.parity", "ming_jax.aot", "benchmarks."):  # imagine: see the docstring
        assert job in marked, f"README: no runnable command with {job}"


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of this checkout (HEAD + uncommitted changes to tracked files), ../shared beside it."""
    root = tmp_path_factory.mktemp("fresh")
    dst = root / "ming_jax"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--local", "--no-checkout", str(REPO), str(dst)], check=True)
    subprocess.run(["git", "checkout", "-q", head], cwd=dst, check=True)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=dst, input=diff, check=True)
    (root / "shared").mkdir()
    if GOLDEN_DIR.is_dir():
        os.symlink(GOLDEN_DIR, root / "shared" / "golden")
    if (GOLDEN_DIR.parent / "reference").is_dir():
        os.symlink(GOLDEN_DIR.parent / "reference", root / "shared" / "reference")
    bin_dir = root / "bin"  # `python` in the blocks: this interpreter (a wrapper: a symlink would lose its venv)
    bin_dir.mkdir()
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    return dst, bin_dir


def _libtpu_missing() -> bool:
    return importlib.util.find_spec("libtpu") is None


@pytest.fixture(scope="module")
def ran(clone, request):
    """The selected blocks' (exit status, stdout, stderr, seconds), run WORKERS at a time: each is a few processes
    that mostly compile on one core, so on a 2-core machine two at a time take about half the wall time."""
    dst, bin_dir = clone
    selected = {(item.callspec.params["doc"], item.callspec.params["line"]) for item in request.session.items
                if getattr(item, "originalname", None) == "test_runnable_command"}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(dst), MING_GOLDEN_DIR=str(GOLDEN_DIR),
               ALLOW_MULTIPLE_LIBTPU_LOAD="1", PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
    env["XLA_FLAGS"] = xla_env.flags()  # the suite's compile setting only (no host device count of a test's)

    def one(script):
        t0 = time.perf_counter()
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=dst, env=env, capture_output=True,
                           text=True, timeout=600)
        return r.returncode, r.stdout, r.stderr, time.perf_counter() - t0

    todo = {(doc, line): script for doc, line, script, needs in BLOCKS
            if (doc, line) in selected and not ("libtpu" in needs and _libtpu_missing())}
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {key: pool.submit(one, script) for key, script in todo.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("doc,line,script,needs", BLOCKS, ids=[f"{d}:{n}" for d, n, _, _ in BLOCKS])
def test_runnable_command(doc, line, script, needs, ran):
    if "libtpu" in needs:
        need_libtpu()  # fails without libtpu, or skips saying so with MING_NO_LIBTPU=1
    if not GOLDEN_DIR.is_dir() and "golden" in script:
        pytest.fail(f"golden data not found at {GOLDEN_DIR} (set MING_GOLDEN_DIR)")
    rc, stdout, stderr, seconds = ran[doc, line]
    assert rc == 0, (f"{doc}:{line} failed (exit {rc}):\n{script}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n"
                     f"{stderr[-3000:]}")
    print(f"{doc}:{line}: {seconds:.1f} s")

"""`python -m ming_jax.imagine`: the tiny default (random weights, says so), editing with a reference image, a
release folder with image-generation sub-folders, and clear errors for bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(args, timeout=900):
    return subprocess.run([sys.executable, "-m", "ming_jax.imagine"] + args, cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_tiny_default_edits_a_reference_and_writes_a_png(tmp_path):
    """The tiny default (random weights, says so) on the editing path: progress bar to the last step, a PNG of the
    reference's size, no temporary file left. (Text-to-image through the CLI: `test_release_folder_generates`.)"""
    ref = tmp_path / "ref.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(ref)
    out = tmp_path / "edit.png"
    r = _run(["--prompt", "make it blue", "--ref", str(ref), "--steps", "3", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and "editing" in r.stderr
    assert "denoising" in r.stderr and "3/3" in r.stderr  # the progress bar reached the last step
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8  # the tiny default's square
    assert sorted(os.listdir(tmp_path)) == ["edit.png", "ref.png"]  # no temporary file left behind


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "at least one step"),
    (["--size", "big"], "HEIGHTxWIDTH"),
    (["--ref", "/no/such/image.png"], "--ref"),
])
def test_bad_flags_are_named(tmp_path, args, message):
    r = _run(args + ["--out", str(tmp_path / "x.png")], timeout=300)
    assert r.returncode != 0
    assert message in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_corrupt_reference_is_refused(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    r = _run(["--ref", str(bad), "--out", str(tmp_path / "x.png")], timeout=300)
    assert r.returncode != 0 and "--ref" in r.stderr


def test_release_folder_without_image_folders_is_refused(tmp_path):
    from test_image_gen_checkpoint import write_image_release

    src = tmp_path / "release"
    write_image_release(str(src))
    shutil.rmtree(src / "transformer")
    r = _run(["--checkpoint", str(src), "--out", str(tmp_path / "x.png")], timeout=300)
    assert r.returncode != 0 and "transformer/config.json" in r.stderr


def test_release_folder_generates(tmp_path):
    """A release with image-generation folders and the stand-in tokenizer saved as its tokenizer.json."""
    from test_image_gen_checkpoint import tiny_config, write_image_release
    from ming_jax.processors import prompt as prompt_lib

    src = tmp_path / "release"
    write_image_release(str(src), dtype=np.float32)
    cfg, _ = tiny_config()
    prompt_lib.StandInTokenizer(prompt_lib.tiny_special_ids(cfg.llm)).save(str(src))
    out = tmp_path / "img.png"
    r = _run(["--checkpoint", str(src), "--prompt", "a dog", "--steps", "2", "--size", "32x32", "--resolution", "512",
              "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert "RANDOM" not in r.stderr
    assert np.asarray(Image.open(out)).shape == (512, 512, 3)  # 32x32 snaps to the 512 table's square bucket

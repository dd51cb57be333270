"""The quantization flags of the CLIs: `convert --dtype int8`, `generate --quantize fp8` (quantize at load), and
`aot --quantize` validation (the quantized AOT compiles themselves: tests/test_quant_aot.py)."""

import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)


def test_convert_int8_and_generate_quantized(golden_dir, tmp_path):
    src = tmp_path / "release"
    src.mkdir()
    for f in ("config.json", "weights.safetensors"):
        shutil.copyfile(golden_dir / "llm_backbone" / f, src / f)
    dst = tmp_path / "int8"
    r = _run("ming_jax.convert", "--src", str(src), "--dst", str(dst), "--dtype", "int8", "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((dst / "ming_jax.json").read_text())
    assert manifest["options"]["quantization"]["qtype"] == "int8"
    r = _run("ming_jax.generate", "--checkpoint", str(src), "--quantize", "fp8", "--prompt_ids", "1,2,3",
             "--max_new_tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "float8_e4m3fn" in r.stderr and "decoding 2/2" in r.stderr  # the parameter dtypes line
    r = _run("ming_jax.convert", "--src", str(src), "--dst", str(tmp_path / "x"), "--dtype", "int4")
    assert r.returncode != 0 and "--dtype" in r.stderr


def test_aot_rejects_an_unknown_quantization():
    r = _run("ming_jax.aot", "--preset", "tiny", "--step", "decode_step", "--quantize", "int3")
    assert r.returncode != 0 and "--quantize" in r.stderr

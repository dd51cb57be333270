"""The one loader (`ming_jax.checkpoint.load`): a release folder and its converted checkpoint (made by
`python -m ming_jax.convert`) give the same parameters, and the generation CLI on the converted checkpoint gives the same greedy tokens on one device and on an
8-device `expert=8` mesh (a subprocess with 8 host CPU devices)."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
import xla_env

from ming_jax.checkpoint import Loaded, convert, load
from ming_jax.checkpoint.manifest import CheckpointFormatError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["1,2,3,4,5,6", "7,8,9"]


@pytest.fixture(scope="module")
def llm_case(golden_dir, tmp_path_factory):
    """(release folder, converted checkpoint) of the golden llm_backbone case."""
    root = tmp_path_factory.mktemp("load")
    src = root / "release"
    src.mkdir()
    for f in ("config.json", "weights.safetensors"):
        shutil.copyfile(golden_dir / "llm_backbone" / f, src / f)
    dst = str(root / "ckpt")
    r = subprocess.run([sys.executable, "-m", "ming_jax.convert", "--src", str(src), "--dst", dst, "--quiet"],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr[-4000:]
    assert convert.mf.Manifest.read(dst).components == ["llm"]
    return str(src), dst


def _params(module) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_release_and_converted_load_the_same_parameters(llm_case):
    release, converted = llm_case
    a, b = load(release), load(converted)
    assert isinstance(a, Loaded) and (a.format, b.format) == ("release", "converted")
    assert list(a.parts) == list(b.parts) == ["llm"] and a.config == b.config
    pa, pb = _params(a.llm), _params(b.llm)
    assert sorted(pa) == sorted(pb) and len(pa) > 10
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert b.omni().llm is b.llm and b.omni().vision is None
    with pytest.raises(CheckpointFormatError, match="'vision' was not loaded"):
        b._module("vision")


def _generate(ckpt, *extra, env=None):
    args = [sys.executable, "-m", "ming_jax.generate", "--checkpoint", ckpt, "--max_new_tokens", "6"]
    for p in PROMPTS:
        args += ["--prompt_ids", p]
    r = subprocess.run(args + list(extra), capture_output=True, text=True, cwd=REPO, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(env or {})))
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    ids = re.findall(r"ids: (\[.*\])", r.stdout)
    assert len(ids) == len(PROMPTS), r.stdout
    return ids, r.stderr


def test_generate_cli_same_tokens_on_one_device_and_an_expert_mesh(llm_case):
    _, converted = llm_case
    single, err = _generate(converted)
    assert "no tokenizer.json" in err and "decoding 6/6" in err
    sharded, err = _generate(converted, "--mesh", "expert=8", "--rules", "ep_fsdp",
                             env={"XLA_FLAGS": xla_env.flags("--xla_force_host_platform_device_count=8")})
    assert "onto mesh" in err and "padded from 2 to 8 rows" in err
    assert sharded == single


def test_bf16_checkpoints_keep_float32_router_biases(llm_case, tmp_path):
    """A bf16 conversion loads in bf16 (also when the dtype is asked for explicitly, as the generate CLI does),
    except the router expert biases, which the model keeps in float32 (selection compares near-equal scores)."""
    release, _ = llm_case
    dst = str(tmp_path / "bf16")
    convert.convert(release, dst, dtype="bf16", progress=False, log=lambda m: None)
    for kw in ({}, {"dtype": "bfloat16", "compute_dtype": "bfloat16"}):
        params = _params(load(dst, **kw).llm)
        biases = {k for k in params if k.endswith("expert_bias")}
        assert biases and all(params[k].dtype == np.float32 for k in biases), kw
        assert all(str(params[k].dtype) == "bfloat16" for k in params if k not in biases), kw

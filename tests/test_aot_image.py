"""Ahead-of-time plans of image generation (`ming_jax.aot.compile.lower_image_step` / `compile_image_step`): one
Z-Image DiT forward as the sampler calls it (CFG batch of two), the sampler's whole scan, the VAE decode.

Here: the full-size programs lowered abstractly on CPU (no compile: the argument bytes are the parameter count x 2
bytes plus the inputs), reduced configs compiled by libtpu for small v5p / v6e slices (splash kernels in the
program, per-chip argument bytes = the parameters' shards), and the CLI flags. The full-size compiles take one to
several minutes each: `python -m benchmarks.image_aot` (docs/scaling.md, docs/data/image_aot.json), not CI.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tpu_compile import need_libtpu

from ming_jax import sharding
from ming_jax.aot import compile as aot
from ming_jax.config.dit import DiTConfig
from ming_jax.config.runtime import Runtime
from ming_jax.config.vae import VAEConfig
from ming_jax.models.image_gen.dit import ZImageDiT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The full DiT's layout at reduced width: head_dim 128 (the splash kernel's lane width, as in the full model), every
# stack present (noise refiner, context refiner, main layers); a quarter of the width (1024 / 4) is still whole
# 128-lane tiles, so TPU tiling pads the per-chip shards by a few percent only (SwiGLU width 2730 = 2 x 1365).
REDUCED_DIT = DiTConfig.z_image(dim=1024, n_heads=8, n_kv_heads=8, n_layers=2, n_refiner_layers=1, cap_feat_dim=128)
# The Flux layout (4 levels, x8) at reduced width: 128 channels everywhere (whole TPU lane tiles, so the compiled
# argument bytes are the parameter bytes; narrower convs are padded to 128 lanes); the mid-block attention is one
# head of 128 channels.
REDUCED_VAE = VAEConfig.flux(block_out_channels=(128, 128, 128, 128), layers_per_block=1)


def _cpu_mesh():
    return sharding.make_mesh("fsdp=1", jax.devices()[:1])


_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "ui32": 4, "i64": 8, "i1": 1, "i8": 1}


def _arg_bytes(lowered) -> int:
    """Global bytes of a lowered program's arguments, read from its `main` signature (jit has dropped the unused
    ones there)."""
    text = lowered.as_text()
    sig = text[text.index("func.func public @main("):]
    sig = sig[:sig.index("->")]
    args = re.findall(r"%arg\d+: tensor<((?:\d+x)*)([a-z]+\d*)>", sig)
    assert args, sig[:300]
    return sum(math.prod(int(d) for d in dims.split("x")[:-1]) * _BYTES[dt] for dims, dt in args)


def _per_chip_state_bytes(make, mesh, rules) -> int:
    """Bytes one chip holds of `make()`'s state under `rules` (each parameter's shard)."""
    abstract = nnx.eval_shape(make)
    shardings = sharding.state_shardings(abstract, mesh, rules)
    _, state = nnx.split(abstract)
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))


def _dit_shard_bytes(topology, mesh, rules) -> int:
    m = sharding.make_mesh(mesh, aot.topology_devices(topology))
    return _per_chip_state_bytes(lambda: ZImageDiT(REDUCED_DIT, Runtime.bf16(), rngs=nnx.Rngs(0)), m,
                                 aot.image_rules(rules))


def test_full_size_numbers():
    """The sizes the plans are read against: 6.15B DiT parameters, 84M VAE parameters (49.5M in the decoder), a
    1024 x 1024 image is 128 x 128 latents and 4096 + 256 DiT tokens with the release's 256 condition tokens."""
    dit, vae = DiTConfig.z_image(), VAEConfig.flux()
    assert aot.dit_param_count(dit) == 6_154_908_736
    assert aot.vae_param_count(vae) == 83_819_683
    assert 45e6 < aot.vae_param_count(vae, "decoder") < 55e6
    assert aot.image_latent_side(1024) == 128
    assert aot.dit_tokens(dit, 1024, 256) == 4352 == 17 * 256  # splits evenly over up to 256 chips (fsdp_seq)
    assert aot.dit_tokens(dit, 512, 250) == 1024 + 256
    rules = aot.image_rules("fsdp_seq")
    assert rules.seq == ("fsdp", "expert") and rules.batch == "data" and rules.embed == ("fsdp", "expert")
    assert aot.image_rules("fsdp") == sharding.ShardingRules.preset("fsdp")


@pytest.mark.parametrize("step", ["dit", "denoise"])
def test_full_size_dit_programs_lower_from_abstract_arguments(step):
    """The 6B DiT forward and the 30-step sampler lower from ShapeDtypeStructs (nothing allocated): bf16 parameters
    (2 bytes x 6.15B) plus the CFG inputs, in the sampler's dtypes."""
    dit = DiTConfig.z_image()
    lowered = aot.lower_image_step(step, _cpu_mesh(), aot.image_rules("fsdp"), dit=dit, batch=1)
    params = aot.dit_param_count(dit) * 2
    side, dc, cap = 128, dit.cap_feat_dim, 256
    if step == "dit":  # x [2, 16, 1, 128, 128] bf16, t [2] f32, caption [2, 256, 2560] bf16
        inputs = 2 * 16 * side * side * 2 + 2 * 4 + 2 * cap * dc * 2
    else:  # caption + negative [1, 256, 2560] bf16, latents [1, 16, 128, 128] f32, sigmas [31], times [30], g
        inputs = 2 * cap * dc * 2 + 16 * side * side * 4 + (31 + 30 + 1) * 4
    assert _arg_bytes(lowered) == params + inputs
    text = lowered.as_text()
    if step == "denoise":
        assert "stablehlo.while" in text  # the steps are one loop, not unrolled
    out = lowered.out_info
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == ((2, 16, 1, side, side) if step == "dit" else (1, 16, side, side))


def test_full_size_vae_decode_lowers_and_reads_only_the_decoder():
    """vae_decode of [2, 16, 128, 128] float32 latents to [2, 3, 1024, 1024]: the encoder's parameters are not
    arguments of the program (jit drops unused inputs), so it reads the decoder's 2 x 49.5M bytes."""
    vae = VAEConfig.flux()
    lowered = aot.lower_image_step("vae_decode", _cpu_mesh(), aot.image_rules("fsdp"), vae=vae, batch=2)
    assert _arg_bytes(lowered) == aot.vae_param_count(vae, "decoder") * 2 + 2 * 16 * 128 * 128 * 4
    out = lowered.out_info
    assert out.shape == (2, 3, 1024, 1024) and out.dtype == jnp.float32


@pytest.mark.slow
@pytest.mark.parametrize("topology,mesh,rules", [("v5p:2x2x1", "fsdp=4", "fsdp"),
                                                 ("v6e:2x2", "fsdp=2,tensor=2", "fsdp_tp")])
def test_reduced_dit_forward_compiles_for_tpu_with_splash(topology, mesh, rules):
    """One DiT forward (CFG batch of two) compiled by libtpu: the attention of each of the three block stacks is the
    splash Mosaic kernel, and a chip's arguments are its shard of the bf16 parameters plus the inputs."""
    need_libtpu()
    plan, compiled = aot.compile_image_step("dit", topology, mesh, rules, dit=REDUCED_DIT, image_size=256,
                                            caption_len=64)
    text = compiled.as_text()
    assert aot.mosaic_kernels(compiled) == 3, "one splash kernel per stack (noise / context refiner, main layers)"
    assert len(re.findall(r"%splash_mha_fwd\S* = ", text)) == 3
    assert not re.search(r"f32\[[0-9,]*\b320,320\]", text), "no [.., T, T] scores: the XLA fallback is not compiled"
    assert plan.fits and plan.seq == 256 + 64 and "DiT batch 2 (CFG)" in plan.note
    shard = _dit_shard_bytes(topology, mesh, rules)
    total = aot.dit_param_count(REDUCED_DIT) * 2
    # ~4 ways; the timestep MLP (0.5M parameters, no "embed" dim) and the norm scales stay replicated
    assert total / 4 < shard < total / 3.5
    inputs = 2 * 16 * 32 * 32 * 2 + 2 * 4 + 2 * 64 * 128 * 2  # at most (replicated CFG pair)
    # TPU tiling pads the SwiGLU width (2730 or 1365) and the small vectors (norm scales, biases) to whole tiles: a few
    # percent here, 0.05 % at full size (docs/scaling.md).
    assert shard <= plan.argument <= 1.02 * (shard + inputs)


@pytest.mark.slow
def test_reduced_denoise_scan_compiles_for_tpu():
    """The sampler's scan of DiT calls compiles as one loop with the same three splash kernels (not one per step);
    it returns the float32 latents only."""
    need_libtpu()
    plan, compiled = aot.compile_image_step("denoise", "v6e:2x2", "fsdp=4", "fsdp_seq", dit=REDUCED_DIT,
                                            image_size=256, caption_len=64, steps=4)
    text = compiled.as_text()
    assert aot.mosaic_kernels(compiled) == 3 and "while" in text
    assert plan.fits and "4 steps" in plan.note
    assert plan.output <= 16 * 32 * 32 * 4  # [1, 16, 32, 32] float32 latents (or a shard of them)
    shard = _dit_shard_bytes("v6e:2x2", "fsdp=4", "fsdp_seq")
    inputs = 2 * 64 * 128 * 2 + 16 * 32 * 32 * 4 + (5 + 4 + 1) * 4  # caption, negative, latents, schedule, g
    assert shard <= plan.argument <= 1.02 * (shard + inputs)


@pytest.mark.slow
def test_reduced_vae_decode_compiles_for_tpu_with_splash():
    """The VAE decode compiled by libtpu: the mid-block attention (one 128-wide head over the h x w latent pixels) is
    the splash kernel; the arguments are the decoder's bf16 parameters (replicated) and the latents."""
    need_libtpu()
    plan, compiled = aot.compile_image_step("vae_decode", "v5p:2x2x1", "fsdp=4", "fsdp", vae=REDUCED_VAE, batch=1,
                                            image_size=128)
    assert aot.mosaic_kernels(compiled) == 1
    assert plan.fits and plan.seq == 16 * 16
    params = aot.vae_param_count(REDUCED_VAE, "decoder") * 2
    latents = 16 * 16 * 16 * 4
    assert params + latents <= plan.argument <= 1.02 * (params + latents)
    assert plan.output == 3 * 128 * 128 * 4  # the [0, 1] image, float32, on every chip (batch 1 is not split)


def test_cli_rejects_image_rules_for_llm_steps():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ming_jax.aot", "--step", "decode_step", "--rules", "fsdp_seq"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode != 0 and "is for the image steps" in r.stderr + r.stdout


def test_cli_lists_the_image_flags():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ming_jax.aot", "--helpfull"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=REPO)
    out = r.stdout + r.stderr
    for flag in ("--image_size", "--caption_len", "--denoise_steps", "--[no]cfg", "--dit_preset", "--vae_preset"):
        assert flag in out, flag
    unwrapped = re.sub(r"\n\s+", "", out)  # absl wraps long enum lists
    enums = [set(m.split("|")) for m in re.findall(r"<([a-z_]+(?:\|[a-z_]+)+)>", unwrapped)]
    assert any({"train", "prefill", "decode", "decode_step", "dit", "denoise", "vae_decode"} <= e for e in enums), \
        enums  # the image steps beside the LLM's (the speech / omni steps: their own test files)


@pytest.mark.slow
def test_cli_compiles_an_image_step_and_writes_its_plan(tmp_path):
    need_libtpu()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "plans.json"
    r = subprocess.run([sys.executable, "-m", "ming_jax.aot", "--step", "dit", "--dit_preset", "tiny", "--image_size",
                        "128", "--caption_len", "32", "--topology", "v5p:2x2x1", "--mesh", "fsdp=4", "--mesh",
                        "data=2,fsdp=2", "--rules", "fsdp_seq", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DiT tiny" in r.stdout and "step=dit images=1 128x128 CFG" in r.stdout
    plans = json.load(open(out))
    assert [p["mesh"] for p in plans] == ["fsdp=4", "data=2,fsdp=2"]
    assert all(p["step"] == "dit" and p["rules"] == "fsdp_seq" and p["fits"] for p in plans)
    assert plans[0]["seq"] == aot.dit_tokens(DiTConfig.tiny(), 128, 32) == 64 + 32
    assert np.isfinite(plans[0]["compile_s"])

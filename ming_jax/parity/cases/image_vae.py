"""Golden kind `image_vae`: the image VAE (diffusers AutoencoderKL, Flux layout) as the Z-Image pipeline drives it.

Inputs: `latents` (DiT space, [B, L, h, w]) for the decode path, `ref_image` ([B, 3, H, W] in [-1, 1]) for the
encode path; either may be absent. Outputs compared (every one the case holds):
  decode: `decoder_input` (latents / scaling + shift), `decoded` (vae.decode(...).sample), `image_pt` (postprocess)
  encode: `posterior_mean`, `posterior_logvar` (clamped), `ref_latent` ((mode - shift) * scaling)
Sizes, scaling and shift all come from the case's config.json.
"""

from __future__ import annotations

from flax import nnx

from ming_jax.config.runtime import Runtime
from ming_jax.config.vae import VAEConfig
from ming_jax.models.image_gen import vae
from ming_jax.parity import numerics
from ming_jax.parity.golden import GoldenCase
from ming_jax.weights.table import load_state_dict
from ming_jax.weights.vae import vae_table

_DECODE_OUTPUTS = ("decoder_input", "decoded", "image_pt")
_ENCODE_OUTPUTS = ("posterior_mean", "posterior_logvar", "ref_latent")


def build(config: dict, tensors, runtime: Runtime | None = None) -> vae.AutoencoderKL:
    """The case's VAE, built abstractly and filled from the official tensors through the name table (strict)."""
    cfg = VAEConfig.from_official(config)
    model = nnx.eval_shape(lambda: vae.AutoencoderKL(cfg, runtime, rngs=nnx.Rngs(0)))
    return load_state_dict(model, vae_table(cfg), tensors)


def outputs(model: vae.AutoencoderKL, inputs) -> dict:
    """Our value of every output the case kind defines, for the inputs present."""
    cfg, ours = model.cfg, {}
    if "latents" in inputs:
        z = vae.to_decoder_input(cfg, inputs["latents"])
        decoded = vae.decode(model, inputs["latents"])
        ours.update(decoder_input=z, decoded=decoded, image_pt=vae.postprocess(decoded))
    if "ref_image" in inputs:
        mean, logvar = vae.encode(model, inputs["ref_image"])
        ours.update(posterior_mean=mean, posterior_logvar=logvar, ref_latent=vae.to_dit_latents(cfg, mean))
    return ours


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    if "latents" not in case.inputs and "ref_image" not in case.inputs:
        raise ValueError(f"{case.path}: neither 'latents' nor 'ref_image' among the inputs {sorted(case.inputs)}")
    model = build(case.config, case.weights, numerics.runtime_for(mode))
    ours = outputs(model, case.inputs)
    known = _DECODE_OUTPUTS + _ENCODE_OUTPUTS
    return numerics.compare_outputs(ours, case.outputs, dtype=mode, missing_note=lambda name: (
        "the case has it, we do not produce it (" +
        ("its input is missing" if name in known else "not an output of this kind") + ")"))

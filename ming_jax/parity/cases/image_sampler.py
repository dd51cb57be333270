"""Golden kind `image_sampler`: the release's whole sampling run (`ZImageLoss.sample` -> the Z-Image pipeline):
flow-matching Euler with CFG (batch [pos, neg], neg = the zero caption), optional editing reference encoded by the
VAE, and the VAE decode of the final latents.

Case layout: config.json {transformer_config, vae_config, scheduler_config_file, zimage_loss_kwargs
{text_encoder_norm, use_identity_mlp, vision_dim}, steps {name: N}, guidance_scale, height, width}; weights
`transformer.*`, `vae.*` (and `mlp.*` when the ToClip MLP is on); inputs per sub-case `<name>_condition_embeds`,
`<name>_initial_latents` (the injected noise; torch's generator is not reproduced), optional `<name>_ref_image`.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.config.dit import DiTConfig
from ming_jax.config.image_gen import CLIP_MLP_OUT, FlowMatchConfig
from ming_jax.config.runtime import Runtime
from ming_jax.config.vae import VAEConfig
from ming_jax.gen import flow_match, image as image_gen
from ming_jax.models.image_gen.condition import ClipMLP, wrap_caption
from ming_jax.models.image_gen.dit import ZImageDiT
from ming_jax.models.image_gen.vae import AutoencoderKL
from ming_jax.parity import numerics
from ming_jax.parity.golden import GoldenCase
from ming_jax.weights.dit import dit_table
from ming_jax.weights.image_gen import clip_mlp_table
from ming_jax.weights.table import load_state_dict
from ming_jax.weights.vae import vae_table


def _load(make, table, tensors, prefix):
    return load_state_dict(nnx.eval_shape(make), table, tensors, names=[n for n in tensors if n.startswith(prefix)])


def build(config: dict, tensors, runtime: Runtime):
    dit_cfg = DiTConfig.from_official(config["transformer_config"])
    vae_cfg = VAEConfig.from_official(config["vae_config"])
    dit = _load(lambda: ZImageDiT(dit_cfg, runtime, rngs=nnx.Rngs(0)), dit_table(dit_cfg, "transformer."), tensors,
                "transformer.")
    vae = _load(lambda: AutoencoderKL(vae_cfg, runtime, rngs=nnx.Rngs(0)), vae_table(vae_cfg, "vae."), tensors,
                "vae.")
    kw = config.get("zimage_loss_kwargs", {})
    clip = None
    if not kw.get("use_identity_mlp", False):
        width = int(kw["vision_dim"])
        if dit_cfg.cap_feat_dim != CLIP_MLP_OUT:
            raise ValueError(f"the ToClip MLP emits {CLIP_MLP_OUT} wide captions, the DiT takes {dit_cfg.cap_feat_dim}")
        clip = _load(lambda: ClipMLP(width, param_dtype=jnp.dtype(runtime.param_dtype), rngs=nnx.Rngs(0)),
                     clip_mlp_table("mlp."), tensors, "mlp.")
    unused = sorted(n for n in tensors if not n.startswith(("transformer.", "vae.", "mlp.")))
    if unused:
        raise ValueError(f"image_sampler case: tensors of no component: {unused[:8]}")
    return dit, vae, clip, bool(kw.get("text_encoder_norm", False))


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    dit, vae, clip, norm = build(case.config, case.weights, numerics.runtime_for(mode))
    sched_cfg = FlowMatchConfig.from_official(case.config["scheduler_config_file"])
    guidance = float(case.config["guidance_scale"])
    names = sorted({m.group(1) for k in case.inputs if (m := re.fullmatch(r"(.+)_condition_embeds", k))})
    if not names:
        raise ValueError(f"{case.path}: no '<name>_condition_embeds' inputs")
    rows = []
    for name in names:
        x = case.inputs
        cond = jnp.asarray(x[f"{name}_condition_embeds"])
        caption = wrap_caption(cond, text_encoder_norm=norm, clip_mlp=clip)
        negative = wrap_caption(jnp.zeros_like(cond), text_encoder_norm=norm, clip_mlp=clip)
        latents = np.asarray(x[f"{name}_initial_latents"], np.float32)
        steps = int(case.config["steps"][name])
        sched = flow_match.schedule(sched_cfg, steps, (latents.shape[2] // 2) * (latents.shape[3] // 2))
        ours = {"sigmas": sched.sigmas, "timesteps": sched.timesteps}
        ref = None
        if f"{name}_ref_image" in x:
            ref = image_gen.encode_reference(vae, x[f"{name}_ref_image"])
            ours["ref_latent"] = ref
        final, (outs, lats) = image_gen.denoise(dit, caption, latents, sched, guidance=guidance, negative=negative,
                                                ref_latent=ref, record=True)
        ours.update(step_model_out=outs, step_latents=lats, final_latents=final,
                    image_pt=image_gen.decode_images(vae, final))
        rows += numerics.compare_outputs(ours, case.outputs, dtype=mode, prefix=f"{name}_",
                                         missing_note="no such output in the sampler")
    return rows

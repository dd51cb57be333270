"""Golden kind `audio_vae`: the talker's AudioVAE (official `AudioVAE/`) decoding, streaming and encoding.

Inputs (each path runs when its inputs are present):
  decode: `latents` [B, T, d] -> `wave`, `dec_fc1`, `dec_upsampled`, `dec_backbone`, `dec_head_linear`
  stream: `latents` + `stream_chunk_sizes` [n] (last chunk with last=True) -> `stream_wave` (the concatenated
          calls) and `stream_chunk_lengths` (samples per call, compared exactly as integers)
  encode: `enc_waveform` [B, L] (+ `enc_noise` [B, d, T_lat], the release's torch layout, for `enc_latent`) ->
          `enc_params`, `enc_mean`, `enc_std`, `enc_latent`, `enc_frame_num` (a float in the release when patch_size
          is set, an int32 without patches: produced in that dtype here)
Sizes all come from the case's config.json.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.config.audio_vae import AudioVAEConfig
from ming_jax.config.runtime import Runtime
from ming_jax.models.talker import audio_vae
from ming_jax.parity import numerics
from ming_jax.parity.golden import GoldenCase
from ming_jax.weights.audio_vae import audio_vae_table
from ming_jax.weights.table import load_state_dict

_DECODE = ("wave", "dec_fc1", "dec_upsampled", "dec_backbone", "dec_head_linear")
_STREAM = ("stream_wave", "stream_chunk_lengths")
_ENCODE = ("enc_params", "enc_mean", "enc_std", "enc_latent", "enc_frame_num")


def build(config: dict, tensors, runtime: Runtime | None = None) -> audio_vae.AudioVAE:
    """The case's AudioVAE, built abstractly and filled from the official tensors through the name table (strict)."""
    cfg = AudioVAEConfig.from_official(config)
    model = nnx.eval_shape(lambda: audio_vae.AudioVAE(cfg, runtime, rngs=nnx.Rngs(0)))
    return load_state_dict(model, audio_vae_table(cfg), tensors)


def outputs(model: audio_vae.AudioVAE, inputs) -> dict:
    """Our value of every output the case kind defines, for the inputs present."""
    ours = {}
    if "latents" in inputs:
        ours.update(audio_vae.decode_intermediates(model, inputs["latents"]))
        if "stream_chunk_sizes" in inputs:
            chunks = audio_vae.decode_stream(model, inputs["latents"], np.asarray(inputs["stream_chunk_sizes"]))
            ours["stream_wave"] = jnp.concatenate(chunks, axis=-1)
            ours["stream_chunk_lengths"] = np.asarray([c.shape[-1] for c in chunks], np.int64)
    if "enc_waveform" in inputs:
        wave = inputs["enc_waveform"]
        params = audio_vae.encoder_params(model, wave)
        d = model.cfg.encoder.latent_dim
        noise = inputs.get("enc_noise")
        noise = np.zeros(params[..., :d].shape, np.float32) if noise is None else np.swapaxes(noise, 1, 2)
        latent, mean, std, frames = audio_vae.encode(model, wave, noise=noise)
        # the release returns a float count after its patch ceil (torch.ceil of an int32 / int), else int32
        frame_dtype = np.float32 if model.cfg.has_patch else np.int32
        ours.update(enc_params=params, enc_mean=mean, enc_std=std, enc_frame_num=np.asarray(frames, frame_dtype))
        if "enc_noise" in inputs:
            ours["enc_latent"] = latent
    return ours


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    if "latents" not in case.inputs and "enc_waveform" not in case.inputs:
        raise ValueError(f"{case.path}: neither 'latents' nor 'enc_waveform' among the inputs {sorted(case.inputs)}")
    model = build(case.config, case.weights, numerics.runtime_for(mode))
    ours = outputs(model, case.inputs)
    known = _DECODE + _STREAM + _ENCODE
    return numerics.compare_outputs(ours, case.outputs, dtype=mode, missing_note=lambda name: (
        "the case has it, we do not produce it (" +
        ("its input is missing" if name in known else "not an output of this kind") + ")"))

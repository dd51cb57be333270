"""The omni pipeline: media encoded once by the towers, the prompt laid out on the host, then the backbone's
forward (`forward`) or prefill + jitted decode loop (`generate`). The model and its encoders are
`ming_jax.models.omni`; this module only strings them together with the text pipeline (`ming_jax.gen.text`)."""

from __future__ import annotations

import dataclasses

import jax

from ming_jax.gen import text as generation
from ming_jax.models import inputs as multimodal
from ming_jax.models.llm import ModelOutput
from ming_jax.models.omni import (MediaFeatures, OmniInputs, OmniModel, create, create_abstract, encode_media, load,
                                  prepare)

__all__ = ["MediaFeatures", "OmniInputs", "OmniModel", "OmniOutput", "create", "create_abstract", "encode_media",
           "forward", "generate", "load", "prepare"]


@dataclasses.dataclass
class OmniOutput:
    embeddings: jax.Array  # [B, S, D] input embeddings after the multimodal merge
    llm: ModelOutput  # logits [B, S, V], hidden (final norm) [B, S, D], and with collect=True per-layer data
    media: MediaFeatures
    prepared: multimodal.Prepared  # positions [3, B, S], rope_deltas, modality masks, scatter plan

    @property
    def logits(self):
        return self.llm.logits


def forward(model: OmniModel, inputs: OmniInputs, *, collect: bool = False) -> OmniOutput:
    """The official `BailingMM2NativeForConditionalGeneration.forward` (no cache): every logit of the prompt.
    `collect` adds per-layer residual streams and every router's decisions."""
    media = encode_media(model, inputs)
    prep = prepare(model, inputs, media)
    embeddings, out = generation.forward(model.llm, prep, collect=collect)
    return OmniOutput(embeddings, out, media, prep)


def generate(model: OmniModel, inputs: OmniInputs, sampling: generation.SamplingConfig, *, seed: int = 0,
             return_logits: bool = False, progress=None, bucket: int = 64) -> generation.Generated:
    """The official `generate` for understanding: media encoded once, then prefill + jitted decode loop (prompts
    left-padded to a multiple of `bucket` slots: prompts of one bucket share the compiled decode loop)."""
    media = encode_media(model, inputs)
    prep = prepare(model, inputs, media)
    return generation.generate(model.llm, prep, sampling, seed=seed, return_logits=return_logits, progress=progress,
                               bucket=bucket)

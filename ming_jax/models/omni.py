"""The omni model of Ming-flash-omni 2.0 (official `BailingMM2NativeForConditionalGeneration`) for understanding:
vision tower + projector, audio tower + projector, and the BailingMoeV2 language model.

One forward (`forward`), in the order of the official one:

    pixel_values [N, C*Tp*P*P] + image_grid_thw       -> ViT -> merger -> projector -> L2 norm   image_embeds [n, D]
    pixel_values_videos + video_grid_thw (per frame)   -> the same tower and projector            video_embeds [m, D]
    audio_feats [B, T, mel] + audio_feats_lengths      -> whisper encoder -> conv projector -> L2 audio_embeds [B, L, D]
    input_ids with placeholders + the three above      -> multimodal.prepare (host): scatter plan, 3-D positions,
                                                          router modality masks
                                                       -> BailingMoeV2 forward -> logits [B, S, V]

The towers run as their own jitted functions (one compilation per grid / clip layout, see `vision.py`, `audio.py`);
their outputs come back to the host, where `inputs.prepare` lays out the prompt exactly as the official LLM
forward does, and then the backbone runs jitted (`ming_jax.gen.omni.forward` / `generate`: the pipeline).

Deepstack: the release builds its vision tower WITHOUT deepstack and its LLM takes no deepstack features, yet the
checkpoint holds the deepstack mergers. We load them (the weight table is strict over the whole state dict) and, with
`OmniModel(..., deepstack=True)`, the tower also returns the deepstack features (`MediaFeatures.*_deepstack`);
nothing is ever injected into the LLM, so logits are the same either way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.models.registry import omni_table
from ming_jax.weights.table import load_state_dict
from ming_jax.models import inputs as multimodal
from ming_jax.layers.norms import l2_normalize
from ming_jax.layers.params import host_random
from ming_jax.models.audio import AudioFeatures, AudioTower, encode_audio, sinusoids
from ming_jax.config.omni import OmniConfig
from ming_jax.config.runtime import Runtime
from ming_jax.models.inputs import OmniInputs
from ming_jax.models.llm import BailingMoeV2
from ming_jax.models.vision import Grid, VisionProjector, VisionTransformer, as_grid

__all__ = ["OmniModel", "OmniInputs", "MediaFeatures", "create", "create_abstract", "load", "encode_media",
           "prepare"]


class OmniModel(nnx.Module):
    """`llm` (BailingMoeV2), `vision` + `vision_proj` (None without a vision tower), `audio` (encoder + projector;
    None without an audio tower). Parameter paths are what `ming_jax.models.registry.omni_table` names."""

    def __init__(self, cfg: OmniConfig, runtime: Runtime | None = None, *, deepstack: bool = False,
                 rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        self.llm = BailingMoeV2(cfg.llm, runtime, rngs=rngs)
        has_vision = cfg.vision is not None
        self.vision = (VisionTransformer(cfg.vision, runtime, use_deepstack=deepstack, rngs=rngs) if has_vision
                       else None)
        self.vision_proj = VisionProjector(
            cfg.vision.out_hidden_size, cfg.llm.hidden_size, cfg.mlp_depth,
            param_dtype=jnp.dtype(runtime.param_dtype), rngs=rngs) if has_vision else None
        self.audio = AudioTower(cfg.audio, runtime, rngs=rngs) if cfg.audio is not None else None


def create(cfg: OmniConfig, runtime: Runtime | None = None, *, seed: int = 0, deepstack: bool = False,
           host: bool = True) -> OmniModel:
    """Random weights (tests, the CLI's tiny demo).

    `host=True` (default) draws them with numpy into the abstract model: no initializer is compiled, which on a
    busy CPU saves about a minute even for the tiny preset (every parameter shape is its own XLA program). Norm
    scales are 1, biases 0, whisper's position table its sinusoids, every other tensor N(0, 0.02^2).
    `host=False` runs the modules' own initializers."""
    if not host:
        return OmniModel(cfg, runtime, deepstack=deepstack, rngs=nnx.Rngs(seed))
    return host_random(create_abstract(cfg, runtime, deepstack=deepstack), seed,
                       special={"positional_embedding": lambda shape: sinusoids(*shape)})


def create_abstract(cfg: OmniConfig, runtime: Runtime | None = None, *, deepstack: bool = False) -> OmniModel:
    """`jax.ShapeDtypeStruct` leaves only: the shape of the model at any size, nothing allocated."""
    return nnx.eval_shape(lambda: OmniModel(cfg, runtime, deepstack=deepstack, rngs=nnx.Rngs(0)))


def load(cfg: OmniConfig, tensors, runtime: Runtime | None = None, *, deepstack: bool = False, names=None,
         put=None) -> OmniModel:
    """The model with every parameter filled from official tensors (strict over the whole omni state dict)."""
    return load_state_dict(create_abstract(cfg, runtime, deepstack=deepstack), omni_table(cfg), tensors,
                           names=names, put=put)


# --- media encoders -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MediaFeatures:
    """What the towers hand the LLM (host arrays), plus what the official forward computes but does not use."""

    image_embeds: np.ndarray | None = None  # [N_img_tok, D] L2-normalised, images in order
    video_embeds: np.ndarray | None = None  # [N_vid_tok, D]
    audio: AudioFeatures | None = None  # .embeds [B, L, D] (L2-normalised), .lengths [B, N]
    image_deepstack: list[np.ndarray] | None = None  # deepstack=True only: one [N_img_tok, out_hidden] per tap
    video_deepstack: list[np.ndarray] | None = None


@functools.partial(nnx.jit, static_argnames=("grid",))
def _vision_embeddings(tower: VisionTransformer, projector: VisionProjector, pixel_values, grid: Grid):
    """The official `extract_image_feature`: tower -> projector -> L2 norm, plus the tower's deepstack features."""
    out = tower(pixel_values, grid)
    hidden, deepstack = out if tower.use_deepstack else (out, [])
    with jax.named_scope("vision_projector"):
        return l2_normalize(projector(hidden)), deepstack


def _vision(model: OmniModel, pixel_values, grid_thw, what: str):
    if pixel_values is None and grid_thw is None:
        return None, None
    if pixel_values is None or grid_thw is None:
        raise ValueError(f"{what}: pixel values and grid_thw come together; got only "
                         f"{'the grid' if pixel_values is None else 'the pixel values'}")
    if model.vision is None:
        raise ValueError(f"{what} given, but this model has no vision tower (vision_config is null)")
    embeds, deep = _vision_embeddings(model.vision, model.vision_proj, np.asarray(pixel_values, np.float32),
                                      as_grid(grid_thw))
    return np.asarray(embeds), ([np.asarray(d) for d in deep] if model.vision.use_deepstack else None)


def encode_media(model: OmniModel, inputs: OmniInputs) -> MediaFeatures:
    """Run the towers on whatever media `inputs` holds (images, video frames, audio clips)."""
    image, image_deep = _vision(model, inputs.pixel_values, inputs.image_grid_thw, "images")
    video, video_deep = _vision(model, inputs.pixel_values_videos, inputs.video_grid_thw, "video frames")
    audio = None
    if inputs.audio_feats is not None:
        if model.audio is None:
            raise ValueError("audio features given, but this model has no audio tower (audio_config is null)")
        if inputs.audio_feats_lengths is None:
            raise ValueError("audio_feats need audio_feats_lengths (mel frames of each clip, [batch, clips])")
        audio = encode_audio(model.audio, np.asarray(inputs.audio_feats, np.float32), inputs.audio_feats_lengths)
    elif inputs.audio_feats_lengths is not None:
        raise ValueError("audio_feats_lengths given without audio_feats")
    return MediaFeatures(image, video, audio, image_deep, video_deep)


def prepare(model: OmniModel, inputs: OmniInputs, media: MediaFeatures) -> multimodal.Prepared:
    """The official LLM forward's own bookkeeping (host side): where each feature row goes, positions, masks."""
    if media.audio is not None and inputs.audio_placeholder_loc_lens is None:
        raise ValueError("audio features need audio_placeholder_loc_lens ((start, length) of each placeholder span)")
    mm = multimodal.MultimodalInputs(
        image_embeds=media.image_embeds, video_embeds=media.video_embeds,
        audio_embeds=None if media.audio is None else np.asarray(media.audio.embeds),
        audio_lengths=None if media.audio is None else np.asarray(media.audio.lengths),
        audio_spans=None if media.audio is None else inputs.audio_placeholder_loc_lens,
        image_grid_thw=inputs.image_grid_thw, video_grid_thw=inputs.video_grid_thw)
    return multimodal.prepare(model.cfg.llm, inputs.input_ids, inputs.attention_mask, mm)

"""Every component of a release, declared once: its config reader, abstract builder, weight table, official name
prefixes and the subtrees of our parameter tree it fills. The converter, the loader, the exporter, the parity
runners and the CLIs read this module and nothing else to learn which components exist.

    parts = describe(raw)            # the components a config.json describes: {"llm": Part, "vision": Part, ...}
    parts["llm"].table               # official names -> our dotted paths (under the subtree keys, "llm.embed", ...)
    parts["llm"].modules["llm"]      # the abstract module that fills subtree "llm" (nnx.eval_shape: no memory)

Our tree is the parameter tree of `ming_jax.models.omni.OmniModel`: one top-level key per subtree. A release that
holds only one sub-model (an LLM-only config, a vision- or audio-tower config: the golden cases) gives the same
subtree keys, so converted checkpoints of any release share one layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from ming_jax.config.audio import AudioConfig
from ming_jax.config.base import ConfigError
from ming_jax.config.image_gen import ImageGenConfig
from ming_jax.config.llm import LLMConfig
from ming_jax.config.omni import OmniConfig
from ming_jax.config.runtime import Runtime
from ming_jax.config.speech import SpeechConfig
from ming_jax.config.vision import VisionConfig
from ming_jax.models.audio import AudioTower
from ming_jax.models.llm import BailingMoeV2
from ming_jax.models.image_gen.condition import ImageGenHead
from ming_jax.models.image_gen.dit import ZImageDiT
from ming_jax.models.image_gen.vae import AutoencoderKL
from ming_jax.models.talker.audio_vae import AudioVAE
from ming_jax.models.talker.talker import Talker
from ming_jax.models.vision import VisionProjector, VisionTransformer
from ming_jax.weights.audio import audio_table
from ming_jax.weights.dit import dit_table
from ming_jax.weights.audio_vae import audio_vae_table
from ming_jax.weights.image_gen import head_table
from ming_jax.weights.llm import llm_table
from ming_jax.weights.vae import vae_table
from ming_jax.weights.table import Table, param_shapes
from ming_jax.weights.talker import talker_table
from ming_jax.weights.vision import OMNI_PROJECTOR_PREFIX, OMNI_VISION_PREFIX, projector_table, vision_table


@dataclasses.dataclass(frozen=True)
class Component:
    """One kind of sub-model: which subtrees of our tree it fills, and what it is."""

    name: str
    subtrees: tuple[str, ...]
    what: str


COMPONENTS: dict[str, Component] = {
    "llm": Component("llm", ("llm",), "BailingMoeV2 language model"),
    "vision": Component("vision", ("vision", "vision_proj"), "vision tower (Qwen3-VL-style ViT) + projector"),
    "audio": Component("audio", ("audio",), "audio tower (whisper encoder) + projector"),
    "image_gen": Component("image_gen", ("image_head", "dit", "vae"),
                           "image generation: query tokens + Qwen2 connector (image_head), Z-Image DiT, Flux VAE"),
    "talker": Component("talker", ("talker", "audio_vae"),
                        "speech generation: Qwen2 talker LM + flow-matching head + aggregator + stop / speaker heads "
                        "(talker), AudioVAE to 44.1 kHz (audio_vae)"),
}
# Parts of the release not implemented yet: named in errors and in the converter's skip report ({} today).
PLANNED: dict[str, str] = {}
# Release sub-folders of the planned components (the converter skips and lists them).
PLANNED_FOLDERS: dict[str, str] = {}

# The image-generation component lives in release sub-folders, each a checkpoint of its own. Their weights join one
# name space under these prefixes (the official module's own names: `get_condition_embeds_for_image_gen` reads
# query_tokens_dict / proj_in / proj_out from mlp/ unprefixed, the pipeline's transformer / vae keep their folder
# name); scheduler/ holds only its config.
IMAGE_GEN_WEIGHT_FOLDERS: dict[str, str] = {"mlp": "", "connector": "connector.", "transformer": "transformer.",
                                            "vae": "vae."}
IMAGE_GEN_CONFIG_FILES: dict[str, str] = {"mlp": "mlp/config.json", "connector": "connector/config.json",
                                          "transformer": "transformer/config.json", "vae": "vae/config.json",
                                          "scheduler": "scheduler/scheduler_config.json"}
IMAGE_GEN_PREFIXES = ("query_tokens_dict.", "proj_in.", "proj_out.", "mlp.", "connector.", "transformer.", "vae.")
LLM_PREFIX = "model."  # in the omni release, BailingMoeV2ForCausalLM's own names (`model.`, `lm_head.`) follow it
AUDIO_PREFIXES = ("audio.", "linear_proj_audio.")

# Speech generation lives in the release's talker/ folder, a checkpoint of its own (config.json + model.safetensors
# with the talker's names, llm/config.json + the LM's tokenizer, campplus.onnx, data/voice_name.json) with the AudioVAE
# in talker/vae/ (config.json + model.safetensors). Config files relative to the talker folder:
TALKER_FOLDER = "talker"
TALKER_CONFIG_FILES: dict[str, str] = {"talker": "config.json", "llm": "llm/config.json", "vae": "vae/config.json"}
TALKER_PREFIX = "talker."  # the talker's own names under this prefix in an omni release ...
TALKER_VAE_PREFIX = "vae."  # ... and the VAE's under it + this
# Weight sub-folders joined into one name space: of an omni release root, and of a bare talker folder (whose own
# shards are the top-level ones).
TALKER_WEIGHT_FOLDERS: dict[str, str] = {TALKER_FOLDER: TALKER_PREFIX,
                                         f"{TALKER_FOLDER}/vae": TALKER_PREFIX + TALKER_VAE_PREFIX}
TALKER_ONLY_WEIGHT_FOLDERS: dict[str, str] = {"vae": TALKER_VAE_PREFIX}
_TALKER_OWN = ("model.", "cfm.", "aggregator.", "stop_head.", "spk_head.")  # the names of BailingTalker2's modules


def nested(table: Table, ours: str) -> Table:
    """The same rules with our paths under the subtree `ours` (e.g. "llm.")."""
    return table.renamed(ours=ours)


@dataclasses.dataclass(frozen=True)
class Part:
    """One component as a given release holds it."""

    name: str
    config: Any  # LLMConfig | VisionConfig | AudioConfig | ImageGenConfig | SpeechConfig
    runtime: Runtime  # what the modules were built with (dtypes, kernels)
    modules: Mapping[str, nnx.Module]  # subtree key -> abstract module
    table: Table  # official names -> our dotted paths, under the subtree keys
    prefixes: tuple[str, ...]  # official names starting with one of these belong here
    problem: str | None = None  # why this component cannot be built (its configs are bad): it owns its names but
    # loading it is an error naming this; the other components load regardless

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefixes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Our dotted path ("llm.embed", ...) -> shape of every parameter this part fills."""
        return {f"{key}.{p}": s for key, module in self.modules.items() for p, s in param_shapes(module).items()}


def abstract(make: Callable[[], nnx.Module]) -> nnx.Module:
    return nnx.eval_shape(make)


def llm_part(cfg: LLMConfig, prefix: str, runtime: Runtime) -> Part:
    """`prefix`: what precedes `model.` / `lm_head.` in the official names ("model." inside the omni release)."""
    module = abstract(lambda: BailingMoeV2(cfg, runtime, rngs=nnx.Rngs(0)))
    return Part("llm", cfg, runtime, {"llm": module}, nested(llm_table(cfg, prefix), "llm."), (prefix,))


def vision_part(cfg: VisionConfig, prefix: str, projector: tuple[int, int] | None, runtime: Runtime, *,
                deepstack: bool = False) -> Part:
    """projector: (LLM hidden size, mlp_depth) of the omni release's `linear_proj`, or None for a bare tower."""
    modules = {"vision": abstract(lambda: VisionTransformer(cfg, runtime, use_deepstack=deepstack,
                                                            rngs=nnx.Rngs(0)))}
    table = vision_table(cfg, prefix, "vision.")
    prefixes: tuple[str, ...] = (prefix,)
    if projector is not None:
        out_dim, depth = projector
        modules["vision_proj"] = abstract(lambda: VisionProjector(
            cfg.out_hidden_size, out_dim, depth, param_dtype=jnp.dtype(runtime.param_dtype), rngs=nnx.Rngs(0)))
        table = table + projector_table(depth, OMNI_PROJECTOR_PREFIX, "vision_proj.")
        prefixes += (OMNI_PROJECTOR_PREFIX,)
    return Part("vision", cfg, runtime, modules, table, prefixes)


def audio_part(cfg: AudioConfig, runtime: Runtime) -> Part:
    module = abstract(lambda: AudioTower(cfg, runtime, rngs=nnx.Rngs(0)))
    return Part("audio", cfg, runtime, {"audio": module}, audio_table(cfg, "", "audio."), AUDIO_PREFIXES)


def image_gen_part(cfg: ImageGenConfig, llm_hidden: int, runtime: Runtime) -> Part:
    """The image-generation head, DiT and VAE of an omni release (names as `IMAGE_GEN_WEIGHT_FOLDERS` joins them)."""
    modules = {
        "image_head": abstract(lambda: ImageGenHead(cfg.head, llm_hidden, cfg.connector, runtime, rngs=nnx.Rngs(0))),
        "dit": abstract(lambda: ZImageDiT(cfg.dit, runtime, rngs=nnx.Rngs(0))),
        "vae": abstract(lambda: AutoencoderKL(cfg.vae, runtime, rngs=nnx.Rngs(0))),
    }
    table = (head_table(cfg.head, cfg.connector, prefix=IMAGE_GEN_WEIGHT_FOLDERS["mlp"],
                        connector_prefix=IMAGE_GEN_WEIGHT_FOLDERS["connector"], ours="image_head.") +
             dit_table(cfg.dit, IMAGE_GEN_WEIGHT_FOLDERS["transformer"], "dit.") +
             vae_table(cfg.vae, IMAGE_GEN_WEIGHT_FOLDERS["vae"], "vae."))
    return Part("image_gen", cfg, runtime, modules, table, IMAGE_GEN_PREFIXES)


def talker_part(cfg: SpeechConfig, prefix: str, runtime: Runtime) -> Part:
    """The talker and its AudioVAE. `prefix`: what precedes the talker's own names (`TALKER_PREFIX` in an omni
    release, "" in a bare talker folder); the VAE's follow it + `TALKER_VAE_PREFIX`."""
    modules = {"talker": abstract(lambda: Talker(cfg.talker, runtime, rngs=nnx.Rngs(0))),
               "audio_vae": abstract(lambda: AudioVAE(cfg.vae, runtime, rngs=nnx.Rngs(0)))}
    table = (talker_table(cfg.talker).renamed(prefix, "talker.") +
             audio_vae_table(cfg.vae, prefix + TALKER_VAE_PREFIX, "audio_vae."))
    prefixes = (prefix,) if prefix else _TALKER_OWN + (TALKER_VAE_PREFIX,)
    return Part("talker", cfg, runtime, modules, table, prefixes)


def _talker_or_problem(speech: Mapping[str, Mapping], prefix: str, runtime: Runtime) -> Part:
    """The talker part, or (its configs bad) a part that owns the talker's names and says why it cannot load."""
    try:
        return talker_part(SpeechConfig.from_official(speech), prefix, runtime)
    except (ConfigError, ValueError) as e:  # a bad talker config must not block the understanding parts
        prefixes = (prefix,) if prefix else _TALKER_OWN + (TALKER_VAE_PREFIX,)
        return Part("talker", None, runtime, {}, Table([]), prefixes, f"the talker configs cannot be used: {e}")


def omni_parts(cfg: OmniConfig, runtime: Runtime | None = None, *, deepstack: bool = False) -> dict[str, Part]:
    """The parts of an omni model (the towers its config has)."""
    runtime = Runtime() if runtime is None else runtime
    parts = {"llm": llm_part(cfg.llm, LLM_PREFIX, runtime)}
    if cfg.vision is not None:
        parts["vision"] = vision_part(cfg.vision, OMNI_VISION_PREFIX, (cfg.llm.hidden_size, cfg.mlp_depth),
                                      runtime, deepstack=deepstack)
    if cfg.audio is not None:
        parts["audio"] = audio_part(cfg.audio, runtime)
    return parts


def omni_table(cfg: OmniConfig) -> Table:
    """Official names of the whole omni state dict <-> the parameter paths of `OmniModel` (every part's table)."""
    tables = [p.table for p in omni_parts(cfg).values()]
    out = tables[0]
    for t in tables[1:]:
        out = out + t
    return out


def release_kind(raw: Mapping) -> str:
    """"omni", "llm", "vision", "audio" or "talker" (a bare talker/ folder): which layout a config.json
    describes."""
    if isinstance(raw.get("llm_config"), Mapping):
        return "omni"
    if isinstance(raw.get("flowmodel"), Mapping) and isinstance(raw.get("aggregator"), Mapping):
        return "talker"
    model_type = raw.get("model_type")
    if model_type == "bailing_moe_v2" or "BailingMoeV2ForCausalLM" in (raw.get("architectures") or ()):
        return "llm"
    if model_type in ("qwen3_moe_vit", "qwen3_vl_moe") or {"depth", "patch_size"} <= set(raw):
        return "vision"
    if isinstance(raw.get("audio_config"), Mapping):
        return "audio"
    raise ConfigError(f"config.json describes no model we convert or load (model_type={model_type!r}, architectures="
                      f"{raw.get('architectures')!r}); expected the omni config, an LLM-only, vision-only, audio-only or "
                      f"talker config")


def release_kind_or_none(raw: Mapping | None) -> str | None:
    """`release_kind`, or None for a missing or unrecognised config."""
    if not isinstance(raw, Mapping):
        return None
    try:
        return release_kind(raw)
    except ConfigError:
        return None


def describe(raw: Mapping, runtime: Runtime | None = None, *, deepstack: bool = False,
             sections: Mapping[str, Mapping] | None = None,
             speech: Mapping[str, Mapping] | None = None) -> dict[str, Part]:
    """The components `raw` (a config.json dict) describes, each as a `Part` built with `runtime` (default:
    `Runtime()`), in COMPONENTS order. `sections`: the image-generation sub-folder configs of an omni release
    ({"mlp": ..., "connector": ..., "transformer": ..., "vae": ..., "scheduler": ...}, see
    `ming_jax.checkpoint.folders.image_gen_sections`); with them the omni release also has "image_gen".
    `speech`: the talker folder's configs ({"talker": ..., "llm": ..., "vae": ...}, see
    `ming_jax.checkpoint.folders.talker_sections`); with them the omni release also has "talker" (a bare talker
    folder, kind "talker", needs them)."""
    runtime = Runtime() if runtime is None else runtime
    kind = release_kind(raw)
    if sections and kind != "omni":
        raise ConfigError(f"image-generation folders belong to the omni release; this config.json is {kind}-only")
    if speech and kind not in ("omni", "talker"):
        raise ConfigError(f"a talker folder belongs to the omni release; this config.json is {kind}-only")
    if kind == "talker":
        if not speech:
            raise ConfigError("a talker folder needs its llm/config.json and vae/config.json (speech sections)")
        return {"talker": _talker_or_problem(speech, "", runtime)}
    if kind == "omni":
        cfg = OmniConfig.from_official(raw)  # cross-section checks (projector widths, depth, token ids)
        parts = omni_parts(cfg, runtime, deepstack=deepstack)
        if sections:
            try:
                parts["image_gen"] = image_gen_part(ImageGenConfig.from_official(sections), cfg.llm.hidden_size,
                                                    runtime)
            except (ConfigError, ValueError) as e:  # a bad sub-folder config must not block the understanding part
                parts["image_gen"] = Part("image_gen", None, runtime, {}, Table([]), IMAGE_GEN_PREFIXES,
                                          f"the image-generation configs cannot be used: {e}")
        if speech:
            parts["talker"] = _talker_or_problem(speech, TALKER_PREFIX, runtime)
        return parts
    if kind == "llm":
        return {"llm": llm_part(LLMConfig.from_official(raw), "", runtime)}
    if kind == "vision":
        return {"vision": vision_part(VisionConfig.from_official(raw), "", None, runtime, deepstack=deepstack)}
    return {"audio": audio_part(AudioConfig.from_official(raw), runtime)}


def select(available, requested) -> list[str]:
    """The requested component names (None / empty: all available that can be built), checked, in COMPONENTS
    order. `available`: component names, or `describe`'s {name: Part} (a Part with a `problem` is left out of
    "all" and is an error naming the problem when requested)."""
    broken = {c: p.problem for c, p in available.items() if p.problem} if isinstance(available, Mapping) else {}
    available = list(available)
    if not requested:
        return [c for c in available if c not in broken]
    asked_broken = [f"{c}: {broken[c]}" for c in requested if c in broken]
    if asked_broken:
        raise ConfigError("; ".join(asked_broken))
    unknown = [c for c in requested if c not in COMPONENTS]
    if unknown:
        hint = "; ".join(f"{k}: {v}" for k, v in PLANNED.items())
        raise ConfigError(f"unknown component(s) {unknown}; known: {', '.join(COMPONENTS)}" +
                          (f" ({hint})" if hint else ""))
    absent = [c for c in requested if c not in available]
    if absent:
        raise ConfigError(f"component(s) {absent} are not in this release's config.json (it has: "
                          f"{', '.join(available)})")
    return [c for c in COMPONENTS if c in requested]

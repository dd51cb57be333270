"""Which files of a checkpoint folder make up which component, beyond config.json and its shards.

The omni release keeps image generation in sub-folders, each a checkpoint of its own (`mlp/`, `connector/`,
`transformer/`, `vae/` with weights, `scheduler/` with only its config; see `registry.IMAGE_GEN_CONFIG_FILES`). A
converted ming_jax checkpoint keeps copies of the same config files at the same relative paths, so both formats are
described the same way:

    sections = image_gen_sections(path)      # None, or {"mlp": {...}, "connector": {...}, ...}
    source = open_source(path)               # the release's tensors, the sub-folders' joined under their prefixes
"""

from __future__ import annotations

import json
import os
import shutil

from ming_jax.checkpoint import glyph
from ming_jax.checkpoint.safetensors import CheckpointError, SourceCheckpoint
from ming_jax.models import registry

_REQUIRED = ("mlp", "connector", "transformer", "vae", "scheduler")  # the release's loaders need every one


def image_gen_problem(path: str) -> str | None:
    """Why a folder that has some image-generation sub-folders cannot serve image generation (None: it has all
    the required configs, or none of them)."""
    present = [k for k in _REQUIRED if os.path.isfile(os.path.join(path, registry.IMAGE_GEN_CONFIG_FILES[k]))]
    missing = [registry.IMAGE_GEN_CONFIG_FILES[k] for k in _REQUIRED if k not in present]
    return f"incomplete image-generation folders: {missing} missing" if present and missing else None


def image_gen_sections(path: str, *, required: bool = False) -> dict[str, dict] | None:
    """The image-generation configs of a release folder or converted checkpoint, or None when it has none or only
    some (`image_gen_problem` says which; the understanding components still load, and the converter lists the
    folders as skipped). `required`: raise instead of returning None."""
    present = {k: os.path.join(path, rel) for k, rel in registry.IMAGE_GEN_CONFIG_FILES.items()
               if os.path.isfile(os.path.join(path, rel))}
    problem = image_gen_problem(path)
    if problem or not any(k in present for k in _REQUIRED):
        if required:
            raise CheckpointError(f"{path}: {problem or 'no image-generation folders (' + ', '.join(_REQUIRED) + ')'}")
        return None
    out = {}
    for key, file in present.items():
        try:
            with open(file) as f:
                out[key] = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} is not valid JSON ({e})") from None
        if not isinstance(out[key], dict):
            raise CheckpointError(f"{file} is not a JSON object")
    return out


def wants_image_gen(components) -> bool:
    """Whether a load / conversion of `components` (None: everything the folder holds) reads image generation."""
    return components is None or len(components) == 0 or "image_gen" in components


def open_source(path: str, components=None) -> SourceCheckpoint:
    """A release folder's tensors, with its image-generation sub-folders' weights joined when it has them and
    `components` include image generation (so a broken image-generation folder never blocks an LLM-only load)."""
    merge = (registry.IMAGE_GEN_WEIGHT_FOLDERS
             if wants_image_gen(components) and image_gen_sections(path) is not None else None)
    return SourceCheckpoint(path, merge=merge)


def copy_sections(src: str, dst: str) -> list[str]:
    """Copy the image-generation config files of `src` (those present) to the same paths under `dst`, and the
    release's byt5/ glyph folder as it is (torch pickles, read by `ming_jax.checkpoint.glyph.load_glyph` in both
    formats; hard links where the file system allows)."""
    copied = []
    for rel in registry.IMAGE_GEN_CONFIG_FILES.values():
        if os.path.isfile(os.path.join(src, rel)):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(dst, rel))
            copied.append(rel)
    if image_gen_sections(src) is not None and glyph.has_glyph(src):
        copied += glyph.copy_glyph(src, dst)
    return copied


def config_only_folders() -> set[str]:
    """Sub-folders image generation uses that are neither skipped nor merged as safetensors: scheduler/ (its config)
    and byt5/ (the glyph branch, kept as the release's files)."""
    weights = set(registry.IMAGE_GEN_WEIGHT_FOLDERS)
    return ({rel.split("/", 1)[0] for rel in registry.IMAGE_GEN_CONFIG_FILES.values()} - weights) | {glyph.GLYPH_FOLDER}

"""Which files of a checkpoint folder make up which component, beyond config.json and its shards.

The omni release keeps image generation in sub-folders, each a checkpoint of its own (`mlp/`, `connector/`,
`transformer/`, `vae/` with weights, `scheduler/` with only its config; see `registry.IMAGE_GEN_CONFIG_FILES`). A
converted ming_jax checkpoint keeps copies of the same config files at the same relative paths, so both formats are
described the same way:

    sections = image_gen_sections(path)      # None, or {"mlp": {...}, "connector": {...}, ...}
    speech = talker_sections(path)           # None, or {"talker": {...}, "llm": {...}, "vae": {...}}
    source = open_source(path)               # the release's tensors, the sub-folders' joined under their prefixes

Speech generation is the release's `talker/` folder (its own config.json + weights, `llm/` with the LM's config and
tokenizer, `vae/` with the AudioVAE, `campplus.onnx`, `data/voice_name.json` and the voices' prompt wavs). A
converted checkpoint keeps every file of it except the weights at the same paths, so `talker_dir(path)` is where
the tokenizer, voices and speaker model are found in both formats. A bare talker folder is a release of its own.
"""

from __future__ import annotations

import json
import os
import shutil

from ming_jax.checkpoint import glyph
from ming_jax.checkpoint.manifest import MANIFEST_FILE, PARAMS_DIR
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


def talker_dir(path: str) -> str:
    """The folder holding the talker's files (llm/, vae/, campplus.onnx, data/): `path/talker` of an omni release
    or converted checkpoint, or `path` itself when it is a bare talker folder."""
    nested = os.path.join(path, registry.TALKER_FOLDER)
    if os.path.isfile(os.path.join(nested, registry.TALKER_CONFIG_FILES["talker"])):
        return nested
    if _is_talker_folder(path):
        return path
    raise CheckpointError(f"{path} has no talker: neither {registry.TALKER_FOLDER}/config.json nor a talker "
                          f"config.json (flowmodel + aggregator) of its own")


def _is_talker_folder(path: str) -> bool:
    cfg = _read_json(os.path.join(path, registry.TALKER_CONFIG_FILES["talker"]))
    return registry.release_kind_or_none(cfg) == "talker"


def _read_json(file: str) -> dict | None:
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return out


def talker_problem(path: str) -> str | None:
    """Why a folder with a talker cannot serve speech generation (None: it has all the talker configs, or no
    talker)."""
    try:
        root = talker_dir(path)
    except CheckpointError:
        return None
    missing = [os.path.relpath(os.path.join(root, rel), path) for rel in registry.TALKER_CONFIG_FILES.values()
               if not os.path.isfile(os.path.join(root, rel))]
    return f"incomplete talker folder: {missing} missing" if missing else None


def talker_sections(path: str, *, required: bool = False) -> dict[str, dict] | None:
    """The talker configs ({"talker", "llm", "vae"}) of an omni release / converted checkpoint / bare talker folder,
    or None when it has no talker or an incomplete one (`talker_problem` says what is missing). `required`: raise
    instead of returning None."""
    problem = talker_problem(path)
    try:
        root = talker_dir(path)
    except CheckpointError:
        if required:
            raise
        return None
    if problem:
        if required:
            raise CheckpointError(f"{path}: {problem}")
        return None
    return {k: _read_json(os.path.join(root, rel)) for k, rel in registry.TALKER_CONFIG_FILES.items()}


def talker_weight_folders(path: str) -> dict[str, str]:
    """{sub-folder: name prefix} of the talker's weights in a release folder (omni root or bare talker folder)."""
    if os.path.isfile(os.path.join(path, registry.TALKER_FOLDER, registry.TALKER_CONFIG_FILES["talker"])):
        return dict(registry.TALKER_WEIGHT_FOLDERS)
    return dict(registry.TALKER_ONLY_WEIGHT_FOLDERS)


def wants_talker(components) -> bool:
    """Whether a load / conversion of `components` (None: everything the folder holds) reads the talker."""
    return components is None or len(components) == 0 or "talker" in components


def wants_image_gen(components) -> bool:
    """Whether a load / conversion of `components` (None: everything the folder holds) reads image generation."""
    return components is None or len(components) == 0 or "image_gen" in components


def open_source(path: str, components=None) -> SourceCheckpoint:
    """A release folder's tensors, with its image-generation sub-folders' weights joined when it has them and
    `components` include image generation (so a broken image-generation folder never blocks an LLM-only load)."""
    merge = dict(registry.IMAGE_GEN_WEIGHT_FOLDERS
                 if wants_image_gen(components) and image_gen_sections(path) is not None else {})
    if wants_talker(components) and talker_sections(path) is not None:
        merge.update(talker_weight_folders(path))
    return SourceCheckpoint(path, merge=merge or None)


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


_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")


def copy_talker_files(src: str, dst: str) -> list[str]:
    """Copy every file of `src`'s talker folder except its weights (configs, the LM's tokenizer, campplus.onnx,
    voice_name.json and the voices' prompt wavs, the normaliser grammars) to the same paths under `dst`; hard links
    where the file system allows. A bare talker folder's top-level config.json is left to the caller."""
    root = talker_dir(src)
    bare = os.path.normpath(root) == os.path.normpath(src)
    copied = []
    for here, dirs, files in os.walk(root):
        if bare and os.path.normpath(here) == os.path.normpath(root):  # a converted bare talker: not its own data
            dirs[:] = [d for d in dirs if d != PARAMS_DIR]
            files = [f for f in files if f != MANIFEST_FILE]
        dirs.sort()
        for name in sorted(files):
            if name.endswith(_WEIGHT_SUFFIXES) or name.startswith("."):
                continue
            file = os.path.join(here, name)
            rel = os.path.normpath(os.path.relpath(file, src))
            if rel == "config.json":  # a bare talker folder: the top-level config is the checkpoint's own
                continue
            out = os.path.join(dst, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            try:
                os.link(file, out)
            except OSError:
                shutil.copyfile(file, out)
            copied.append(rel)
    return copied


def config_only_folders() -> set[str]:
    """Sub-folders image generation uses that are neither skipped nor merged as safetensors: scheduler/ (its config)
    and byt5/ (the glyph branch, kept as the release's files)."""
    weights = set(registry.IMAGE_GEN_WEIGHT_FOLDERS)
    return ({rel.split("/", 1)[0] for rel in registry.IMAGE_GEN_CONFIG_FILES.values()} - weights) | {glyph.GLYPH_FOLDER}

"""Our converted checkpoint -> the official state dict (safetensors shards + index + config.json), the inverse
of `ming_jax.checkpoint.convert` through the same tables, bit-exact where the stored dtype is the source's."""

from __future__ import annotations

import os
import shutil
import sys
import zlib
from typing import Callable

import ml_dtypes
import numpy as np

from ming_jax.checkpoint import manifest as mf
from ming_jax.checkpoint import folders, orbax_tree
from ming_jax.checkpoint.convert import (ConversionError, Progress, _dummy, _gb, _partial_dir, _publish)
from ming_jax.models import registry
from ming_jax.pallas.gmm import quant as qmath
from ming_jax.checkpoint.safetensors import OutTensor, st_code, write_sharded
from ming_jax.weights.table import Assignment


def export_official(ckpt_dir: str, dst: str, *, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                    progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Our checkpoint -> the official state dict as size-limited safetensors shards + index + config.json.

    Each official tensor is one slot of one of our arrays, read on its own and put back in the official layout by
    the table's inverse transform. When the stored dtype is the source's, the bytes must match the CRC32 the
    converter recorded, so a bit-exact round trip is checked, not assumed. A quantized checkpoint (`--dtype
    int8|fp8`) exports its quantized weights dequantised (values x scales) in bfloat16. Returns the index.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if os.path.exists(dst) and not overwrite:
        raise ConversionError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    manifest = mf.Manifest.read(ckpt_dir)
    raw = mf.read_config(ckpt_dir)
    parts = registry.describe(raw, sections=folders.image_gen_sections(ckpt_dir),
                              speech=folders.talker_sections(ckpt_dir))
    reader = orbax_tree.TreeReader(os.path.join(ckpt_dir, mf.PARAMS_DIR))
    quantized = set((manifest.options.get("quantization") or {}).get("params", ()))
    plan: dict[str, tuple[Assignment, OutTensor]] = {}
    for cname in manifest.components:
        comp = parts[cname]
        for rule in comp.table.rules:
            for v in rule.instances():
                path, slot = rule.path(v), rule.slot(v)
                if path in quantized:  # int8 / fp8 values + scales: exported dequantised, in bfloat16
                    full, dtype = reader.spec(path + ".qvalue")[0], np.dtype(ml_dtypes.bfloat16)
                else:
                    full, dtype = reader.spec(path)
                if full != tuple(comp.shapes[path]):
                    raise mf.CheckpointFormatError(f"{path}: stored shape {full} != config shape "
                                                     f"{tuple(comp.shapes[path])}")
                shape = tuple(rule.transform.to_official(_dummy(full[len(slot):])).shape)
                name = rule.name(v)
                plan[name] = (Assignment(name, path, slot, rule.transform), OutTensor(name, dtype, shape))
    constants = {n: v for cname in manifest.components for n, v in parts[cname].table.constants.items()}
    for name, value in constants.items():  # buffers the config fixes (never converted): written from the config
        plan[name] = (None, OutTensor(name, value.dtype, tuple(value.shape)))
    source = manifest.source.get("tensors", {})
    order = ([n for n in source if n in plan] + [n for n in plan if n in constants and n not in source]
             if set(source) | set(constants) == set(plan) else list(plan))
    tensors = [plan[n][1] for n in order]
    tmp = _partial_dir(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    bar = Progress(sum(t.nbytes for t in tensors), "export", enabled=progress)
    checked = []

    def fetch(t: OutTensor) -> np.ndarray:
        a = plan[t.name][0]
        if a is None:
            return np.ascontiguousarray(constants[t.name])
        if a.path in quantized:
            q = qmath.QArray(reader.read(a.path + ".qvalue", a.index), reader.read(a.path + ".scale", a.index))
            return np.ascontiguousarray(a.transform.to_official(qmath.dequantize(q, ml_dtypes.bfloat16)))
        value = np.ascontiguousarray(a.transform.to_official(reader.read(a.path, a.index)))
        want = source.get(t.name)
        if want is not None and want["dtype"] == st_code(value.dtype):
            if zlib.crc32(memoryview(value.reshape(-1).view(np.uint8))) != want["crc32"]:
                raise ConversionError(f"{t.name}: exported bytes differ from the converted source tensor (CRC32 "
                                      f"mismatch): the checkpoint was modified or is corrupt")
            checked.append(t.name)
        return value

    on_tensor = lambda t: bar.update(t.nbytes, t.name)  # noqa: E731
    folder_map = _weight_folders(ckpt_dir, raw, manifest)
    by_folder = _split_folders(tensors, folder_map, parts, manifest)
    index = write_sharded(tmp, by_folder.pop(""), fetch, max_shard_bytes, on_tensor)
    for folder, group in by_folder.items():  # image generation, talker: each sub-folder a checkpoint of its own
        prefix = folder_map[folder]
        renamed = {prefix + t.name[len(prefix):]: t for t in group}
        local = [OutTensor(t.name[len(prefix):], t.dtype, t.shape) for t in group]
        os.makedirs(os.path.join(tmp, folder), exist_ok=True)
        sub = write_sharded(os.path.join(tmp, folder), local,
                            lambda t, renamed=renamed, prefix=prefix: fetch(renamed[prefix + t.name]), max_shard_bytes,
                            lambda t, renamed=renamed, prefix=prefix: on_tensor(renamed[prefix + t.name]),
                            base=_FOLDER_FILES[folder], single_file=True)
        index["weight_map"].update({prefix + n: f"{folder}/{f}" for n, f in sub["weight_map"].items()})
    shutil.copyfile(os.path.join(ckpt_dir, mf.CONFIG_FILE), os.path.join(tmp, mf.CONFIG_FILE))
    if "image_gen" in manifest.components:
        folders.copy_sections(ckpt_dir, tmp)
    if "talker" in manifest.components:
        folders.copy_talker_files(ckpt_dir, tmp)
    elapsed = bar.close()
    _publish(tmp, dst, overwrite)
    n_shards = len(set(index["weight_map"].values()))
    log(f"wrote {dst}: {len(tensors)} tensors in {n_shards} shard(s), {_gb(index['metadata']['total_size'])} in "
        f"{elapsed:.1f} s; {len(checked)} verified bit-exact against the source CRC32")
    if manifest.skipped.get("folders") or manifest.skipped.get("components"):
        log("not exported (never converted): " + ", ".join(
            [f"{c} ({n} tensors)" for c, n in manifest.skipped.get("components", {}).items()] +
            [f"{f['name']}/" for f in manifest.skipped.get("folders", [])]))
    return index


# File names the release's loaders open in each weight sub-folder: mlp/model.safetensors is read by name,
# connector/ and talker/ through transformers' from_pretrained, transformer/ and vae/ through diffusers', talker/vae/
# through the AudioVAE's (transformers) from_pretrained.
_FOLDER_FILES = {"mlp": "model", "connector": "model", "transformer": "diffusion_pytorch_model",
                 "vae": "diffusion_pytorch_model", registry.TALKER_FOLDER: "model",
                 f"{registry.TALKER_FOLDER}/vae": "model"}
_COMPONENT_FOLDERS = ("image_gen", "talker")  # the components whose weights live in sub-folders of the release


def _weight_folders(ckpt_dir: str, raw, manifest) -> dict[str, str]:
    """{sub-folder: name prefix} of every exported component that keeps its weights in sub-folders."""
    out: dict[str, str] = {}
    if "image_gen" in manifest.components:
        out.update(registry.IMAGE_GEN_WEIGHT_FOLDERS)
    if "talker" in manifest.components and registry.release_kind(raw) != "talker":
        out.update(registry.TALKER_WEIGHT_FOLDERS)  # a bare talker folder keeps its own at the top (and vae/)
    elif "talker" in manifest.components:
        out.update(registry.TALKER_ONLY_WEIGHT_FOLDERS)
    return out


def _split_folders(tensors: list[OutTensor], folder_map: dict[str, str], parts, manifest
                   ) -> dict[str, list[OutTensor]]:
    """"" (the release's own shards) and each weight sub-folder -> its tensors, order kept. A tensor of a component
    that lives in sub-folders goes to the one with the longest matching prefix (talker/vae/ before talker/)."""
    owners = [parts[c] for c in _COMPONENT_FOLDERS if c in manifest.components]
    out: dict[str, list[OutTensor]] = {"": []}
    for t in tensors:
        folder = ""
        if any(p.owns(t.name) for p in owners):
            hits = [(len(p), f) for f, p in folder_map.items() if t.name.startswith(p)]
            folder = max(hits)[1] if hits else ""
        out.setdefault(folder, []).append(t)
    return out

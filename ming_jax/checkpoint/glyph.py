"""The release's ByT5 glyph folder (`<model>/byt5/`) -> the glyph branch's encoder and mapper, filled; and its copy
into a converted checkpoint (which keeps the folder's files as they are, so both formats load the same way).

What the release's `load_byt5` (modeling_bailingmm2.py, with bizgen/utils/load_byt5_and_byt5_tokenizer.py) does
with the folder, and what `load_glyph` does (file names: `ming_jax.config.glyph`):

 1. `byt5.json` -> `GlyphConfig`. Its byt5_ckpt_path, font_ann_path and color_ann_path are `os.path.join`ed onto
    byt5/ (so an absolute path stays absolute).
 2. The base ByT5 folder: `config.json` -> `T5EncoderConfig`; its tokenizer files (`AutoTokenizer`, which must
    resolve to a ByT5Tokenizer) -> the number of `<extra_id_i>` tokens (`base_extra_ids`).
 3. With `special_token`, both annotation files are read and the added tokens appended to the tokenizer
    (`ming_jax.processors.glyph.release_special_tokens`), and the embedding is resized to `len(tokenizer)`
    = 259 + extra ids + added tokens; without it the embedding keeps config.json's vocab_size.
 4. `byt5_model/base.pt`'s "state_dict", names containing `module.text_tower.encoder.` with that many leading
    characters cut, is loaded strictly into the encoder; `byt5_mapper/byt5_mapper.pt` strictly into the mapper;
    then `byt5_model/byt5_model.pt` into the encoder, strictly too (`load_state_dict`'s default).

Both encoder loads are strict, so byt5_model.pt must hold every encoder tensor (the release raises otherwise) and
replaces every value base.pt put there: nothing is ever taken from base.pt, and there is no fallback to it. Its
values never matter, but the release fails unless its filtered names and shapes are exactly the encoder's, so we
check those from its pickle alone (no tensor data is read) and refuse what the release refuses. The release reads
base.pt with `weights_only=False` (a training checkpoint may hold more than tensors): its other contents are kept
as inert records (`torch_pickle` opaque mode, nothing executed); byt5_model.pt and byt5_mapper.pt must be plain
state dicts {name: tensor}. Every tensor of those two is consumed exactly once by the name tables
(`ming_jax.weights.glyph`), onto modules built abstractly (`nnx.eval_shape`), shapes checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import uuid
from typing import Any

import numpy as np
from flax import nnx

from ming_jax.checkpoint import torch_pickle
from ming_jax.checkpoint.safetensors import CheckpointError
from ming_jax.config.base import ConfigError
from ming_jax.config.glyph import (
    BASE_CKPT,
    BASE_PREFIX,
    CONFIG_FILE,
    FINETUNED_CKPT,
    MAPPER_CKPT,
    GlyphConfig,
    T5EncoderConfig,
)
from ming_jax.config.runtime import Runtime
from ming_jax.models.image_gen.glyph import GlyphMapper, T5Encoder
from ming_jax.processors.glyph import (
    BYTE_OFFSET,
    ByteTokenizer,
    GlyphError,
    release_special_tokens,
)
from ming_jax.weights.glyph import glyph_mapper_table, t5_encoder_table
from ming_jax.weights.table import Table, WeightError, load_state_dict, param_shapes

GLYPH_FOLDER = "byt5"
_FIRST_EXTRA = BYTE_OFFSET + 256  # 259: the id of <extra_id_0>
_BASE_SPECIALS = {0: "<pad>", 1: "</s>", 2: "<unk>"}
_DEFAULT_EXTRA_IDS = 125  # ByT5Tokenizer's default


@dataclasses.dataclass(frozen=True)
class GlyphBranch:
    """The loaded glyph branch: byt5.json, the encoder's config (its vocab_size the resized table's), the filled
    modules, and the tokens the release adds to the ByT5 tokenizer (in id order, duplicates dropped as
    `tokenizer.add_tokens` drops them) on top of `extra_ids` `<extra_id_i>` tokens."""

    config: GlyphConfig
    t5: T5EncoderConfig
    encoder: T5Encoder
    mapper: GlyphMapper
    special_tokens: list[str]
    extra_ids: int = _DEFAULT_EXTRA_IDS

    def tokenizer(self) -> ByteTokenizer:
        """The release's tokenizer: ids `ByteTokenizer(...).vocab_size` <= the encoder's table rows."""
        return ByteTokenizer(self.special_tokens, extra_ids=self.extra_ids)


def has_glyph(path: str | os.PathLike) -> bool:
    """Whether a release folder or converted checkpoint has a glyph branch: a byt5/ entry, as the release tests
    (its `load_byt5` skips the branch when the path does not exist, and fails on a broken folder)."""
    return os.path.exists(os.path.join(path, GLYPH_FOLDER))


# --- the folder's configs ------------------------------------------------------------------------------------------


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({e})") from None


def _object(path: str, what: str) -> dict:
    value = _read_json(path, what)
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} {path} is not a JSON object")
    return value


def _token(entry) -> str | None:
    """A token as tokenizer files write it: a string, or an AddedToken dict with its `content`."""
    return entry.get("content") if isinstance(entry, dict) else entry


def base_extra_ids(base: str, config: dict | None = None) -> int:
    """How many `<extra_id_i>` tokens the base folder's ByT5 tokenizer has (ids 259 + i, what `ByteTokenizer`
    models), as transformers loads it: the ids of tokenizer_config.json's `added_tokens_decoder` (what
    save_pretrained writes since transformers 4.34, with `extra_ids: 0`); in older files `additional_special_tokens`
    (tokenizer_config.json, else special_tokens_map.json) appended in order, else `extra_ids` (default 125).
    Anything else there (other added tokens, other ids) is refused: not the tokenizer we model."""
    tc_path = os.path.join(base, "tokenizer_config.json")
    tc = _object(tc_path, "base ByT5 tokenizer config") if os.path.exists(tc_path) else {}
    stm_path = os.path.join(base, "special_tokens_map.json")
    stm = _object(stm_path, "base ByT5 special tokens map") if os.path.exists(stm_path) else {}
    cls = tc.get("tokenizer_class") or (config or {}).get("tokenizer_class")
    if cls != "ByT5Tokenizer":
        raise CheckpointError(f"{base}: the tokenizer is {cls or 'not named'} (tokenizer_class in "
                              f"tokenizer_config.json or config.json); the glyph branch needs a ByT5Tokenizer")
    decoder = tc.get("added_tokens_decoder")
    if decoder:
        try:
            tokens = {int(i): _token(t) for i, t in decoder.items()}
        except (TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{tc_path}: malformed added_tokens_decoder") from None
        wrong = {i: t for i, t in tokens.items() if i in _BASE_SPECIALS and t != _BASE_SPECIALS[i]}
        if wrong or any(i in range(BYTE_OFFSET, _FIRST_EXTRA) for i in tokens):
            raise CheckpointError(f"{tc_path}: added_tokens_decoder moves ByT5's specials or bytes "
                                  f"({wrong or sorted(i for i in tokens if BYTE_OFFSET <= i < _FIRST_EXTRA)})")
        extras = {i: t for i, t in tokens.items() if i >= _FIRST_EXTRA}
    else:
        n = tc.get("extra_ids", _DEFAULT_EXTRA_IDS)
        listed = tc.get("additional_special_tokens", stm.get("additional_special_tokens"))
        if type(n) is not int or n < 0:
            raise CheckpointError(f"{tc_path}: extra_ids={n!r} is not a non-negative integer")
        if listed:
            extras = {_FIRST_EXTRA + k: _token(t) for k, t in enumerate(listed)}
            if n and sum("extra_id" in str(t) for t in set(extras.values())) != n:
                raise CheckpointError(f"{tc_path}: extra_ids={n} but additional_special_tokens lists other "
                                      f"tokens (transformers refuses this tokenizer too)")
        else:
            extras = {_FIRST_EXTRA + i: f"<extra_id_{i}>" for i in range(n)}
    want = {_FIRST_EXTRA + i: f"<extra_id_{i}>" for i in range(len(extras))}
    if extras != want:
        odd = sorted(f"{i}: {t}" for i, t in extras.items() if want.get(i) != t)
        raise CheckpointError(f"{base}: the tokenizer's added tokens are not <extra_id_0> ... at ids 259 ...: "
                              f"{odd[:6]}; this tokenizer is not modelled")
    return len(extras)


@dataclasses.dataclass(frozen=True)
class _Folder:
    """What byt5/ says before any weights are read."""

    root: str
    config: GlyphConfig
    t5: T5EncoderConfig  # vocab_size: the table's rows after the release's resize
    extra_ids: int
    added: list[str]  # the tokens the tokenizer really adds (ByteTokenizer.added)
    fonts: str | None
    colors: str | None


def _read_folder(root: str) -> _Folder:
    if not os.path.isdir(root):
        raise CheckpointError(f"{root} is not a folder (the glyph branch's byt5/)")
    cfg_path = os.path.join(root, CONFIG_FILE)
    try:
        cfg = GlyphConfig.from_official(_object(cfg_path, "glyph config"))
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    base = os.path.join(root, cfg.ckpt_path)
    if not os.path.isdir(base):
        raise CheckpointError(f"{cfg_path}: byt5_ckpt_path {cfg.ckpt_path!r} is not a folder ({base})")
    base_config = _object(os.path.join(base, "config.json"), "base ByT5 config")
    try:
        t5 = T5EncoderConfig.from_official(base_config, section=os.path.join(base, "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    extra_ids = base_extra_ids(base, base_config)
    fonts = colors = None
    added: list[str] = []
    if cfg.special_tokens:  # the release opens both annotation files whatever the color / font flags say
        fonts, colors = os.path.join(root, cfg.font_ann_path), os.path.join(root, cfg.color_ann_path)
        font_ann = _read_json(fonts, "font annotation file")
        color_ann = _read_json(colors, "color annotation file")
        try:
            added = release_special_tokens(cfg, font_ann, color_ann)
            tok = ByteTokenizer(added, extra_ids=extra_ids)
        except (GlyphError, TypeError) as e:
            raise CheckpointError(f"{root}: the annotation files {cfg.font_ann_path} / {cfg.color_ann_path} do not "
                                  f"give special tokens ({e})") from None
        t5 = t5.replace(vocab_size=tok.vocab_size)  # resize_token_embeddings(len(tokenizer))
    else:
        tok = ByteTokenizer([], extra_ids=extra_ids)
        if tok.vocab_size > t5.vocab_size:
            raise CheckpointError(f"{base}: the tokenizer has {tok.vocab_size} ids but config.json's vocab_size is "
                                  f"{t5.vocab_size} (and byt5.json adds no tokens, so no resize)")
    return _Folder(root, cfg, t5, extra_ids, list(tok.added), fonts, colors)


# --- the weights ---------------------------------------------------------------------------------------------------


def _open(root: str, rel: str, *, opaque: bool = False) -> torch_pickle.TorchArchive:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist (the release's load_byt5 reads it)")
    return torch_pickle.TorchArchive(path, opaque=opaque)


def _tensors(tree: Any, where: str) -> dict[str, torch_pickle.TensorRef]:
    """A state dict {name: tensor}: anything else is refused (the release's load_state_dict would fail)."""
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        raise CheckpointError(f"{where} is not a state dict {{name: tensor}} (found {type(tree).__name__})")
    bad = sorted(k for k, v in tree.items() if not isinstance(v, torch_pickle.TensorRef))
    if bad:
        raise CheckpointError(f"{where}: entries that are not tensors: {bad[:8]}")
    return dict(tree)


def _base_encoder(arch: torch_pickle.TorchArchive) -> dict[str, torch_pickle.TensorRef]:
    """base.pt's encoder tensors as the release filters them: every name containing BASE_PREFIX, with
    len(BASE_PREFIX) leading characters cut (the other entries are not read)."""
    tree = arch.tree
    state = tree.get("state_dict") if isinstance(tree, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{arch.path} has no 'state_dict' dict (the release reads base.pt['state_dict'])")
    picked = {k: v for k, v in state.items() if isinstance(k, str) and BASE_PREFIX in k}
    return _tensors({k[len(BASE_PREFIX):]: v for k, v in picked.items()}, f"{arch.path} ['state_dict']")


def _check_base(path: str, base: dict, final: dict) -> None:
    """base.pt must load strictly into the same encoder as byt5_model.pt (whose names the table has accepted)."""
    missing = sorted(set(final) - set(base))
    unexpected = sorted(set(base) - set(final))
    shapes = sorted(f"{n} {list(base[n].shape)} (encoder: {list(final[n].shape)})" for n in set(base) & set(final)
                    if base[n].shape != final[n].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {missing[:8]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {unexpected[:8]}")
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) of another shape: {shapes[:8]}")
    if problems:
        raise CheckpointError(f"{path}: its {BASE_PREFIX}* tensors do not fit the encoder, so the release's strict "
                              f"load of base.pt fails (though {FINETUNED_CKPT} replaces every value): "
                              + "; ".join(problems))


def _check_shapes(arch: torch_pickle.TorchArchive, table: Table, refs: dict, model, what: str) -> None:
    """Every tensor's shape against the official shape the abstract model implies (each rule's inverse transform
    applied to a zero-stride stand-in of its slice: no data), before any tensor is read."""
    shapes = param_shapes(model)
    wrong = []
    for rule in table.rules:
        for v in rule.instances():
            stand_in = np.broadcast_to(np.zeros((), np.float32), shapes[rule.path(v)])[rule.slot(v)]
            want = tuple(rule.transform.to_official(stand_in).shape)
            if refs[rule.name(v)].shape != want:
                wrong.append(f"{rule.name(v)} has shape {refs[rule.name(v)].shape}, the {what} needs {want}")
    if wrong:
        raise CheckpointError(f"{arch.path}: {len(wrong)} tensor(s) of the wrong shape: " + "; ".join(wrong[:8]))


def _fill(model, table: Table, arch: torch_pickle.TorchArchive, refs: dict):
    try:
        return load_state_dict(model, table, torch_pickle.ArchiveTensors(arch, refs))
    except WeightError as e:
        raise CheckpointError(f"{arch.path}: {e}") from None


def load_glyph(path: str | os.PathLike, runtime: Runtime | None = None) -> GlyphBranch:
    """The glyph branch of a release folder or converted checkpoint (`path`/byt5/), as the release's `load_byt5`
    builds it (module docstring): configs, tokens, the encoder from byt5_model.pt (base.pt checked, never used),
    the mapper from byt5_mapper.pt. `runtime`: dtypes of the modules (default float32, as the release runs it).
    Raises `CheckpointError` naming the file for anything the release would fail on or we do not model."""
    folder = _read_folder(os.path.join(os.fspath(path), GLYPH_FOLDER))
    root, cfg, t5 = folder.root, folder.config, folder.t5
    enc_table, map_table = t5_encoder_table(t5), glyph_mapper_table(t5, cfg)
    with _open(root, FINETUNED_CKPT) as final, _open(root, MAPPER_CKPT) as mapper_arch:
        enc_refs = _tensors(final.tree, final.path)
        map_refs = _tensors(mapper_arch.tree, mapper_arch.path)
        for arch, table, refs in ((final, enc_table, enc_refs), (mapper_arch, map_table, map_refs)):
            try:
                table.plan(refs)  # names first: a wrong folder fails before any model is built
            except WeightError as e:
                raise CheckpointError(f"{arch.path}: {e}") from None
        rows = enc_refs["embed_tokens.weight"].shape[0]
        if rows != t5.vocab_size:
            source = (f"259 + {folder.extra_ids} extra ids + {len(folder.added)} added tokens of "
                      f"{cfg.font_ann_path} / {cfg.color_ann_path}" if cfg.special_tokens else "config.json")
            raise CheckpointError(f"{final.path}: embed_tokens.weight has {rows} rows but the tokenizer needs "
                                  f"{t5.vocab_size} ({source}): the release's resized encoder would not load it")
        encoder = nnx.eval_shape(lambda: T5Encoder(t5, runtime, rngs=nnx.Rngs(0)))
        mapper = nnx.eval_shape(lambda: GlyphMapper(t5, cfg, runtime, rngs=nnx.Rngs(0)))
        _check_shapes(final, enc_table, enc_refs, encoder, "encoder")
        _check_shapes(mapper_arch, map_table, map_refs, mapper, "mapper")
        with _open(root, BASE_CKPT, opaque=True) as base:  # against byt5_model.pt's names and shapes, now checked
            _check_base(base.path, _base_encoder(base), enc_refs)
        encoder = _fill(encoder, enc_table, final, enc_refs)
        mapper = _fill(mapper, map_table, mapper_arch, map_refs)
    return GlyphBranch(cfg, t5, encoder, mapper, folder.added, folder.extra_ids)


# --- the converter's copy --------------------------------------------------------------------------------------------


def _inside(rel: str) -> bool:
    norm = os.path.normpath(rel)
    return not os.path.isabs(rel) and norm != ".." and not norm.startswith(".." + os.sep)


def _link_or_copy(src: str, dst: str) -> bool:
    """A hard link when src (a regular file) and dst share a file system (True), else a copy (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError:  # another file system (EXDEV), one without hard links, or a file we may not link (EPERM)
        shutil.copy2(src, dst)
        return False


def _hub_blob(target: str, src: str) -> bool:
    """Whether `target` (a resolved path) is a blob of the Hugging Face hub cache whose snapshot holds `src`:
    huggingface_hub keeps each file of `<repo>/snapshots/<revision>/` as a link to `<repo>/blobs/<hash>`."""
    blobs = os.path.dirname(target)
    snapshots = os.path.join(os.path.dirname(blobs), "snapshots")
    return os.path.basename(blobs) == "blobs" and os.path.realpath(src).startswith(snapshots + os.sep)


def _source_file(path: str, real_root: str, src: str) -> str:
    """The regular file to copy for `path` (a walk entry of byt5/ that is not a folder): itself, or the target of a
    symbolic link that stays inside byt5/ or is a hub-cache blob (`_hub_blob`); anything else is refused."""
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode):
        return path
    if not stat.S_ISLNK(mode):
        raise CheckpointError(f"{path} is not a regular file (a FIFO, socket or device): refusing to copy it")
    target = os.path.realpath(path)
    if not os.path.isfile(target):
        raise CheckpointError(f"{path} is a symbolic link to {target}, which is not a regular file (a dangling or "
                              f"looping link): refusing to copy it")
    if os.path.commonpath([target, real_root]) != real_root and not _hub_blob(target, src):
        raise CheckpointError(f"{path} is a symbolic link to {target}, outside byt5/: refusing to copy an outside "
                              f"file into the checkpoint (replace the link by the file if it belongs there)")
    return target


def _glyph_tree(src: str, root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """byt5/'s folders (relative) and files (relative, the regular file to copy), links not followed: a folder
    that is a symbolic link is refused (it could loop, or pull an outside folder into the checkpoint), files as
    `_source_file` says; an unreadable folder is an error, not a silent gap."""

    def unreadable(e: OSError):
        raise CheckpointError(f"{e.filename} cannot be listed ({e.strerror}): refusing an incomplete copy of byt5/")

    real_root = os.path.realpath(root)
    folders, files = [], []
    for here, dirs, names in os.walk(root, onerror=unreadable):  # followlinks=False: a linked folder is not entered
        dirs.sort()
        folders.append(os.path.normpath(os.path.relpath(here, root)))
        for name in dirs:
            if os.path.islink(os.path.join(here, name)):
                path = os.path.join(here, name)
                raise CheckpointError(f"{path} is a symbolic link to the folder {os.path.realpath(path)}: byt5/ is "
                                      f"copied without following folder links (one could loop, or pull an outside "
                                      f"folder into the checkpoint); replace it by the folder itself")
        for name in sorted(names):
            path = os.path.join(here, name)
            files.append((os.path.normpath(os.path.relpath(path, root)), _source_file(path, real_root, src)))
    return folders, files


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def copy_glyph(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy `src`/byt5/ to `dst`/byt5/ file for file, for the converter: a converted checkpoint keeps the release's
    glyph files as they are, so `load_glyph` reads both formats. Returns the copied paths, relative to byt5/.

    Files are hard links to the release's files where the file system allows (they save the GBs of the two
    encoder checkpoints), else copies. A hard link is the same file under two names: replacing a file of the copy
    (writing a new file and renaming it over the old) leaves the release alone, but writing into one in place
    changes both, and that includes `torch.save` onto an existing path (it truncates the file it opens) and
    editors that keep hard links by writing in place (vim does); delete the file first, or copy the folder, to
    change one side only.

    Links are not followed: a folder under byt5/ that is a symbolic link is refused (it could loop, or bring an
    outside folder into the checkpoint), as is a file link leading outside byt5/, except to the Hugging Face hub
    cache's blobs (how a snapshot download stores every file), and anything that is not a regular file.
    byt5.json's paths must lie inside byt5/ (else the copy would not carry them).

    Written to a temporary folder in `dst`, then renamed into place: an existing `dst`/byt5 (a converter re-run
    after a crash) is replaced by the new copy, moved aside first so that `dst`/byt5 is always a complete folder
    or, for a moment, absent; leftovers of an interrupted copy in `dst` are removed. One copy into a `dst` at a
    time."""
    src, dst = os.fspath(src), os.fspath(dst)
    root = os.path.join(src, GLYPH_FOLDER)
    cfg_path = os.path.join(root, CONFIG_FILE)
    try:
        cfg = GlyphConfig.from_official(_object(cfg_path, "glyph config"))
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    named = [cfg.ckpt_path] + ([cfg.font_ann_path, cfg.color_ann_path] if cfg.special_tokens else [])
    outside = [p for p in named if not _inside(p)]
    if outside:
        raise CheckpointError(f"{cfg_path} names {outside} outside byt5/: a copy of the folder would not carry them")
    folders, files = _glyph_tree(src, root)  # everything refused before anything is written
    target = os.path.join(dst, GLYPH_FOLDER)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(dst):  # an interrupted copy's temporary folders
        if name.startswith((f".{GLYPH_FOLDER}.partial-", f".{GLYPH_FOLDER}.old-")):
            _remove(os.path.join(dst, name))
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(dst, f".{GLYPH_FOLDER}.partial-{tag}")
    os.mkdir(tmp)  # not mkdtemp: the folder keeps the umask's permissions, not 0700
    try:
        for rel in folders:
            os.makedirs(os.path.join(tmp, rel), exist_ok=True)
        for rel, source in files:
            _link_or_copy(source, os.path.join(tmp, rel))
        if os.path.lexists(target):  # an earlier run's copy: moved aside, replaced, removed
            old = os.path.join(dst, f".{GLYPH_FOLDER}.old-{tag}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            _remove(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [rel for rel, _ in files]

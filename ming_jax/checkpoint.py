"""Our converted checkpoint: one orbax parameter tree (OCDBT + zarr), the official config, and a manifest.

Layout of a converted folder DIR (written by `ming_jax.convert`, read here):

    DIR/config.json       the release's config.json, verbatim: every sub-model config is read from it
    DIR/ming_jax.json     manifest: format, converted components, every parameter's shape and stored dtype,
                          per-tensor CRC32 of the source bytes, what was skipped (see `Manifest`)
    DIR/params/           an orbax checkpoint in `StandardCheckpointer` layout: OCDBT database + zarr arrays

The parameter tree is the pure-dict form (`nnx.to_pure_dict`) of `ming_jax.omni.OmniModel`'s parameters, restricted
to the converted components: top-level keys `llm`, `vision`, `vision_proj`, `audio` (a language-model-only
release gives just `llm`). So the standard orbax restore works unchanged:

    abstract = ming_jax.omni.create_abstract(cfg)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))   # leaves may carry shardings
    tree = ocp.StandardCheckpointer().restore(DIR / "params", target)

and `restore_params` / `load_llm` / `load_vision` / `load_audio` / `load_omni` below do exactly that for one
sub-model or the whole model, straight into sharded device arrays: each device reads only its own shard of each
array from disk, so no host ever holds a full copy of the model.

Writing is `TreeWriter`: zarr arrays created in one OCDBT database and filled slice by slice (one expert of one
layer at a time), inside bounded transactions, so a stacked [L, E, ...] parameter is never whole in memory. It
writes the same files orbax's own save would (`_METADATA`, `_CHECKPOINT_METADATA`, the OCDBT manifest and data),
which `tests/test_convert.py` checks against an orbax save of the same tree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import nnx

FORMAT = "ming_jax.orbax.v1"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "ming_jax.json"
PARAMS_DIR = "params"

# The sub-models a release holds that we implement, and the top-level keys of our tree each one fills
# (the attribute names of `ming_jax.omni.OmniModel`).
SUBTREES = {"llm": ("llm",), "vision": ("vision", "vision_proj"), "audio": ("audio",)}

# Largest zarr chunk we write. A chunk is also the smallest unit a sharded restore reads, so large 2-D tensors
# (embeddings, lm head) are split into row blocks of at most this size; expert slices are one chunk each.
CHUNK_BYTES = 64 << 20

_ZARR_DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "bfloat16": "bfloat16"}
_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
              "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointFormatError(ValueError):
    """A converted checkpoint folder that is incomplete, of another format, or does not fit the model asked for."""


def np_dtype(name: str) -> np.dtype:
    if name not in _NP_DTYPES:
        raise CheckpointFormatError(f"dtype {name!r} is not a parameter dtype we store ({', '.join(_NP_DTYPES)})")
    return _NP_DTYPES[name]


# --- the on-disk parameter tree ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One array of the tree: dotted path ("llm.moe_layers.moe.w_gate"), shape, stored dtype name, and how many
    leading axes are stacked slots (filled one official tensor at a time)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    n_lead: int = 0

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.path.split("."))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np_dtype(self.dtype).itemsize

    def chunks(self) -> tuple[int, ...]:
        """One slot per chunk; within a slot, row blocks of at most CHUNK_BYTES."""
        lead, rest = self.shape[:self.n_lead], self.shape[self.n_lead:]
        if not rest:
            return (1,) * len(lead)
        row_bytes = int(np.prod(rest[1:], dtype=np.int64)) * np_dtype(self.dtype).itemsize
        rows = max(1, min(rest[0], CHUNK_BYTES // max(row_bytes, 1)))
        return (1,) * len(lead) + (max(rows, 1),) + tuple(rest[1:])


def _kvstore(directory: str, *, write: bool) -> dict:
    """The OCDBT key-value store at `directory` (the spec orbax uses for local files; write options only when
    creating, reading takes the stored configuration)."""
    spec: dict[str, Any] = {"driver": "ocdbt", "base": {"driver": "file", "path": os.path.abspath(directory) + "/"},
                            "cache_pool": "cache_pool#ocdbt"}
    if write:
        spec["config"] = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000,
                          "manifest_kind": "single"}
        spec["target_data_file_size"] = 2**31
    return spec


def ts_context(cache_bytes: int = 100_000_000) -> ts.Context:
    """No chunk cache for the arrays (each chunk is written or read once); a bounded one for OCDBT's B-tree."""
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "cache_pool#ocdbt": {"total_bytes_limit": cache_bytes}})


class TreeWriter:
    """Creates the zarr arrays of `leaves` in an OCDBT database at `directory` and fills them slot by slot.

    `write(path, slot, value, txn)` stores one slot (`slot` indexes the leading stacked axes, () for a whole leaf);
    the caller owns the transactions (`ts.Transaction()`), which bound how much written data is buffered before it
    is compressed and committed. `finish()` writes orbax's tree metadata; until then orbax does not see a
    checkpoint here. Re-opening an existing directory (resuming) re-opens the arrays, which must match.
    """

    def __init__(self, directory: str, leaves: Sequence[LeafSpec], *, compression: str | None = "zstd",
                 context: ts.Context | None = None):
        if compression not in ("zstd", None):
            raise ValueError(f"compression={compression!r} (zstd or None)")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.leaves = {leaf.path: leaf for leaf in leaves}
        self.context = context or ts_context()
        kv = _kvstore(directory, write=True)
        self._arrays = {}
        futures = {}
        for leaf in leaves:
            spec = {"driver": "zarr", "kvstore": dict(kv, path=leaf.path),
                    "metadata": {"shape": list(leaf.shape), "chunks": list(leaf.chunks()),
                                 "dtype": _ZARR_DTYPES[leaf.dtype],
                                 "compressor": {"id": "zstd", "level": 1} if compression else None}}
            futures[leaf.path] = ts.open(spec, create=True, open=True, context=self.context)
        for path, fut in futures.items():
            try:
                self._arrays[path] = fut.result()
            except ValueError as e:
                raise CheckpointFormatError(f"{directory}: cannot create / re-open array {path}: {e}") from None

    def write(self, path: str, slot: tuple[int, ...], value: np.ndarray, txn: ts.Transaction):
        """Queue one slot; returns tensorstore's write futures. `value` (C-contiguous) is kept by reference until
        the transaction commits, not copied: the caller must not modify it."""
        leaf = self.leaves[path]
        want = leaf.shape[len(slot):]
        if tuple(value.shape) != want or value.dtype != np_dtype(leaf.dtype):
            raise CheckpointFormatError(f"{path}{list(slot)}: got {value.dtype}{list(value.shape)}, the array holds "
                                        f"{leaf.dtype}{list(want)}")
        target = self._arrays[path].with_transaction(txn)
        return (target[slot] if slot else target).write(np.ascontiguousarray(value),
                                                        can_reference_source_data_indefinitely=True)

    def finish(self) -> None:
        """Write the files that make the directory an orbax checkpoint (tree metadata, checkpoint metadata)."""
        write_tree_metadata(self.directory, self.leaves.values())


def write_tree_metadata(directory: str, leaves) -> None:
    """`_METADATA` and `_CHECKPOINT_METADATA` as orbax's StandardCheckpointer writes them for a tree of arrays."""
    tree = {}
    for leaf in leaves:
        tree[str(leaf.keys)] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in leaf.keys],  # 2: a dict key
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(leaf.shape)},
        }
    meta = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    write_json(os.path.join(directory, "_METADATA"), meta)
    now = time.time_ns()
    write_json(os.path.join(directory, "_CHECKPOINT_METADATA"), {
        "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler",
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
        "custom_metadata": {}})


class TreeReader:
    """Slot-by-slot reads of a parameter tree in orbax OCDBT layout (ours, or one orbax saved itself)."""

    def __init__(self, directory: str, context: ts.Context | None = None):
        self.directory = directory
        meta_path = os.path.join(directory, "_METADATA")
        if not os.path.exists(meta_path) or not os.path.exists(os.path.join(directory, "manifest.ocdbt")):
            raise CheckpointFormatError(f"{directory} is not an orbax OCDBT checkpoint (no _METADATA / "
                                        f"manifest.ocdbt)")
        with open(meta_path) as f:
            tree = json.load(f)["tree_metadata"]
        self.paths = [".".join(k["key"] for k in entry["key_metadata"]) for entry in tree.values()]
        self.context = context or ts_context()
        self._kv = _kvstore(directory, write=False)
        self._arrays: dict[str, ts.TensorStore] = {}

    def array(self, path: str) -> ts.TensorStore:
        if path not in self._arrays:
            if path not in self.paths:
                raise CheckpointFormatError(f"{self.directory} has no parameter {path}")
            self._arrays[path] = ts.open({"driver": "zarr", "kvstore": dict(self._kv, path=path)}, open=True,
                                         context=self.context).result()
        return self._arrays[path]

    def read(self, path: str, slot: tuple[int, ...] = ()) -> np.ndarray:
        arr = self.array(path)
        return np.asarray((arr[slot] if slot else arr).read().result())

    def spec(self, path: str) -> tuple[tuple[int, ...], np.dtype]:
        arr = self.array(path)
        return tuple(int(s) for s in arr.shape), np.dtype(arr.dtype.numpy_dtype)


# --- the manifest -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Manifest:
    """What `ming_jax.json` records about a conversion."""

    components: list[str]
    params: dict[str, dict[str, Any]]  # dotted path -> {"shape": [...], "dtype": "bfloat16"}
    source: dict[str, Any]  # path, tensor / byte counts, {name: {"dtype", "crc32"}} of the source tensors
    skipped: dict[str, Any]  # components not converted, sub-folders not implemented, their sizes
    options: dict[str, Any]  # dtype, compression
    format: str = FORMAT

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, ckpt_dir: str) -> "Manifest":
        path = os.path.join(ckpt_dir, MANIFEST_FILE)
        if not os.path.exists(path):
            raise CheckpointFormatError(f"{ckpt_dir} is not a converted ming_jax checkpoint (no {MANIFEST_FILE}); "
                                        f"convert a release with tools/convert_torch.py")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointFormatError(f"{path} is not valid JSON ({e})") from None
        if d.get("format") != FORMAT:
            raise CheckpointFormatError(f"{path}: format {d.get('format')!r}, this code reads {FORMAT!r}")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def read_config(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{ckpt_dir} has no {CONFIG_FILE}")
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Write-then-rename, fsynced: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=None if path.endswith("_METADATA") else 1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- restoring into (sharded) models ------------------------------------------------------------------------------


Shardings = Any  # an nnx.State / pure dict of NamedSharding mirroring nnx.state(model, nnx.Param)


def _pure(tree) -> dict:
    """nnx.State (of arrays, ShapeDtypeStructs or shardings) -> nested plain dict; plain dicts pass through."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, path + "."))
        else:
            out[path] = v
    return out


def restore_params(ckpt_dir: str, abstract_model: nnx.Module, *, subtree: str | None = None,
                   shardings: Shardings | None = None, mesh=None, rules=None, dtype: str | None = None
                   ) -> nnx.Module:
    """Fill every `nnx.Param` of `abstract_model` (from `nnx.eval_shape`) from the converted checkpoint.

    `subtree` is where the model sits in our tree ("llm", "vision", "vision_proj", "audio"; None: the whole tree,
    i.e. an `OmniModel`). Placement: `shardings` (a pytree of `NamedSharding` matching
    `nnx.state(abstract_model, nnx.Param)`, e.g. `ming_jax.sharding.param_shardings`), or `mesh` + `rules` to
    compute it, or neither for the default device. Each device reads its shard straight from disk.
    Each array is cast to the dtype the model gives that parameter (e.g. float32 router biases in a bfloat16
    model), or every one to `dtype`.
    """
    import orbax.checkpoint as ocp

    params_dir = os.path.abspath(os.path.join(ckpt_dir, PARAMS_DIR))
    manifest = Manifest.read(ckpt_dir)
    if shardings is None and mesh is not None:
        from ming_jax.sharding import param_shardings

        shardings = param_shardings(abstract_model, mesh, rules)
    state = nnx.state(abstract_model, nnx.Param)
    abstract = nnx.to_pure_dict(state)
    flat_abstract = _flat(abstract)
    prefix = f"{subtree}." if subtree else ""
    flat_shardings = _flat(_pure(shardings)) if shardings is not None else {}
    if shardings is not None and set(flat_shardings) != set(flat_abstract):
        extra, missing = set(flat_shardings) - set(flat_abstract), set(flat_abstract) - set(flat_shardings)
        raise CheckpointFormatError(f"shardings do not match the model's parameters: missing {sorted(missing)[:8]}, "
                                    f"unknown {sorted(extra)[:8]}")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    problems = []
    target = {}
    for path, leaf in flat_abstract.items():
        stored = manifest.params.get(prefix + path)
        if stored is None:
            problems.append(f"{prefix + path}: not in the checkpoint")
            continue
        if tuple(stored["shape"]) != tuple(leaf.shape):
            problems.append(f"{prefix + path}: checkpoint shape {tuple(stored['shape'])} != model {tuple(leaf.shape)}")
            continue
        sharding = flat_shardings.get(path)
        if sharding is not None and isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        target[path] = jax.ShapeDtypeStruct(leaf.shape, np_dtype(dtype) if dtype else leaf.dtype,
                                            sharding=sharding or default)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        raise CheckpointFormatError(f"{ckpt_dir} does not fit the model ({len(problems)} problem(s)): {shown}")
    nested = _unflatten(target)
    item = {subtree: nested} if subtree else nested
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                          partial_restore=True))
    restored = restored[subtree] if subtree else restored
    nnx.replace_by_pure_dict(state, _restore_keys(abstract, restored))
    nnx.update(abstract_model, state)
    return abstract_model


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return out


def _restore_keys(like, tree):
    """Give `tree` (string keys, from our flat paths) the key types of `like` (nnx.List indices are ints)."""
    if not isinstance(like, Mapping):
        return tree
    return {k: _restore_keys(v, tree[str(k)]) for k, v in like.items()}


# --- the sub-models ------------------------------------------------------------------------------------------------


def _param_dtype(manifest: Manifest, subtree: str) -> str:
    """The dtype most of a subtree's parameters are stored in (bfloat16 or float32: what the configs accept)."""
    counts: dict[str, int] = {}
    for path, p in manifest.params.items():
        if path.split(".", 1)[0] == subtree:
            counts[p["dtype"]] = counts.get(p["dtype"], 0) + int(np.prod(p["shape"], dtype=np.int64))
    if not counts:
        raise CheckpointFormatError(f"the checkpoint holds no {subtree!r} parameters (converted components: "
                                    f"{', '.join(manifest.components)})")
    main = max(counts, key=counts.get)
    return "bfloat16" if main == "bfloat16" else "float32"


def _needs(manifest: Manifest, component: str, ckpt_dir: str) -> None:
    if component not in manifest.components:
        raise CheckpointFormatError(f"{ckpt_dir} holds no {component} (converted: {', '.join(manifest.components)}); "
                                    f"re-run the converter with --components including {component}")


def load_llm(ckpt_dir: str, *, shardings: Shardings | None = None, mesh=None, rules=None, dtype: str | None = None,
             **overrides):
    """The `BailingMoeV2` of a converted checkpoint (omni or LLM-only release); `overrides` go to `LLMConfig`
    (e.g. `dtype="bfloat16"` for the compute dtype)."""
    from ming_jax import model as model_lib
    from ming_jax.config.llm import LLMConfig

    manifest = Manifest.read(ckpt_dir)
    _needs(manifest, "llm", ckpt_dir)
    overrides.setdefault("param_dtype", dtype or _param_dtype(manifest, "llm"))
    cfg = LLMConfig.from_official(read_config(ckpt_dir), **overrides)
    return restore_params(ckpt_dir, model_lib.create_abstract(cfg), subtree="llm", shardings=shardings, mesh=mesh,
                          rules=rules, dtype=dtype)


def load_vision(ckpt_dir: str, *, use_deepstack: bool = False, shardings: Mapping[str, Shardings] | None = None,
                mesh=None, rules=None, dtype: str | None = None):
    """(VisionTransformer, VisionProjector or None): the tower, and in an omni release its projector into the LLM.
    `shardings` maps "vision" / "vision_proj" to each module's shardings."""
    from ming_jax.config.vision import VisionConfig
    from ming_jax.vision import VisionProjector, VisionTransformer

    manifest = Manifest.read(ckpt_dir)
    _needs(manifest, "vision", ckpt_dir)
    raw = read_config(ckpt_dir)
    pdt = dtype or _param_dtype(manifest, "vision")
    cfg = VisionConfig.from_official(raw, param_dtype=pdt)
    tower = nnx.eval_shape(lambda: VisionTransformer(cfg, use_deepstack=use_deepstack, rngs=nnx.Rngs(0)))
    shardings = shardings or {}
    tower = restore_params(ckpt_dir, tower, subtree="vision", shardings=shardings.get("vision"), mesh=mesh,
                           rules=rules, dtype=dtype)
    if not any(p.startswith("vision_proj.") for p in manifest.params):
        return tower, None
    llm_hidden = raw["llm_config"]["hidden_size"]
    proj = nnx.eval_shape(lambda: VisionProjector(cfg.out_hidden_size, llm_hidden, int(raw.get("mlp_depth", 1)),
                                                  param_dtype=np_dtype(pdt), rngs=nnx.Rngs(0)))
    proj = restore_params(ckpt_dir, proj, subtree="vision_proj", shardings=shardings.get("vision_proj"), mesh=mesh,
                          rules=rules, dtype=dtype)
    return tower, proj


def load_audio(ckpt_dir: str, *, shardings: Shardings | None = None, mesh=None, rules=None,
               dtype: str | None = None):
    """The `AudioTower` (whisper encoder + projector) of a converted checkpoint."""
    from ming_jax.audio import AudioTower
    from ming_jax.config.audio import AudioConfig

    manifest = Manifest.read(ckpt_dir)
    _needs(manifest, "audio", ckpt_dir)
    cfg = AudioConfig.from_official(read_config(ckpt_dir), param_dtype=dtype or _param_dtype(manifest, "audio"))
    model = nnx.eval_shape(lambda: AudioTower(cfg, rngs=nnx.Rngs(0)))
    return restore_params(ckpt_dir, model, subtree="audio", shardings=shardings, mesh=mesh, rules=rules, dtype=dtype)


def load_omni(ckpt_dir: str, *, deepstack: bool = False, shardings: Shardings | None = None, mesh=None, rules=None,
              dtype: str | None = None):
    """The whole `OmniModel` of a converted omni release (every tower it has must have been converted)."""
    from ming_jax import omni
    from ming_jax.config.omni import OmniConfig

    manifest = Manifest.read(ckpt_dir)
    raw = read_config(ckpt_dir)
    cfg = OmniConfig.from_official(raw, dtype="float32", param_dtype=dtype or _param_dtype(manifest, "llm"))
    for name, present in (("llm", True), ("vision", cfg.vision is not None), ("audio", cfg.audio is not None)):
        if present:
            _needs(manifest, name, ckpt_dir)
    return restore_params(ckpt_dir, omni.create_abstract(cfg, deepstack=deepstack), shardings=shardings, mesh=mesh,
                          rules=rules, dtype=dtype)


LOADERS: dict[str, Callable] = {"llm": load_llm, "vision": load_vision, "audio": load_audio}

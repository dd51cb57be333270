"""Our converted checkpoint: one orbax parameter tree (OCDBT + zarr), the official config, and a manifest.

Layout of a converted folder DIR (written by `ming_jax.checkpoint.convert`, read here):

    DIR/config.json       the release's config.json, verbatim: every sub-model config is read from it
    DIR/ming_jax.json     manifest: format, converted components, every parameter's shape and stored dtype,
                          per-tensor CRC32 of the source bytes, what was skipped (see `Manifest`)
    DIR/params/           an orbax checkpoint in `StandardCheckpointer` layout: OCDBT database + zarr arrays

The parameter tree is the pure-dict form (`nnx.to_pure_dict`) of `ming_jax.models.omni.OmniModel`'s parameters, restricted
to the converted components: top-level keys `llm`, `vision`, `vision_proj`, `audio` (a language-model-only
release gives just `llm`). So the standard orbax restore works unchanged:

    abstract = ming_jax.models.omni.create_abstract(cfg)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))   # leaves may carry shardings
    tree = ocp.StandardCheckpointer().restore(DIR / "params", target)

and `ming_jax.checkpoint.restore` (`restore_params`, and `load` over it) does exactly that for each
sub-model, straight into sharded device arrays: each device reads only its own shard of each
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
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from ming_jax.checkpoint.manifest import CheckpointFormatError, np_dtype, write_json

# Largest zarr chunk we write. A chunk is also the smallest unit a sharded restore reads, so large 2-D tensors
# (embeddings, lm head) are split into row blocks of at most this size; expert slices are one chunk each.
CHUNK_BYTES = 64 << 20

_ZARR_DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "bfloat16": "bfloat16", "int8": "|i1",
                "float8_e4m3fn": "float8_e4m3fn"}  # int8 / fp8: quantized weights (`ming_jax.quant`)


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

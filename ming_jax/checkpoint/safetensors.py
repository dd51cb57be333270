"""Safetensors release folders: strict reading (headers, index, byte ranges checked before any data is read) and
streaming writing (one tensor in memory at a time). Used by the converter, the reverse export and `ming_jax.checkpoint.release`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import math
import os
import struct
import threading
import zlib
from typing import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes.
_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_FLOATING = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ST_CODE = {v: k for k, v in _FLOATING.items()}
_MAX_HEADER = 100 << 20  # a header larger than this is corruption, not a model
FP8_SCALE_SUFFIX = "_scale_inv"  # transformers' fine-grained FP8: `<name>.weight` F8_E4M3 + `<name>.weight_scale_inv`

class CheckpointError(ValueError):
    """A checkpoint folder, shard or index that is unusable; the message names the problem."""


def _listing(items: Sequence[str], n: int = 12) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# --- reading the source folder ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str  # safetensors code: BF16, F32, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard file
    nbytes: int
    # A block-scaled FP8 weight (transformers' fine-grained FP8 / DeepSeek-V3 layout: F8_E4M3 `<name>` and its F32
    # `<name>_scale_inv` [ceil(out / bo), ceil(in / bi)]): the scale tensor and the (bo, bi) block. `read` returns
    # the dequantised float32 weight; it counts as BF16 (the release's dtype) when planning dtypes.
    scale: "TensorInfo | None" = None
    block: tuple[int, int] | None = None

    @property
    def value_dtype(self) -> str:
        """The safetensors code of what `read` returns for planning: BF16 for a dequantised FP8 weight."""
        return "BF16" if self.scale is not None else self.dtype


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parse one safetensors file's header and check every tensor's byte range against the file size.

    Returns ({name: TensorInfo}, __metadata__). Raises CheckpointError for a truncated or corrupt file.
    """
    shard = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"shard {shard} is truncated: {size} bytes, not even a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"shard {shard} is truncated or corrupt: header length {n} but the file has "
                                  f"{size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"shard {shard} has a corrupt header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {shard} has a corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    out, spans = {}, []
    for name, e in header.items():
        try:
            code, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {shard}: corrupt header entry for {name}: {e!r}") from None
        if code not in _ST_DTYPES:
            raise CheckpointError(f"shard {shard}: tensor {name} has unknown dtype {code!r}")
        want = math.prod(shape) * _ST_DTYPES[code].itemsize
        if not 0 <= begin <= end or end - begin != want or any(s < 0 for s in shape):
            raise CheckpointError(f"shard {shard}: tensor {name} {code}{list(shape)} needs {want} bytes but its "
                                  f"header gives the byte range [{begin}, {end})")
        if end > data_size:
            raise CheckpointError(f"shard {shard} is truncated: tensor {name} ends at data byte {end} but the file "
                                  f"holds only {data_size} data bytes ({size} bytes in all)")
        out[name] = TensorInfo(name, shard, code, shape, data_start + begin, want)
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"shard {shard} is corrupt: tensors {n0} and {n1} overlap")
    return out, meta


class SourceCheckpoint:
    """A release folder: config.json + safetensors shards (with `model.safetensors.index.json`, or without: every
    *.safetensors file). Construction reads every header and cross-checks them; `read` fetches one tensor.

    `merge` {sub-folder: name prefix} adds the weights of those sub-folders (each with its own shards, indexed by its
    `*.safetensors.index.json` or not) under `prefix + name`, e.g. the image-generation folders of the omni release
    (`transformer/diffusion_pytorch_model.safetensors` -> `transformer.<name>`). Their shards are named by their
    path relative to the folder; `subfolders()` no longer lists them."""

    def __init__(self, path: str, merge: Mapping[str, str] | None = None):
        if not os.path.isdir(path):
            raise CheckpointError(f"source folder {path} does not exist")
        self.path = path
        self.config_path = os.path.join(path, "config.json")
        if not os.path.exists(self.config_path):
            raise CheckpointError(f"{path} has no config.json")
        with open(self.config_path, "rb") as f:
            self.config_bytes = f.read()
        try:
            self.config = json.loads(self.config_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.config_path} is not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.config_path} is not a JSON object")
        self.index_path = os.path.join(path, INDEX_FILE)
        self.index_bytes = b""
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if os.path.exists(self.index_path):
            weight_map = self._read_index()
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise CheckpointError(f"{INDEX_FILE} names shard(s) that are not in {path}: {_listing(missing)}")
            self.unindexed_files = [f for f in files if f not in set(shards)]
        else:
            if not files:
                raise CheckpointError(f"{path} has no *.safetensors files and no {INDEX_FILE}")
            weight_map, shards, self.unindexed_files = None, files, []
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            infos, _ = read_header(os.path.join(path, shard))
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name} is in both {self.tensors[name].shard} and {shard}")
                self.tensors[name] = info
        if weight_map is not None:
            self._check_index(weight_map)
        self.merged = dict(merge or {})
        for folder, prefix in self.merged.items():
            shards += self._merge(folder, prefix)
        self.shards = shards
        self.fp8_weights = self._pair_fp8_scales()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _read_index(self) -> dict[str, str]:
        with open(self.index_path, "rb") as f:
            self.index_bytes = f.read()
        try:
            index = json.loads(self.index_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{INDEX_FILE} is not valid JSON ({e})") from None
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{INDEX_FILE} has no weight_map of tensor name -> shard file name")
        bad = sorted({v for v in wm.values() if os.path.basename(v) != v or not v.endswith(".safetensors")})
        if bad:
            raise CheckpointError(f"{INDEX_FILE} maps tensors to invalid shard names: {_listing(bad)}")
        return wm

    def _check_index(self, weight_map: Mapping[str, str]) -> None:
        absent = [f"{n} (in {s})" for n, s in weight_map.items() if n not in self.tensors]
        moved = [f"{n} (index: {s}, found in {self.tensors[n].shard})" for n, s in weight_map.items()
                 if n in self.tensors and self.tensors[n].shard != s]
        unlisted = sorted(set(self.tensors) - set(weight_map))
        problems = []
        if absent:
            problems.append(f"{len(absent)} tensor(s) listed in the index are not in their shard: {_listing(absent)}")
        if moved:
            problems.append(f"{len(moved)} tensor(s) are in another shard than the index says: {_listing(moved)}")
        if unlisted:
            problems.append(f"{len(unlisted)} tensor(s) in the shards are missing from the index: "
                            f"{_listing(unlisted)}")
        if problems:
            raise CheckpointError(f"{INDEX_FILE} does not match the shards: " + "; ".join(problems))

    def _merge(self, folder: str, prefix: str) -> list[str]:
        """Read the headers of one merged sub-folder; returns its shards as paths relative to the folder."""
        root = os.path.join(self.path, folder)
        if not os.path.isdir(root):
            raise CheckpointError(f"{self.path} has no {folder}/ sub-folder")
        files = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
        indexes = sorted(f for f in os.listdir(root) if f.endswith(".safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{folder}/ has several safetensors indexes: {indexes}")
        if indexes:
            with open(os.path.join(root, indexes[0]), "rb") as f:
                raw = f.read()
            try:
                wm = json.loads(raw).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise CheckpointError(f"{folder}/{indexes[0]} is not a valid index ({e})") from None
            if not isinstance(wm, dict):
                raise CheckpointError(f"{folder}/{indexes[0]} has no weight_map")
            self.index_bytes += raw
            on_disk = files
            files = sorted(set(wm.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
            if missing:
                raise CheckpointError(f"{folder}/{indexes[0]} names shard(s) that are not in {folder}/: "
                                      f"{_listing(missing)}")
            self.unindexed_files += [f"{folder}/{f}" for f in on_disk if f not in set(files)]
        if not files:
            raise CheckpointError(f"{folder}/ holds no *.safetensors weights")
        found: dict[str, str] = {}
        for shard in files:
            infos, _ = read_header(os.path.join(root, shard))
            for name, info in infos.items():
                full = prefix + name
                if full in self.tensors:
                    raise CheckpointError(f"tensor {full} ({folder}/{shard}) is also in {self.tensors[full].shard}")
                self.tensors[full] = dataclasses.replace(info, name=full, shard=f"{folder}/{shard}")
                found[name] = shard
        if indexes:  # the index must describe the shards exactly, as at the top level
            bad = sorted(n for n in set(wm) | set(found) if wm.get(n) != found.get(n))
            if bad:
                detail = [f"{n} (index: {wm.get(n)}, shards: {found.get(n)})" for n in bad]
                raise CheckpointError(f"{folder}/{indexes[0]} does not match the shards: {_listing(detail)}")
        return [f"{folder}/{f}" for f in files]

    def _pair_fp8_scales(self) -> int:
        """Fold every `<w>_scale_inv` into its F8_E4M3 weight `<w>` (the release's FP8 checkpoints, if it ships
        them, in transformers' fine-grained FP8 naming): the scale leaves `tensors`, the weight carries it. Block
        size: config.json's `quantization_config.weight_block_size` (top level or llm_config), else [128, 128];
        the scale's shape must be [ceil(out / bo), ceil(in / bi)]. Returns how many weights were paired."""
        qc = self.config.get("quantization_config") or (self.config.get("llm_config") or {}).get(
            "quantization_config") or {}
        block = tuple(int(b) for b in (qc.get("weight_block_size") or (128, 128)))
        scales = [n for n in self.tensors if n.endswith(FP8_SCALE_SUFFIX)]
        problems, paired = [], 0
        for sname in scales:
            wname = sname[: -len(FP8_SCALE_SUFFIX)]
            w, sc = self.tensors.get(wname), self.tensors[sname]
            if w is None or w.dtype not in ("F8_E4M3", "F8_E5M2"):
                problems.append(f"{sname}: no FP8 weight {wname} to scale ({'absent' if w is None else w.dtype})")
                continue
            if len(w.shape) != 2 or len(block) != 2 or sc.dtype not in ("F32", "BF16", "F16"):
                problems.append(f"{sname}: expected a 2-D FP8 weight and a float scale, got {w.dtype}{list(w.shape)}"
                                f" / {sc.dtype}{list(sc.shape)}")
                continue
            want = tuple(-(-d // b) for d, b in zip(w.shape, block))
            if tuple(sc.shape) != want:
                problems.append(f"{sname}: shape {list(sc.shape)}, but {wname} {list(w.shape)} in {list(block)} "
                                f"blocks needs {list(want)}")
                continue
            self.tensors[wname] = dataclasses.replace(w, scale=sc, block=block)
            del self.tensors[sname]
            paired += 1
        bare = [n for n, t in self.tensors.items() if t.dtype in ("F8_E4M3", "F8_E5M2") and t.scale is None]
        if bare:
            problems.append(f"{len(bare)} FP8 tensor(s) without a {FP8_SCALE_SUFFIX} scale: {_listing(bare)}")
        if problems:
            raise CheckpointError(f"{self.path}: FP8 weights: " + "; ".join(problems[:8]))
        return paired

    def subfolders(self) -> list[tuple[str, int, int]]:
        """(name, bytes, files) of every sub-folder that is not merged: parts of the release we do not convert."""
        out = []
        for entry in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, entry)
            if os.path.isdir(full) and entry not in self.merged:
                size = files = 0
                for root, _, names in os.walk(full):
                    for n in names:
                        files += 1
                        size += os.path.getsize(os.path.join(root, n))
                out.append((entry, size, files))
        return out

    def fingerprint(self) -> str:
        """Identity of the source for resuming: config, index, and every shard's size and mtime."""
        h = hashlib.sha256(self.config_bytes + self.index_bytes)
        for s in self.shards:
            st = os.stat(os.path.join(self.path, s))
            h.update(f"{s}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()

    def read(self, info: TensorInfo) -> tuple[np.ndarray, int]:
        """One tensor, read into a fresh buffer (no memory map that would keep pages resident); (array, CRC32 of its
        stored bytes). A block-scaled FP8 weight comes back dequantised: float32 fp8 x its block's scale."""
        if info.scale is not None:
            raw, crc = self._read(info)
            scale = self._read(info.scale)[0].astype(np.float32)
            bo, bi = info.block
            full = np.repeat(np.repeat(scale, bo, axis=0), bi, axis=1)[: info.shape[0], : info.shape[1]]
            return raw.astype(np.float32) * full, crc
        return self._read(info)

    def _read(self, info: TensorInfo) -> tuple[np.ndarray, int]:
        with self._lock:  # called from the converter's worker threads
            fd = self._fds.get(info.shard)
            if fd is None:
                fd = self._fds[info.shard] = os.open(os.path.join(self.path, info.shard), os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = np.empty(info.nbytes, np.uint8)
        view, done = memoryview(buf), 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got <= 0:
                raise CheckpointError(f"shard {info.shard} ended while reading {info.name} (file truncated while "
                                      f"converting?)")
            done += got
        if hasattr(os, "posix_fadvise"):  # the bytes are ours now: do not let them crowd the page cache
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
        crc = zlib.crc32(view)
        return buf.view(_ST_DTYPES[info.dtype]).reshape(info.shape), crc

    def close(self) -> None:
        with self._lock:
            fds = list(self._fds.values())
        for fd in fds:
            os.close(fd)
        self._fds.clear()

# --- writing safetensors (reverse export, synthetic checkpoints) ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def st_code(dtype: np.dtype) -> str:
    for code, dt in _ST_DTYPES.items():
        if dt == dtype:
            return code
    raise CheckpointError(f"dtype {dtype} has no safetensors code")


def write_safetensors(path: str, tensors: Sequence[OutTensor], fetch: Callable[[OutTensor], np.ndarray],
                      on_tensor: Callable[[OutTensor], None] | None = None) -> None:
    """Stream one safetensors file: the header is built from `tensors` up front, then each tensor's bytes are
    fetched and written in turn, so only one tensor is in memory."""
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": st_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset,
                                                                                              offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            a = np.ascontiguousarray(fetch(t))
            if a.dtype != t.dtype or tuple(a.shape) != t.shape:
                raise CheckpointError(f"{t.name}: got {a.dtype}{list(a.shape)}, header says {t.dtype}{list(t.shape)}")
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
            if on_tensor:
                on_tensor(t)
        f.flush()
        os.fsync(f.fileno())


def shard_names(tensors: Sequence[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards, cur, size = [], [], 0
    for t in tensors:
        if cur and size + t.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.nbytes
    if cur:
        shards.append(cur)
    return shards


def write_sharded(dst: str, tensors: Sequence[OutTensor], fetch: Callable[[OutTensor], np.ndarray],
                  max_shard_bytes: int, on_tensor=None, *, base: str = "model", single_file: bool = False) -> dict:
    """`{base}-0000k-of-0000n.safetensors` shards + `{base}.safetensors.index.json` in `dst`; returns the index.
    `single_file`: when everything fits one shard, write `{base}.safetensors` and no index file (what loaders that
    open one fixed file name expect, e.g. the release's mlp/model.safetensors)."""
    shards = shard_names(tensors, max_shard_bytes)
    weight_map = {}
    if single_file and len(shards) <= 1:
        fname = f"{base}.safetensors"
        write_safetensors(os.path.join(dst, fname), shards[0] if shards else [], fetch, on_tensor)
        return {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                "weight_map": {t.name: fname for t in tensors}}
    for k, shard in enumerate(shards):
        fname = f"{base}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(dst, fname), shard, fetch, on_tensor)
        weight_map.update({t.name: fname for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    with open(os.path.join(dst, f"{base}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


class TensorMapping(collections.abc.Mapping):
    """name -> numpy array over a `SourceCheckpoint` (each access reads that one tensor)."""

    def __init__(self, source: "SourceCheckpoint"):
        self.source = source

    def __getitem__(self, name: str) -> np.ndarray:
        return self.source.read(self.source.tensors[name])[0]

    def __iter__(self):
        return iter(self.source.tensors)

    def __len__(self):
        return len(self.source.tensors)

"""Reading `torch.save` files without torch: a restricted unpickler and the zip archive's raw storages -> numpy.

The zip format that `torch.save` writes (torch >= 1.6; `<a>` is the archive's one top-level folder):

    <a>/data.pkl        a pickle (protocol 2) of the saved object; each tensor is a call
                        torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])
                        (dtypes without a legacy storage class, e.g. float8 / uint16: _rebuild_tensor_v3(..., dtype)
                        on a torch.storage.UntypedStorage), nn.Parameters wrapped in _rebuild_parameter; storages are
                        persistent ids ("storage", torch.<X>Storage, key, location, numel)
    <a>/data/<key>      each storage's raw bytes (numel x itemsize, uncompressed, 64-byte aligned)
                        (every record is written ZIP_STORED: torch's PyTorchStreamWriter::writeRecord compresses only
                        when asked, and torch.save's `write_record(name, data, size)` never asks)
    <a>/byteorder       "little" / "big" (absent in old files: little)
    <a>/version, <a>/.format_version, <a>/.storage_alignment, <a>/.data/serialization_id   (not needed here)

A pickle can call any importable function while it loads, so `find_class` here resolves only the globals a tensor
checkpoint needs, to stand-ins of our own (nothing is imported from the file's say-so): the rebuild functions
above, the storage types, torch dtypes, `torch.Size` (a tuple), `torch.device` (its string),
`collections.OrderedDict`, `set` / `frozenset` / `complex` / `bytearray`, and `_codecs.encode` for latin-1 only
(how protocol 2 spells bytes). Any other global is refused with a `CheckpointError` naming it. `opaque=True` keeps
other globals instead as inert `Opaque` records (name, arguments, state; never imported, never called): for files
whose tensors we need next to objects we do not (a training checkpoint's arguments), which the release reads with
`weights_only=False`.

    arch = TorchArchive(path)          # the pickle unpickled, every storage record checked; no tensor data read
    arch.tree                          # the saved object, tensors as `TensorRef` (dtype, shape, storage slice)
    arch.read(ref)                     # one tensor as a numpy array
    load(path)                         # the whole object, tensors read (`TensorRef` -> np.ndarray)

Tensors come back as C-contiguous numpy arrays of the storage's dtype (bfloat16 / float8 via ml_dtypes), in native
byte order. Legacy (non-zip) `torch.save` files are refused: re-save them with a current torch.

What a hostile file can cost is bounded by its size: records must be stored (a compressed one is refused before
anything is decompressed) and lie inside the file, so no storage is larger than the file; a tensor whose strides
address a storage element twice (`expand`, overlapping `as_strided`: more elements than its slice holds) is refused
when read, so no tensor is larger than its storage; the unpickler and the tree walk share out `MAX_ITEMS` objects /
container items (a pickle's memo lets a few hundred bytes describe a tree of 2**n paths: every object is visited
once, and shared objects stay shared in the result). Left as is: pickle itself re-hashes a tuple each time it is
used as a dict key or set element, which costs time (not memory) quadratic in data.pkl's size at worst.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Self

import ml_dtypes
import numpy as np

from ming_jax.checkpoint.safetensors import CheckpointError

# torch.<X>Storage -> element dtype (what `_rebuild_tensor_v2` gives the tensor).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64), "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),  # raw bytes: numel counts bytes
}
# torch dtype globals (`torch.float8_e4m3fn`, ...) -> numpy dtype; the names torch pickles them by.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_, "complex64": np.complex64, "cfloat": np.complex64, "complex128": np.complex128,
    "cdouble": np.complex128,
}
_TORCH_DTYPES = {k: np.dtype(v) for k, v in _TORCH_DTYPES.items()}
_BUILTINS = ("builtins", "__builtin__")  # protocol 2 writes the Python 2 name
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_METHODS = {zipfile.ZIP_DEFLATED: "DEFLATE", zipfile.ZIP_BZIP2: "BZIP2", zipfile.ZIP_LZMA: "LZMA"}
# The most objects / container items one file may build: the unpickler counts what its allowed calls copy (set(x),
# OrderedDict(x), bytearray(x), a tensor's size / stride: each element), the tree walk every item it visits once.
# A state dict of 100k tensors (far beyond any model's) visits ~300k; ten million keeps each phase to seconds and
# about a GB of Python objects.
MAX_ITEMS = 10_000_000
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header: 30 bytes, then name and extra field


# --- what the pickle may build ----------------------------------------------------------------------------------


class _Inert:
    """Our stand-ins refuse pickle's BUILD (which would otherwise write into their __dict__)."""

    def __setstate__(self, state):
        raise CheckpointError(f"the pickle sets state on a {type(self).__name__}: not a torch.save file")


@dataclasses.dataclass(frozen=True, eq=False)
class StorageRef(_Inert):
    """One storage record of the archive: `numel` elements of `dtype` (bytes for an UntypedStorage)."""

    key: str
    dtype: np.dtype
    numel: int
    location: str


@dataclasses.dataclass(frozen=True, eq=False)
class TensorRef(_Inert):
    """A tensor as the pickle describes it: `shape` / `stride` (elements) into `storage` from element `offset`."""

    storage: StorageRef
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class _Marker(_Inert):
    """A storage type or dtype global: only ever an argument, never called."""

    kind: str  # "storage" / "dtype"
    name: str
    dtype: np.dtype


class Opaque:
    """An object of a global the reader does not know (`opaque=True`), kept as data: `global_name`, the arguments
    it was called with, the state pickle set on it, items appended / assigned. Nothing of it ever runs."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[], entries={})
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def __setitem__(self, key, value):
        self.entries[key] = value

    def __repr__(self):
        return f"Opaque({self.global_name}, args={self.args!r})"


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointError(f"tensor {what} {value!r} is not a tuple of non-negative integers")
    return tuple(value)


def _tensor(storage, offset, size, stride, requires_grad, hooks, dtype, metadata) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage record")
    if type(offset) is not int or offset < 0:
        raise CheckpointError(f"tensor storage offset {offset!r} is not a non-negative integer")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointError(f"tensor size {shape} and stride {strides} differ in rank")
    if metadata:
        raise CheckpointError(f"tensor metadata {sorted(metadata)} (a tensor subclass or flag) is not supported")
    if not isinstance(requires_grad, bool):
        raise CheckpointError(f"tensor requires_grad {requires_grad!r} is not a bool")
    return TensorRef(storage, dtype, offset, shape, strides)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    dtype = storage.dtype if isinstance(storage, StorageRef) else None
    return _tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _Marker) or dtype.kind != "dtype":
        raise CheckpointError(f"_rebuild_tensor_v3 dtype {dtype!r} is not a torch dtype")
    if isinstance(storage, StorageRef) and storage.dtype != np.uint8:
        raise CheckpointError("_rebuild_tensor_v3 on a typed storage (expected an UntypedStorage)")
    return _tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype.dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorRef):
        raise CheckpointError(f"nn.Parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _device(kind, index=None) -> str:
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise CheckpointError(f"torch.device({kind!r}, {index!r}) is not a device")
    return kind if index is None else f"{kind}:{index}"


def _size(dims=()) -> tuple[int, ...]:
    return _ints(dims, "torch.Size")


def _latin1(text, encoding="latin1"):
    """`_codecs.encode` as protocol 2 uses it for bytes objects; any other codec is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r}): only latin-1 text is allowed")
    return text.encode("latin1")


def _bytearray(data=b""):
    if not isinstance(data, bytes):  # what protocol 2 writes; bytearray(n) would allocate n bytes
        raise CheckpointError(f"bytearray({type(data).__name__}): only bytes are allowed")
    return bytearray(data)


class _Budget:
    """A count of objects / items built, refused past `MAX_ITEMS` (read when the budget is made)."""

    def __init__(self, where: str, what: str):
        self.where, self.what, self.limit, self.used = where, what, MAX_ITEMS, 0

    def charge(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise CheckpointError(f"{self.where}{self.what} more than {self.limit:,} objects / container items "
                                  f"(torch_pickle.MAX_ITEMS), far more than a state dict holds: refusing it (a small "
                                  f"pickle can spell out a huge tree by reusing its objects)")


def _weight(value) -> int:
    """What copying / iterating an argument costs: its length for sized built-ins, else 1."""
    return len(value) if isinstance(value, (str, bytes, bytearray, tuple, list, dict, set, frozenset)) else 1


def _allowed(module: str, name: str):
    """The stand-in of an allowed global, or None."""
    if module == "torch._utils":
        return {"_rebuild_tensor_v2": _rebuild_tensor_v2, "_rebuild_tensor_v3": _rebuild_tensor_v3,
                "_rebuild_parameter": _rebuild_parameter,
                "_rebuild_parameter_with_state": _rebuild_parameter}.get(name)
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
        return _Marker("storage", name, _STORAGE_DTYPES[name])
    if module == "torch":
        if name in _TORCH_DTYPES:
            return _Marker("dtype", name, _TORCH_DTYPES[name])
        return {"Size": _size, "device": _device}.get(name)
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module in _BUILTINS:
        return {"set": set, "frozenset": frozenset, "complex": complex, "bytearray": _bytearray}.get(name)
    if module == "_codecs" and name == "encode":
        return _latin1
    return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, where: str, opaque: bool):
        super().__init__(file, encoding="utf-8")
        self.where = where
        self.opaque = opaque
        self.storages: dict[str, StorageRef] = {}
        self._opaque_types: dict[str, type] = {}
        self.budget = _Budget(f"{where}: ", "data.pkl builds")

    def _charged(self, fn: Callable) -> Callable:
        """`fn`, each call first charged its arguments' sizes (a memo get is 2 bytes of pickle, an argument it
        names may be a container of millions of items that fn copies)."""

        def call(*args, **kwargs):
            self.budget.charge(1 + sum(map(_weight, args)) + sum(map(_weight, kwargs.values())))
            return fn(*args, **kwargs)

        return call

    def find_class(self, module, name):
        found = _allowed(module, name)
        if found is not None:
            return self._charged(found) if callable(found) else found  # markers are arguments, never called
        full = f"{module}.{name}"
        if not self.opaque:
            raise CheckpointError(f"{self.where}: the pickle references the global {full}, which a tensor "
                                  f"checkpoint does not need; refusing to load it (unpickling it could run "
                                  f"arbitrary code)")
        if full not in self._opaque_types:
            self._opaque_types[full] = type(f"Opaque[{full}]", (Opaque,), {"global_name": full})
        return self._opaque_types[full]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.where}: unknown persistent id {pid!r} (expected a storage record)")
        _, kind, key, location, numel = pid
        if not isinstance(kind, _Marker) or kind.kind != "storage":
            raise CheckpointError(f"{self.where}: storage record {key!r} has type {kind!r}, not a torch storage")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{self.where}: malformed storage record {pid!r}")
        ref = StorageRef(key, kind.dtype, numel, location)
        seen = self.storages.setdefault(key, ref)
        if (seen.dtype, seen.numel) != (ref.dtype, ref.numel):
            raise CheckpointError(f"{self.where}: storage {key} is described as both {seen.dtype}[{seen.numel}] "
                                  f"and {ref.dtype}[{ref.numel}]")
        return seen


# --- the archive ------------------------------------------------------------------------------------------------


def _refuse_unreadable(path: str, head: bytes) -> None:
    if head.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"{path} is a truncated or corrupt zip archive (torch.save file cut short?)")
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path} is a legacy (non-zip) torch.save file (torch < 1.6, or "
                              f"_use_new_zipfile_serialization=False), which is not supported: re-save it with a "
                              f"current torch (torch.save(torch.load(path), path))")
    raise CheckpointError(f"{path} is not a torch.save file (no zip archive)")


class TorchArchive:
    """An open `torch.save` zip file: `tree` is the saved object with `TensorRef` leaves; `read` fetches one.

    Opening reads only the pickle and the zip directory, and checks every storage record the pickle names (present,
    stored, of the size the pickle says, inside the file) and every tensor's slice of its storage; tensor bytes are
    read by `read`. `refs`: the tree's tensors, each once (`tensor_refs`)."""

    def __init__(self, path: str | os.PathLike, *, opaque: bool = False):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path} does not exist")
        with open(self.path, "rb") as f:
            head = f.read(4)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            _refuse_unreadable(self.path, head)
        try:
            self._open(opaque)
        except BaseException:
            self._zip.close()
            raise

    def _open(self, opaque: bool) -> None:
        names = self._zip.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{self.path}: a torch.save archive has one <archive>/data.pkl, found "
                                  f"{pickles or 'none'}")
        self.prefix = pickles[0][:-len("data.pkl")]
        self._infos = {i.filename: i for i in self._zip.infolist()}
        self._size = os.path.getsize(self.path)
        order = self._record(self.prefix + "byteorder").decode("ascii", "replace") \
            if self.prefix + "byteorder" in self._infos else "little"
        if order not in ("little", "big"):
            raise CheckpointError(f"{self.path}: byteorder record says {order!r}")
        self.byteorder = order
        raw = self._record(pickles[0])
        unpickler = _Unpickler(io.BytesIO(raw), self.path, opaque)
        try:
            self.tree = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (a malformed pickle fails in many ways: UnpicklingError, TypeError, ...)
            raise CheckpointError(f"{self.path}: data.pkl is not a readable torch.save pickle "
                                  f"({type(e).__name__}: {e})") from None
        self.storages = unpickler.storages
        try:
            refs = tensor_refs(self.tree)
        except RecursionError:
            raise CheckpointError(f"{self.path}: data.pkl nests containers too deeply for a state dict") from None
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        for ref in self.storages.values():
            info = self._infos.get(self._storage_name(ref))
            if info is None:
                raise CheckpointError(f"{self.path}: storage {ref.key} is named by the pickle but has no record "
                                      f"{self._storage_name(ref)}")
            self._check_record(info)
            want = ref.numel * ref.dtype.itemsize
            if info.file_size != want:
                raise CheckpointError(f"{self.path}: storage {ref.key} holds {info.file_size} bytes but the pickle "
                                      f"says {ref.numel} x {ref.dtype} = {want}")
        self.refs = refs
        self._uses = collections.Counter()
        for ref in refs:
            self._check_slice(ref)
            self._uses[ref.storage.key] += 1

    def _storage_name(self, ref: StorageRef) -> str:
        return f"{self.prefix}data/{ref.key}"

    def _check_record(self, info: zipfile.ZipInfo) -> None:
        """A record we read is stored, as torch.save writes every record (a compressed one could inflate to any
        size: refused before anything is decompressed), unencrypted, and lies inside the file."""
        if info.compress_type != zipfile.ZIP_STORED:
            method = _ZIP_METHODS.get(info.compress_type, f"method {info.compress_type}")
            raise CheckpointError(f"{self.path}: record {info.filename} is compressed ({method}); torch.save writes "
                                  f"every record uncompressed, so another tool re-packed this archive: load it with "
                                  f"torch and re-save it with torch.save (torch.save(torch.load(path), path))")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{self.path}: record {info.filename} is encrypted: not a torch.save file")
        end = info.header_offset + _LOCAL_HEADER.size + info.file_size
        if info.compress_size != info.file_size or end > self._size:
            raise CheckpointError(f"{self.path}: record {info.filename} claims {info.file_size} bytes at offset "
                                  f"{info.header_offset}, but the file holds only {self._size}: truncated or "
                                  f"corrupt file")

    def _record(self, name: str) -> bytes:
        self._check_record(self._infos[name])
        try:
            with self._zip.open(name) as f:
                return f.read()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{self.path}: record {name} is unreadable ({e}): truncated or corrupt file") \
                from None

    def _check_slice(self, ref: TensorRef) -> None:
        """The tensor's elements lie inside its storage (reinterpreted as the tensor's dtype for v3 tensors)."""
        total = ref.storage.numel * ref.storage.dtype.itemsize
        if total % ref.dtype.itemsize:
            raise CheckpointError(f"{self.path}: storage {ref.storage.key} ({total} bytes) is not a whole number of "
                                  f"{ref.dtype} elements")
        numel = total // ref.dtype.itemsize
        if math.prod(ref.shape) == 0:
            end = ref.offset
        else:
            end = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
        if end > numel:
            raise CheckpointError(f"{self.path}: tensor {ref.dtype}{list(ref.shape)} (offset {ref.offset}, stride "
                                  f"{list(ref.stride)}) reaches element {end} of storage {ref.storage.key}, which "
                                  f"holds {numel}")

    def _storage_bytes(self, ref: StorageRef) -> np.ndarray:
        """The storage record's bytes (stored, inside the file: `_check_record`), CRC-checked, in a buffer of our
        own, native byte order not yet applied."""
        info = self._infos[self._storage_name(ref)]
        buf = np.empty(info.file_size, np.uint8)
        with open(self.path, "rb") as f:  # read straight into the buffer
            f.seek(info.header_offset)
            head = f.read(_LOCAL_HEADER.size)
            if len(head) < _LOCAL_HEADER.size or not head.startswith(_ZIP_MAGIC):
                raise CheckpointError(f"{self.path}: corrupt zip entry {info.filename}")
            fields = _LOCAL_HEADER.unpack(head)
            f.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])
            got = f.readinto(memoryview(buf))
        if got != info.file_size:
            raise CheckpointError(f"{self.path}: storage {ref.key} ends after {got} of {info.file_size} bytes "
                                  f"(truncated file)")
        if zlib.crc32(memoryview(buf)) != info.CRC:
            raise CheckpointError(f"{self.path}: storage {ref.key} fails its CRC check (corrupt file)")
        return buf

    def _check_distinct(self, ref: TensorRef) -> None:
        """No two of the tensor's elements are one storage element, so reading it never materialises more than
        its slice of the storage holds (an expanded [1e5, 1e5] at stride (0, 0) over one float would be 40 GB).
        The test: the dims of extent > 1 taken by increasing stride, each stride reaches past every element the
        smaller ones address (sufficient for no overlap; views by slicing, stepping, transposing or permuting a
        tensor always pass; `expand` (stride 0) and overlapping `as_strided` fail, as would an interleaving only
        `as_strided` makes, e.g. [3, 2] at stride (2, 3))."""
        if math.prod(ref.shape) == 0:
            return
        reach = 0
        for stride, n in sorted((s, n) for n, s in zip(ref.shape, ref.stride) if n > 1):
            if stride <= reach:
                raise CheckpointError(
                    f"{self.path}: tensor {ref.dtype}{list(ref.shape)} (stride {list(ref.stride)}) addresses "
                    f"storage elements more than once (an expanded or overlapping view, e.g. from .expand()), so "
                    f"reading it would materialise {math.prod(ref.shape):,} elements from fewer stored ones; "
                    f"refused. A module's state_dict never holds such tensors: save this one as t.contiguous()")
            reach += (n - 1) * stride

    def _storage_array(self, ref: StorageRef, dtype: np.dtype) -> np.ndarray:
        buf = self._storage_bytes(ref)
        if self.byteorder == "big" and dtype.itemsize > 1:
            part = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: swap each half
            buf.view(f"u{part}").byteswap(inplace=True)
        return buf.view(dtype)

    def read(self, ref: TensorRef, cache: dict | None = None) -> np.ndarray:
        """One tensor: a C-contiguous array of its dtype. `cache` (a dict) keeps storages read for later tensors;
        a tensor of a storage that other tensors share is always a copy, so no two results alias. A tensor whose
        strides address a storage element twice is refused (`_check_distinct`)."""
        self._check_distinct(ref)
        key = (ref.storage.key, ref.dtype.str, ref.dtype.name)
        storage = cache.get(key) if cache is not None else None
        if storage is None:
            storage = self._storage_array(ref.storage, ref.dtype)
            if cache is not None and self._uses[ref.storage.key] > 1:
                cache[key] = storage
        n = math.prod(ref.shape)
        contiguous = all(s == math.prod(ref.shape[i + 1:]) for i, (d, s) in enumerate(zip(ref.shape, ref.stride))
                         if d > 1)
        if not contiguous:  # strided on raw elements (as_strided does not know ml_dtypes), copied, retyped
            item = ref.dtype.itemsize
            raw = storage.view(np.dtype(f"V{item}"))[ref.offset:]
            view = np.lib.stride_tricks.as_strided(raw, ref.shape, [s * item for s in ref.stride], writeable=False)
            return np.array(view, order="C", copy=True).view(ref.dtype)
        out = storage[ref.offset:ref.offset + n].reshape(ref.shape)
        shared = self._uses[ref.storage.key] > 1 or n < storage.size
        return np.array(out, copy=True) if shared else out

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- trees ------------------------------------------------------------------------------------------------------


def map_tree(obj: Any, fn: Callable[[TensorRef], Any]) -> Any:
    """The tree with each `TensorRef` replaced by fn(ref): OrderedDicts become dicts (torch's `_metadata`
    attribute dropped), lists / tuples / dicts rebuilt, torch dtypes as numpy dtypes, `Opaque` records kept with
    their arguments mapped. Each object is mapped once: one the tree holds in several places (a tied weight, a
    pickle memo get) is one object in the result too (fn called once). Past `MAX_ITEMS` items visited, or on a
    cycle, raises `CheckpointError`."""
    done: dict[int, Any] = {}  # id -> result; the tree keeps every id's object alive for the walk
    active: set[int] = set()
    budget = _Budget("", "the tree holds")
    limit, visited = budget.limit, 0

    def walk(node):
        nonlocal visited
        visited += 1
        if visited > limit:
            budget.charge(visited)  # raises
        if not isinstance(node, _NODES):
            if isinstance(node, _Marker):  # a torch dtype saved as a value
                return node.dtype if node.kind == "dtype" else node
            return node
        key = id(node)
        if key in done:
            return done[key]
        if key in active:
            raise CheckpointError("the pickle's containers refer to themselves (a cycle): not a state dict")
        active.add(key)
        if isinstance(node, TensorRef):
            out = fn(node)
        elif isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
        elif isinstance(node, list):
            out = [walk(v) for v in node]
        elif isinstance(node, tuple):
            out = tuple(walk(v) for v in node)
        else:
            out = type(node)(*walk(node.args), **walk(node.kwargs))
            out.__setstate__(walk(node.state))
            out.items.extend(walk(node.items))
            out.entries.update(walk(node.entries))
        active.discard(key)
        done[key] = out
        return out

    return walk(obj)


_NODES = (TensorRef, dict, list, tuple, Opaque)


def tensor_refs(obj: Any) -> list[TensorRef]:
    """Every `TensorRef` of a tree, each once (a tensor the tree holds twice is one ref), in order."""
    found: list[TensorRef] = []
    map_tree(obj, lambda r: found.append(r))
    return found


class ArchiveTensors(collections.abc.Mapping):
    """name -> numpy array over {name: TensorRef} of one archive, each access reading that tensor."""

    def __init__(self, archive: TorchArchive, refs: Mapping[str, TensorRef]):
        self.archive = archive
        self.refs = dict(refs)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.archive.read(self.refs[name])

    def __iter__(self):
        return iter(self.refs)

    def __len__(self):
        return len(self.refs)


def load(path: str | os.PathLike, *, opaque: bool = False) -> Any:
    """The object saved in a `torch.save` file, tensors as numpy arrays (nested dicts / lists / tuples as saved;
    OrderedDicts as dicts). A tensor saved twice (one object, e.g. a tied weight) is one array in both places, as
    torch.load gives one tensor; distinct tensors over one storage are distinct arrays. Raises `CheckpointError`
    for a missing, truncated, non-zip or forbidden file, or an expanded tensor (before any tensor is read)."""
    with TorchArchive(path, opaque=opaque) as arch:
        for ref in arch.refs:
            arch._check_distinct(ref)
        cache: dict = {}
        return map_tree(arch.tree, lambda ref: arch.read(ref, cache))

"""Loading the release's ByT5 glyph folder without torch: `ming_jax.checkpoint.torch_pickle` (torch.save zip files
through a restricted unpickler) and `ming_jax.checkpoint.glyph` (byt5/ -> encoder + mapper; the converter's copy).

References: torch itself (torch.save of tensors of every dtype, views, shared storages, module state dicts; torch is
a test-only dependency) and transformers (the base folder's ByT5Tokenizer files and `len(tokenizer)`). The release
folder is written here in the release's layout (`tools/make_glyph_reference.py` shows the official loader reading
the same layout) from random arrays named by our tables.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import shutil
import struct
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax.checkpoint import glyph as glyph_ckpt
from ming_jax.checkpoint import torch_pickle
from ming_jax.checkpoint.glyph import GLYPH_FOLDER, copy_glyph, has_glyph, load_glyph
from ming_jax.checkpoint.safetensors import CheckpointError
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
from ming_jax.models.image_gen.glyph import GlyphMapper, T5Encoder, encode_glyphs
from ming_jax.processors.glyph import ByteTokenizer, release_special_tokens
from ming_jax.weights.glyph import glyph_mapper_table, t5_encoder_table
from ming_jax.weights.table import (
    export_arrays,
    load_state_dict,
    param_arrays,
    param_shapes,
)


def _torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return torch


def _same(ours: np.ndarray, tensor) -> None:
    """Bit-exact equality with a torch tensor, for every dtype (bfloat16 / float8 compared as raw bits)."""
    torch = _torch()
    want = tensor.detach().contiguous()
    assert tuple(ours.shape) == tuple(want.shape)
    if want.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.int16)}[want.element_size()]
        np.testing.assert_array_equal(ours.view(bits[1]), want.view(bits[0]).numpy())
    else:
        np.testing.assert_array_equal(ours, want.numpy())
    assert ours.flags.c_contiguous


# --- torch_pickle against torch.save -------------------------------------------------------------------------------

_DTYPES = ["float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32", "int16",
           "int8", "uint8", "uint16", "uint32", "bool", "complex64"]


@pytest.mark.parametrize("name", _DTYPES)
def test_dtypes_match_torch(tmp_path, name):
    torch = _torch()
    dtype = getattr(torch, name)
    full = (torch.randn(5, 6) * 50).to(dtype) if dtype.is_floating_point or dtype.is_complex else \
        torch.randint(0, 100, (5, 6)).to(dtype)
    saved = {"full": full, "view": full[1:, ::2], "scalar": full[2, 3].clone()}
    torch.save(saved, tmp_path / "x.pt")
    got = torch_pickle.load(tmp_path / "x.pt")
    assert set(got) == set(saved)
    for k, t in saved.items():
        _same(got[k], t)
    assert got["scalar"].shape == ()


def test_views_shared_storages_and_containers(tmp_path):
    torch = _torch()
    base = torch.randn(4, 6, 5)
    flat = torch.arange(30, dtype=torch.float32)
    saved = {
        "transposed": base.transpose(0, 2), "sliced": base[1:3, 2:, 1:4], "permuted": base.permute(2, 0, 1)[::2],
        "diagonal": flat[:25].view(5, 5).diagonal(), "empty": base[:, :0], "stepped": flat.view(5, 6)[::2, ::3],
        "nested": [flat[3:9], (flat[10:12], {"deep": collections.OrderedDict(x=flat.view(5, 6)[:, 1])})],
        "param": torch.nn.Parameter(torch.ones(3)), "plain": {"n": 3, "s": "text", "f": 2.5, "none": None,
                                                              "b": b"\x00\xff", "set": {1, 2}, "c": 1 + 2j},
        "meta": [torch.Size([2, 3]), torch.bfloat16, torch.device("cpu")],
    }
    torch.save(saved, tmp_path / "v.pt")
    got = torch_pickle.load(tmp_path / "v.pt")
    for k in ("transposed", "sliced", "permuted", "diagonal", "empty", "stepped", "param"):
        _same(got[k], saved[k])
    _same(got["nested"][0], flat[3:9])
    _same(got["nested"][1][0], flat[10:12])
    _same(got["nested"][1][1]["deep"]["x"], flat.view(5, 6)[:, 1])
    assert type(got["nested"][1][1]["deep"]) is dict and isinstance(got["nested"][1], tuple)
    assert got["plain"] == saved["plain"]
    assert got["meta"] == [(2, 3), np.dtype("bfloat16"), "cpu"]
    # flat's storage backs five tensors: each result is its own copy, none aliases another
    views = [got["stepped"], got["diagonal"], got["nested"][0], got["nested"][1][0], got["nested"][1][1]["deep"]["x"]]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(views) for b in views[i + 1:])
    got["nested"][0][0] = -1.0  # writable
    assert got["nested"][1][0][0] == 10


def test_module_state_dict(tmp_path):
    torch = _torch()
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.BatchNorm1d(3),
                              torch.nn.Embedding(7, 2).to(torch.bfloat16))
    net[2].running_mean.add_(0.5)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    got = torch_pickle.load(tmp_path / "m.pt")
    want = net.state_dict()
    assert list(got) == list(want)  # order kept, `_metadata` dropped
    for k, t in want.items():
        _same(got[k], t)
    assert got["2.num_batches_tracked"].dtype == np.int64 and got["2.num_batches_tracked"].shape == ()


def test_module_state_dicts_load(tmp_path):
    """state_dict() of a few kinds of module (none holds an expanded tensor), and a tied weight saved as a
    transposed view: all load, the tied pair as one array (torch.load gives one tensor too)."""
    torch = _torch()
    modules = {"conv": torch.nn.Conv2d(2, 3, 3), "lstm": torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True),
               "mha": torch.nn.MultiheadAttention(4, 2, kdim=3, vdim=5), "gru": torch.nn.GRU(2, 3),
               "layer": torch.nn.TransformerEncoderLayer(8, 2, 16), "norm": torch.nn.GroupNorm(2, 4),
               "weight_norm": torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2))}
    for name, module in modules.items():
        torch.save(module.state_dict(), tmp_path / f"{name}.pt")
        got, want = torch_pickle.load(tmp_path / f"{name}.pt"), module.state_dict()
        assert list(got) == list(want), name
        for k, t in want.items():
            _same(got[k], t)
    emb = torch.nn.Embedding(6, 4)
    sd = {"embed": emb.weight, "head": emb.weight, "head_t": emb.weight.detach().t()}
    torch.save(sd, tmp_path / "tied.pt")
    got = torch_pickle.load(tmp_path / "tied.pt")
    assert got["embed"] is got["head"]
    _same(got["head_t"], emb.weight.t())
    assert not np.shares_memory(got["embed"], got["head_t"])


def test_archive_reads_lazily(tmp_path):
    torch = _torch()
    big = torch.randn(3, 4)
    torch.save({"a": big, "b": big.t(), "c": torch.ones(2, dtype=torch.float16)}, tmp_path / "l.pt")
    with torch_pickle.TorchArchive(tmp_path / "l.pt") as arch:
        refs = arch.tree
        assert [(k, r.shape, r.dtype) for k, r in refs.items()] == [("a", (3, 4), np.float32),
                                                                   ("b", (4, 3), np.float32),
                                                                   ("c", (2,), np.float16)]
        assert refs["a"].storage is refs["b"].storage and refs["b"].stride == (1, 4)
        lazy = torch_pickle.ArchiveTensors(arch, refs)
        assert len(lazy) == 3 and list(lazy) == ["a", "b", "c"]
        _same(lazy["b"], big.t())
        assert [r.nbytes for r in torch_pickle.tensor_refs(arch.tree)] == [48, 48, 4]


def _rewrite(src, dst, edit) -> None:
    """Copy a zip archive record by record, `edit(name, data) -> data` (stored, as torch writes them)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)))


def test_big_endian_archives(tmp_path):
    torch = _torch()
    saved = {"f": torch.randn(3, 2), "h": torch.randn(4).half(), "bf": torch.randn(4).bfloat16(),
             "c": torch.randn(3, dtype=torch.complex64), "i": torch.arange(5), "u": torch.arange(4).to(torch.uint8)}
    torch.save(saved, tmp_path / "le.pt")
    sizes = {"f": 4, "h": 2, "bf": 2, "c": 4, "i": 8, "u": 1}  # the byte-swap unit of each storage
    with torch_pickle.TorchArchive(tmp_path / "le.pt") as arch:
        unit = {f"{arch.prefix}data/{r.storage.key}": sizes[k] for k, r in arch.tree.items()}

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if name in unit and unit[name] > 1:
            return np.frombuffer(data, f"u{unit[name]}").byteswap().tobytes()
        return data

    _rewrite(tmp_path / "le.pt", tmp_path / "be.pt", to_big)
    got = torch_pickle.load(tmp_path / "be.pt")
    for k, t in saved.items():
        _same(got[k], t)


# --- refusing what is not a tensor checkpoint ------------------------------------------------------------------


def _zip(path, pkl: bytes, records: dict | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        for k, v in (records or {}).items():
            z.writestr(f"archive/data/{k}", v)


class _Run:
    """Would run `os.system(cmd)` when unpickled by an unrestricted loader."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_refuses_code_in_the_pickle(tmp_path):
    marker = tmp_path / "ran"
    evil = {"weight": [1.0], "payload": _Run(f"touch {marker}")}
    _zip(tmp_path / "evil.pt", pickle.dumps(evil, protocol=2))
    with pytest.raises(CheckpointError, match=rf"global {os.system.__module__}\.system.*arbitrary code"):
        torch_pickle.load(tmp_path / "evil.pt")
    assert not marker.exists()
    # opaque mode keeps it as a record: named, with its arguments, never run
    got = torch_pickle.load(tmp_path / "evil.pt", opaque=True)
    assert isinstance(got["payload"], torch_pickle.Opaque) and not marker.exists()
    assert got["payload"].global_name == f"{os.system.__module__}.system"
    assert got["payload"].args == (f"touch {marker}",) and got["weight"] == [1.0]
    for obj, name in [(eval, "builtins.eval"), (getattr, "builtins.getattr"), (shutil.rmtree, "shutil.rmtree")]:
        _zip(tmp_path / "g.pt", pickle.dumps({"x": obj}, protocol=2))
        with pytest.raises(CheckpointError, match=rf"global (__builtin__|builtins|shutil)\.{name.split('.')[1]}"):
            torch_pickle.load(tmp_path / "g.pt")
    _zip(tmp_path / "codec.pt", b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00rot_13\x86R.")
    with pytest.raises(CheckpointError, match="latin-1"):
        torch_pickle.load(tmp_path / "codec.pt")


_STORAGE = object()


def _tensor_pickle(torch, *, size=(4,), stride=(1,), offset=0, numel=4, state=None) -> bytes:
    """A pickle of one float32 tensor over storage "0", built from the parts torch.save uses; `state`: a BUILD
    on the tensor (what no torch.save writes)."""

    class Tensor:
        def __reduce__(self):
            args = (_STORAGE, offset, size, stride, False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args) + ((state,) if state is not None else ())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is _STORAGE else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"t": Tensor()})
    return buf.getvalue()


def test_refuses_malformed_tensors(tmp_path):
    torch = _torch()
    data = np.arange(4, dtype=np.float32).tobytes()
    _zip(tmp_path / "ok.pt", _tensor_pickle(torch), {"0": data})
    np.testing.assert_array_equal(torch_pickle.load(tmp_path / "ok.pt")["t"], np.arange(4))
    cases = [({"size": (10,)}, {"0": data}, "reaches element 10"),
             ({"offset": 2, "size": (2, 2), "stride": (2, 1)}, {"0": data}, "reaches element 6"),
             ({}, {"0": data[:8]}, "holds 8 bytes"),
             ({}, {}, "no record"),
             ({"size": (2, 2), "stride": (1,)}, {"0": data}, "differ in rank"),
             ({"size": (-1,)}, {"0": data}, "non-negative"),
             ({"state": {"shape": (100,)}}, {"0": data}, "sets state")]
    for kw, records, message in cases:
        _zip(tmp_path / "bad.pt", _tensor_pickle(torch, **kw), records)
        with pytest.raises(CheckpointError, match=message):
            torch_pickle.load(tmp_path / "bad.pt")


def test_refuses_expanded_tensors(tmp_path):
    """Strides that address a storage element twice (expand, overlapping as_strided) would materialise more than
    the file holds ([1e5, 1e5] at stride (0, 0) over one float: 40 GB): refused when read, the archive still opens."""
    torch = _torch()
    one = np.ones(1, np.float32).tobytes()
    _zip(tmp_path / "wide.pt", _tensor_pickle(torch, size=(1000, 1000), stride=(0, 0), numel=1), {"0": one})
    with torch_pickle.TorchArchive(tmp_path / "wide.pt") as arch:
        assert arch.tree["t"].shape == (1000, 1000)  # the reference is fine to inspect
        with pytest.raises(CheckpointError, match=r"more than once.*\.contiguous\(\)"):
            torch_pickle.ArchiveTensors(arch, arch.tree)["t"]
    with pytest.raises(CheckpointError, match=r"wide.pt: tensor float32\[1000, 1000\] \(stride \[0, 0\]\)"):
        torch_pickle.load(tmp_path / "wide.pt")
    data = np.arange(6, dtype=np.float32).tobytes()
    for size, stride in [((2, 3), (2, 1)), ((3,), (0,)), ((2, 2, 2), (3, 1, 1))]:  # overlapping, inside the slice
        _zip(tmp_path / "overlap.pt", _tensor_pickle(torch, size=size, stride=stride, numel=6), {"0": data})
        with pytest.raises(CheckpointError, match="more than once"):
            torch_pickle.load(tmp_path / "overlap.pt")
    for size, stride in [((2, 3), (1, 2)), ((1, 6), (0, 1)), ((0, 4), (0, 0)), ((2, 2), (3, 1))]:  # distinct
        _zip(tmp_path / "ok.pt", _tensor_pickle(torch, size=size, stride=stride, numel=6), {"0": data})
        want = np.lib.stride_tricks.as_strided(np.arange(6, dtype=np.float32), size, [4 * s for s in stride])
        np.testing.assert_array_equal(torch_pickle.load(tmp_path / "ok.pt")["t"], want)
    flat = torch.arange(5, dtype=torch.float32)
    torch.save({"expanded": flat.expand(3, 5)}, tmp_path / "expand.pt")
    with pytest.raises(CheckpointError, match=r"expanded.*\.contiguous\(\)"):
        torch_pickle.load(tmp_path / "expand.pt")
    torch.save({"expanded": flat.expand(3, 5).contiguous()}, tmp_path / "expand.pt")
    _same(torch_pickle.load(tmp_path / "expand.pt")["expanded"], flat.expand(3, 5))


class _Call:
    """Unpickles as fn(*args)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_shared_subobjects_are_mapped_once(tmp_path):
    """Lists each holding the one before twice (memo gets): the pickle grows with the depth, the tree it spells
    out doubles per level. Each object is mapped once and stays shared (before: time exponential in the depth)."""
    chain = []
    for _ in range(8):
        chain = [chain, chain]
    _zip(tmp_path / "shared.pt", pickle.dumps({"c": chain}, protocol=2))
    got = torch_pickle.load(tmp_path / "shared.pt")["c"]
    assert got[0] is got[1] and got[0][0] is got[1][1]
    for _ in range(192):
        chain = [chain, chain]
    raw = pickle.dumps(chain, protocol=2)
    assert len(raw) < 2000  # 2**200 paths
    _zip(tmp_path / "deep.pt", raw)
    got = torch_pickle.load(tmp_path / "deep.pt")
    for _ in range(200):
        assert got[0] is got[1]
        got = got[0]
    assert got == []
    with torch_pickle.TorchArchive(tmp_path / "deep.pt") as arch:
        assert torch_pickle.tensor_refs(arch.tree) == []


def test_item_budget(tmp_path, monkeypatch):
    """A global budget of objects / container items (MAX_ITEMS): the tree walk counts every item it visits, the
    unpickler every element an allowed call copies (set(x), OrderedDict(x), bytearray(x) of one shared x)."""
    assert torch_pickle.MAX_ITEMS >= 10_000_000  # a state dict of 100k tensors visits ~300k
    monkeypatch.setattr(torch_pickle, "MAX_ITEMS", 1000)
    _zip(tmp_path / "ok.pt", pickle.dumps({"x": list(range(900))}, protocol=2))
    assert torch_pickle.load(tmp_path / "ok.pt")["x"] == list(range(900))
    _zip(tmp_path / "long.pt", pickle.dumps({"x": list(range(2000))}, protocol=2))
    with pytest.raises(CheckpointError, match=r"long.pt: .*more than 1,000 .*MAX_ITEMS"):
        torch_pickle.load(tmp_path / "long.pt")
    items, table, text = list(range(100)), {str(i): i for i in range(100)}, b"\x00" * 100
    for fn, arg in [(set, items), (collections.OrderedDict, table), (bytearray, text)]:  # 20 copies of one argument
        _zip(tmp_path / "copies.pt", pickle.dumps([_Call(fn, arg) for _ in range(20)], protocol=2))
        with pytest.raises(CheckpointError, match=r"copies.pt: .*more than 1,000 .*MAX_ITEMS"):
            torch_pickle.load(tmp_path / "copies.pt")


def test_refuses_compressed_records(tmp_path):
    """torch.save writes every record stored (ZIP_STORED); a compressed one (an archive re-packed by another tool)
    could inflate far beyond the file, so it is refused before anything is decompressed. Records that claim more
    bytes than the file holds are refused on opening."""
    torch = _torch()
    torch.save({"w": torch.zeros(256, 256)}, tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}

    def deflate(src, dst, which):
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
            for info in zin.infolist():
                kind = zipfile.ZIP_DEFLATED if which(info.filename) else zipfile.ZIP_STORED
                zout.writestr(info.filename, zin.read(info.filename), compress_type=kind)

    for which, name in [(lambda n: n.endswith("/data/0"), "good/data/0"),
                        (lambda n: n.endswith("/data.pkl"), "good/data.pkl"),
                        (lambda n: n.endswith("/byteorder"), "good/byteorder")]:
        deflate(tmp_path / "good.pt", tmp_path / "z.pt", which)
        assert os.path.getsize(tmp_path / "z.pt") < os.path.getsize(tmp_path / "good.pt") or "data/0" not in name
        with pytest.raises(CheckpointError, match=rf"record {name} is compressed \(DEFLATE\).*torch.save"):
            torch_pickle.TorchArchive(tmp_path / "z.pt")
    # a stored record whose directory entry claims 1 GiB in a file of a few hundred bytes
    _zip(tmp_path / "big.pt", _tensor_pickle(torch, size=(2 ** 28,), numel=2 ** 28), {"0": b"\0" * 16})
    raw = bytearray((tmp_path / "big.pt").read_bytes())
    entry = raw.rindex(b"PK\x01\x02", 0, raw.rindex(b"archive/data/0") + 1)
    struct.pack_into("<2L", raw, entry + 20, 2 ** 30, 2 ** 30)  # compressed and uncompressed sizes
    (tmp_path / "big.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"archive/data/0 claims 1073741824 bytes.*holds only"):
        torch_pickle.TorchArchive(tmp_path / "big.pt")


def test_refuses_bad_files(tmp_path):
    torch = _torch()
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    with pytest.raises(CheckpointError, match="does not exist"):
        torch_pickle.load(tmp_path / "absent.pt")
    (tmp_path / "cut.pt").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        torch_pickle.load(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch.save file"):
        torch_pickle.load(tmp_path / "text.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        torch_pickle.load(tmp_path / "legacy.pt")
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as z:
        z.writestr("archive/version", b"3")
    with pytest.raises(CheckpointError, match="data.pkl"):
        torch_pickle.load(tmp_path / "nopkl.pt")
    _zip(tmp_path / "junk.pt", b"\x80\x02}q\x00(X\x01")
    with pytest.raises(CheckpointError, match="not a readable"):
        torch_pickle.load(tmp_path / "junk.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as z:  # flip one byte of the storage's data: the CRC catches it
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    with open(tmp_path / "good.pt", "rb") as f:
        f.seek(info.header_offset)
        head = struct.unpack("<4s5H3L2H", f.read(30))
    at = info.header_offset + 30 + head[-2] + head[-1] + 100
    flipped = bytearray(raw)
    flipped[at] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="CRC"):
        torch_pickle.load(tmp_path / "flip.pt")


# --- a release-shaped byt5/ folder ---------------------------------------------------------------------------------

_T5 = T5EncoderConfig(vocab_size=384, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_heads=3,
                      relative_attention_num_buckets=8, relative_attention_max_distance=12)
_BYT5_JSON = {
    "byt5_config": {"byt5_ckpt_path": "base", "byt5_name": "google/byt5-small", "special_token": True,
                    "color_special_token": True, "font_special_token": True, "multilingual": True,
                    "font_ann_path": "glyph/fonts.json", "color_ann_path": "glyph/colors.json"},
    "byt5_mapper_config": {"num_layers": 2, "sdxl_channels": 20},
    "byt5_max_length": 24,
    "byt5_mapper_type": "T5EncoderBlockByT5Mapper",
}
# Language-prefixed and plain codes, one index twice (its token is added once).
_FONTS = {"cn-SourceHanSans": 0, "en-Roboto": 1, "jp-Noto": 2, "Arial": 3, "en-Roboto-Bold": 1}
_COLORS = {"white": 0, "black": 1, "red": 2}
_TEXTS = ['Text "Grand Opening". ', 'Text "<color-2><cn-font-0>百灵 <font-3>Ming". ', "", 'Text "' + "x" * 40 + '". ']


def _random_arrays(make, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: (rng.standard_normal(s) * 0.3 + (1.0 if p.endswith("scale") else 0.0)).astype(np.float32)
            for p, s in param_shapes(nnx.eval_shape(make)).items()}


def _state_dict(torch, official: dict[str, np.ndarray], dtype=None):
    """torch tensors in a state_dict-like OrderedDict (with torch's `_metadata`); 2-D tensors saved as transposed
    views of a [in, out] copy, as a non-contiguous tensor in a real state dict would be."""
    out = collections.OrderedDict()
    for k, v in official.items():
        t = torch.from_numpy(v.T.copy()).t() if v.ndim == 2 else torch.from_numpy(v.copy())
        out[k] = t.to(dtype) if dtype is not None else t
    out._metadata = collections.OrderedDict({"": {"version": 1}})
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A model folder holding byt5/ in the release's layout; returns (folder, t5, glyph, encoder and mapper
    tensors as the modules hold them, vocab size)."""
    return write_glyph_folder(tmp_path_factory.mktemp("release"))


def write_glyph_folder(model, channels: int | None = None):
    """byt5/ in the release's layout under `model` (`channels`: the mapper's sdxl_channels, default 20); returns
    (folder, t5, glyph, encoder and mapper tensors as the modules hold them, added tokens)."""
    import pathlib

    torch = _torch()
    transformers = pytest.importorskip("transformers")
    model = pathlib.Path(model)
    byt5_json = json.loads(json.dumps(_BYT5_JSON))
    if channels is not None:
        byt5_json["byt5_mapper_config"]["sdxl_channels"] = channels
    root = model / GLYPH_FOLDER
    (root / "glyph").mkdir(parents=True)
    (root / CONFIG_FILE).write_text(json.dumps(byt5_json))
    (root / "glyph" / "fonts.json").write_text(json.dumps(_FONTS))
    (root / "glyph" / "colors.json").write_text(json.dumps(_COLORS))
    hf_cfg = {k: v for k, v in _T5.to_official().items() if k not in ("architectures", "model_type")}
    transformers.T5Config(**hf_cfg, tokenizer_class="ByT5Tokenizer").save_pretrained(root / "base")
    transformers.ByT5Tokenizer(extra_ids=125).save_pretrained(root / "base")
    glyph = GlyphConfig.from_official(byt5_json)
    added = ByteTokenizer(release_special_tokens(glyph, _FONTS, _COLORS)).added
    t5 = _T5.replace(vocab_size=259 + 125 + len(added))

    enc_table, map_table = t5_encoder_table(t5), glyph_mapper_table(t5, glyph)
    encoder = export_arrays(enc_table, _random_arrays(lambda: T5Encoder(t5, rngs=nnx.Rngs(0)), 0))
    stale = export_arrays(enc_table, _random_arrays(lambda: T5Encoder(t5, rngs=nnx.Rngs(0)), 1))
    mapper = export_arrays(map_table, _random_arrays(lambda: GlyphMapper(t5, glyph, rngs=nnx.Rngs(0)), 2))
    (root / "byt5_model").mkdir()
    (root / "byt5_mapper").mkdir()
    base_sd = {BASE_PREFIX + k: v for k, v in _state_dict(torch, stale).items()}
    base_sd["module.text_tower.proj.weight"] = torch.zeros(3, 3)  # not the encoder's: the release filters it out
    torch.save({"state_dict": base_sd, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}, root / BASE_CKPT)
    torch.save(_state_dict(torch, encoder), root / FINETUNED_CKPT)
    mapper_sd = _state_dict(torch, mapper, torch.bfloat16)  # bfloat16 on disk; the modules are float32
    torch.save(mapper_sd, root / MAPPER_CKPT)
    mapper = {k: v.float().numpy() for k, v in mapper_sd.items()}
    return model, t5, glyph, encoder, mapper, added


def _direct(t5, glyph, encoder, mapper):
    """The same modules filled straight from the arrays (no files)."""
    enc = load_state_dict(nnx.eval_shape(lambda: T5Encoder(t5, rngs=nnx.Rngs(0))), t5_encoder_table(t5), encoder)
    mp = load_state_dict(nnx.eval_shape(lambda: GlyphMapper(t5, glyph, rngs=nnx.Rngs(0))),
                         glyph_mapper_table(t5, glyph), mapper)
    return enc, mp


def test_load_glyph_matches_the_arrays(release):
    model, t5, glyph, encoder, mapper, added = release
    assert has_glyph(model) and not has_glyph(model / GLYPH_FOLDER)
    branch = load_glyph(model)
    assert branch.config == glyph and branch.t5 == t5 and branch.extra_ids == 125
    assert branch.special_tokens == added == ["<color-0>", "<color-1>", "<color-2>", "<cn-font-0>", "<en-font-1>",
                                              "<jp-font-2>", "<font-3>"]
    tok = branch.tokenizer()
    assert tok.vocab_size == t5.vocab_size == 391
    ids, mask = tok(_TEXTS, glyph.max_length)
    ref_encoder, ref_mapper = _direct(t5, glyph, encoder, mapper)
    got = np.asarray(encode_glyphs(branch.encoder, branch.mapper, ids, mask))
    want = np.asarray(encode_glyphs(ref_encoder, ref_mapper, ids, mask))
    assert got.shape == (4, glyph.max_length, 20) and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, want)
    for p, v in param_arrays(ref_encoder).items():  # byt5_model.pt's values, not base.pt's
        np.testing.assert_array_equal(param_arrays(branch.encoder)[p], v)
    bf16 = param_arrays(load_glyph(model, Runtime(param_dtype="bfloat16")).mapper)  # the runtime's dtypes
    for p, v in param_arrays(branch.mapper).items():
        assert bf16[p].dtype == jnp.bfloat16
        np.testing.assert_array_equal(bf16[p], v.astype(jnp.bfloat16))


def test_vocabulary_is_the_release_tokenizers(release):
    """len(tokenizer) as the release builds it: AutoTokenizer on the base folder plus the added tokens."""
    transformers = pytest.importorskip("transformers")
    model, t5, glyph, _, _, added = release
    hf = transformers.AutoTokenizer.from_pretrained(model / GLYPH_FOLDER / "base")
    hf.add_tokens(release_special_tokens(glyph, _FONTS, _COLORS), special_tokens=True)
    tok = ByteTokenizer(added)
    assert len(hf) == t5.vocab_size == tok.vocab_size
    assert {t: hf.convert_tokens_to_ids(t) for t in added} == {t: tok.token_id(t) for t in added}


@pytest.mark.parametrize("kind", ["saved", "extra_ids", "listed", "config_only", "no_specials"])
def test_base_extra_ids_like_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    base = tmp_path / "base"
    base.mkdir()
    cfg = dict(_T5.to_official(), tokenizer_class="ByT5Tokenizer")
    (base / "config.json").write_text(json.dumps(cfg))
    tc = {"saved": None, "extra_ids": {"tokenizer_class": "ByT5Tokenizer", "extra_ids": 7},
          "listed": {"tokenizer_class": "ByT5Tokenizer", "extra_ids": 3,
                     "additional_special_tokens": ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]},
          "config_only": {}, "no_specials": {"extra_ids": 0}}[kind]
    if tc is None:
        transformers.ByT5Tokenizer(extra_ids=5).save_pretrained(base)
    else:
        (base / "tokenizer_config.json").write_text(json.dumps(tc))
    n = glyph_ckpt.base_extra_ids(str(base), cfg)
    assert 259 + n == len(transformers.AutoTokenizer.from_pretrained(base))
    assert n == {"saved": 5, "extra_ids": 7, "listed": 3, "config_only": 125, "no_specials": 0}[kind]


def test_base_tokenizers_not_modelled(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.ByT5Tokenizer(extra_ids=2)
    tok.add_tokens(["<color-0>"], special_tokens=True)  # an added token saved into the base folder
    tok.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not modelled"):
        glyph_ckpt.base_extra_ids(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(CheckpointError, match="needs a ByT5Tokenizer"):
        glyph_ckpt.base_extra_ids(str(tmp_path))


# --- bad folders ---------------------------------------------------------------------------------------------------


def _resave(path, edit):
    torch = _torch()
    obj = torch.load(path, weights_only=False)
    torch.save(edit(obj, torch), path)


def _drop(key):
    def edit(sd, torch):
        del sd[key]
        return sd
    return edit


def _set(key, value):
    def edit(sd, torch):
        sd[key] = value(torch) if callable(value) else value
        return sd
    return edit


def _in_base(edit):
    def outer(obj, torch):
        obj["state_dict"] = edit(obj["state_dict"], torch)
        return obj
    return outer


def _json_edit(rel, change):
    def apply(root):
        d = json.loads((root / rel).read_text())
        change(d)
        (root / rel).write_text(json.dumps(d))
    return apply


_Q = "block.0.layer.0.SelfAttention.q.weight"
_BAD = {
    "no byt5.json": (lambda r: (r / CONFIG_FILE).unlink(), r"glyph config .*byt5.json does not exist"),
    "unknown byt5.json key": (_json_edit(CONFIG_FILE, lambda d: d.update(extra=1)), "unknown key"),
    "no base folder": (lambda r: shutil.rmtree(r / "base"), "byt5_ckpt_path 'base' is not a folder"),
    "not a ByT5 tokenizer": (_json_edit("base/tokenizer_config.json", lambda d: d.update(tokenizer_class="T5")),
                             "needs a ByT5Tokenizer"),
    "no font file": (lambda r: (r / "glyph" / "fonts.json").unlink(), "font annotation file .* does not exist"),
    "no base.pt": (lambda r: (r / BASE_CKPT).unlink(), r"base.pt does not exist"),
    "base.pt without state_dict": (lambda r: _resave(r / BASE_CKPT, lambda o, t: {"model": o["state_dict"]}),
                                   "no 'state_dict'"),
    "base.pt misses a tensor": (lambda r: _resave(r / BASE_CKPT, _in_base(_drop(BASE_PREFIX + _Q))),
                                rf"strict load of base.pt fails.*1 missing tensor.*{_Q}"),
    "base.pt has another shape": (
        lambda r: _resave(r / BASE_CKPT, _in_base(_set(BASE_PREFIX + _Q, lambda t: t.zeros(2, 2)))),
        r"another shape: \['block.0.layer.0.SelfAttention.q.weight \[2, 2\]"),
    "base.pt extra encoder tensor": (
        lambda r: _resave(r / BASE_CKPT, _in_base(_set(BASE_PREFIX + "extra.weight", lambda t: t.zeros(1)))),
        r"1 unexpected tensor.*extra.weight"),
    "byt5_model.pt misses a tensor": (lambda r: _resave(r / FINETUNED_CKPT, _drop(_Q)),
                                      rf"byt5_model.pt: 1 missing tensor.*{_Q}"),
    "byt5_model.pt extra tensor": (lambda r: _resave(r / FINETUNED_CKPT, _set("shared.weight", lambda t: t.ones(1))),
                                   r"byt5_model.pt: 1 unexpected tensor.*shared.weight"),
    "byt5_model.pt wrong shape": (lambda r: _resave(r / FINETUNED_CKPT, _set(_Q, lambda t: t.zeros(16, 18))),
                                  (rf"byt5_model.pt: 1 tensor.* wrong shape: {_Q} has shape \(16, 18\), the "
                                   r"encoder needs \(18, 16\)")),
    "byt5_model.pt non-tensor": (lambda r: _resave(r / FINETUNED_CKPT, _set("note", "hello")), "not tensors.*note"),
    "byt5_model.pt wrapped": (lambda r: _resave(r / FINETUNED_CKPT, lambda o, t: {"state_dict": o}),
                              "entries that are not tensors.*state_dict"),
    "byt5_model.pt forbidden global": (lambda r: _resave(r / FINETUNED_CKPT, _set("x", argparse.Namespace())),
                                       "global argparse.Namespace"),
    "byt5_model.pt truncated": (lambda r: (r / FINETUNED_CKPT).write_bytes((r / FINETUNED_CKPT).read_bytes()[:900]),
                                "truncated"),
    "one font fewer than the table": (_json_edit("glyph/fonts.json", lambda d: d.pop("Arial")),
                                      ("embed_tokens.weight has 391 rows but the tokenizer needs 390 "
                                       r"\(259 \+ 125 extra ids \+ 6 added tokens")),
    "no mapper": (lambda r: (r / MAPPER_CKPT).unlink(), "byt5_mapper.pt does not exist"),
    "mapper width": (_json_edit(CONFIG_FILE, lambda d: d["byt5_mapper_config"].update(sdxl_channels=21)),
                     (r"byt5_mapper.pt: 3 tensor.* channel_mapper.weight has shape \(20, 16\), the mapper "
                      r"needs \(21, 16\)")),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_folders_are_refused(release, tmp_path, case):
    model = release[0]
    shutil.copytree(model / GLYPH_FOLDER, tmp_path / GLYPH_FOLDER)
    edit, message = _BAD[case]
    edit(tmp_path / GLYPH_FOLDER)
    with pytest.raises(CheckpointError, match=message):
        load_glyph(tmp_path)


def test_missing_folder(tmp_path):
    assert not has_glyph(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_glyph(tmp_path)


# --- the converter's copy ------------------------------------------------------------------------------------------


def _files(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs}


def test_copy_glyph_round_trip(release, tmp_path, monkeypatch):
    model = release[0]
    src = model / GLYPH_FOLDER
    copied = copy_glyph(model, tmp_path / "linked")
    assert sorted(copied) == sorted(_files(src)) and _files(tmp_path / "linked" / GLYPH_FOLDER) == _files(src)
    assert os.stat(tmp_path / "linked" / GLYPH_FOLDER / FINETUNED_CKPT).st_ino == os.stat(src / FINETUNED_CKPT).st_ino
    assert [p.name for p in (tmp_path / "linked").iterdir()] == [GLYPH_FOLDER]  # no partial folder left
    a, b = load_glyph(model), load_glyph(tmp_path / "linked")
    for part in ("encoder", "mapper"):
        ours, theirs = param_arrays(getattr(a, part)), param_arrays(getattr(b, part))
        assert all(np.array_equal(ours[p], theirs[p]) for p in ours)
    assert a.special_tokens == b.special_tokens and a.t5 == b.t5

    def no_links(*args, **kwargs):  # another file system
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    copy_glyph(model, tmp_path / "copied")
    assert _files(tmp_path / "copied" / GLYPH_FOLDER) == _files(src)
    assert os.stat(tmp_path / "copied" / GLYPH_FOLDER / FINETUNED_CKPT).st_ino != \
        os.stat(src / FINETUNED_CKPT).st_ino


def test_copy_glyph_reruns_replace_the_copy(release, tmp_path):
    """A re-run over an earlier (possibly half-made) dst/byt5 replaces it; an interrupted run's temporary folders
    go, nothing else in dst is touched."""
    model = release[0]
    src, dst = model / GLYPH_FOLDER, tmp_path / "dst"
    copy_glyph(model, dst)
    (dst / GLYPH_FOLDER / "stale.json").write_text("{}")
    (dst / GLYPH_FOLDER / CONFIG_FILE).unlink()
    (dst / f".{GLYPH_FOLDER}.partial-1-0000abcd").mkdir()
    (dst / f".{GLYPH_FOLDER}.old-1-0000abcd").mkdir()
    (dst / "model.json").write_text("{}")
    copied = copy_glyph(model, dst)
    assert sorted(copied) == sorted(_files(src)) and _files(dst / GLYPH_FOLDER) == _files(src)
    assert sorted(p.name for p in dst.iterdir()) == [GLYPH_FOLDER, "model.json"]
    assert load_glyph(dst).special_tokens == load_glyph(model).special_tokens


def test_conversion_resumes_after_the_glyph_copy(release, tmp_path, monkeypatch):
    """A conversion stopped right after copying byt5/ into DST.partial/ (its journal still there) resumes."""
    from test_image_gen_checkpoint import QUIET, write_image_release

    from ming_jax.checkpoint import convert, folders

    src, dst = tmp_path / "release", tmp_path / "ckpt"
    write_image_release(src, dtype=np.float32)
    shutil.copytree(release[0] / GLYPH_FOLDER, src / GLYPH_FOLDER)
    copy_sections = folders.copy_sections

    def copy_then_crash(*args):
        copy_sections(*args)
        raise KeyboardInterrupt

    logged = []
    with monkeypatch.context() as m:
        m.setattr(folders, "copy_sections", copy_then_crash)
        with pytest.raises(KeyboardInterrupt):
            convert.convert(str(src), str(dst), **QUIET)
    assert (tmp_path / "ckpt.partial" / GLYPH_FOLDER).is_dir() and not dst.exists()
    convert.convert(str(src), str(dst), **dict(QUIET, log=logged.append))
    assert any("resuming" in line for line in logged)
    assert _files(dst / GLYPH_FOLDER) == _files(src / GLYPH_FOLDER)


def _linked_release(release, tmp_path, rel: str, target) -> str:
    """A copy of the release whose byt5/`rel` is a symbolic link to `target` (a path, or a callable of the copy's
    byt5/ folder)."""
    model = tmp_path / "linked"
    shutil.copytree(release[0] / GLYPH_FOLDER, model / GLYPH_FOLDER)
    root = model / GLYPH_FOLDER
    if (root / rel).is_file():
        (root / rel).unlink()
    os.symlink(target(root) if callable(target) else target, root / rel)
    return model


def test_copy_glyph_refuses_links_out(release, tmp_path):
    """Folder links (a loop, an outside folder) and file links leading out of byt5/ are refused, naming the link;
    nothing is written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the release's")
    cases = [("loop", lambda root: root, "loop is a symbolic link to the folder"),
             ("extra", outside, "extra is a symbolic link to the folder .*outside"),
             ("glyph/notes.txt", outside / "secret.txt", r"notes.txt is a symbolic link to .*secret.txt, outside"),
             ("dangling.txt", tmp_path / "missing", "dangling.txt is a symbolic link to .*not a regular file")]
    for rel, target, message in cases:
        model = _linked_release(release, tmp_path, rel, target)
        with pytest.raises(CheckpointError, match=message):
            copy_glyph(model, tmp_path / "dst")
        assert not (tmp_path / "dst").exists()
        shutil.rmtree(model)
    model = tmp_path / "piped"
    shutil.copytree(release[0] / GLYPH_FOLDER, model / GLYPH_FOLDER)
    os.mkfifo(model / GLYPH_FOLDER / "pipe")
    with pytest.raises(CheckpointError, match="pipe is not a regular file"):
        copy_glyph(model, tmp_path / "dst")


def test_copy_glyph_follows_file_links_inside_and_to_hub_blobs(release, tmp_path):
    """A file link that stays in byt5/, and the Hugging Face hub cache's layout (every snapshot file a link to
    <repo>/blobs/<hash>), copy as the files they name."""
    repo = tmp_path / "hub" / "models--org--ming"
    model = repo / "snapshots" / "0123abc"
    shutil.copytree(release[0] / GLYPH_FOLDER, model / GLYPH_FOLDER)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted((model / GLYPH_FOLDER).rglob("*"))):
        if path.is_file():
            blob = repo / "blobs" / f"{i:040x}"
            path.rename(blob)
            os.symlink(os.path.relpath(blob, path.parent), path)
    os.symlink("byt5.json", model / GLYPH_FOLDER / "alias.json")  # inside byt5/
    copied = copy_glyph(model, tmp_path / "dst")
    got = _files(tmp_path / "dst" / GLYPH_FOLDER)
    assert set(copied) == set(got) == set(_files(release[0] / GLYPH_FOLDER)) | {"alias.json"}
    assert not any(p.is_symlink() for p in (tmp_path / "dst").rglob("*"))
    assert got["alias.json"] == got[CONFIG_FILE] and got == _files(model / GLYPH_FOLDER)
    assert load_glyph(tmp_path / "dst").t5 == load_glyph(release[0]).t5


def test_copy_glyph_refuses_paths_outside(release, tmp_path):
    shutil.copytree(release[0] / GLYPH_FOLDER, tmp_path / "src" / GLYPH_FOLDER)
    _json_edit(CONFIG_FILE, lambda d: d["byt5_config"].update(font_ann_path="../fonts.json"))(
        tmp_path / "src" / GLYPH_FOLDER)
    with pytest.raises(CheckpointError, match="outside byt5/"):
        copy_glyph(tmp_path / "src", tmp_path / "dst")
    with pytest.raises(CheckpointError, match="does not exist"):
        copy_glyph(tmp_path / "nothing", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()

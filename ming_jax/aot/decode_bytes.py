"""Bytes one decode step reads per chip: the floor the shapes and the sharding impose, against what the compiled TPU
program accesses.

Floor (per chip, `decode_floor`): the bytes a single-token step cannot avoid reading from HBM, given how the plan
shards the weights and the cache:
  dense    every parameter that is not a routed expert, at its per-chip shard size (attention, the dense layer's MLP,
           the shared experts, norms, the LM head), except: the embedding table contributes only the B rows it looks
           up, and each MultiRouter contributes only its text gate (a decode step routes text tokens; the image and
           audio gates are not read);
  experts  the routed experts a step touches: per MoE layer and chip, `expected_experts` distinct ones of the chip's
           E_l local experts under uniform routing (each token picks K of E experts uniformly at random, tokens
           independent: an expert is untouched by B tokens with probability (1 - K / E) ** B, so
           E_l * (1 - (1 - K / E) ** B) are touched on average), or `worst_experts` = min(E_l, B K) (every pick lands
           on this chip); each at its per-chip shard size (an expert split over `tensor` counts its slice);
  kv       the K and V cache of every layer and every slot (the step attends to the whole preallocated cache: the
           floor assumes it is full), in the cache dtype, per-chip shard. The one slot written is not counted.
The activations, the logits and the cache write are left out (B x (D or V) values, small against the weights at
decode).

Compiled (`compiled_bytes`): XLA's cost analysis of the compiled per-chip module ("bytes accessed") counts a
`while` body once (checked in tests/test_decode_bytes.py: a scan of L matmuls reports one layer's weight bytes), and
the layer scan is a while loop. `hlo_bytes` walks the optimized HLO text, counts per instruction the bytes it reads
and writes (the model of XLA's HloCostAnalysis: operands + outputs; slices and in-place updates at the bytes moved;
a Pallas kernel at the `cost_estimate` it declares, an async copy as one read and one write) and multiplies loop bodies by their trip count (the bound in
the loop condition). The corrected count is cost_analysis + (trip - 1) x the body's bytes by that walk.

Pallas grouped matmuls (`ming_gmm*`, `ming_jax.pallas.gmm.kernel`) declare every local expert's weights as read
(the whole [G, K, N] stack per weight: `_gmm_cost`, weights once per group when the contraction is one tile, as at
these sizes). Their index maps DMA only the experts that have rows (the dynamic grid visits non-empty groups only;
padding steps are pinned), so `kernel_adjusted` replaces that term by the touched fraction of the stack under the
same routing assumption as the floor. That is the number to compare with the floor; both are reported. A kernel
reading one layer of the [L * G, K, N] stacks in place (`ming_gmm*_stacked`) declares that layer's G groups, and its
weight operands count as G / (L * G) of their size.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from flax import nnx

from ming_jax import quant, sharding
from ming_jax.aot.compile import _bytes_accessed
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.layers.kv_cache import KVCache, kv_cache_shardings
from ming_jax.models import llm as model_lib

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts B tokens touch in one layer under uniform routing: E (1 - (1 - K / E) ** B)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def worst_experts(num_experts: int, top_k: int, tokens: int) -> int:
    """At most min(E, B K) distinct experts per layer."""
    return min(num_experts, tokens * top_k)


@dataclasses.dataclass(frozen=True)
class DecodeFloor:
    """Per-chip bytes a decode step must read (see the module docstring); `parts` names the dense bytes."""

    batch: int
    kv_len: int
    dense: float
    experts_all: float  # the chip's whole local routed-expert stacks, every MoE layer
    local_experts: int  # E_l: experts per MoE layer on one chip
    num_experts: int
    top_k: int
    kv: float
    parts: dict

    @property
    def expected_fraction(self) -> float:
        """Touched fraction of a chip's local experts per layer, uniform routing: 1 - (1 - K / E) ** B."""
        return expected_experts(self.num_experts, self.top_k, self.batch) / self.num_experts

    @property
    def worst_fraction(self) -> float:
        return min(self.local_experts, self.batch * self.top_k) / self.local_experts

    @property
    def expected(self) -> float:
        return self.dense + self.experts_all * self.expected_fraction + self.kv

    @property
    def worst(self) -> float:
        return self.dense + self.experts_all * self.worst_fraction + self.kv


def _shard_bytes(shape, dtype, shard) -> int:
    return math.prod(shard.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def decode_floor(cfg: LLMConfig, mesh, rules: sharding.ShardingRules, *, batch: int, seq: int,
                 runtime: Runtime | None = None, quantize=None) -> DecodeFloor:
    """The per-chip floor of one decode step of `batch` tokens against a cache of `seq` slots, for the parameter
    and cache shardings `ming_jax.aot.compile.lower_step` uses (the same model, quantization and rules)."""
    runtime = Runtime.bf16(remat=True) if runtime is None else runtime
    abstract = model_lib.create_abstract(cfg, runtime)
    qcfg = quant.QuantConfig.parse(quantize)
    if qcfg is not None:
        quant.quantize_model(abstract, qcfg)
    shards = dict(nnx.to_flat_state(sharding.state_shardings(abstract, mesh, rules)))
    parts = {"embedding rows": 0.0, "router (text gate)": 0.0, "lm head": 0.0, "other dense": 0.0}
    experts_all, local = 0.0, 0
    for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        a, s = v.get_value(), shards[path].get_value()
        nbytes = _shard_bytes(a.shape, a.dtype, s)
        names = [str(p) for p in path]
        if "moe" in names and any(w in names for w in EXPERT_WEIGHTS):  # [L, E, D, F] (or its qvalue / scale)
            experts_all += nbytes
            local = s.shard_shape(tuple(a.shape))[1]
        elif names[0] == "embed":
            rows = a.shape[0] if cfg.tie_word_embeddings else min(batch, a.shape[0])  # tied: the head reads it all
            parts["embedding rows"] += nbytes * rows / s.shard_shape(tuple(a.shape))[0]
        elif "router" in names and names[-1] == "kernel":  # [L, R, D, E]: gate 0 (text) only
            parts["router (text gate)"] += nbytes / a.shape[-3]
        elif names[0] == "lm_head":
            parts["lm head"] += nbytes
        else:
            parts["other dense"] += nbytes
    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, seq, runtime.dtype))
    c_shard = kv_cache_shardings(mesh, rules, cache)
    kv = sum(_shard_bytes(getattr(cache, n).shape, getattr(cache, n).dtype, getattr(c_shard, n))
             for n in ("k_dense", "v_dense", "k_moe", "v_moe") if getattr(cache, n) is not None)
    return DecodeFloor(batch, seq, sum(parts.values()), experts_all, local or 1, cfg.num_experts,
                       cfg.num_experts_per_tok, float(kv), parts)


# --- the compiled program's bytes, from its HLO ---------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2,
                "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5,
                "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "domain"}
_SLICING = {"dynamic-slice", "slice", "gather"}


def _array_bytes(type_text: str) -> float:
    total = 0.0
    for dt, dims in _ARRAY.findall(type_text):
        if dt in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(type_text: str) -> tuple[int, ...]:
    m = _ARRAY.search(type_text)
    return tuple(int(d) for d in m.group(2).split(",") if d) if m else ()


@dataclasses.dataclass
class _Instr:
    name: str
    type_text: str
    opcode: str
    operands: list
    attrs: str
    line: str


def _split_instr(rest: str):
    """'TYPE opcode(operands), attrs' -> (type text, opcode, operand names, attrs)."""
    if rest.startswith("("):  # tuple type: balanced parentheses
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        type_text, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        i += 1
    args, attrs = rest[:i - 1], rest[i:]
    return type_text, opcode.strip(), re.findall(r"%([\w.\-]+)", args), attrs


def parse_hlo(text: str) -> tuple[dict, str]:
    """Optimized HLO text -> ({computation name: [instructions]}, entry name)."""
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        head = _COMP_HEAD.match(line)
        if head:
            cur = head.group(2)
            comps[cur] = []
            entry = cur if head.group(1) else entry
            continue
        if cur is None:
            continue
        if line.startswith("}"):
            cur = None
            continue
        m = _INSTR.match(line)
        if m:
            type_text, opcode, operands, attrs = _split_instr(m.group(3))
            comps[cur].append(_Instr(m.group(2), type_text, opcode, operands, attrs, line))
    return comps, entry


def _called(attrs: str, key: str) -> str | None:
    m = re.search(key + r"=%([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _trip_count(cond: list) -> int | None:
    """The constant bound of a counted loop's condition (`i < N`, i from 0, the form jax's scans lower to)."""
    consts = {i.name: int(re.search(r"constant\((-?\d+)\)", i.line).group(1)) for i in cond
              if i.opcode == "constant" and re.search(r"constant\((-?\d+)\)", i.line) and i.type_text.startswith("s32")}
    for i in cond:
        if i.opcode == "compare" and "direction=LT" in i.attrs:
            bound = [consts[o] for o in i.operands if o in consts]
            if bound:
                return bound[0]
    return None


def _kernel_estimate(ins: _Instr) -> float | None:
    m = re.search(r'"cost_estimate":\{[^}]*"bytes_accessed":"(\d+)"', ins.attrs)
    return float(m.group(1)) if m else None


@dataclasses.dataclass
class OpBytes:
    """One instruction's bytes per step: `once` as cost analysis counts it, `total` x its loops' trip counts."""

    name: str
    opcode: str
    computation: str
    once: float
    total: float
    op_name: str
    kernel: str = ""  # a Pallas kernel's name (tpu_custom_call)
    rhs_bytes: float = 0.0  # a ming_gmm kernel's [G, K, N] weight operands (once)


_PASS = {"copy", "bitcast", "convert", "reshape", "transpose"}  # elementwise re-layouts: a fused consumer reads
# only the elements its own users need


def _param_read(comps: dict, comp: str, pname: str, full: float):
    """Bytes a fused computation reads of its value `pname` (of `full` bytes): the outputs of the slices that are its
    only users (through re-layouts and nested fusions too), nothing when it is updated in place, else all of it.
    None: it reaches the computation's root through re-layouts only (the caller's users of the result decide)."""
    body = comps.get(comp, [])
    users = [b for b in body if pname in b.operands]
    root = next((b for b in body if b.line.lstrip().startswith("ROOT")), None)
    if not users:
        return None if root is not None and root.name == pname else 0.0
    read = 0.0
    for u in users:
        if u.opcode in _SLICING and u.operands[0] == pname:
            read += _array_bytes(u.type_text)
        elif u.opcode == "dynamic-update-slice" and u.operands[0] == pname:
            continue
        elif u.opcode in _PASS:
            r = _param_read(comps, comp, u.name, full)
            if r is None:
                return None
            read += r
        elif u.opcode == "fusion":
            inner = _called(u.attrs, "calls") or ""
            idx = u.operands.index(pname)
            inner_param = next((b.name for b in comps.get(inner, []) if b.opcode == "parameter"
                                and int(re.search(r"parameter\((\d+)\)", b.line).group(1)) == idx), None)
            r = full if inner_param is None else _param_read(comps, inner, inner_param, full)
            if r is None:  # the nested fusion only re-lays it out: what reads its result counts
                r = _param_read(comps, comp, u.name, full)
                if r is None:
                    return None
            read += r
        else:
            return full
    return min(full, read)


def _fusion_bytes(ins: _Instr, comps: dict, shapes: dict) -> float:
    """A fusion's operands at the bytes its body reads (a parameter used only by slices counts their outputs) plus
    its output (an in-place dynamic-update-slice root counts the update)."""
    comp = _called(ins.attrs, "calls") or ""
    body = comps.get(comp, [])
    read = 0.0
    for b in body:
        if b.opcode == "parameter":
            idx = int(re.search(r"parameter\((\d+)\)", b.line).group(1))
            if idx < len(ins.operands):
                full = shapes.get(ins.operands[idx], 0.0)
                r = _param_read(comps, comp, b.name, full)
                read += full if r is None else r
    root = next((b for b in body if b.line.lstrip().startswith("ROOT")), None)
    out = _array_bytes(ins.type_text)
    if root is not None and root.opcode == "dynamic-update-slice":
        upd = next((b for b in body if b.name == root.operands[1]), None)
        out = _array_bytes(upd.type_text) if upd is not None else out
    return read + out


def hlo_bytes(text: str) -> list[OpBytes]:
    """Per-instruction bytes of an optimized (per-chip) HLO module: the entry computation, loop bodies x their trip
    counts, conditionals at their largest branch. Sums compare with cost_analysis: sum(op.once) is its model."""
    comps, entry = parse_hlo(text)
    rows: list[OpBytes] = []

    def walk(comp: str, mult: float, once_mult: float):
        shapes = {i.name: _array_bytes(i.type_text) for i in comps[comp]}
        for ins in comps[comp]:
            op = ins.opcode
            meta = re.search(r'op_name="([^"]*)"', ins.attrs)
            meta = meta.group(1) if meta else ""
            if op in _FREE:
                continue
            if op == "while":
                body, cond = _called(ins.attrs, "body"), _called(ins.attrs, "condition")
                trips = _trip_count(comps.get(cond, [])) or 1
                walk(body, mult * trips, once_mult)
                continue
            if op == "conditional":
                branches = re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                                                       or re.search(r"(true_computation=%[\w.\-]+, "
                                                                    r"false_computation=%[\w.\-]+)", ins.attrs)
                                                       or re.search(r"()", "")).group(1))
                sub = []
                for br in branches:
                    n0 = len(rows)
                    walk(br, mult, once_mult)
                    sub.append(rows[n0:])
                    del rows[n0:]
                if sub:
                    rows.extend(max(sub, key=lambda rs: sum(r.total for r in rs)))
                continue
            if op == "call":
                walk(_called(ins.attrs, "to_apply"), mult, once_mult)
                continue
            kernel, rhs = "", 0.0
            if op == "fusion":
                b = _fusion_bytes(ins, comps, shapes)
            elif op == "custom-call" and 'custom_call_target="tpu_custom_call"' in ins.attrs:
                est = _kernel_estimate(ins)
                b = est if est is not None else sum(shapes.get(o, 0.0) for o in ins.operands) + shapes[ins.name]
                kernel = ins.name
                if ins.name.startswith("ming_gmm"):
                    out_dims = _dims(ins.type_text)
                    # A kernel reading a layer of the [L * G, K, N] stacks in place (`_stacked`) declares that
                    # layer's G groups: count its weight operands at G / (L * G). G + 2 = the length of the first
                    # 1-D scalar-prefetch operand longer than 1, the group offsets (with the tail group).
                    vecs = [d for d in (_dims(_type_of(comps[comp], o)) for o in ins.operands) if len(d) == 1]
                    groups = next((d[0] - 2 for d in vecs if d[0] > 1), 0)
                    rhs = sum(shapes.get(o, 0.0) * (min(1.0, groups / _dims(_type_of(comps[comp], o))[0])
                                                    if "_stacked" in ins.name and groups > 0 else 1.0)
                              for o in ins.operands
                              if len(_dims(_type_of(comps[comp], o))) == 3 and _dims(_type_of(comps[comp], o))[1] > 1
                              and _dims(_type_of(comps[comp], o))[2] in (out_dims[-1:] or (0,)))
            elif op == "copy-start":  # an async copy (a prefetch between memory spaces): read the source once
                b = shapes.get(ins.operands[0], 0.0)
            elif op == "copy-done":  # ... and write the destination once
                b = _array_bytes(ins.type_text)
            elif op == "dynamic-slice":
                b = 2 * shapes[ins.name]
            elif op == "dynamic-update-slice":
                b = 2 * shapes.get(ins.operands[1], 0.0)
            else:
                b = sum(shapes.get(o, 0.0) for o in ins.operands) + shapes[ins.name]
            rows.append(OpBytes(ins.name, op, comp, b * once_mult, b * mult, meta, kernel, rhs))

    walk(entry, 1.0, 1.0)
    return rows


def _type_of(instrs: list, name: str) -> str:
    for i in instrs:
        if i.name == name:
            return i.type_text
    return ""


@dataclasses.dataclass(frozen=True)
class CompiledBytes:
    """Per-chip bytes of a compiled decode step (see the module docstring)."""

    cost_analysis: float  # XLA's "bytes accessed" (loop bodies once; kernels as declared)
    walk_once: float  # `hlo_bytes` with loop bodies once: checks the walk against cost_analysis
    walk_total: float  # `hlo_bytes` with loop bodies x trip count
    gmm_declared: float  # the ming_gmm kernels' declared bytes, x trip counts
    gmm_stacks: float  # their [G, K, N] weight operands, x trip counts (what they declare as read)

    @property
    def corrected(self) -> float:
        """cost_analysis with the loop bodies counted trip-count times."""
        return self.cost_analysis + self.walk_total - self.walk_once

    def kernel_adjusted(self, touched_fraction: float) -> float:
        """`corrected`, the grouped matmuls reading only `touched_fraction` of their expert stacks."""
        return self.corrected - (1.0 - touched_fraction) * self.gmm_stacks


def compiled_bytes(compiled) -> tuple[CompiledBytes, list[OpBytes]]:
    rows = hlo_bytes(compiled.as_text())
    gmm = [r for r in rows if r.kernel.startswith("ming_gmm")]
    return CompiledBytes(_bytes_accessed(compiled), sum(r.once for r in rows), sum(r.total for r in rows),
                         sum(r.total for r in gmm), sum(r.rhs_bytes * r.total / max(r.once, 1e-9) for r in gmm)), rows


def breakdown(rows: list[OpBytes], top: int = 15) -> list[tuple[str, float, int]]:
    """The largest contributors: (kind, bytes x trips, instructions), grouped by opcode / kernel and the op_name's
    last two scopes."""
    groups: dict = {}
    for r in rows:
        scope = "/".join(s for s in r.op_name.split("/")[-3:] if s) or r.name
        key = f"{r.kernel.split('.')[0] or r.opcode}: {scope}"
        b, n = groups.get(key, (0.0, 0))
        groups[key] = (b + r.total, n + 1)
    return sorted(((k, b, n) for k, (b, n) in groups.items()), key=lambda x: -x[1])[:top]

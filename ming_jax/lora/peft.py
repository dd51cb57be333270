"""LoRA adapters exported in PEFT's format, for PyTorch users of the official model:

    <out_dir>/adapter_model.safetensors   base_model.model.<official module>.lora_A.weight [r, in]
                                          base_model.model.<official module>.lora_B.weight [out, r]
    <out_dir>/adapter_config.json         peft_type LORA, r, lora_alpha, target_modules (a regex PEFT full-matches
                                          against module names: exactly the exported modules), ...

PEFT's LoRA Linear computes y = x W^T + (lora_alpha / r) * x A^T B^T, i.e. W_official + scale * B @ A. The official
names and layouts come from the LLM's weight table (`ming_jax.weights.llm.llm_table`): each adapted parameter of
ours maps to the official Linears its table rule fills (one per layer of a stacked parameter, one per expert of an
expert stack), and the rule's transform, which is a permutation of the weight's in and out indices (the transpose
of every Linear, the regrouped fused qkv rows, the per-head attention output), is applied to A's in axes and B's out
axes separately: it is read off the transform applied to an index array. A transform that does not separate that
way (a slice or a fusion of several Linears) is refused with the parameter's name. Tensors are written in float32.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import tempfile

import numpy as np
from safetensors.numpy import save_file

from ming_jax.lora.model import adapters
from ming_jax.weights import llm as llm_weights
from ming_jax.weights.table import Rule, WeightError

PEFT_PREFIX = "base_model.model."


def _permutations(rule: Rule, shape: tuple[int, ...], n_in: int, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """(perm_in [I_official], perm_out [O_official]): official in index i is our flat in index perm_in[i], official
    out row o our flat out index perm_out[o], for a base slot of `shape` ([in..., out...])."""
    key = (rule.transform.name, shape, n_in)
    if key not in cache:
        n_i = int(np.prod(shape[:n_in]))
        n_o = int(np.prod(shape[n_in:]))
        if rule.transform.name == "linear_t":  # a plain transpose: no index array needed (the LM head is large)
            cache[key] = (np.arange(n_i), np.arange(n_o))
        else:
            idx = np.arange(n_i * n_o, dtype=np.int64).reshape(shape)
            off = np.asarray(rule.transform.to_official(idx))
            if off.shape != (n_o, n_i):
                raise WeightError(f"LoRA export: {rule.official} is not one Linear of our [{n_i} in, {n_o} out] "
                                  f"weight (transform {rule.transform.name} gives {off.shape})")
            ours_in, ours_out = off // n_o, off % n_o
            if not ((ours_in == ours_in[:1]).all() and (ours_out == ours_out[:, :1]).all()):
                raise WeightError(f"LoRA export: the transform {rule.transform.name} of {rule.official} mixes in and "
                                  "out axes; its adapter cannot be written as one lora_A / lora_B pair")
            cache[key] = (ours_in[0], ours_out[:, 0])
    return cache[key]


def peft_tensors(model, *, prefix: str = "") -> tuple[dict[str, np.ndarray], list[str], list[Rule]]:
    """-> ({PEFT tensor name: float32 array}, the official module names, the table rules used) of the model's
    adapters. `prefix` as for `llm_table` (e.g. "model." for the omni checkpoint's LLM). Merged adapters are
    exported too (their factors are unchanged)."""
    found = adapters(model)
    if not found:
        raise ValueError("export_peft: the model has no LoRA adapters")
    table = llm_weights.llm_table(model.cfg, prefix)
    tensors: dict[str, np.ndarray] = {}
    modules: list[str] = []
    used: list[Rule] = []
    cache: dict = {}
    for path, w in found.items():
        a_all = np.asarray(w.lora_a.get_value(), np.float32)
        b_all = np.asarray(w.lora_b.get_value(), np.float32)
        hits = 0
        for rule in table.rules:
            for v in rule.instances():
                if rule.path(v) != path:
                    continue
                name = rule.name(v)
                if not name.endswith(".weight"):
                    raise WeightError(f"LoRA export: {path} maps to {name}, not a Linear's weight")
                slot = rule.slot(v)
                a, b = a_all[slot], b_all[slot]  # [in..., r], [r, out...]
                shape = a.shape[:-1] + b.shape[1:]
                if len(shape) != w.n_in + (b.ndim - 1):
                    raise WeightError(f"LoRA export: {path} slot {slot} of {name} has the wrong rank")
                perm_in, perm_out = _permutations(rule, shape, w.n_in, cache)
                module = name[:-len(".weight")]
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(
                    a.reshape(-1, w.rank)[perm_in].T)  # [r, in]
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(
                    b.reshape(w.rank, -1)[:, perm_out].T)  # [out, r]
                modules.append(module)
                hits += 1
                if rule not in used:
                    used.append(rule)
        if not hits:
            raise WeightError(f"LoRA export: no official tensor maps to our {path} (the weight table has no rule "
                              "for it)")
    return tensors, modules, used


def _module_regex(rules: list[Rule], modules: list[str]) -> str:
    """A regex PEFT full-matches against module names that selects exactly `modules`: each rule's official template
    with every variable replaced by the alternation of the values exported."""
    names = set(modules)
    parts = []
    for rule in rules:
        template = rule.official[:-len(".weight")]
        pieces, fields = [], []
        for literal, field, _, _ in string.Formatter().parse(template):
            pieces.append(re.escape(literal))
            if field:
                fields.append(field)
                pieces.append("{" + field + "}")
        values = {f: sorted({v[f] for v in rule.instances() if rule.name(v)[:-len(".weight")] in names})
                  for f in fields}
        pattern = "".join(pieces)
        for f, vals in values.items():
            pattern = pattern.replace("{" + f + "}", "(?:" + "|".join(map(str, vals)) + ")")
        parts.append(pattern)
    regex = "(?:" + "|".join(parts) + ")"
    compiled = re.compile(regex)
    if not all(compiled.fullmatch(m) for m in modules) or any(compiled.fullmatch(m) for m in
                                                              _other_modules(rules, names)):
        raise WeightError("LoRA export: the target_modules regex does not select exactly the exported modules")
    return regex


def _other_modules(rules: list[Rule], names: set[str]) -> list[str]:
    return [rule.name(v)[:-len(".weight")] for rule in rules for v in rule.instances()
            if rule.name(v)[:-len(".weight")] not in names]


def export_peft(model, out_dir: str, *, prefix: str = "", base_model_name_or_path: str | None = None,
                overwrite: bool = True) -> str:
    """Write the model's adapters as a PEFT LoRA folder (see the module docstring); the folder appears complete or
    not at all (written beside, then renamed). Returns its absolute path."""
    tensors, modules, rules = peft_tensors(model, prefix=prefix)
    w = next(iter(adapters(model).values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": w.rank, "lora_alpha": w.alpha, "lora_dropout": 0.0,
        "target_modules": _module_regex(rules, modules), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }
    dst = os.path.abspath(out_dir)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial.", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if os.path.exists(dst):
            old = tmp + ".old"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return dst

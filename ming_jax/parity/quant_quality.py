"""What int8 / fp8 weights cost in quality: logits error and greedy / top-1 agreement against bfloat16 and float32.

    model, logit_preps, greedy_preps, official = golden_case(GOLDEN / "llm_backbone")
    rows = measure(model, logit_preps, greedy_preps, ["bf16", "int8", "fp8"], new_tokens=8, case="golden",
                   official=official)
    print(markdown(rows))

One float32 model gives every variant its weights: "float32" (itself), "bf16" (parameters and compute in bfloat16,
what the release ships), and each quantization (`ming_jax.quant.QuantConfig.parse`: "int8", "fp8", "fp8:128")
applied to the bfloat16 model's weights, computing in bfloat16: the deployed configuration (int8 / fp8 weights,
bf16 activations). Each variant runs the full forward of the logits prompts (logits at every position) and a greedy
decode of `new_tokens` tokens from the greedy prompts. Against a reference (another variant, or the official float32
outputs of a golden case):

  rel_l2   ||logits - ref|| / ||ref|| over all positions of all prompts
  max_abs  max |logits - ref| / max |ref| (the repo's relative max-abs)
  top1     fraction of positions whose argmax agrees
  greedy   mean over prompt rows of (common prefix of the greedy tokens) / new_tokens

`golden_case` reads the golden `llm_backbone` case (its multimodal and text prompts, the official float32 logits
and greedy decodes); `random_case` makes a larger random BailingMoeV2 and prompts. The bounds the tests hold these
to are `ming_jax.parity.numerics.QUANT_QUALITY`; `benchmarks/quant_quality.py` prints the table of
docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax import quant
from ming_jax.checkpoint import restore
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.gen import text as generation
from ming_jax.models import inputs as multimodal
from ming_jax.models import llm as model_lib
from ming_jax.parity import golden
from ming_jax.parity.cases import llm_backbone


@dataclasses.dataclass(frozen=True)
class Row:
    case: str
    variant: str
    reference: str
    rel_l2: float
    max_abs: float
    top1: float
    greedy: float
    positions: int  # logits rows compared
    tokens: int  # greedy tokens compared (rows x new_tokens)

    def markdown(self) -> str:
        return (f"| {self.case} | {self.variant} | {self.reference} | {self.rel_l2:.4f} | {self.max_abs:.4f} | "
                f"{100 * self.top1:.1f}% | {100 * self.greedy:.1f}% |")

    MARKDOWN_HEADER = ("| case | weights | against | logits rel L2 | logits max-abs (rel) | top-1 agree | "
                       "greedy prefix agree |\n|---|---|---|---:|---:|---:|---:|")


def with_runtime(model: model_lib.BailingMoeV2, runtime: Runtime) -> model_lib.BailingMoeV2:
    """The same weights in another runtime (parameter / compute dtype): each array cast to the dtype the new model
    gives it (router expert biases stay float32)."""
    graphdef, like = nnx.split(model_lib.create_abstract(model.cfg, runtime))
    _, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda a, s: jnp.asarray(a).astype(s.dtype), state, like))


def variant(model32: model_lib.BailingMoeV2, name: str) -> model_lib.BailingMoeV2:
    """"float32", "bf16", or a quantization ("int8", "fp8", "fp8:128") of the bf16 weights, bf16 compute."""
    if name == "float32":
        return model32
    m = with_runtime(model32, Runtime.bf16())
    if name == "bf16":
        return m
    return quant.quantize_model(m, quant.QuantConfig.parse(name))


@dataclasses.dataclass
class Outputs:
    logits: list[np.ndarray]  # per logits prompt [B, S, V] float32
    greedy: list[np.ndarray]  # per greedy prompt [B, N] int


def run(model, logit_preps: Sequence[multimodal.Prepared], greedy_preps: Sequence[multimodal.Prepared],
        new_tokens: int) -> Outputs:
    """Full-sequence logits of `logit_preps`, greedy tokens of `greedy_preps` (prompts of one shape compile once)."""
    sampling = generation.SamplingConfig(max_new_tokens=new_tokens)  # greedy, no stop tokens
    logits = [np.asarray(generation.forward(model, p)[1].logits, np.float32) for p in logit_preps]
    tokens = [np.asarray(generation.generate(model, p, sampling).tokens) for p in greedy_preps]
    return Outputs(logits, tokens)


def compare(case: str, name: str, ref_name: str, ours: Outputs, ref: Outputs) -> Row:
    o = np.concatenate([a.reshape(-1, a.shape[-1]) for a in ours.logits]).astype(np.float64)
    r = np.concatenate([b.reshape(-1, b.shape[-1]) for b in ref.logits]).astype(np.float64)
    rel_l2 = float(np.linalg.norm(o - r) / np.linalg.norm(r))
    max_abs = float(np.abs(o - r).max() / np.abs(r).max())
    top1 = float(np.mean(o.argmax(-1) == r.argmax(-1)))
    prefixes, n_tok = [], 0
    for a, b in zip(ours.greedy, ref.greedy):
        same = np.cumprod(a == b, axis=1).sum(1)  # [B] common prefix length
        prefixes += list(same / a.shape[1])
        n_tok += a.size
    greedy = float(np.mean(prefixes)) if prefixes else float("nan")
    return Row(case, name, ref_name, rel_l2, max_abs, top1, greedy, int(o.shape[0]), n_tok)


def measure(model32, logit_preps, greedy_preps, variants: Sequence[str], *, new_tokens: int, case: str,
            references: Sequence[str] = ("bf16", "float32"), official: Outputs | None = None) -> list[Row]:
    """Every variant against every reference (variant names: they run too; a variant is not compared with itself),
    and against the official outputs when given (reference "official float32")."""
    names = list(dict.fromkeys([*references, *variants]))
    outs = {n: run(variant(model32, n), logit_preps, greedy_preps, new_tokens) for n in names}
    rows = []
    for n in variants:
        if official is not None:
            rows.append(compare(case, n, "official float32", outs[n], official))
        for ref in references:
            if ref != n:
                rows.append(compare(case, n, ref, outs[n], outs[ref]))
    return rows


# --- the cases --------------------------------------------------------------------------------------------------


def golden_case(case_dir: str, *, logits: Sequence[str] = ("mm", "text"), greedy: Sequence[str] = ("mm", "text")):
    """(float32 model, logits prompts, greedy prompts, official Outputs) of the golden `llm_backbone` case: its
    multimodal ("mm") and text prompts, the official float32 logits and 8-step greedy decodes of those chosen."""
    case = golden.load_case(str(case_dir))
    model = restore.load_tensors(case.config, case.weights, components=("llm",), source=case.path).llm
    x, want = case.inputs, case.outputs
    preps = {"mm": multimodal.prepare(model.cfg, x["input_ids"], mm=llm_backbone.multimodal_inputs(x)),
             "text": multimodal.prepare(model.cfg, x["text_input_ids"])}
    ref_logits = {"mm": want["logits"], "text": want["text_logits"]}
    ref_tokens = {"mm": want["mm_decode_tokens"], "text": want["text_decode_tokens"]}
    official = Outputs([np.asarray(ref_logits[k], np.float32) for k in logits],
                       [np.asarray(ref_tokens[k]) for k in greedy])
    return model, [preps[k] for k in logits], [preps[k] for k in greedy], official


def random_config(**overrides) -> LLMConfig:
    """A larger random BailingMoeV2 than the golden one, still CPU-sized: 4 layers (1 dense + 3 MoE), hidden 512,
    64 experts (top 8, 8 groups of which 4 are chosen), expert width 256, vocab 4096."""
    kw = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=2,
              head_dim=128, moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4)
    kw.update(overrides)
    return LLMConfig.tiny(**kw)


def random_case(cfg: LLMConfig, *, prompts: int = 4, seq: int = 64, seed: int = 0):
    """(float32 model, prompts) of a random model (the repo's initialisers): `prompts` random-id prompts of `seq`
    tokens, each its own batch of one (bf16 generation with batches > 1 hits an XLA:CPU dot it cannot run:
    "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")."""
    model = model_lib.create(cfg, seed=seed)
    top = min(cfg.vocab_size, cfg.pad_token_id or cfg.vocab_size)
    ids = np.random.default_rng(seed).integers(0, top, (prompts, seq))
    return model, [multimodal.prepare(cfg, ids[i:i + 1]) for i in range(prompts)]


def markdown(rows: Sequence[Row]) -> str:
    return "\n".join([Row.MARKDOWN_HEADER] + [r.markdown() for r in rows])

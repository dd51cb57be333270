"""Quality of int8 / fp8 weights on the golden llm_backbone case, held within `numerics.QUANT_QUALITY`: logits of the
multimodal prompt against the official float32 logits (relative L2 error, top-1 agreement) and the greedy decode of
the text prompt against the official tokens (common prefix). The full table (both prompts, against bf16 and
float32 too, and a larger random model) is `python -m benchmarks.quant_quality` (docs/benchmarks.md)."""

import pytest

from ming_jax.parity import numerics
from ming_jax.parity import quant_quality as qq


@pytest.fixture(scope="module")
def golden_llm(golden_dir):
    return qq.golden_case(golden_dir / "llm_backbone", logits=("mm",), greedy=("text",))


@pytest.mark.parametrize("qtype", ["int8", "fp8"])
def test_quantized_quality_within_bounds(golden_llm, qtype):
    model, logit_preps, greedy_preps, official = golden_llm
    (row,) = qq.measure(model, logit_preps, greedy_preps, [qtype], new_tokens=8, case="golden", references=(),
                        official=official)
    bound = numerics.QUANT_QUALITY[qtype]
    print(row.markdown())
    assert row.positions == 91 and row.tokens == 8
    assert row.rel_l2 <= bound["rel_l2"], row
    assert row.top1 >= bound["top1"], row
    assert row.greedy >= bound["greedy"], row

"""Quality of int8 / fp8 weights against bfloat16 and float32, measured: the table of docs/benchmarks.md.

    python -m benchmarks.quant_quality [--golden DIR] [--variants bf16,int8,fp8,fp8:128] [--random_prompts 4]
                                       [--json PATH (default $TMPDIR/ming_jax_quant_quality.json)]

Cases: the golden `llm_backbone` case (the official float32 logits of its multimodal prompt (91 tokens) and text
prompt (6 tokens), and 8 greedy tokens from each) and a larger random model (`quant_quality.random_config`: 4
layers, hidden 512, 64 experts top-8; `--random_prompts` prompts of 64 random tokens, 16 greedy tokens each). All
logic is `ming_jax.parity.quant_quality`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib

from benchmarks.results import run_meta, write_json
from ming_jax.parity import quant_quality as qq

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--golden", default=os.environ.get("MING_GOLDEN_DIR", str(GOLDEN)))
    p.add_argument("--variants", default="bf16,int8,fp8,fp8:128")
    p.add_argument("--random_prompts", type=int, default=4)
    p.add_argument("--skip_random", action="store_true")
    p.add_argument("--json", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ming_jax_quant_quality.json"))
    a = p.parse_args()
    variants = a.variants.split(",")
    rows = []
    model, logit_preps, greedy_preps, official = qq.golden_case(os.path.join(a.golden, "llm_backbone"))
    rows += qq.measure(model, logit_preps, greedy_preps, variants, new_tokens=8, case="golden llm_backbone",
                       official=official)
    print(qq.markdown(rows), flush=True)
    if not a.skip_random:
        model, preps = qq.random_case(qq.random_config(), prompts=a.random_prompts, seq=64)
        more = qq.measure(model, preps, preps, variants, new_tokens=16, case="random 4 layers, d 512, 64 experts")
        rows += more
        print(qq.markdown(more), flush=True)
    write_json(a.json, dict(run_meta(), rows=[dataclasses.asdict(r) for r in rows]))


if __name__ == "__main__":
    main()

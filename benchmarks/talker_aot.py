"""Speech generation compiled by the TPU compiler for pod slices from this host (libtpu, no TPU): per-chip memory of
one talker step, the talker's whole jitted generation program (prefill + while_loop) and the AudioVAE decode, for a
batch of utterances (default 64), with the release presets (`TalkerConfig.ming_flash_omni_2()`,
`AudioVAEConfig.ming_flash_omni_2()`).

    python -m benchmarks.talker_aot [--out docs/data/talker_aot.json] \
        [--cases talker_step/v5p:2x2x1/fsdp=4/replicated/64 ...]

A case is step/topology/mesh/rules/utterances. Cases run one after another in this process; the JSON is rewritten
after every case, so an interrupted run keeps what it measured. Same numbers as `python -m ming_jax.aot --step
talker_step|talker_generate|audio_vae_decode ...`.

FLOPs: `xla_flops` is XLA's cost analysis of the compiled (per-chip) program, which counts every while / scan body
once (the layer scans, the 10 Euler steps, the generation loop), so it is far below the work done; `model_flops` is
an analytic count for the whole batch (2 x parameters x tokens for every matmul, plus the attention score and value
products as the program computes them: full T x S, the AudioVAE's causal mask included), for one step
(talker_step), the prefill plus all `max_steps` steps (talker_generate) or the whole decode (audio_vae_decode).
"""

from __future__ import annotations

import argparse
import math
import time

from flax import nnx

from ming_jax.aot import compile as aot
from ming_jax.config.audio_vae import AudioVAEConfig
from ming_jax.config.runtime import Runtime
from ming_jax.config.talker import TalkerConfig
from ming_jax.models.talker import talker as tk

from benchmarks.tpu_aot import write_results

CASES = (
    "talker_step/v5p:2x2x1/fsdp=4/replicated/64",
    "talker_step/v5p:2x2x1/fsdp=4/fsdp/64",
    "talker_step/v5p:4x4x4/fsdp=64/replicated/64",
    "talker_generate/v5p:2x2x1/fsdp=4/replicated/64",
    "talker_generate/v5p:4x4x4/fsdp=64/replicated/64",
    "audio_vae_decode/v5p:2x2x1/fsdp=4/replicated/64",
    "audio_vae_decode/v5p:4x4x4/fsdp=64/replicated/64",
)


def _params(module_state, prefix: tuple) -> int:
    return sum(math.prod(v.shape) for p, v in module_state if p[:len(prefix)] == prefix)


def talker_step_flops(cfg: TalkerConfig, cache_slots: int) -> float:
    """Analytic FLOPs of one talker step for one utterance (see the module docstring)."""
    st = nnx.to_flat_state(nnx.state(tk.create_abstract(cfg), nnx.Param))
    f, a, lm = cfg.flow, cfg.aggregator, cfg.llm
    dit_tokens, agg_tokens = cfg.dit_length, 1 + cfg.patch_size
    dit = 2 * _params(st, ("flow", "blocks")) * dit_tokens + 4 * f.depth * dit_tokens ** 2 * f.hidden_size
    dit += 2 * (_params(st, ("flow", "x_embedder")) * (dit_tokens - 1) + _params(st, ("flow", "c_embedder"))
                + _params(st, ("flow", "t_embedder")))
    agg = 2 * (_params(st, ("aggregator", "blocks")) + _params(st, ("aggregator", "x_embedder"))) * agg_tokens
    agg += 4 * a.depth * agg_tokens ** 2 * a.hidden_size
    lm_layers = _params(st, ("llm", "layers"))
    lm_step = 2 * lm_layers + 4 * lm.num_hidden_layers * cache_slots * lm.num_attention_heads * lm.head_dim
    return 2 * cfg.steps * dit + agg + lm_step + 2 * _params(st, ("stop_head",))


def talker_generate_flops(cfg: TalkerConfig, prompt: int, steps: int) -> float:
    """Analytic FLOPs of the prefill of `prompt` positions plus `steps` steps, each against the whole cache of
    prompt + steps slots (the loop attends to every slot, masked), for one utterance."""
    st = nnx.to_flat_state(nnx.state(tk.create_abstract(cfg), nnx.Param))
    lm = cfg.llm
    prefill = 2 * _params(st, ("llm", "layers")) * prompt
    prefill += 4 * lm.num_hidden_layers * prompt ** 2 * lm.num_attention_heads * lm.head_dim
    return prefill + steps * talker_step_flops(cfg, prompt + steps)


def audio_vae_decode_flops(cfg: AudioVAEConfig, latents: int) -> float:
    """Analytic FLOPs of one utterance's decode (the backbone's attention as computed: full N x N, masked)."""
    from ming_jax.models.talker.audio_vae import AudioVAEDecoder

    decoder = nnx.eval_shape(lambda: AudioVAEDecoder(cfg, Runtime(), rngs=nnx.Rngs(0)))
    st = nnx.to_flat_state(nnx.state(decoder, nnx.Param))
    bb = cfg.decoder.backbone
    n = cfg.frames_per_latent * latents
    out = 2 * _params(st, ("backbone", "layers")) * n + 4 * bb.num_hidden_layers * n ** 2 * bb.hidden_size
    return out + 2 * _params(st, ("fc1",)) * latents + 2 * _params(st, ("head", "out")) * n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="step/topology/mesh/rules/utterances")
    ap.add_argument("--max_len", type=int, default=aot.SPEECH_MAX_LEN, help="talker_step: KV cache slots")
    ap.add_argument("--prompt_len", type=int, default=aot.SPEECH_PROMPT, help="talker_generate: prompt positions")
    ap.add_argument("--max_steps", type=int, default=0, help="talker_generate: step buffer (0: the preset's, 1000)")
    ap.add_argument("--latents", type=int, default=aot.SPEECH_LATENTS,
                    help="audio_vae_decode: latents per utterance")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    talker, vae = TalkerConfig.ming_flash_omni_2(), AudioVAEConfig.ming_flash_omni_2()
    max_steps = args.max_steps or talker.generate.max_steps
    libtpu = aot._libtpu_version()
    note = (f"talker {aot.talker_param_count(talker)} parameters ({aot.talker_param_count(talker, 'step')} read per "
            f"step), AudioVAE decoder {aot.audio_vae_decoder_param_count(vae)} parameters (release presets, see "
            f"their docstrings for which sizes are confirmed); bf16 parameters and compute, attention auto; "
            f"talker_step cache {args.max_len} slots; talker_generate prompt {args.prompt_len}, {max_steps} steps; "
            f"audio_vae_decode {args.latents} latents per utterance; libtpu {libtpu}; compiled ahead of time on a "
            f"CPU host, no TPU; compile_s measured on a shared 2-core VM, so only indicative")
    rows = []
    print(f"{'step':<16} {'topology':<10} {'mesh':<8} {'rules':<10} {'utt':>3} {'args':>6} {'temp':>6} {'out':>6} "
          f"{'alias':>6} {'total':>6} {'HBM':>4} {'fits':>5} {'TFLOP/chip':>10} {'compile s':>9}   (GB = 1e9 B "
          f"per chip; TFLOP: analytic, batch / chips)")
    for case in args.cases:
        step, topology, mesh, rules, utterances = case.split("/")
        utterances = int(utterances)
        t0 = time.perf_counter()
        try:
            devices = aot.topology_devices(topology)
            plan, compiled = aot.compile_speech_step(step, topology, mesh, rules, talker=talker, vae=vae,
                                                     batch=utterances, max_len=args.max_len,
                                                     prompt_len=args.prompt_len, max_steps=max_steps,
                                                     latents=args.latents, devices=devices)
        except Exception as e:  # noqa: BLE001 - recorded, the next case still runs
            rows.append(dict(step=step, topology=topology, mesh=mesh, rules=rules, utterances=utterances,
                             error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            print(f"{case}: failed: {rows[-1]['error']}", flush=True)
            write_results(args.out, "talker_aot.json", rows, note)
            continue
        del compiled
        if step == "talker_step":
            per_utt = talker_step_flops(talker, args.max_len)
            params = aot.talker_param_count(talker, "step") * 2
        elif step == "talker_generate":
            per_utt = talker_generate_flops(talker, args.prompt_len, max_steps)
            params = aot.talker_param_count(talker, "step") * 2
        else:
            per_utt = audio_vae_decode_flops(vae, args.latents)
            params = aot.audio_vae_decoder_param_count(vae) * 2
        chips = len(devices)
        row = dict(step=step, topology=topology, chips=chips, mesh=mesh, rules=rules, utterances=utterances,
                   seq=plan.seq, note=plan.note, argument=plan.argument, output=plan.output, temp=plan.temp,
                   alias=plan.alias, code=plan.code, total=plan.total, hbm_bytes=plan.capacity, fits=plan.fits,
                   param_bytes=params,  # global bf16 bytes of the parameters the program reads
                   xla_flops=plan.flops, model_flops=per_utt * utterances, model_flops_per_chip=per_utt * utterances
                   / chips, compile_s=plan.compile_s, wall_s=time.perf_counter() - t0, libtpu=libtpu)
        rows.append(row)
        g = lambda b: f"{b / 1e9:6.2f}"  # noqa: E731
        print(f"{step:<16} {topology:<10} {mesh:<8} {rules:<10} {utterances:>3} {g(plan.argument)} {g(plan.temp)} "
              f"{g(plan.output)} {g(plan.alias)} {g(plan.total)} {plan.capacity / 1e9:>4.0f} {str(plan.fits):>5} "
              f"{row['model_flops_per_chip'] / 1e12:>10.2f} {plan.compile_s:>9.0f}", flush=True)
        write_results(args.out, "talker_aot.json", rows, note)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The docs/scaling.md table of these rows."""
    out = ["| step | topology | chips | mesh | rules | utterances | args | temp | output | donated | total | HBM | "
           "fits | TFLOP per chip (analytic) | compile s |",
           "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    g = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            out.append(f"| {r['step']} | {r['topology']} | | {r['mesh']} | {r['rules']} | {r['utterances']} | "
                       f"failed: {r['error'][:80]} | | | | | | | | |")
            continue
        out.append(f"| {r['step']} | {r['topology']} | {r['chips']} | {r['mesh']} | {r['rules']} | "
                   f"{r['utterances']} | {g(r['argument'])} | {g(r['temp'])} | {g(r['output'])} | {g(r['alias'])} | "
                   f"{g(r['total'])} | {r['hbm_bytes'] / 1e9:.0f} | {'yes' if r['fits'] else '**no**'} | "
                   f"{r['model_flops_per_chip'] / 1e12:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

"""The omni model's multimodal prefill (towers included) compiled by the TPU compiler for pod slices from this host
(libtpu, no TPU): per-chip memory of the vision tower on each prompt's images / video frames, the audio tower on its
clip, their rows into the prompt's embeddings and the LLM prefill into a fresh cache, for a batch of prompts, with the
release preset (`OmniConfig.ming_flash_omni_2()`, bf16).

    python -m benchmarks.omni_aot [--out docs/data/omni_aot.json] \
        [--cases v5p:4x4x4/fsdp=16,expert=4/ep_fsdp/same/64/i1x1024+a30 ...]

A case is topology/mesh/rules/tower_rules/prompts/media, media a "+"-joined list of iNxSIZE (N images of SIZE x SIZE
pixels per prompt), vFxSIZE (F video frames of SIZE x SIZE), aSECONDS (one audio clip), sPROMPT (the prompt length;
"s2048" alone: a text-only prompt, the same program without towers). Cases run one after another
in this process; the JSON is rewritten after every case, so an interrupted run keeps what it measured. Same numbers
as `python -m ming_jax.aot --step omni_prefill ...`.

FLOPs: `xla_flops` is XLA's cost analysis of the compiled (per-chip) program, which counts every scan body once (the
ViT's 27 blocks, whisper's 32, the LLM's layer scans), so it is far below the work done; `model_flops` is the
analytic count of `ming_jax.aot.omni.omni_prefill_flops` for the whole batch, per part.
"""

from __future__ import annotations

import argparse
import time

from ming_jax.aot import compile as aot, omni as ao
from ming_jax.config.omni import OmniConfig

from benchmarks.tpu_aot import write_results

CASES = (
    "v5p:4x4x4/fsdp=16,expert=4/ep_fsdp/same/64/i1x1024+a30",
    "v5p:4x4x4/fsdp=16,expert=4/ep_fsdp/replicated/64/i1x1024+a30",
    "v5p:4x4x4/fsdp=16,expert=4/ep_fsdp/same/64/i1x1024+v32x448+a30",
    "v5p:2x2x4/fsdp=4,expert=4/ep_fsdp/same/16/i1x1024+a30",
    "v5p:4x8x8/fsdp=4,expert=64/ep_fsdp/replicated/256/i1x1024+a30",
    "v6e:8x8/fsdp=16,expert=4/ep_fsdp/same/64/i1x1024+a30",
    "v5p:4x4x4/fsdp=16,expert=4/ep_fsdp/same/64/s2048",
    "v5p:4x4x4/fsdp=16,expert=4/ep_fsdp/same/256/i1x1024+a30",
    "v5p:4x8x8/fsdp=4,expert=64/ep_fsdp/same/256/i1x1024+a30",  # fails: 1152 (ViT width) over 256 chips
    "v5p:4x8x8/fsdp=64,expert=4/ep_fsdp/replicated/256/i1x1024+a30",
)


def parse_media(media: str, prompts: int, new_tokens: int) -> ao.OmniShapes:
    kw = dict(images=0, audio_seconds=0.0)
    for item in media.split("+"):
        kind, rest = item[0], item[1:]
        if kind == "i":
            n, size = rest.split("x")
            kw.update(images=int(n), image_size=int(size))
        elif kind == "v":
            n, size = rest.split("x")
            kw.update(video_frames=int(n), video_size=int(size))
        elif kind == "a":
            kw.update(audio_seconds=float(rest))
        elif kind == "s":
            kw.update(seq=int(rest))
        else:
            raise ValueError(f"media item {item!r}: expected iNxSIZE, vFxSIZE, aSECONDS or sPROMPT")
    return ao.OmniShapes(batch=prompts, new_tokens=new_tokens, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="topology/mesh/rules/tower_rules/prompts/media")
    ap.add_argument("--new_tokens", type=int, default=256, help="cache slots after the prompt")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cfg = OmniConfig.ming_flash_omni_2()
    counts = ao.omni_param_count(cfg)
    libtpu = aot._libtpu_version()
    note = (f"omni release preset: LLM {counts['llm']}, ViT {counts['vision']} (deepstack mergers included, not run), "
            f"vision projector {counts['vision_proj']}, audio tower {counts['audio']} parameters; bf16 parameters and "
            f"compute, attention auto (splash in the ViT and the LLM), dropless experts; prompts = the media + "
            f"{ao.TEXT_TOKENS} text tokens rounded up to {ao.SEQ_MULTIPLE}; cache prompt + {args.new_tokens} slots; "
            f"libtpu {libtpu}; compiled ahead of time on a CPU host, no TPU; compile_s measured on a shared 2-core "
            f"VM, so only indicative")
    rows = []
    print(f"{'topology':<10} {'mesh':<18} {'towers':<10} {'B':>3} {'media':<22} {'seq':>5} {'args':>6} {'temp':>6} "
          f"{'out':>6} {'total':>6} {'HBM':>4} {'fits':>5} {'TFLOP/chip':>10} {'compile s':>9}   (GB = 1e9 B per "
          f"chip; TFLOP: analytic, batch / chips)")
    for case in args.cases:
        topology, mesh, rules, towers, prompts, media = case.split("/")
        shapes = parse_media(media, int(prompts), args.new_tokens)
        base = dict(topology=topology, mesh=mesh, rules=rules, tower_rules=towers, prompts=shapes.batch, media=media)
        t0 = time.perf_counter()
        try:
            devices = aot.topology_devices(topology)
            plan, compiled, layout = ao.compile_omni_prefill(cfg, topology, mesh, rules, shapes,
                                                             tower_rules_name=towers, devices=devices)
            kernels = aot.mosaic_kernels(compiled)
            del compiled
        except Exception as e:  # noqa: BLE001 - recorded, the next case still runs
            rows.append(dict(base, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            print(f"{case}: failed: {rows[-1]['error']}", flush=True)
            write_results(args.out, "omni_aot.json", rows, note)
            continue
        chips = len(devices)
        work = ao.omni_prefill_flops(cfg, layout)
        row = dict(base, chips=chips, seq=plan.seq, note=plan.note, tokens=layout.media_tokens(2),
                   argument=plan.argument, output=plan.output, temp=plan.temp, alias=plan.alias, code=plan.code,
                   total=plan.total, hbm_bytes=plan.capacity, fits=plan.fits, mosaic_kernels=kernels,
                   xla_flops=plan.flops, model_flops=work, model_flops_per_chip=sum(work.values()) / chips,
                   compile_s=plan.compile_s, wall_s=time.perf_counter() - t0, libtpu=libtpu)
        rows.append(row)
        g = lambda b: f"{b / 1e9:6.2f}"  # noqa: E731
        print(f"{topology:<10} {mesh:<18} {towers:<10} {shapes.batch:>3} {media:<22} {plan.seq:>5} "
              f"{g(plan.argument)} {g(plan.temp)} {g(plan.output)} {g(plan.total)} {plan.capacity / 1e9:>4.0f} "
              f"{str(plan.fits):>5} {row['model_flops_per_chip'] / 1e12:>10.2f} {plan.compile_s:>9.0f}", flush=True)
        write_results(args.out, "omni_aot.json", rows, note)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The docs/scaling.md table of these rows."""
    out = ["| topology | chips | mesh | tower weights | prompts | media per prompt | prompt | args | temp | output | "
           "total | HBM | fits | TFLOP per chip: ViT / audio / LLM (analytic) | compile s |",
           "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    g = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            out.append(f"| {r['topology']} | | {r['mesh']} | {r['tower_rules']} | {r['prompts']} | {r['media']} | | "
                       f"failed: {r['error'][:80]} | | | | | | | |")
            continue
        towers = "as the LLM (ZeRO-3)" if r["tower_rules"] == "same" else r["tower_rules"]
        f = {k: v / r["chips"] / 1e12 for k, v in r["model_flops"].items()}
        media = r["note"].split(" per prompt")[0].replace("text only", "none (text only)")
        out.append(f"| {r['topology']} | {r['chips']} | {r['mesh']} | {towers} | {r['prompts']} | {media} | "
                   f"{r['seq']} | {g(r['argument'])} | {g(r['temp'])} | {g(r['output'])} | {g(r['total'])} | "
                   f"{r['hbm_bytes'] / 1e9:.0f} | {'yes' if r['fits'] else '**no**'} | {f['vision']:.2f} / "
                   f"{f['audio']:.2f} / {f['llm']:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

"""Image generation compiled by the TPU compiler for pod slices from this host (libtpu, no TPU): per-chip memory of
one Z-Image DiT forward (CFG batch of two), the sampler's whole scan of DiT calls and the Flux VAE decode, at
1024 x 1024, and whether the attention runs the splash Pallas kernel (Mosaic custom calls in the compiled program).

    python -m benchmarks.image_aot [--out docs/data/image_aot.json] [--cases dit/v5p:2x2x1/fsdp=4/fsdp/1 ...]

A case is step/topology/mesh/rules/images. Cases run one after another in this process (each compile takes from
half a minute, the DiT, to several minutes, the VAE); the JSON is rewritten after every case, so an interrupted
run keeps what it measured. Same numbers as `python -m ming_jax.aot --step dit|denoise|vae_decode ...`.
"""

from __future__ import annotations

import argparse
import re
import time

from ming_jax.aot import compile as aot
from ming_jax.config.dit import DiTConfig
from ming_jax.config.vae import VAEConfig

from benchmarks.tpu_aot import write_results

CASES = (
    "dit/v5p:2x2x1/fsdp=4/fsdp/1",
    "dit/v5p:2x2x1/fsdp=4/fsdp_seq/1",
    "dit/v5p:2x2x1/fsdp=2,tensor=2/fsdp_tp/1",
    "dit/v5p:4x4x4/fsdp=64/fsdp_seq/1",
    "dit/v6e:2x2/fsdp=4/fsdp/1",
    "dit/v6e:2x2/fsdp=2,tensor=2/fsdp_tp/1",
    "dit/v6e:2x2/data=2,tensor=2/ep_tp/1",
    "dit/v6e:4x4/fsdp=16/fsdp/1",
    "dit/v6e:4x4/fsdp=16/fsdp_seq/1",
    "denoise/v5p:2x2x1/fsdp=4/fsdp/1",
    "denoise/v6e:2x2/fsdp=4/fsdp/1",
    "denoise/v6e:4x4/fsdp=16/fsdp_seq/1",
    "vae_decode/v5p:2x2x1/fsdp=4/fsdp/1",
    "vae_decode/v6e:2x2/fsdp=4/fsdp/1",
    "vae_decode/v6e:2x2/fsdp=4/fsdp/4",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="step/topology/mesh/rules/images")
    ap.add_argument("--image_size", type=int, default=1024)
    ap.add_argument("--caption_len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="denoise: DiT calls in the scan")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dit, vae = DiTConfig.z_image(), VAEConfig.flux()
    dit_bytes = aot.dit_param_count(dit) * 2  # bf16
    vae_bytes = aot.vae_param_count(vae, "decoder") * 2
    libtpu = aot._libtpu_version()
    note = (f"Z-Image DiT ({aot.dit_param_count(dit)} parameters) and Flux VAE decoder, bf16 parameters and compute, "
            f"attention auto, {args.image_size}px, caption {args.caption_len}, denoise {args.steps} steps; libtpu "
            f"{libtpu}; compiled ahead of time on a CPU host, no TPU")
    rows = []
    print(f"{'step':<10} {'topology':<10} {'mesh':<16} {'rules':<9} {'img':>3} {'args':>6} {'temp':>6} {'out':>6} "
          f"{'total':>6} {'HBM':>4} {'fits':>5} {'splash':>6} {'compile s':>9}   (GB = 1e9 B per chip)")
    for case in args.cases:
        step, topology, mesh, rules, images = case.split("/")
        images = int(images)
        t0 = time.perf_counter()
        try:
            devices = aot.topology_devices(topology)
            plan, compiled = aot.compile_image_step(step, topology, mesh, rules, dit=dit, vae=vae, batch=images,
                                                    image_size=args.image_size, caption_len=args.caption_len,
                                                    steps=args.steps, devices=devices)
        except Exception as e:  # noqa: BLE001 - recorded, the next case still runs
            rows.append(dict(step=step, topology=topology, mesh=mesh, rules=rules, images=images,
                             error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            print(f"{case}: failed: {rows[-1]['error']}", flush=True)
            write_results(args.out, "image_aot.json", rows, note)
            continue
        text = compiled.as_text()
        params = vae_bytes if step == "vae_decode" else dit_bytes
        row = dict(step=step, topology=topology, chips=len(devices), mesh=mesh, rules=rules, images=images,
                   dit_rows=(2 * images if step != "vae_decode" else None), image_size=args.image_size,
                   caption_len=args.caption_len if step != "vae_decode" else None,
                   steps=args.steps if step == "denoise" else None, seq=plan.seq,
                   argument=plan.argument, output=plan.output, temp=plan.temp, alias=plan.alias, code=plan.code,
                   total=plan.total, hbm_bytes=plan.capacity, fits=plan.fits,
                   param_bytes=params,  # global bf16 bytes the program reads (DiT; the VAE's decoder)
                   mosaic_kernels=aot.mosaic_kernels(compiled),
                   splash_kernels=len(re.findall(r"%splash_mha_fwd\S* = ", text)),
                   compile_s=plan.compile_s, wall_s=time.perf_counter() - t0, libtpu=libtpu)
        del compiled, text
        rows.append(row)
        g = lambda b: f"{b / 1e9:6.2f}"  # noqa: E731
        print(f"{step:<10} {topology:<10} {mesh:<16} {rules:<9} {images:>3} {g(plan.argument)} {g(plan.temp)} "
              f"{g(plan.output)} {g(plan.total)} {plan.capacity / 1e9:>4.0f} {str(plan.fits):>5} "
              f"{row['splash_kernels']:>6} {plan.compile_s:>9.0f}", flush=True)
        write_results(args.out, "image_aot.json", rows, note)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The docs/scaling.md table of these rows."""
    out = ["| step | topology | chips | mesh | rules | images (DiT rows) | args | temp | output | total | HBM | fits | "
           "splash kernels | compile s |", "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    g = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            out.append(f"| {r['step']} | {r['topology']} | | {r['mesh']} | {r['rules']} | {r['images']} | "
                       f"failed: {r['error'][:80]} | | | | | | | |")
            continue
        imgs = f"{r['images']}" + (f" ({r['dit_rows']})" if r["dit_rows"] else "")
        out.append(f"| {r['step']} | {r['topology']} | {r['chips']} | {r['mesh']} | {r['rules']} | {imgs} | "
                   f"{g(r['argument'])} | {g(r['temp'])} | {g(r['output'])} | {g(r['total'])} | "
                   f"{r['hbm_bytes'] / 1e9:.0f} | {'yes' if r['fits'] else '**no**'} | {r['splash_kernels']} | "
                   f"{r['compile_s']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

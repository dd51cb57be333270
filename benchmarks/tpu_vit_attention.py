"""Ahead-of-time TPU cost of the ViT's attention (Ming-flash-omni 2.0: 16 heads, head dim 72, bf16) at release image
sizes, compiled for named TPU topologies from a CPU host: which backend `Runtime.attention="auto"` should take.

One ViT attention layer (`ming_jax.models.vision.segment_attention`, q / k / v [N, 16, 72] after rotary), forward and
forward + backward, three ways:
  xla_grouped     "xla": one dense `attend` per run of equal-length (image, frame) segments ([G, L, 16, 72] batches,
                  float32 logits [G, 16, L, L] in HBM), what the tower ran before the dispatcher;
  splash_grouped  "auto" lowered for TPU: the same [G, L] batches through `api.attention(pad_head_dim=True)`: q, k, v
                  zero-padded to 128 lanes, L padded to the tile, the splash kernels;
  splash_masked   the "masked" layout on "auto": one [1, N] splash call with per-(image, frame) segment ids (the
                  static mask is full, so every tile of N x N is visited: only for the multi-segment cases).

Nothing is timed (no TPU here): numbers are the TPU compiler's cost / memory analysis for one chip; XLA cannot see
inside a Mosaic kernel, so the splash rows add the kernel work MODELLED from its block grid (`splash_model`, the model
of `benchmarks/tpu_attention.py` for non-causal MHA, at the padded head dim 128). "roofline ms" = max(flops / peak bf16, bytes / HBM bandwidth).

  JAX_PLATFORMS=cpu python -m benchmarks.tpu_vit_attention --topologies=v5p:2x2x1,v6e:2x2
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.tpu_aot import chip_info, one_chip_args, write_results
from ming_jax.config.vision import VisionConfig
from ming_jax.models.vision import segment_attention, vision_layout
from ming_jax.pallas.attention import kernel as splash_kernel
from ming_jax.pallas.attention import metadata

_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5p:2x2x1", "v6e:2x2"], "TPU topologies to compile for.")
_CASES = flags.DEFINE_list("cases", ["image_1024", "image_512", "video_4x448", "mixed"], "Grids (see CASES).")
_IMPLS = flags.DEFINE_list("impls", ["xla_grouped", "splash_grouped", "splash_masked"], "Implementations.")
_OPS = flags.DEFINE_list("ops", ["fwd", "fwd_bwd"], "fwd: attention; fwd_bwd: gradients of q, k, v.")
_JSON = flags.DEFINE_string("json", "", "JSON results path (default: <tmpdir>/ming_jax_tpu_vit_attention.json).")

CASES = {  # (t, h, w) in 16-pixel patches, as the image processor emits them
    "image_1024": ((1, 64, 64),),  # one 1024 x 1024 image: 4096 patches, one segment
    "image_512": ((1, 32, 32),),  # one 512 x 512 image: 1024 patches
    "video_4x448": ((4, 28, 28),),  # a 4-frame (temporal patch) 448 x 448 video: 4 segments of 784
    "mixed": ((1, 64, 64), (1, 32, 48), (4, 28, 28)),  # a 1024^2 image, a 512 x 768 image and that video
}
_LANES, _SUBLANES = 128, 8


def _visited_tiles(kern) -> tuple[int, int, int]:
    def count(info):
        return int(np.count_nonzero(np.asarray(info.block_mask))) // np.asarray(info.block_mask).shape[0]

    return count(kern.fwd_mask_info), count(kern.dq_mask_info), count(kern.dkv_mask_info)


def splash_model(h: int, hd: int, t: int, blocks, kern, train: bool, e: int = 2) -> tuple[float, float]:
    """(flops, HBM bytes) of the splash kernels for one batch row of MHA (as `benchmarks/tpu_attention.py`)."""
    fwd_tiles, dq_tiles, dkv_tiles = _visited_tiles(kern)
    row = t * hd * e
    flops = h * fwd_tiles * 2 * (2 * blocks.block_q * blocks.block_kv * hd)
    nbytes = h * (2 * row + fwd_tiles * 2 * blocks.block_kv * hd * e)
    if not train:
        return flops, nbytes
    nbytes += h * t * _LANES * 4
    flops += h * dq_tiles * 3 * (2 * blocks.block_q_dq * blocks.block_kv_dq * hd)
    nbytes += h * (3 * row + 2 * t * 4 + dq_tiles * 2 * blocks.block_kv_dq * hd * e)
    flops += h * dkv_tiles * 4 * (2 * blocks.block_q_dkv * blocks.block_kv_dkv * hd)
    nbytes += (h * 2 * t * hd * e + h * 2 * t * hd * e
               + h * dkv_tiles * (2 * blocks.block_q_dkv * hd * e + 2 * _SUBLANES * blocks.block_q_dkv * 4))
    return flops, nbytes


def _program(layout, impl: str, train: bool):
    layer = "masked" if impl == "splash_masked" else "grouped"
    backend = "xla" if impl == "xla_grouped" else "auto"

    def fwd(q, k, v):
        return segment_attention(q, k, v, layout, layer, backend)

    if not train:
        return fwd

    def step(q, k, v, d_out):
        def loss(q, k, v):
            return jnp.sum(fwd(q, k, v).astype(jnp.float32) * d_out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return step


def _kernel_model(layout, impl: str, heads: int, train: bool) -> tuple[float, float]:
    """Modelled (flops, HBM bytes) of the splash kernels of one layer (head dim padded to 128)."""
    if impl == "xla_grouped":
        return 0.0, 0.0
    rows = [(layout.num_patches, 1)] if impl == "splash_masked" else list(layout.groups)
    flops = nbytes = 0.0
    for length, count in rows:
        blocks = splash_kernel.get_default(length, length)
        t_pad, _ = metadata.padded_lengths(length, length, blocks.q_multiple, blocks.kv_multiple, False)
        kern = splash_kernel.make_kernel(heads, t_pad, t_pad, False, blocks)
        f, b = splash_model(heads, _LANES, t_pad, blocks, kern, train)
        flops, nbytes = flops + count * f, nbytes + count * b
    return flops, nbytes


def compile_one(topology: str, case: str, impl: str, op: str, cfg: VisionConfig) -> dict:
    grid = CASES[case]
    layout = vision_layout(grid, cfg.spatial_merge_size, cfg.position_grid_side)
    h, hd, n = cfg.num_heads, cfg.head_dim, layout.num_patches
    train = op == "fwd_bwd"
    shapes = [((n, h, hd), jnp.bfloat16)] * (4 if train else 3)
    pairs = sum(count * length * length for length, count in layout.groups) * h
    useful = pairs * 2 * hd * (6 if train else 2)  # algorithmic flops at the true head dim
    row = dict(topology=topology, case=case, grid=[list(g) for g in grid], patches=n, impl=impl, op=op,
               useful_flops=useful)
    t0 = time.time()
    try:
        lowered = jax.jit(_program(layout, impl, train)).lower(*one_chip_args(topology, shapes))
        row["mosaic_kernels"] = lowered.as_text().count("custom_call @tpu_custom_call")
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001  a program that does not fit is a result
        row.update(compile_s=round(time.time() - t0, 1), error=f"{type(err).__name__}: {str(err)[:300]}")
        return row
    row["compile_s"] = round(time.time() - t0, 1)
    cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
    xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    k_flops, k_bytes = _kernel_model(layout, impl, h, train)
    info = chip_info(topology)
    peak = info.bf16_ops_per_second * info.num_cores
    bw = info.mem_bw_bytes_per_second * info.num_cores
    flops, nbytes = xla_flops + k_flops, xla_bytes + k_bytes
    row.update(xla_flops=xla_flops, xla_bytes=xla_bytes, kernel_flops_model=k_flops, kernel_bytes_model=k_bytes,
               flops=flops, bytes_accessed=nbytes, temp_bytes=int(mem.temp_size_in_bytes),
               roofline_ms=1e3 * max(flops / peak, nbytes / bw))
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'topology':<10} {'case':<12} {'N':>6} {'op':<8} {'impl':<15} {'kern':>4} {'GFLOP':>8} {'useful':>7} "
            f"{'GB acc.':>8} {'temp MiB':>9} {'roofline ms':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        pre = f"{r['topology']:<10} {r['case']:<12} {r['patches']:>6} {r['op']:<8} {r['impl']:<15}"
        if "error" in r:
            lines.append(f"{pre} not compiled: {r['error'][:120]}")
            continue
        lines.append(f"{pre} {r['mosaic_kernels']:>4} {r['flops'] / 1e9:8.1f} {r['useful_flops'] / r['flops']:7.1%} "
                     f"{r['bytes_accessed'] / 1e9:8.3f} {r['temp_bytes'] / 2**20:9.1f} {r['roofline_ms']:11.3f}")
    return "\n".join(lines)


def main(argv):
    del argv
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg = VisionConfig.ming_flash_omni_2()
    rows = []
    for case in _CASES.value:
        for impl in _IMPLS.value:
            if impl == "splash_masked" and len(vision_layout(CASES[case], 2, cfg.position_grid_side).groups) == 1 \
                    and sum(t for t, _, _ in CASES[case]) == 1:
                continue  # one segment: masked == grouped
            for op in _OPS.value:
                for topology in _TOPOLOGIES.value:
                    row = compile_one(topology, case, impl, op, cfg)
                    rows.append(row)
                    print(f"compiled {topology} {case} {impl} {op} in {row['compile_s']} s", flush=True)
    print(format_table(rows))
    write_results(_JSON.value, "ming_jax_tpu_vit_attention.json", rows,
                  note="static AOT cost / memory analysis of one ViT attention layer for one chip, plus a "
                       "block-grid model of the splash kernels; run time not measured (no TPU)")


if __name__ == "__main__":
    app.run(main)

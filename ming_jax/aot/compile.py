"""Ahead-of-time compile of the train step, the prefill and the generation loop for a TPU topology, from abstract
arrays only.

No weights are allocated: the model is `nnx.eval_shape`d, every argument is a `jax.ShapeDtypeStruct` carrying its
NamedSharding on a mesh of the topology's devices (`jax.experimental.topologies`, which works from a CPU host with
libtpu installed), and the real TPU compiler produces the per-chip memory plan. What "fits" means here: argument +
output + temporaries + code - donated (aliased) bytes <= the chip's HBM (Google's spec sheet: v5p 95 GB, v6e 32 GB).
XLA's plan is static; fragmentation and the runtime's own reservations are not in it, so keep some headroom.

  python -m ming_jax.aot --preset ming-flash-omni-2.0 --topology v5p:4x4x4 --mesh fsdp=16,expert=4 --step train
  python -m ming_jax.aot --topology v6e:8x8 --mesh expert=64 --rules ep_tp --step decode --batch 256 --seq 8192

Train step: bf16 parameters, optax AdamW with float32 first and second moments (the update is computed in float32
and rounded into the bf16 parameters), per-layer remat, token cross-entropy in sequence chunks (no [B, T, V]
logits); parameters and optimizer state donated. Prefill: a [batch, seq] prompt into a fresh cache. Decode: the
generation `while_loop` users run (`ming_jax.gen.text`), `--new_tokens` steps over a donated cache of `--seq`
slots; decode_step: one token of it. All run the MoE layers expert-parallel when the mesh has
an expert axis > 1 (ragged all-to-all and the compiled Pallas grouped matmuls on TPU).

Image generation (`lower_image_step` / `compile_image_step`): one Z-Image DiT forward, the sampler's scan, the VAE
decode. Speech generation (`lower_speech_step` / `compile_speech_step`): one talker step (flow sampler with CFG,
aggregator, stop head, one LM position against the KV cache), the talker's whole jitted generation program (prefill
and `lax.while_loop`, `ming_jax.gen.speech`), the AudioVAE decode to 44.1 kHz waveforms; a batch of utterances split
over the batch axes, weights replicated by default (`SPEECH_RULES`). The omni model's multimodal prefill (vision and
audio towers, their rows into the embeddings, the LLM prefill) is `ming_jax.aot.omni`.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ming_jax import lora as lora_lib, quant, sharding
from ming_jax.aot.memory_plan import MemoryPlan
from ming_jax.aot.topology import HBM_BYTES, chip_of, topology_devices
from ming_jax.config.audio_vae import AudioVAEConfig
from ming_jax.config.dit import DiTConfig
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.config.talker import TalkerConfig
from ming_jax.config.vae import VAEConfig
from ming_jax.gen import image as image_lib, speech as speech_lib, text
from ming_jax.gen.sampling import SamplingConfig
from ming_jax.gen.steps import make_decode_step, make_prefill
from ming_jax.layers.kv_cache import KVCache, kv_cache_shardings
from ming_jax.models import llm as model_lib
from ming_jax.models.image_gen.dit import ZImageDiT, ceil_to
from ming_jax.models.image_gen import vae as vae_lib
from ming_jax.models.image_gen.vae import AutoencoderKL
from ming_jax.models.qwen2 import Qwen2Cache
from ming_jax.models.talker import audio_vae as audio_vae_lib, talker as tk
from ming_jax.models.talker.audio_vae import AudioVAEDecoder
from ming_jax.models.talker.talker import SamplerArgs
from ming_jax.train import step as train_step
from ming_jax.train.config import TrainConfig


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


STEPS = ("train", "prefill", "decode", "decode_step")


def lower_step(cfg: LLMConfig, mesh, rules: sharding.ShardingRules, step: str, *, batch: int, seq: int,
               cache_layout: str = "auto", runtime: Runtime | None = None, new_tokens: int = 256,
               train: TrainConfig | None = None, quantize: "quant.QuantConfig | str | None" = None,
               lora: "lora_lib.LoraConfig | None" = None):
    """The jitted step lowered for `mesh` from abstract, sharded arguments.

    step: "train" (`ming_jax.train.step`, seq = training length); "prefill" (`ming_jax.gen.steps.prefill` of a
    [batch, seq] prompt into a cache of seq + new_tokens slots); "decode" (the generation program users run:
    `ming_jax.gen.text`'s `lax.while_loop` of `new_tokens` steps with its token / position buffers, over a donated
    cache of seq slots); "decode_step" (one token against a cache of seq slots: the step body alone).
    cache_layout (decode_step): "auto" lets the compiler choose the KV cache's memory layout
    (`compiled.input_formats` then says which; allocate the cache in it, e.g. by jitting `KVCache.create` with
    that format as out_shardings); "default": row-major. With "default" the TPU compiler gives the layer loop's
    carried cache another tiled layout and copies the MoE stacks in and out of the loop (one cache-sized
    temporary). runtime: dtypes, kernels, remat, expert parallelism (default: `Runtime.bf16(remat=True)`, how the
    release trains). train: the train step's TrainConfig (default `TrainConfig()`: AdamW, clipping, bias balancing).
    quantize ("int8", "fp8", "fp8:128"; not for "train"): the LLM's projections as int8 / fp8 weights with float32
    scales (`ming_jax.quant`), the expert stacks read by the quantized Pallas grouped matmuls; for "train" only
    with `lora` (QLoRA). lora: LoRA adapters on the (float or quantized) base (`ming_jax.lora`); the train step then
    optimises the adapters alone (default TrainConfig: bias balancing off, the biases being part of the base)."""
    runtime = Runtime.bf16(remat=True) if runtime is None else runtime
    abstract = model_lib.create_abstract(cfg, runtime)
    qcfg = quant.QuantConfig.parse(quantize)
    if qcfg is not None:
        if step == "train" and lora is None:
            raise ValueError("step=train with quantized weights: quantized weights are frozen (QLoRA needs adapters)")
        quant.quantize_model(abstract, qcfg)
    if lora is not None:
        lora_lib.add_lora(abstract, lora)
    graphdef, params = nnx.split(abstract)
    p_shard = sharding.state_shardings(abstract, mesh, rules)
    a_params = _abstract(params, p_shard)
    replicated = NamedSharding(mesh, PartitionSpec())
    tokens = lambda shape: jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.int32, sharding=sharding.named_sharding(mesh, rules, ("batch",) + (None,) * (len(shape) - 1),
                                                           shape, what=f"batch of shape {shape}"))
    if step == "train":  # outside the mesh context: eager constants there would go to the (absent) TPU devices
        train = (TrainConfig(bias_update_rate=0.0) if lora is not None else TrainConfig()) if train is None else train
        t_graphdef, a_state, tx = train_step.abstract_state(abstract, train)
        s_shard = train_step.state_shardings(a_state, tx, mesh, rules)
        a_state = _abstract(a_state, s_shard)
        b_floats = lambda shape: _batched(mesh, rules, shape, jnp.float32)  # noqa: E731
        a_batch = dict(input_ids=tokens((batch, seq)), targets=tokens((batch, seq)),
                       loss_mask=b_floats((batch, seq)), segment_ids=tokens((batch, seq)),
                       positions=tokens((batch, seq)))
    with sharding.use_mesh(mesh, rules):
        if step == "train":  # exactly the step `python -m ming_jax.train` runs; the state donated
            fn = jax.jit(train_step.make_train_step(t_graphdef, train, tx), out_shardings=(s_shard, replicated),
                         donate_argnums=(0,))
            return fn.lower(a_state, a_batch)
        if step == "decode_step":
            cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, seq, runtime.dtype))
            c_shard = kv_cache_shardings(mesh, rules, cache)
            if cache_layout == "auto":  # the compiler picks the cache's layout (in = out, so the donation holds)
                from jax.experimental.layout import Format, Layout

                c_shard = jax.tree.map(lambda s: Format(Layout.AUTO, s), c_shard)
            t = tokens((batch,))
            fn = jax.jit(make_decode_step(graphdef), in_shardings=(p_shard, c_shard, t.sharding, t.sharding),
                         out_shardings=(sharding.named_sharding(mesh, rules, ("batch", "act_vocab")), c_shard),
                         donate_argnums=(1,))
            return fn.lower(a_params, cache, t, t)
        if step == "prefill":
            fn = jax.jit(make_prefill(graphdef, seq + new_tokens))
            return fn.lower(a_params, tokens((batch, seq)), _batched(mesh, rules, (batch, seq), jnp.bool_),
                            jax.ShapeDtypeStruct((3, batch, seq), jnp.int32, sharding=sharding.named_sharding(
                                mesh, rules, (None, "batch", None), (3, batch, seq), what="positions")))
        if step == "decode":
            if new_tokens >= seq:
                raise ValueError(f"decode: the cache of {seq} slots must hold the prompt and {new_tokens} new tokens")
            cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, seq, runtime.dtype))
            cache = _abstract(cache, kv_cache_shardings(mesh, rules, cache))
            logits = jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32, sharding=sharding.named_sharding(
                mesh, rules, ("batch", "act_vocab"), (batch, cfg.vocab_size), what="logits"))
            key = jax.eval_shape(lambda: jax.random.key(0))
            key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
            return text._decode.lower(graphdef, a_params, logits, tokens((batch,)), cache, key,
                                      sampling=SamplingConfig(max_new_tokens=new_tokens), pad_id=0,
                                      return_logits=False)
    raise ValueError(f"step={step!r} (known: {', '.join(STEPS)})")


def _batched(mesh, rules, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named_sharding(
        mesh, rules, ("batch",) + (None,) * (len(shape) - 1), shape, what=f"batch of shape {shape}"))


def compile_step(cfg: LLMConfig, topology: str, mesh_spec: str, rules_name: str, step: str, *, batch: int, seq: int,
                 num_slices: int = 1, devices: Sequence | None = None, cache_layout: str = "auto",
                 runtime: Runtime | None = None, new_tokens: int = 256,
                 train: TrainConfig | None = None, quantize: "quant.QuantConfig | str | None" = None,
                 lora: "lora_lib.LoraConfig | None" = None) -> tuple[MemoryPlan, object]:
    """Compile one step for a topology; -> (its memory plan, the compiled executable)."""
    runtime = Runtime.bf16(remat=True) if runtime is None else runtime
    devices = topology_devices(topology, num_slices) if devices is None else devices
    mesh = sharding.make_mesh(mesh_spec, devices)
    rules = sharding.ShardingRules.preset(rules_name)
    t0 = time.perf_counter()
    compiled = lower_step(cfg, mesh, rules, step, batch=batch, seq=seq, cache_layout=cache_layout,
                          runtime=runtime, new_tokens=new_tokens, train=train, quantize=quantize,
                          lora=lora).compile()
    m = compiled.memory_analysis()
    shape = ",".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 chip"
    plan = MemoryPlan(topology + (f" x{num_slices}" if num_slices > 1 else ""), step, shape, rules_name, batch, seq,
                      int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                      int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
                      HBM_BYTES[chip_of(topology)] * 1.0, time.perf_counter() - t0,
                      note=(f"cache layout {cache_layout}" if step == "decode_step" else
                            f"{new_tokens} new tokens" if step in ("decode", "prefill") else ""),
                      attention=runtime.attention, capacity_factor=runtime.capacity_factor or 0.0,
                      flops=_flops(compiled), weights=str(quant.QuantConfig.parse(quantize) or runtime.param_dtype)
                      + (f" + LoRA r={lora.rank} ({','.join(lora.targets)})" if lora is not None else ""),
                      bytes_accessed=_bytes_accessed(compiled))
    return plan, compiled


def train_state_bytes(cfg: LLMConfig, mesh, rules: sharding.ShardingRules, *, runtime: Runtime | None = None,
                      train: TrainConfig | None = None, quantize: "quant.QuantConfig | str | None" = None,
                      lora: "lora_lib.LoraConfig | None" = None) -> dict[str, int]:
    """Per-chip bytes of the train state's parts as the train step holds them on `mesh` (the largest shard of
    each leaf, summed): params (trained), frozen (everything else the model holds), opt_state (AdamW moments and
    counters), master (the float32 copy of low-precision trained parameters); and trained_count (elements)."""
    runtime = Runtime.bf16(remat=True) if runtime is None else runtime
    abstract = model_lib.create_abstract(cfg, runtime)
    if quantize:
        quant.quantize_model(abstract, quantize)
    if lora is not None:
        lora_lib.add_lora(abstract, lora)
    train = (TrainConfig(bias_update_rate=0.0) if lora is not None else TrainConfig()) if train is None else train
    _, a_state, tx = train_step.abstract_state(abstract, train)
    s_shard = train_step.state_shardings(a_state, tx, mesh, rules)

    def per_chip(tree, shards) -> int:
        return sum(math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shards)))

    out = {name: per_chip(getattr(a_state, name), getattr(s_shard, name))
           for name in ("params", "frozen", "opt_state") if getattr(a_state, name) is not None}
    out["master"] = 0 if a_state.master is None else per_chip(a_state.master, s_shard.master)
    out["trained_count"] = sum(math.prod(a.shape) for a in jax.tree.leaves(a_state.params))
    return out


def _param_count(cfg: LLMConfig) -> int:
    return model_lib.param_count(model_lib.create_abstract(cfg))


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001 - informational only
        return "?"


# --- image generation ------------------------------------------------------------------------------------------------

IMAGE_STEPS = ("dit", "denoise", "vae_decode")
VAE_SCALE = 8  # the Flux VAE's downsampling (2 ** (levels - 1)); latents are image_size / 8 on a side

# Rules the image steps may use besides `sharding.PRESETS`. "fsdp_seq": ZeRO-3 weights as `fsdp`, the activations'
# token axis split over (fsdp, expert) instead of the batch (a CFG batch of 2 does not split over more chips than 2;
# 4352 = 17 x 256 DiT tokens split up to 256 ways); the batch goes to `data` only.
IMAGE_RULES = {"fsdp_seq": lambda: sharding.ShardingRules.preset("fsdp", batch="data", seq=("fsdp", "expert"))}


def image_rules(name: str) -> sharding.ShardingRules:
    """A `sharding.PRESETS` name or one of `IMAGE_RULES`."""
    return IMAGE_RULES[name]() if name in IMAGE_RULES else sharding.ShardingRules.preset(name)


def image_latent_side(image_size: int) -> int:
    """Latent side of a square image: 1024 -> 128 (the pipeline's `latent_shape`, VAE scale 8)."""
    return image_lib.latent_shape(1, 16, image_size, image_size, VAE_SCALE)[2]


def dit_tokens(cfg: DiTConfig, image_size: int, caption_len: int) -> int:
    """Tokens of the DiT's joint sequence: image tokens (latent / patch, squared, padded to the sequence multiple)
    plus the caption slots (padded the same way): 1024 px, caption 256 -> 4096 + 256 = 4352."""
    p = cfg.all_patch_size[0]
    n = (image_latent_side(image_size) // p) ** 2
    return ceil_to(n, cfg.seq_multiple) + ceil_to(caption_len, cfg.seq_multiple)


def _abstract_module(make, mesh, rules):
    """(graphdef, abstract state carrying its shardings, those shardings) of `make()`, never materialised."""
    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    shard = sharding.state_shardings(abstract, mesh, rules)
    return graphdef, _abstract(state, shard), shard


def _split_batch(mesh, rules, shape, dtype):
    """Dim 0 over the `batch` rule's axes when it divides evenly (else replicated: a CFG pair on 4 chips)."""
    axes = tuple(a for a in rules.mesh_axes("batch") if mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    spec = PartitionSpec(axes if len(axes) > 1 else axes[0]) if axes and shape[0] % n == 0 else PartitionSpec()
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _fresh_programs(graphdef, rows_cfg: bool):
    """The three image programs as functions made for this lowering only.

    jax caches a function's trace by its identity, the argument types and the mesh, not by the sharding rules that
    `constrain` and the splash `shard_map` read while tracing: lowering the module-level jits
    (`ming_jax.gen.image._denoise` / `_decode`) a second time with other rules on the same mesh would silently
    reuse the first trace. Fresh closures trace anew; their bodies are the sampler's and the decoder's own."""

    def dit(state, x, t, caption):  # `ming_jax.gen.image._denoise_body`'s DiT call: no caption lengths, no reference
        return nnx.merge(graphdef, state)(x, t, caption, None, None)

    def denoise(state, caption, negative, latents, sigmas, times, guidance):
        return image_lib._denoise_body(graphdef, state, caption, negative, latents, sigmas, times, guidance, None,
                                       cfg=rows_cfg, record=False)

    def vae_decode(state, latents):  # `ming_jax.gen.image._decode` with the VAE's jitted NCHW wrapper inlined
        model = nnx.merge(graphdef, state)
        z = jnp.transpose(vae_lib.to_decoder_input(model.cfg, latents), (0, 2, 3, 1))  # NCHW -> NHWC
        return vae_lib.postprocess(jnp.transpose(model.decode_nhwc(z), (0, 3, 1, 2)))

    return dit, denoise, vae_decode


def lower_image_step(step: str, mesh, rules: sharding.ShardingRules, *, dit: DiTConfig | None = None,
                     vae: VAEConfig | None = None, runtime: Runtime | None = None, batch: int = 1,
                     image_size: int = 1024, caption_len: int = 256, steps: int = 30, cfg: bool = True):
    """An image-generation program lowered for `mesh` from abstract, sharded arguments.

    step: "dit" (one DiT forward: latents [R, C, 1, h, w], model times [R], caption [R, caption_len, Dc], R = 2 x
    batch with CFG, in the compute dtype, as `denoise` feeds it); "denoise" (the body of `ming_jax.gen.image._denoise`,
    the sampler users run: a `lax.scan` of `steps` DiT calls on float32 latents [batch, C, h, w], CFG by a batch of
    two, the negative caption an argument of the caption's shape); "vae_decode" (`ming_jax.gen.image.decode_images`:
    float32 latents [batch, L, h, w] -> [batch, 3, image_size, image_size] in [0, 1]). h = w = image_size / 8 (the VAE's
    scale factor for vae_decode). Each call traces fresh functions (`_fresh_programs`), so the rules always apply.
    dit / vae: the configs (default `DiTConfig.z_image()`, `VAEConfig.flux()`); runtime: default
    `Runtime.bf16()` (bf16 parameters and compute, attention "auto")."""
    runtime = Runtime.bf16() if runtime is None else runtime
    dt = jnp.dtype(runtime.dtype)
    side = image_latent_side(image_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    if step in ("dit", "denoise"):
        dit = DiTConfig.z_image() if dit is None else dit
        c = dit.in_channels
        graphdef, a_state, _ = _abstract_module(lambda: ZImageDiT(dit, runtime, rngs=nnx.Rngs(0)), mesh, rules)
        dit_fn, denoise_fn, _ = _fresh_programs(graphdef, cfg)
        with sharding.use_mesh(mesh, rules):
            if step == "dit":
                rows = 2 * batch if cfg else batch
                x = _split_batch(mesh, rules, (rows, c, 1, side, side), dt)
                t = _split_batch(mesh, rules, (rows,), jnp.float32)
                caption = _split_batch(mesh, rules, (rows, caption_len, dit.cap_feat_dim), dt)
                return jax.jit(dit_fn).lower(a_state, x, t, caption)
            caption = _split_batch(mesh, rules, (batch, caption_len, dit.cap_feat_dim), dt)
            latents = _split_batch(mesh, rules, (batch, c, side, side), jnp.float32)
            vec = lambda n: jax.ShapeDtypeStruct((n,), jnp.float32, sharding=replicated)  # noqa: E731
            guidance = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
            return jax.jit(denoise_fn).lower(a_state, caption, caption, latents, vec(steps + 1), vec(steps), guidance)
    if step == "vae_decode":
        vae = VAEConfig.flux() if vae is None else vae
        graphdef, a_state, _ = _abstract_module(lambda: AutoencoderKL(vae, runtime, rngs=nnx.Rngs(0)), mesh, rules)
        side = image_size // vae.scale_factor
        latents = _split_batch(mesh, rules, (batch, vae.latent_channels, side, side), jnp.float32)
        vae_lib.check_latents(vae, latents.shape)
        _, _, decode_fn = _fresh_programs(graphdef, cfg)
        with sharding.use_mesh(mesh, rules):
            return jax.jit(decode_fn).lower(a_state, latents)
    raise ValueError(f"image step={step!r} (known: {', '.join(IMAGE_STEPS)})")


def compile_image_step(step: str, topology: str, mesh_spec: str, rules_name: str, *, dit: DiTConfig | None = None,
                       vae: VAEConfig | None = None, runtime: Runtime | None = None, batch: int = 1,
                       image_size: int = 1024, caption_len: int = 256, steps: int = 30, cfg: bool = True,
                       num_slices: int = 1, devices: Sequence | None = None) -> tuple[MemoryPlan, object]:
    """Compile one image-generation step for a topology; -> (its memory plan, the compiled executable).

    The plan's `batch` is the images, `seq` the attention's sequence (DiT: image + caption tokens; VAE: the
    mid-block's h x w pixels); `note` says the image size, the DiT rows and the caption length."""
    runtime = Runtime.bf16() if runtime is None else runtime
    devices = topology_devices(topology, num_slices) if devices is None else devices
    mesh = sharding.make_mesh(mesh_spec, devices)
    rules = image_rules(rules_name)
    t0 = time.perf_counter()
    compiled = lower_image_step(step, mesh, rules, dit=dit, vae=vae, runtime=runtime, batch=batch,
                                image_size=image_size, caption_len=caption_len, steps=steps, cfg=cfg).compile()
    m = compiled.memory_analysis()
    shape = ",".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 chip"
    if step == "vae_decode":
        v = VAEConfig.flux() if vae is None else vae
        side = image_size // v.scale_factor
        seq = side * side
        note = f"{image_size}px, latents [{batch}, {v.latent_channels}, {side}, {side}]"
    else:
        d = DiTConfig.z_image() if dit is None else dit
        seq = dit_tokens(d, image_size, caption_len)
        rows = 2 * batch if cfg else batch
        note = (f"{image_size}px, DiT batch {rows}{' (CFG)' if cfg else ''}, caption {caption_len}"
                + (f", {steps} steps" if step == "denoise" else ""))
    plan = MemoryPlan(topology + (f" x{num_slices}" if num_slices > 1 else ""), step, shape, rules_name, batch, seq,
                      int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                      int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
                      HBM_BYTES[chip_of(topology)] * 1.0, time.perf_counter() - t0, note=note,
                      attention=runtime.attention)
    return plan, compiled


def mosaic_kernels(compiled) -> int:
    """Mosaic (Pallas TPU) custom calls in a compiled program's HLO: the splash kernels of the attention."""
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def dit_param_count(cfg: DiTConfig) -> int:
    """Parameters of the DiT, counted abstractly (`DiTConfig.z_image()`: 6,154,908,736)."""
    abstract = nnx.eval_shape(lambda: ZImageDiT(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def vae_param_count(cfg: VAEConfig, part: str = "all") -> int:
    """Parameters of the VAE ("all"), or of its "decoder" (+ post_quant_conv): what `vae_decode` reads (jit drops
    the unused encoder from the compiled program's arguments)."""
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    keep = lambda p: part == "all" or p[0] in ("decoder", "post_quant_conv")  # noqa: E731
    return sum(math.prod(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)) if keep(p))


# --- speech generation -----------------------------------------------------------------------------------------------

SPEECH_STEPS = ("talker_step", "talker_generate", "audio_vae_decode")
SPEECH_BATCH = 64  # utterances per call (the default of `--batch` for these steps)
SPEECH_MAX_LEN = 2048  # talker_step's KV cache: the release's StaticCache (`GenerateConfig.max_cache_len`)
SPEECH_PROMPT = 128  # talker_generate: prompt positions (a multiple of `gen.speech`'s default bucket, 64)
SPEECH_LATENTS = 250  # audio_vae_decode: latents per utterance (20 s at 12.5 latents / s)
TALKER_PRESETS = {"ming-flash-omni-2.0": TalkerConfig.ming_flash_omni_2, "tiny": TalkerConfig.tiny}
AUDIO_VAE_PRESETS = {"ming-flash-omni-2.0": AudioVAEConfig.ming_flash_omni_2, "tiny": AudioVAEConfig.tiny}

# Rules the speech steps may use besides `sharding.PRESETS`. "replicated" (their default): every weight on every chip
# (the talker is 0.7B parameters, 1.4 GB in bf16; the VAE decoder 0.36B), the utterance batch split over data x fsdp x
# expert. A decode step runs the LM once and the flow DiT 10 times (CFG batch of 2B) on a few tokens per utterance:
# with ZeRO-sharded weights (`fsdp`) every one of those 11 passes would all-gather its weights again each step, for
# 64 x (1 + 37 + 5) tokens of work; replicated weights need no collective at all (rows are independent).
SPEECH_RULES = {"replicated": lambda: sharding.ShardingRules(batch=("data", "fsdp", "expert"))}
_CACHE_KV = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


def speech_rules(name: str) -> sharding.ShardingRules:
    """A `sharding.PRESETS` name or one of `SPEECH_RULES`."""
    return SPEECH_RULES[name]() if name in SPEECH_RULES else sharding.ShardingRules.preset(name)


def _qwen2_cache_shardings(mesh, rules, cache: Qwen2Cache):
    """The talker LM's cache: k / v [L, B, K, S, hd] by (layers, batch, kv_heads, cache_seq, head_dim), valid [B, S]
    by (batch, cache_seq), the write slot replicated."""
    axes = Qwen2Cache(_CACHE_KV, _CACHE_KV, ("batch", "cache_seq"), ())
    return sharding.tree_shardings(cache, axes, mesh, rules, what="talker cache")


def _speech_programs(graphdef, tcfg: TalkerConfig | None, max_steps: int):
    """The three speech programs as functions made for this lowering only (see `_fresh_programs`: jax's trace cache
    does not key on the sharding rules; `ming_jax.gen.speech._generate` is a module-level jit)."""

    def talker_step(state, h_t, history, cache, positions, keys, step, args):
        """One step of `ming_jax.gen.speech._loop`'s while body: the row noise of `step`, the flow sampler (CFG),
        the aggregator, the stop head and the history update (`talker.sample_step`), then the next LM position
        through the cache (`talker.lm_step`)."""
        talker = nnx.merge(graphdef, state)
        y0, sde = speech_lib._row_noise(keys, step, (tcfg.patch_size, tcfg.latent_dim), tcfg.steps)
        out = tk.sample_step(talker, h_t, history, y0, sde, args)
        h_next, cache = tk.lm_step(talker, out.next_embed, positions, cache)
        return out.latents, out.stop_prob, out.history, h_next.astype(jnp.float32), cache

    def talker_generate(state, embeds, lengths, history, caps, min_new, args, keys):
        """`ming_jax.gen.speech._generate`'s body: the prefill and the whole while_loop, noise from row keys."""
        return speech_lib._loop(graphdef, state, embeds, lengths, history, caps, min_new, args, keys, None,
                                max_steps=max_steps, taps=False)

    def audio_vae_decode(state, latents):
        """`ming_jax.models.talker.audio_vae.decode`: latents [B, T, d] -> waveform [B, 1, f T hop] float32."""
        return nnx.merge(graphdef, state).intermediates(latents)["wave"]

    return talker_step, talker_generate, audio_vae_decode


def _sampler_args(mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    return SamplerArgs(scalar, scalar, scalar)


def _row_keys(mesh, rules, batch: int):
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    return _split_batch(mesh, rules, key.shape, key.dtype)


def lower_speech_step(step: str, mesh, rules: sharding.ShardingRules, *, talker: TalkerConfig | None = None,
                      vae: AudioVAEConfig | None = None, runtime: Runtime | None = None, batch: int = SPEECH_BATCH,
                      max_len: int = SPEECH_MAX_LEN, prompt_len: int = SPEECH_PROMPT, max_steps: int | None = None,
                      latents: int = SPEECH_LATENTS):
    """A speech-generation program lowered for `mesh` from abstract, sharded arguments (nothing allocated).

    step: "talker_step" (one autoregressive step for `batch` utterances: h_t [B, H] and the history [B, 32, 64]
    float32, the LM cache of `max_len` slots (donated), rope positions [B], row keys [B], the step index and the
    sampler knobs -> latents [B, 4, 64], stop probabilities [B, 2], the new history, the next h_t and the cache);
    "talker_generate" (the program `ming_jax.gen.speech.generate_speech` runs: prompt embeddings [B, prompt_len, H]
    in the compute dtype, lengths, the initial history, per-row caps, min_new_token, the knobs and row keys -> one
    prefill into a cache of prompt_len + max_steps slots and one `lax.while_loop` of at most `max_steps` steps,
    -> `SpeechOutput`, latents [B, max_steps * 4, 64] float32); "audio_vae_decode" (float32 latents [B, latents, 64]
    -> waveforms [B, 1, 4 x latents x 882 (+1)] float32 at 44.1 kHz; only the decoder is built). Every batched
    argument is split over the `batch` rule's axes when they divide it. talker_step's cache argument has the default
    (row-major) layout: the TPU compiler then gives the layer loop's carried cache its own layout and copies it in
    and out (cache-sized temporaries); talker_generate allocates its cache inside, in the layout the compiler picks.
    talker / vae: default the release presets; runtime: default `Runtime.bf16()`; max_steps: default the talker's
    `generate.max_steps` (1000)."""
    runtime = Runtime.bf16() if runtime is None else runtime
    dt = jnp.dtype(runtime.dtype)
    replicated = NamedSharding(mesh, PartitionSpec())
    if step in ("talker_step", "talker_generate"):
        tcfg = TalkerConfig.ming_flash_omni_2() if talker is None else talker
        steps = tcfg.generate.max_steps if max_steps is None else max_steps
        if steps < 1:
            raise ValueError(f"talker_generate: max_steps={steps} must be >= 1")
        h, hp, c = tcfg.hidden_size, tcfg.history_patch_size, tcfg.latent_dim
        graphdef, a_state, _ = _abstract_module(lambda: tk.Talker(tcfg, runtime, rngs=nnx.Rngs(0)), mesh, rules)
        step_fn, generate_fn, _ = _speech_programs(graphdef, tcfg, steps)
        b32 = lambda *shape: _split_batch(mesh, rules, (batch,) + shape, jnp.float32)  # noqa: E731
        i32 = _split_batch(mesh, rules, (batch,), jnp.int32)
        with sharding.use_mesh(mesh, rules):
            if step == "talker_step":
                cache = jax.eval_shape(lambda: Qwen2Cache.create(tcfg.llm, batch, max_len, runtime.dtype))
                c_shard = _qwen2_cache_shardings(mesh, rules, cache)
                step_i = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
                fn = jax.jit(step_fn, donate_argnums=(3,))
                return fn.lower(a_state, b32(h), b32(hp, c), _abstract(cache, c_shard), i32,
                                _row_keys(mesh, rules, batch), step_i, _sampler_args(mesh))
            embeds = _split_batch(mesh, rules, (batch, prompt_len, h), dt)
            min_new = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
            return jax.jit(generate_fn).lower(a_state, embeds, i32, b32(hp, c), i32, min_new, _sampler_args(mesh),
                                              _row_keys(mesh, rules, batch))
    if step == "audio_vae_decode":
        vcfg = AudioVAEConfig.ming_flash_omni_2() if vae is None else vae
        graphdef, a_state, _ = _abstract_module(lambda: AudioVAEDecoder(vcfg, runtime, rngs=nnx.Rngs(0)), mesh,
                                                rules)
        lat = _split_batch(mesh, rules, (batch, latents, vcfg.decoder.latent_dim), jnp.float32)
        audio_vae_lib.check_latents(vcfg, lat.shape)
        _, _, decode_fn = _speech_programs(graphdef, None, 0)
        with sharding.use_mesh(mesh, rules):
            return jax.jit(decode_fn).lower(a_state, lat)
    raise ValueError(f"speech step={step!r} (known: {', '.join(SPEECH_STEPS)})")


def _bytes_accessed(compiled) -> float:
    """XLA's "bytes accessed" of a compiled program (per chip; a while / scan body counted once; a Pallas kernel as
    its CostEstimate says)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - informational only
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("bytes accessed", 0.0))


def _flops(compiled) -> float:
    """XLA's flop count of a compiled program (its partitioned, per-chip module; a while / scan body counted once)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - informational only
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def compile_speech_step(step: str, topology: str, mesh_spec: str, rules_name: str, *,
                        talker: TalkerConfig | None = None, vae: AudioVAEConfig | None = None,
                        runtime: Runtime | None = None, batch: int = SPEECH_BATCH, max_len: int = SPEECH_MAX_LEN,
                        prompt_len: int = SPEECH_PROMPT, max_steps: int | None = None, latents: int = SPEECH_LATENTS,
                        num_slices: int = 1, devices: Sequence | None = None) -> tuple[MemoryPlan, object]:
    """Compile one speech-generation step for a topology; -> (its memory plan, the compiled executable).

    The plan's `batch` is the utterances, `seq` the LM's cache slots (talker_step: max_len; talker_generate:
    prompt_len + max_steps) or the VAE backbone's frames (4 x latents); `flops` XLA's cost analysis; `note` the
    shapes."""
    runtime = Runtime.bf16() if runtime is None else runtime
    devices = topology_devices(topology, num_slices) if devices is None else devices
    mesh = sharding.make_mesh(mesh_spec, devices)
    rules = speech_rules(rules_name)
    t0 = time.perf_counter()
    compiled = lower_speech_step(step, mesh, rules, talker=talker, vae=vae, runtime=runtime, batch=batch,
                                 max_len=max_len, prompt_len=prompt_len, max_steps=max_steps,
                                 latents=latents).compile()
    m = compiled.memory_analysis()
    shape = ",".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 chip"
    if step == "audio_vae_decode":
        v = AudioVAEConfig.ming_flash_omni_2() if vae is None else vae
        seq = v.frames_per_latent * latents
        note = f"{batch} x {latents} latents -> {seq} frames, {seq * v.decoder.hop} samples at {v.sample_rate} Hz"
    else:
        t = TalkerConfig.ming_flash_omni_2() if talker is None else talker
        steps = t.generate.max_steps if max_steps is None else max_steps
        if step == "talker_step":
            seq = max_len
            note = f"cache {max_len} slots, {t.steps} Euler steps (CFG batch {2 * batch})"
        else:
            seq = prompt_len + steps
            note = f"prompt {prompt_len}, up to {steps} steps ({steps * t.patch_size} latents), cache {seq} slots"
    plan = MemoryPlan(topology + (f" x{num_slices}" if num_slices > 1 else ""), step, shape, rules_name, batch, seq,
                      int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                      int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
                      HBM_BYTES[chip_of(topology)] * 1.0, time.perf_counter() - t0, note=note,
                      attention=runtime.attention, flops=_flops(compiled))
    return plan, compiled


def talker_param_count(cfg: TalkerConfig, part: str = "all") -> int:
    """Parameters of the talker ("all"), or those one step reads ("step": all but the LM's token embedding table,
    which only the prompt front end reads; jit drops it from the step's arguments). The release preset: 699,065,794
    in all."""
    abstract = tk.create_abstract(cfg)
    keep = lambda p: part == "all" or p[:2] != ("llm", "embed")  # noqa: E731
    return sum(math.prod(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)) if keep(p))


def audio_vae_decoder_param_count(cfg: AudioVAEConfig) -> int:
    """Parameters of the AudioVAE decoder (fc1, the Qwen2 backbone with its unused 1-row token table, the iSTFT
    head and its stored window): what audio_vae_decode reads."""
    abstract = nnx.eval_shape(lambda: AudioVAEDecoder(cfg, Runtime(), rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))

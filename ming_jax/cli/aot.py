"""AOT memory plans CLI: compile the train step, the prefill or the generation loop for a TPU topology from any
host (libtpu needed).

    python -m ming_jax.aot --preset ming-flash-omni-2.0 --topology v5p:4x4x4 --mesh fsdp=16,expert=4 --step train
    python -m ming_jax.aot --topology v6e:8x8 --mesh expert=64 --rules ep_tp --step decode --batch 256 --seq 8192
    python -m ming_jax.aot --table plans.json       # render earlier --json results as a markdown table
    python -m ming_jax.aot --step dit --topology v5p:2x2x1 --mesh fsdp=4 --rules fsdp    # image generation:
    python -m ming_jax.aot --step vae_decode --topology v6e:2x2 --mesh fsdp=4 --rules fsdp   # dit / denoise / vae
    python -m ming_jax.aot --step talker_step --topology v5p:2x2x1 --mesh fsdp=4   # speech generation: talker_step /
    python -m ming_jax.aot --step audio_vae_decode --topology v5p:4x4x4 --mesh fsdp=64  # talker_generate / vae
    python -m ming_jax.aot --step omni_prefill --topology v5p:4x4x4 --mesh fsdp=16,expert=4 --images 1 \
        --image_size 1024 --audio_seconds 30       # the multimodal prefill: towers + scatter + LLM prefill

Speech steps default to 64 utterances and to the `replicated` rules (weights on every chip, utterances split over
data x fsdp x expert) when --rules is not given. omni_prefill defaults to one prompt per chip, the LLM under --rules
and the towers' weights under the same rules (--tower_rules replicated: on every chip).

All logic lives in `ming_jax.aot`; this file parses flags and prints.
"""

from __future__ import annotations

import dataclasses
import json

import jax
from absl import app, flags

from ming_jax import cli, sharding
from ming_jax.aot import compile as aot, omni as aot_omni
from ming_jax.aot.compile import (IMAGE_RULES, IMAGE_STEPS, SPEECH_RULES, SPEECH_STEPS, STEPS, _libtpu_version,
                                  _param_count, compile_step, train_state_bytes)
from ming_jax.aot.memory_plan import MemoryPlan
from ming_jax.aot.topology import topology_devices
from ming_jax.config import dit as dit_config, vae as vae_config
from ming_jax.config.llm import PRESETS
from ming_jax.config.runtime import Runtime
from ming_jax.lora import LoraConfig
from ming_jax.quant import QuantConfig


def main(argv):
    del argv
    f = flags.FLAGS
    if f.table:  # render earlier --json results, compile nothing
        print(MemoryPlan.MARKDOWN_HEADER)
        for path in f.table:
            for plan in MemoryPlan.load(path):
                print(plan.markdown())
        return 0
    if f.step in aot_omni.OMNI_STEPS:
        return _omni_main(f)
    for name in ("omni_preset", "images", "video_frames", "video_size", "audio_seconds", "tower_rules"):
        if f[name].present:
            raise app.UsageError(f"--{name} is for --step omni_prefill only")
    if f.step in SPEECH_STEPS:
        return _speech_main(f)
    if f.rules in SPEECH_RULES:
        raise app.UsageError(f"--rules {f.rules} is for the speech steps ({', '.join(SPEECH_STEPS)}) only")
    if f.step in IMAGE_STEPS:
        return _image_main(f)
    if f.rules in IMAGE_RULES:
        raise app.UsageError(f"--rules {f.rules} is for the image steps ({', '.join(IMAGE_STEPS)}) only")
    cfg = PRESETS[f.preset](**({"num_layers": f.layers} if f.layers else {}))
    runtime = Runtime(dtype=f.dtype, param_dtype=f.dtype, remat=True, attention=f.attention_impl,
                      capacity_factor=f.capacity_factor or None)
    devices = topology_devices(f.topology, f.num_slices)
    n = len(devices)
    batch = f.batch or (n if f.step in ("train", "prefill") else 4 * n)
    seq = f.seq or (4096 if f.step in ("train", "prefill") else 8192)
    print(f"{cfg.__class__.__name__} {f.preset}: {_param_count(cfg) / 1e9:.1f}B parameters; {f.topology} "
          f"x{f.num_slices} = {n} chips; step={f.step} batch={batch} {'max_len' if f.step.startswith('decode') else 'seq'}="
          f"{seq}; jax {jax.__version__}, libtpu {_libtpu_version()}", flush=True)
    if f.quantize:
        print(f"weights: {f.quantize} (the LLM's projections; `ming_jax.quant`)", flush=True)
    lcfg = None
    if f.lora_rank:
        try:
            lcfg = LoraConfig(f.lora_rank, f.lora_alpha, tuple(f.lora_targets.split(",")))
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        print(f"LoRA: rank {lcfg.rank} on {', '.join(lcfg.targets)} (`ming_jax.lora`); the train step optimises the "
              "adapters only", flush=True)
    elif f.quantize and f.step == "train":
        raise app.UsageError("--quantize with --step train: quantized weights are frozen; add adapters (--lora_rank)")

    def one(mesh_spec):
        plan, compiled = compile_step(
            cfg, f.topology, mesh_spec, f.rules, f.step, batch=batch, seq=seq, num_slices=f.num_slices,
            devices=devices, cache_layout=f.cache_layout, runtime=runtime, new_tokens=f.new_tokens,
            quantize=f.quantize or None, lora=lcfg)
        if f.step == "train":
            mesh = sharding.make_mesh(mesh_spec, devices)
            b = train_state_bytes(cfg, mesh, sharding.ShardingRules.preset(f.rules), runtime=runtime,
                                  quantize=f.quantize or None, lora=lcfg)
            print(f"  train state per chip: trained {b['params'] / 1e9:.3f} GB ({b['trained_count']:,} elements), "
                  f"optimizer {b['opt_state'] / 1e9:.3f} GB, master {b['master'] / 1e9:.3f} GB, frozen "
                  f"{b['frozen'] / 1e9:.3f} GB", flush=True)
            plan = dataclasses.replace(plan, note=(plan.note + " " if plan.note else "") + (
                f"trained {b['trained_count']} elements; optimizer {b['opt_state']} B, master {b['master']} B, "
                f"trained {b['params']} B, frozen {b['frozen']} B per chip"))
        return plan, compiled

    return _compile_meshes(f, one)


def _image_main(f):
    """The image-generation steps: the DiT (one forward or the whole sampler) or the VAE decode."""
    runtime = Runtime(dtype=f.dtype, param_dtype=f.dtype, attention=f.attention_impl)
    dit = dit_config.PRESETS[f.dit_preset](**({"n_layers": f.layers} if f.layers else {}))
    vae = vae_config.PRESETS[f.vae_preset]()
    devices = topology_devices(f.topology, f.num_slices)
    batch = f.batch or 1
    if f.step == "vae_decode":
        what = f"VAE {f.vae_preset}: {aot.vae_param_count(vae) / 1e6:.1f}M parameters"
    else:
        what = (f"DiT {f.dit_preset}: {aot.dit_param_count(dit) / 1e9:.2f}B parameters, "
                f"{aot.dit_tokens(dit, f.image_size, f.caption_len)} tokens")
    print(f"{what}; {f.topology} x{f.num_slices} = {len(devices)} chips; step={f.step} images={batch} "
          f"{f.image_size}x{f.image_size}{' CFG' if f.cfg and f.step != 'vae_decode' else ''}; jax {jax.__version__}, "
          f"libtpu {_libtpu_version()}", flush=True)

    def one(mesh_spec):
        plan, compiled = aot.compile_image_step(
            f.step, f.topology, mesh_spec, f.rules, dit=dit, vae=vae, runtime=runtime, batch=batch,
            image_size=f.image_size, caption_len=f.caption_len, steps=f.denoise_steps, cfg=f.cfg,
            num_slices=f.num_slices, devices=devices)
        print(f"  {plan.note}; Mosaic (splash) kernels in the program: {aot.mosaic_kernels(compiled)}", flush=True)
        return plan, compiled

    return _compile_meshes(f, one)


def _speech_main(f):
    """The speech-generation steps: one talker step, the talker's whole generation program, the AudioVAE decode."""
    if f.rules in IMAGE_RULES:
        raise app.UsageError(f"--rules {f.rules} is for the image steps ({', '.join(IMAGE_STEPS)}) only")
    if f.layers:
        raise app.UsageError("--layers is for the LLM and image steps; the speech steps take --talker_preset / "
                             "--audio_vae_preset")
    for name in ("max_steps", "latents"):
        if f[name].present and getattr(f, name) < 1:
            raise app.UsageError(f"--{name}={getattr(f, name)} must be >= 1")
    rules = f.rules if f["rules"].present else "replicated"
    runtime = Runtime(dtype=f.dtype, param_dtype=f.dtype, attention=f.attention_impl)
    talker = aot.TALKER_PRESETS[f.talker_preset]()
    vae = aot.AUDIO_VAE_PRESETS[f.audio_vae_preset]()
    devices = topology_devices(f.topology, f.num_slices)
    batch = f.batch or aot.SPEECH_BATCH
    max_steps = f.max_steps or talker.generate.max_steps
    if f.step == "talker_step":
        seq = f.seq or aot.SPEECH_MAX_LEN
        shapes = f"KV cache {seq} slots"
    elif f.step == "talker_generate":
        seq = f.seq or aot.SPEECH_PROMPT
        shapes = f"prompt {seq}, up to {max_steps} steps"
    else:
        seq = 0
        shapes = f"{f.latents} latents each"
    if f.step == "audio_vae_decode":
        what = f"AudioVAE {f.audio_vae_preset}: decoder {aot.audio_vae_decoder_param_count(vae) / 1e6:.1f}M parameters"
    else:
        what = (f"talker {f.talker_preset}: {aot.talker_param_count(talker) / 1e6:.1f}M parameters "
                f"({aot.talker_param_count(talker, 'step') / 1e6:.1f}M read per step)")
    print(f"{what}; {f.topology} x{f.num_slices} = {len(devices)} chips; step={f.step} utterances={batch} {shapes}; "
          f"rules {rules}; jax {jax.__version__}, libtpu {_libtpu_version()}", flush=True)

    def one(mesh_spec):
        plan, compiled = aot.compile_speech_step(
            f.step, f.topology, mesh_spec, rules, talker=talker, vae=vae, runtime=runtime, batch=batch,
            max_len=seq or aot.SPEECH_MAX_LEN, prompt_len=seq or aot.SPEECH_PROMPT, max_steps=max_steps,
            latents=f.latents, num_slices=f.num_slices, devices=devices)
        print(f"  {plan.note}; XLA flops per chip {plan.flops / 1e9:.1f} G (each loop body counted once)", flush=True)
        return plan, compiled

    return _compile_meshes(f, one)


def _omni_main(f):
    """The multimodal prefill: the towers on each prompt's media, their rows into the embeddings, the LLM prefill."""
    if f.rules in IMAGE_RULES or f.rules in SPEECH_RULES:
        raise app.UsageError(f"--rules {f.rules} is for the image / speech steps only; omni_prefill takes "
                             f"{', '.join(sharding.PRESETS)}")
    for name in ("images", "video_frames", "audio_seconds", "new_tokens", "seq", "batch"):
        if getattr(f, name) < 0:
            raise app.UsageError(f"--{name}={getattr(f, name)} must be >= 0")
    if f.image_size < 1 or f.video_size < 1:
        raise app.UsageError("--image_size / --video_size must be positive")
    if f.new_tokens < 1:
        raise app.UsageError(f"--new_tokens={f.new_tokens} must be >= 1")
    cfg = aot_omni.OMNI_PRESETS[f.omni_preset]()
    if f.layers:
        cfg = cfg.replace(llm={"num_layers": f.layers})
    runtime = Runtime(dtype=f.dtype, param_dtype=f.dtype, attention=f.attention_impl,
                      capacity_factor=f.capacity_factor or None)
    devices = topology_devices(f.topology, f.num_slices)
    shapes = aot_omni.OmniShapes(batch=f.batch or len(devices), images=f.images, image_size=f.image_size,
                                 video_frames=f.video_frames, video_size=f.video_size,
                                 audio_seconds=f.audio_seconds, seq=f.seq, new_tokens=f.new_tokens)
    try:
        layout = aot_omni.build_layout(cfg, shapes)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    counts = aot_omni.omni_param_count(cfg)
    work = aot_omni.omni_prefill_flops(cfg, layout)
    print(f"omni {f.omni_preset}: LLM {counts['llm'] / 1e9:.1f}B, ViT {counts['vision'] / 1e6:.0f}M + projector "
          f"{counts['vision_proj'] / 1e6:.0f}M, audio tower {counts['audio'] / 1e6:.0f}M parameters; {f.topology} "
          f"x{f.num_slices} = {len(devices)} chips; step=omni_prefill prompts={shapes.batch}: "
          f"{layout.describe(cfg)}; towers' weights: {f.tower_rules}; jax {jax.__version__}, libtpu "
          f"{_libtpu_version()}", flush=True)
    chips = len(devices)
    print("  analytic TFLOP per chip: " + ", ".join(f"{k} {v / chips / 1e12:.2f}" for k, v in work.items())
          + f", total {sum(work.values()) / chips / 1e12:.2f}", flush=True)

    def one(mesh_spec):
        plan, compiled, _ = aot_omni.compile_omni_prefill(cfg, f.topology, mesh_spec, f.rules, shapes,
                                                          tower_rules_name=f.tower_rules, runtime=runtime,
                                                          num_slices=f.num_slices, devices=devices)
        print(f"  XLA flops per chip {plan.flops / 1e12:.2f} T (each scan body counted once); Mosaic kernels in the "
              f"program: {aot.mosaic_kernels(compiled)}", flush=True)
        return plan, compiled

    return _compile_meshes(f, one)


def _compile_meshes(f, compile_one):
    """Compile every --mesh with `compile_one(mesh_spec) -> (plan, compiled)`; print, write --json; exit status."""
    plans, failed = [], []
    print(MemoryPlan.header(), flush=True)
    for mesh_spec in f.mesh:
        try:
            plan, _ = compile_one(mesh_spec)
        except Exception as e:  # noqa: BLE001 - reported per mesh; the exit status says that one failed
            print(f"{mesh_spec}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            failed.append(mesh_spec)
            if not f.keep_going:
                break
            continue
        plans.append(plan)
        print(plan.row(), flush=True)
    if f.json:
        with open(f.json, "w") as fh:
            json.dump([dict(dataclasses.asdict(p), total=p.total, fits=p.fits) for p in plans], fh, indent=1)
    if failed:
        print(f"{len(failed)} mesh(es) failed to compile: {', '.join(failed)}"
              + ("" if f.keep_going else " (stopped there; --keep_going compiles the rest)"), flush=True)
    return 0 if plans and all(p.fits for p in plans) and not failed else 1


def _define_flags():
    flags.DEFINE_enum("preset", "ming-flash-omni-2.0", list(PRESETS), "LLM config preset.")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype (the release: "
                      "bfloat16; AdamW moments are float32 either way).")
    flags.DEFINE_string("topology", "v5p:4x4x4", "TPU topology, e.g. v5p:4x4x4 (64 chips), v6e:16x16.")
    flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multi-slice: DCN between them).")
    flags.DEFINE_multi_string("mesh", ["fsdp=-1"], "Mesh spec(s) (sharding.MeshSpec), e.g. fsdp=16,expert=4; "
                              "repeat to compare several.")
    flags.DEFINE_enum("rules", "ep_fsdp", list(sharding.PRESETS) + list(IMAGE_RULES) + list(SPEECH_RULES),
                      "Sharding rules preset (fsdp_seq: image steps only, ZeRO-3 weights and the DiT's tokens split "
                      "over fsdp x expert, the batch over data; replicated: speech steps only, and their default, "
                      "every weight on every chip, the utterances split over data x fsdp x expert).")
    flags.DEFINE_enum("step", "train", list(STEPS) + list(IMAGE_STEPS) + list(SPEECH_STEPS) + list(aot_omni.OMNI_STEPS),
                      "Which program to compile: train (the train step), prefill (a prompt into a fresh cache), "
                      "decode (the generation loop of --new_tokens steps), decode_step (one token against the cache); "
                      "image generation: dit (one DiT forward as the sampler calls it), denoise (the sampler's scan "
                      "of --denoise_steps DiT calls), vae_decode (latents to --image_size images); speech generation: "
                      "talker_step (one autoregressive step: flow sampler with CFG, aggregator, stop head, one LM "
                      "position against a KV cache of --seq slots), talker_generate (the whole jitted prefill of "
                      "--seq prompt positions and while_loop of up to --max_steps steps), audio_vae_decode (--latents "
                      "latents per utterance to 44.1 kHz waveforms); omni_prefill (the multimodal prompt up to the "
                      "first token: vision tower on --images images of --image_size and --video_frames video "
                      "frames, audio tower on --audio_seconds of audio, their rows into the prompt's embeddings, the "
                      "LLM prefill into a fresh cache of --seq + --new_tokens slots).")
    flags.DEFINE_enum("omni_preset", "ming-flash-omni-2.0", list(aot_omni.OMNI_PRESETS),
                      "omni_prefill: omni config preset (LLM + towers); --layers overrides the LLM's layers.")
    flags.DEFINE_integer("images", 1, "omni_prefill: images per prompt (square, --image_size source pixels, resized "
                         "as the release's image processor does).")
    flags.DEFINE_integer("video_frames", 0, "omni_prefill: video frames per prompt (padded to the temporal patch, 2; "
                         "0: no video).")
    flags.DEFINE_integer("video_size", 448, "omni_prefill: side of the square source video frames (resized with the "
                         "release's video pixel budget).")
    flags.DEFINE_float("audio_seconds", 30.0, "omni_prefill: seconds of 16 kHz audio per prompt, one clip (0: none).")
    flags.DEFINE_enum("tower_rules", "same", ["same", *aot_omni.TOWER_RULES, *sharding.PRESETS],
                      "omni_prefill: sharding of the towers' weights (same: --rules; replicated: every tower "
                      "weight on every chip).")
    flags.DEFINE_enum("talker_preset", "ming-flash-omni-2.0", list(aot.TALKER_PRESETS),
                      "talker_step / talker_generate: talker config preset.")
    flags.DEFINE_enum("audio_vae_preset", "ming-flash-omni-2.0", list(aot.AUDIO_VAE_PRESETS),
                      "audio_vae_decode: AudioVAE config preset.")
    flags.DEFINE_integer("max_steps", 0, "talker_generate: the while_loop's step buffer (0: the preset's "
                         "generate.max_steps, 1000 for the release).")
    flags.DEFINE_integer("latents", aot.SPEECH_LATENTS, "audio_vae_decode: latents per utterance (12.5 per second of "
                         "speech; 250 = 20 s).")
    flags.DEFINE_integer("image_size", 1024, "Image steps: square image side in pixels (latents: a side / 8).")
    flags.DEFINE_integer("caption_len", 256, "dit / denoise: caption (condition) tokens (the release: 256 query "
                         "tokens).")
    flags.DEFINE_integer("denoise_steps", 30, "denoise: DiT calls in the sampler's scan.")
    flags.DEFINE_bool("cfg", True, "dit / denoise: classifier-free guidance (the DiT runs a batch of 2 x images).")
    flags.DEFINE_enum("dit_preset", "z-image", list(dit_config.PRESETS), "dit / denoise: DiT config preset.")
    flags.DEFINE_enum("vae_preset", "flux", list(vae_config.PRESETS), "vae_decode: VAE config preset.")
    flags.DEFINE_integer("new_tokens", 256, "prefill / decode / omni_prefill: tokens generated after the prompt.")
    flags.DEFINE_bool("keep_going", False, "Compile every --mesh even after one fails (the exit status is still 1).")
    flags.DEFINE_integer("batch", 0, "Global batch (default: 1 sequence per chip for train, 4 for decode; image "
                         "steps: images, default 1; speech steps: utterances, default 64; omni_prefill: prompts, "
                         "default 1 per chip).")
    flags.DEFINE_integer("seq", 0, "Train / prefill sequence length, decode KV-cache length (default 4096 / "
                         "8192); talker_step: KV-cache slots (default 2048, the release's cache); talker_generate: "
                         "prompt positions (default 128); omni_prefill: prompt length (default: the media tokens + "
                         "256 text tokens, rounded up to 128).")
    flags.DEFINE_integer("layers", 0, "Override the number of layers (0: the preset's; image steps: the DiT's main "
                         "layers; omni_prefill: the LLM's; not taken by the speech steps).")
    flags.DEFINE_float("capacity_factor", 0.0, "Expert capacity factor (0: dropless).")
    flags.DEFINE_enum("attention_impl", "auto", ["xla", "auto", "splash"],
                      "Attention backend: 'auto' compiles the splash kernel for TPU (in a shard_map under the mesh; "
                      "decode steps against the cache use XLA attention), 'xla' the reference everywhere.")
    flags.DEFINE_enum("cache_layout", "auto", ["auto", "default"],
                      "decode_step: KV cache memory layout chosen by the compiler ('auto') or row-major "
                      "('default').")
    flags.DEFINE_string("quantize", "", "LLM steps (train only with --lora_rank: QLoRA): int8 / fp8 weights "
                        "(fp8:128, int8:128: sub-channel "
                        "scales along K) for the projections and expert stacks, as `generate --quantize` loads them.")
    flags.register_validator("quantize", _valid_quantize, "--quantize: int8, fp8, int8:BLOCK or fp8:BLOCK")
    flags.DEFINE_integer("lora_rank", 0, "LLM steps: LoRA adapters of this rank (0: none); --step train then "
                         "optimises the adapters alone (with --quantize: QLoRA).")
    flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (the delta is scaled by alpha / rank).")
    flags.DEFINE_string("lora_targets", "attention,mlp,shared_expert", "LoRA targets: presets (attention, mlp, "
                        "shared_expert, experts, lm_head) or regexes over parameter paths, comma-separated.")
    flags.DEFINE_string("json", "", "Write the memory plans here as JSON.")
    flags.DEFINE_multi_string("table", [], "Print the plans of these --json files as a markdown table and exit.")


def _valid_quantize(value: str) -> bool:
    try:
        QuantConfig.parse(value)
    except ValueError:
        return False
    return True


def run():
    _define_flags()
    cli.run(main, __name__)


if __name__ == "__main__":
    run()

"""Ahead-of-time plan of the omni model's multimodal prefill (towers included), for a TPU topology from abstract
arrays only.

`omni_prefill` is the work of answering a batch of multimodal prompts up to the first token, compiled as one
program: the vision tower (ViT -> merger -> projector -> L2 norm) on the prompts' images and video frames, the audio
tower (whisper encoder -> conv projector -> L2 norm) on their clips, the towers' rows gathered into the order the
prompt's placeholders take them, scattered into the LLM's input embeddings, and the LLM prefill into a fresh KV cache
(`ming_jax.gen.steps.prefill`) -> first-token logits [B, V] and the cache.

The pipeline users run (`ming_jax.gen.omni.generate`) runs the same pieces as three jits with a host round trip
between them: the towers (`ming_jax.models.omni.encode_media`), the host bookkeeping (`ming_jax.models.omni.prepare`:
where each feature row goes, the 3-D rope positions, the router's modality masks), then the prefill. Here the host
part is done once, by `prepare` itself, on a synthetic prompt of the requested shapes (the release's layout: `<image>`
+ patch tokens + `</image>` per image, per temporal patch of a video a time stamp and a `<image>` + frame-patch
block, `<audio>` + audio tokens + `</audio>` per clip), and its outputs (positions, masks, scatter destinations and
the order of the feature rows) are arguments of the compiled program, as they are of the pipeline's prefill. The one
program's plan stands for the three: the weights of all of them are resident either way, and the towers' outputs are
the only values carried from one stage to the next (the compiler may schedule the stages' temporaries differently
from three separate programs; that difference is not measured).

Sizes: images are `--image_size` squares resized as the release's image processor does (`smart_resize`, factor 32,
at most 4096 x 4096 pixels: 1024 x 1024 stays 1024 x 1024 = 64 x 64 patches = 1024 tokens); a video of
`video_frames` frames (padded to the temporal patch, 2) of a `video_size` square source, resized with the release's
video pixel budget (`processors.video.frame_size`); `audio_seconds` of 16 kHz audio = 100 mel frames per second
(30 s: 3000 mel frames -> 1500 encoder frames -> 750 tokens). Every prompt of the batch has the same media.

Sharding: the LLM's parameters by `rules` (the MoE backbone expert-parallel under `ep_fsdp` / `ep_tp`), the towers'
parameters by `tower_rules` (default the same rules: ZeRO-3 over fsdp x expert under `ep_fsdp`; `replicated` puts
every tower weight on every chip, for slices whose fsdp x expert does not divide the ViT's 1152 width). Pixel rows,
mel features and every [B, ...] prompt array are split over the `batch` rule's axes (data x fsdp x expert), so each
chip encodes its own images and clips; the ViT's per-image attention (splash on TPU, `shard_map` over the images)
and the whisper encoder (its clips constrained to the batch axes) stay local. The scatter indices and the feature
order are replicated (0.9 MB for 64 prompts of one image and 30 s of audio).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ming_jax import sharding
from ming_jax.aot.compile import _flops
from ming_jax.aot.memory_plan import MemoryPlan
from ming_jax.aot.topology import HBM_BYTES, chip_of, topology_devices
from ming_jax.config.omni import OmniConfig
from ming_jax.config.runtime import Runtime
from ming_jax.gen.steps import prefill
from ming_jax.layers.norms import l2_normalize
from ming_jax.models import inputs as multimodal, omni as omni_lib
from ming_jax.models.audio import ClipLayout, clip_layout
from ming_jax.models.vision import as_grid, check_inputs
from ming_jax.processors import audio as audio_proc, image as image_proc, video as video_proc
from ming_jax.sharding.place import logical_axes

OMNI_STEPS = ("omni_prefill",)
OMNI_PRESETS = {"ming-flash-omni-2.0": OmniConfig.ming_flash_omni_2, "tiny": OmniConfig.tiny}
TEXT_TOKENS = 256  # text tokens of each prompt besides the media blocks (chat template, question)
SEQ_MULTIPLE = 128  # prompt length rounded up to this (the default when --seq is not given)
TIMESTAMP_TOKENS = 5  # "<1.5 seconds>" before each video frame block (the release's tokenizer: a few tokens)
_TOWERS = ("vision", "vision_proj", "audio")

# Rules the towers may use besides `sharding.PRESETS` ("same": the run's rules).
TOWER_RULES = {"replicated": lambda: sharding.ShardingRules(batch=("data", "fsdp", "expert"))}


def tower_rules(name: str, rules: sharding.ShardingRules) -> sharding.ShardingRules:
    """"same" -> `rules`; "replicated" -> every tower weight on every chip; else a `sharding.PRESETS` name."""
    if name == "same":
        return rules
    return TOWER_RULES[name]() if name in TOWER_RULES else sharding.ShardingRules.preset(name)


@dataclasses.dataclass(frozen=True)
class OmniShapes:
    """The media of each prompt, as sizes of their sources (resized here as the release's processors do)."""

    batch: int = 1
    images: int = 1  # per prompt
    image_size: int = 1024  # side of a square source image, in pixels
    video_frames: int = 0  # per prompt, after sampling (padded to the temporal patch)
    video_size: int = 448  # side of the square source frames
    audio_seconds: float = 30.0  # one clip per prompt (0: none)
    seq: int = 0  # prompt length (0: the media tokens + TEXT_TOKENS, rounded up to SEQ_MULTIPLE)
    new_tokens: int = 256  # the cache holds seq + new_tokens slots


@dataclasses.dataclass(frozen=True)
class OmniLayout:
    """The concrete layout of the synthetic batch: grids, clip shapes, the prepared prompt (host arrays)."""

    shapes: OmniShapes
    image_grid: tuple  # ((t, h, w), ...) per image of the whole batch, prompt-major
    video_grid: tuple  # one (1, h, w) row per temporal patch of every prompt's video (the interleaved layout)
    mel_frames: int  # per clip (0: no audio)
    audio_tokens: int  # per clip
    clips: ClipLayout | None
    prepared: multimodal.Prepared  # positions [3, B, S], mask, modality, destinations of the feature rows
    feature_source: np.ndarray | None  # [N] int32: row of the concatenated [image; video; audio] tower outputs

    @property
    def seq(self) -> int:
        return int(self.prepared.input_ids.shape[1])

    @property
    def image_patches(self) -> int:
        return sum(t * h * w for t, h, w in self.image_grid)

    @property
    def video_patches(self) -> int:
        return sum(t * h * w for t, h, w in self.video_grid)

    def media_tokens(self, merge: int) -> dict[str, int]:
        """LLM positions each prompt gives to image / video / audio rows."""
        b = self.shapes.batch
        return dict(image=self.image_patches // merge**2 // b, video=self.video_patches // merge**2 // b,
                    audio=self.audio_tokens)

    def describe(self, cfg: OmniConfig) -> str:
        s, tok = self.shapes, self.media_tokens(cfg.llm.spatial_merge_size)
        p = cfg.vision.patch_size if cfg.vision is not None else 0
        parts = []
        if s.images:
            _, h, w = self.image_grid[0]
            parts.append(f"{s.images} image{'s' if s.images > 1 else ''} {w * p}x{h * p} ({tok['image']} tokens)")
        if self.video_grid:
            frames = cfg.vision.temporal_patch_size * len(self.video_grid) // s.batch
            _, h, w = self.video_grid[0]
            parts.append(f"video {frames} frames {w * p}x{h * p} ({tok['video']} tokens)")
        if self.mel_frames:
            parts.append(f"audio {s.audio_seconds:g} s ({self.mel_frames} mel frames, {tok['audio']} tokens)")
        return (", ".join(parts) or "text only") + f" per prompt; prompt {self.seq}, cache {self.seq + s.new_tokens}"


def _text_id(cfg) -> int:
    """An ordinary token id: none of the placeholder / special ids the layout reads."""
    special = {cfg.llm.image_patch_token, cfg.llm.video_patch_token, cfg.llm.image_start_token,
               cfg.llm.video_start_token, cfg.llm.pad_token_id, cfg.llm.eos_token_id}
    return next(i for i in range(10, cfg.llm.vocab_size) if i not in special)


def build_layout(cfg: OmniConfig, shapes: OmniShapes) -> OmniLayout:
    """The synthetic batch of `shapes` laid out by `ming_jax.models.omni.prepare` (raises ValueError on bad sizes)."""
    s = shapes
    if s.batch < 1:
        raise ValueError(f"omni_prefill: batch={s.batch} must be >= 1")
    if s.images < 0 or s.video_frames < 0 or s.audio_seconds < 0:
        raise ValueError(f"omni_prefill: images={s.images}, video_frames={s.video_frames}, audio_seconds="
                         f"{s.audio_seconds} must be >= 0")
    if s.new_tokens < 1:
        raise ValueError(f"omni_prefill: new_tokens={s.new_tokens} must be >= 1")
    if (s.images or s.video_frames) and cfg.vision is None:
        raise ValueError("omni_prefill: images / video frames given, but this config has no vision tower")
    if s.audio_seconds and cfg.audio is None:
        raise ValueError("omni_prefill: audio given, but this config has no audio tower")
    llm, text = cfg.llm, _text_id(cfg)
    merge = cfg.llm.spatial_merge_size
    block = []  # one prompt's media blocks, in the processor's order (images, video, audio) with their kinds
    image_grid = video_grid = ()
    if s.images:
        proc = image_proc.ProcessorConfig.ming_flash_omni_2()
        h, w = image_proc.smart_resize(s.image_size, s.image_size, proc.factor, proc.min_pixels, proc.max_pixels)
        g = (1, h // proc.patch_size, w // proc.patch_size)
        for _ in range(s.images):
            block += [llm.image_start_token] + [llm.image_patch_token] * (g[1] * g[2] // merge**2) + [text]
        image_grid = (g,) * (s.images * s.batch)
    if s.video_frames:
        proc = image_proc.ProcessorConfig.ming_flash_omni_2()
        vcfg = video_proc.VideoSamplingConfig.for_processor(proc)
        frames = s.video_frames + (-s.video_frames) % proc.temporal_patch_size
        h, w = video_proc.frame_size(s.video_size, s.video_size, frames, vcfg)
        g = (1, h // proc.patch_size, w // proc.patch_size)
        patches = frames // proc.temporal_patch_size
        block += [text]  # <video>
        for _ in range(patches):
            block += [text] * TIMESTAMP_TOKENS + [llm.image_start_token] + [llm.video_patch_token] * (
                g[1] * g[2] // merge**2) + [text]
        block += [text]  # </video>
        video_grid = (g,) * (patches * s.batch)
    mel = audio_tok = 0
    audio_start = None
    if s.audio_seconds:
        mel = audio_proc.num_mel_frames(int(round(s.audio_seconds * audio_proc.SAMPLE_RATE)))
        if mel < 1 or cfg.audio.encoder_frames(mel) > cfg.audio.encoder.n_ctx:
            raise ValueError(f"omni_prefill: audio_seconds={s.audio_seconds:g} gives {mel} mel frames; the audio "
                             f"tower takes 1 to {cfg.audio.max_mel_frames} ({cfg.audio.max_mel_frames / 100:g} s)")
        audio_tok = cfg.audio.output_frames(mel)
        block += [text]  # <audio>
        audio_start = len(block)
        block += [text] * audio_tok + [text]  # the placeholder span, </audio>
    media = len(block)
    seq = s.seq or max(-(-(media + TEXT_TOKENS) // SEQ_MULTIPLE) * SEQ_MULTIPLE, SEQ_MULTIPLE)
    if seq < media + 2:
        raise ValueError(f"omni_prefill: seq={seq} cannot hold the media ({media} tokens) and 2 text tokens; give "
                         f"at least --seq {media + 2} (or 0 for the default)")
    prefix = min(TEXT_TOKENS // 2, (seq - media) // 2)  # text before the media (system prompt, ...), the rest after
    row = [text] * prefix + block + [text] * (seq - prefix - media)
    ids = np.tile(np.asarray(row, np.int32), (s.batch, 1))
    # Feature rows stand for their own index into the concatenated tower outputs: `prepare` moves them exactly as it
    # moves the features, so its `features` column is the gather order the program applies on device.
    n_img = len(image_grid) and sum(t * h * w for t, h, w in image_grid) // merge**2
    n_vid = len(video_grid) and sum(t * h * w for t, h, w in video_grid) // merge**2
    clips = None
    mm = multimodal.MultimodalInputs(image_grid_thw=np.asarray(image_grid) if image_grid else None,
                                     video_grid_thw=np.asarray(video_grid) if video_grid else None)
    if n_img:
        mm.image_embeds = np.arange(n_img, dtype=np.float32)[:, None]
    if n_vid:
        mm.video_embeds = (n_img + np.arange(n_vid, dtype=np.float32))[:, None]
    if mel:
        lengths = np.full((s.batch, 1), mel, np.int64)
        clips = clip_layout(lengths, mel, cfg.audio)
        width = clips.out_clip.shape[1]
        mm.audio_embeds = (n_img + n_vid + np.arange(s.batch * width, dtype=np.float32)).reshape(s.batch, width, 1)
        mm.audio_lengths = clips.out_lengths
        mm.audio_spans = np.tile(np.asarray([[[prefix + audio_start, audio_tok]]], np.int64), (s.batch, 1, 1))
    total = n_img + n_vid + (s.batch * clips.out_clip.shape[1] if mel else 0)
    if total >= 2**24:
        raise ValueError(f"omni_prefill: {total} feature rows; the layout is computed with float32 row numbers, "
                         "exact below 2**24 (use a smaller batch)")
    prep = multimodal.prepare(cfg.llm, ids, None, mm)
    source = None if prep.features is None else prep.features[:, 0].astype(np.int32)
    if source is not None and not np.array_equal(source.astype(np.float32), prep.features[:, 0]):
        raise AssertionError("feature order is not integral")  # cannot happen below 2**24
    return OmniLayout(s, image_grid, video_grid, mel, audio_tok, clips, prep, source)


def _param_shardings(abstract, mesh, rules, t_rules):
    """Every variable's NamedSharding: the LLM's by `rules`, the towers' by `t_rules`, non-parameters replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, v):
        if not isinstance(v, nnx.Param):
            return v.replace(replicated)
        key = str(getattr(path[0], "key", path[0]))
        r = t_rules if key in _TOWERS else rules
        where = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return v.replace(sharding.named_sharding(mesh, r, logical_axes(v), v.get_value().shape,
                                                 what=f"parameter {where}"))

    return jax.tree_util.tree_map_with_path(one, nnx.state(abstract), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _omni_program(graphdef, layout: OmniLayout, max_len: int):
    """The multimodal prefill as a function made for this lowering only (jax's trace cache does not key on the
    sharding rules that splash's `shard_map` and `constrain` read while tracing; see `compile._fresh_programs`).
    The tower calls are `ming_jax.models.omni._vision_embeddings` (tower -> projector -> L2 norm) and
    `ming_jax.models.audio.encode_audio`'s `AudioTower.__call__`, unjitted; the rest is `gen.steps.prefill`."""
    image_grid = as_grid(layout.image_grid) if layout.image_grid else None
    video_grid = as_grid(layout.video_grid) if layout.video_grid else None

    def vision(model, pixels, grid):
        hidden = model.vision(pixels, grid)
        with jax.named_scope("vision_projector"):
            return l2_normalize(model.vision_proj(hidden))

    def program(state, input_ids, attention_mask, positions, modality, feature_source, feature_index, pixel_values,
                pixel_values_videos, audio_feats, clips):
        model = nnx.merge(graphdef, state)
        rows = []
        if image_grid is not None:
            rows.append(vision(model, pixel_values, image_grid))
        if video_grid is not None:
            rows.append(vision(model, pixel_values_videos, video_grid))
        if audio_feats is not None:
            emb = model.audio(audio_feats, clips).embeds  # [B, W, D]
            rows.append(emb.reshape(-1, emb.shape[-1]))
        features = None
        if rows:
            # The pipeline hands the prefill float32 host copies of these bf16 rows; `embed_tokens` rounds them to
            # the compute dtype either way, so they are concatenated in it here (the same values, half the bytes).
            rows = [r.astype(model.llm.runtime.dtype) for r in rows]
            features = (rows[0] if len(rows) == 1 else jnp.concatenate(rows))[feature_source]
        return prefill(model.llm, input_ids, attention_mask, positions, modality, features,
                       feature_index if features is not None else None, max_len=max_len)

    return program


def omni_arguments(cfg: OmniConfig, mesh, rules: sharding.ShardingRules, shapes: OmniShapes, *,
                   towers: sharding.ShardingRules | None = None, runtime: Runtime | None = None):
    """-> (graphdef, the program's abstract sharded arguments, layout): the model state (the LLM's parameters by
    `rules`, the towers' by `towers`, default `rules`), the prompt's ids / mask / positions [3, B, S] / modality,
    the feature order and destinations (replicated), the pixel rows of the images and of the video (float32, as
    the processor emits them), the mel features [B, T, n_mels] float32 and the clip layout (replicated). None for
    what the prompt does not have. Batched arrays are split over the `batch` rule's axes when they divide evenly."""
    runtime = Runtime.bf16() if runtime is None else runtime
    towers = rules if towers is None else towers
    layout = build_layout(cfg, shapes)
    abstract = omni_lib.create_abstract(cfg, runtime)
    graphdef, state = nnx.split(abstract)
    shard = _param_shardings(abstract, mesh, rules, towers)
    a_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, shard)
    replicated = NamedSharding(mesh, PartitionSpec())
    axes = tuple(a for a in rules.mesh_axes("batch") if mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)

    def batched(shape, dtype, dim=0):  # split dim over the batch axes when it divides, else replicated
        spec = [None] * len(shape)
        if axes and shape[dim] % n == 0:
            spec[dim] = axes if len(axes) > 1 else axes[0]
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))

    def rep(shape, dtype):
        return jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(dtype), sharding=replicated)

    prep, b, s = layout.prepared, shapes.batch, layout.seq
    pixel = pixel_v = feats = clips = source = index = modality = None
    if layout.image_grid:
        pixel = batched((layout.image_patches, cfg.vision.patch_dim), jnp.float32)
        check_inputs(cfg.vision, pixel.shape, as_grid(layout.image_grid))
    if layout.video_grid:
        pixel_v = batched((layout.video_patches, cfg.vision.patch_dim), jnp.float32)
    if layout.mel_frames:
        feats = batched((b, layout.mel_frames, cfg.audio.encoder.n_mels), jnp.float32)
        clips = jax.tree.map(lambda a: rep(a.shape, a.dtype), layout.clips)
    if layout.feature_source is not None:
        source = rep(layout.feature_source.shape, jnp.int32)
        index = rep(prep.feature_index.shape, jnp.int32)
    if prep.modality is not None:
        modality = batched((b, s), jnp.int32)
    args = (a_state, batched((b, s), jnp.int32), batched((b, s), jnp.bool_), batched((3, b, s), jnp.int32, dim=1),
            modality, source, index, pixel, pixel_v, feats, clips)
    return graphdef, args, layout


def lower_omni_prefill(cfg: OmniConfig, mesh, rules: sharding.ShardingRules, shapes: OmniShapes, *,
                       towers: sharding.ShardingRules | None = None, runtime: Runtime | None = None):
    """The multimodal prefill lowered for `mesh` from abstract, sharded arguments (`omni_arguments`; nothing
    allocated) -> (lowered, layout). runtime: default `Runtime.bf16()` (bf16 parameters and compute, attention
    "auto": splash in the ViT and the LLM on TPU). towers: the towers' parameter rules (default `rules`)."""
    graphdef, args, layout = omni_arguments(cfg, mesh, rules, shapes, towers=towers, runtime=runtime)
    program = _omni_program(graphdef, layout, layout.seq + shapes.new_tokens)
    with sharding.use_mesh(mesh, rules):
        return jax.jit(program).lower(*args), layout


def compile_omni_prefill(cfg: OmniConfig, topology: str, mesh_spec: str, rules_name: str, shapes: OmniShapes, *,
                         tower_rules_name: str = "same", runtime: Runtime | None = None, num_slices: int = 1,
                         devices: Sequence | None = None) -> tuple[MemoryPlan, object, OmniLayout]:
    """Compile the multimodal prefill for a topology -> (its memory plan, the compiled executable, the layout).

    The plan's `batch` is the prompts, `seq` the prompt length, `flops` XLA's cost analysis (each scan body once:
    see `omni_prefill_flops` for the work), `rules` "<rules>" or "<rules>, towers <tower rules>"."""
    runtime = Runtime.bf16() if runtime is None else runtime
    devices = topology_devices(topology, num_slices) if devices is None else devices
    mesh = sharding.make_mesh(mesh_spec, devices)
    rules = sharding.ShardingRules.preset(rules_name)
    t0 = time.perf_counter()
    lowered, layout = lower_omni_prefill(cfg, mesh, rules, shapes, towers=tower_rules(tower_rules_name, rules),
                                         runtime=runtime)
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    shape = ",".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 chip"
    plan = MemoryPlan(topology + (f" x{num_slices}" if num_slices > 1 else ""), "omni_prefill", shape,
                      rules_name + ("" if tower_rules_name == "same" else f", towers {tower_rules_name}"),
                      shapes.batch, layout.seq, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                      int(m.temp_size_in_bytes), int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
                      HBM_BYTES[chip_of(topology)] * 1.0, time.perf_counter() - t0,
                      note=layout.describe(cfg), attention=runtime.attention,
                      capacity_factor=runtime.capacity_factor or 0.0, flops=_flops(compiled))
    return plan, compiled, layout


# --- sizes and work --------------------------------------------------------------------------------------------------


def _params(flat, prefix: tuple) -> int:
    return sum(math.prod(v.shape) for p, v in flat if tuple(map(str, p[:len(prefix)])) == prefix)


def omni_param_count(cfg: OmniConfig) -> dict[str, int]:
    """Parameters per part: llm, vision (the ViT, deepstack mergers included), vision_proj, audio (encoder +
    projector). The release: 102,954,732,800 / 576,388,336 / 33,562,624 / 686,763,008."""
    flat = nnx.to_flat_state(nnx.state(omni_lib.create_abstract(cfg), nnx.Param))
    return {k: _params(flat, (k,)) for k in ("llm",) + _TOWERS}


def omni_prefill_flops(cfg: OmniConfig, layout: OmniLayout) -> dict[str, float]:
    """Analytic FLOPs of the whole batch's prefill, per part (2 x parameters x rows for every matmul, plus the
    attention products: the ViT's per (image, frame), whisper's over each padded clip, the LLM's causal half of
    S x S). Norms, rope, gathers and the deepstack mergers (not run) are left out; the LLM counts the active
    experts (top-k + shared) and the LM head at the last position of each row only, as the prefill computes it."""
    flat = nnx.to_flat_state(nnx.state(omni_lib.create_abstract(cfg), nnx.Param))
    out = dict(vision=0.0, audio=0.0, llm=0.0)
    if layout.image_grid or layout.video_grid:
        v = cfg.vision
        blocks, patch = _params(flat, ("vision", "blocks")), _params(flat, ("vision", "patch_embed"))
        merger, proj = _params(flat, ("vision", "merger")), _params(flat, ("vision_proj",))
        for t, h, w in layout.image_grid + layout.video_grid:
            n = t * h * w
            out["vision"] += 2 * (blocks + patch) * n + 4 * v.depth * t * (h * w) ** 2 * v.hidden_size
            out["vision"] += 2 * (merger + proj) * n / v.merge_unit
    if layout.mel_frames:
        a, e = cfg.audio, cfg.audio.encoder
        t = layout.mel_frames
        t1, t2 = a.encoder_frames(t), a.output_frames(t)
        enc = 2 * 3 * e.n_mels * e.n_state * t + 2 * 3 * e.n_state**2 * t1
        enc += 2 * _params(flat, ("audio", "encoder", "blocks")) * t1 + 4 * e.n_layer * t1**2 * e.n_state
        proj = 2 * _params(flat, ("audio", "projector")) * t2
        out["audio"] = layout.shapes.batch * (enc + proj)
    c, b, s = cfg.llm, layout.shapes.batch, layout.seq
    d, hd = c.hidden_size, c.head_dim
    attn = d * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * d
    moe = 3 * d * c.moe_intermediate_size * (c.num_experts_per_tok + c.num_shared_experts) + c.num_routers * d * \
        c.num_experts
    body = c.num_layers * attn + c.num_dense_layers * 3 * d * c.intermediate_size + c.num_moe_layers * moe
    out["llm"] = 2.0 * body * b * s + 2.0 * c.num_layers * c.num_heads * hd * s * s * b + 2.0 * d * c.vocab_size * b
    return out

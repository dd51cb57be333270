"""Ahead-of-time plan of the omni model's multimodal prefill (`ming_jax.aot.omni`): the vision and audio towers on
each prompt's media, their rows scattered into the embeddings at the placeholders, the LLM prefill into a fresh cache.

Here: the release's layout computed by `prepare` (no compile), the tiny omni config compiled by libtpu for
v5p:2x2x1 (fsdp=2, expert=2, ep_fsdp: the MoE backbone expert-parallel) with and without media, the towers'
shardings, bad sizes and the CLI. The full-size compiles: `python -m benchmarks.omni_aot` (docs/scaling.md,
docs/data/omni_aot.json), not CI.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from tpu_compile import need_libtpu

from ming_jax import sharding
from ming_jax.aot import compile as aot, omni as ao
from ming_jax.config.omni import OmniConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY, MESH = "v5p:2x2x1", "fsdp=2,expert=2"
TINY = OmniConfig.tiny()
B = 4
# 64 x 64 images (4 x 4 patches, 4 tokens), 2 s of audio (200 mel frames -> 50 tokens), 2 video frames (the
# release's video minimum: 384 x 384, 576 patches -> 144 tokens).
MEDIA = ao.OmniShapes(batch=B, images=2, image_size=64, video_frames=2, video_size=64, audio_seconds=2.0,
                      new_tokens=16)
TEXT = ao.OmniShapes(batch=B, images=0, audio_seconds=0.0, seq=512, new_tokens=16)


@pytest.fixture(scope="module")
def devices():
    need_libtpu()
    return aot.topology_devices(TOPOLOGY)


@pytest.fixture(scope="module")
def plans(devices):
    return {name: ao.compile_omni_prefill(TINY, TOPOLOGY, MESH, "ep_fsdp", shapes, devices=devices)
            for name, shapes in (("media", MEDIA), ("text", TEXT))}


def test_release_layout():
    """The release's sizes through `prepare`: a 1024 x 1024 image stays 64 x 64 patches = 1024 tokens, 30 s of audio
    is 3000 mel frames = 750 tokens, 8 frames of a 448 x 448 video are 4 temporal patches of 448 x 448 (196 tokens
    each, the interleaved layout: one (1, h, w) grid row per patch). Every feature row lands on its placeholder, in
    the order the towers emit them, and the prompt is the media + 256 text tokens rounded up to 128."""
    cfg = OmniConfig.ming_flash_omni_2()
    lay = ao.build_layout(cfg, ao.OmniShapes(batch=2, images=1, image_size=1024, video_frames=8, video_size=448,
                                             audio_seconds=30.0))
    assert lay.image_grid == ((1, 64, 64),) * 2 and lay.video_grid == ((1, 28, 28),) * 8
    assert (lay.mel_frames, lay.audio_tokens) == (3000, 750)
    assert lay.media_tokens(2) == dict(image=1024, video=4 * 196, audio=750)
    media = 1024 + 2 + 4 * (196 + 2 + ao.TIMESTAMP_TOKENS) + 2 + 750 + 2
    assert lay.seq == -(-(media + ao.TEXT_TOKENS) // 128) * 128
    prep, llm = lay.prepared, cfg.llm
    n_img, n_vid = 2 * 1024, 2 * 4 * 196
    assert sorted(lay.feature_source.tolist()) == list(range(n_img + n_vid + 2 * 750))
    flat = prep.input_ids.reshape(-1)
    dest = prep.feature_index
    src = lay.feature_source
    assert (flat[dest[src < n_img]] == llm.image_patch_token).all()
    assert (flat[dest[(src >= n_img) & (src < n_img + n_vid)]] == llm.video_patch_token).all()
    assert (prep.modality.reshape(-1)[dest[src >= n_img + n_vid]] == 2).all()  # AUDIO
    assert np.array_equal(dest[src < n_img], np.flatnonzero(flat == llm.image_patch_token))  # in image order
    assert "1 image 1024x1024 (1024 tokens)" in lay.describe(cfg) and "30 s" in lay.describe(cfg)
    counts = ao.omni_param_count(cfg)
    assert counts == dict(llm=102_954_732_800, vision=576_388_336, vision_proj=33_562_624, audio=686_763_008)
    work = ao.omni_prefill_flops(cfg, lay)
    assert work["vision"] > work["audio"] > 0 and work["llm"] > 0


def test_towers_are_in_the_program(plans):
    """With media the program takes the pixel rows and mel features and reads the towers' weights (jit drops unused
    arguments, so the text-only program has none of them), does more work, and runs a splash kernel per ViT call
    (image grid, video grid) on top of the LLM's kernels; the MoE layers exchange tokens over the expert axis."""
    (media, media_c, lay), (text, text_c, _) = plans["media"], plans["text"]
    for plan in (media, text):
        assert plan.fits and plan.argument > 0 and plan.temp > 0 and plan.output > 0 and plan.flops > 0
        assert plan.step == "omni_prefill" and plan.batch == B and plan.seq == 512
    pixels = (lay.image_patches + lay.video_patches) * TINY.vision.patch_dim * 4 // 4  # float32, split 4 ways
    mels = B * lay.mel_frames * TINY.audio.encoder.n_mels * 4 // 4
    counts = ao.omni_param_count(TINY)
    towers = (counts["vision"] + counts["vision_proj"] + counts["audio"]) * 2 // 4  # bf16, ZeRO-3 over 4 chips
    assert media.argument - text.argument > pixels + mels + towers // 2
    assert media.flops > 1.2 * text.flops
    assert aot.mosaic_kernels(media_c) >= aot.mosaic_kernels(text_c) + 2
    for c in (media_c, text_c):
        assert "ragged-all-to-all" in c.as_text()
    # output: the first-token logits [B, V] float32 and the cache of 512 + 16 slots, each chip its share
    cache = 2 * TINY.llm.num_layers * B * TINY.llm.num_kv_heads * 528 * TINY.llm.head_dim * 2
    assert media.output >= (B * TINY.llm.vocab_size * 4 + cache) // 4
    assert "2 images 64x64 (8 tokens)" in media.note and "video 2 frames 384x384" in media.note


def test_tower_shardings(devices):
    """The towers' weights follow --tower_rules: ZeRO-3 like the LLM's dense weights by default (ep_fsdp: embed over
    fsdp x expert), on every chip with `replicated`; the pixel rows and the mel features split over the batch axes."""
    mesh = sharding.make_mesh(MESH, devices)
    rules = sharding.ShardingRules.preset("ep_fsdp")
    shapes = ao.OmniShapes(batch=B, images=1, image_size=64, audio_seconds=1.0, new_tokens=8)
    for name, want in (("same", PartitionSpec(None, ("fsdp", "expert"))), ("replicated", PartitionSpec())):
        _, args, _ = ao.omni_arguments(TINY, mesh, rules, shapes, towers=ao.tower_rules(name, rules))
        state = args[0]
        assert state["vision"]["patch_embed"]["kernel"].get_value().sharding.spec == want
        assert state["audio"]["encoder"]["conv2_bias"].get_value().sharding.spec == (
            PartitionSpec(("fsdp", "expert")) if name == "same" else PartitionSpec())
        assert state["llm"]["embed"].get_value().sharding.spec != PartitionSpec()  # the LLM keeps its rules
        pixels, mels = args[7], args[9]
        assert pixels.sharding.spec[0] == ("fsdp", "expert") == mels.sharding.spec[0]


def test_bad_sizes():
    with pytest.raises(ValueError, match="cannot hold the media"):
        ao.build_layout(TINY, ao.OmniShapes(batch=1, images=1, image_size=64, audio_seconds=0, seq=7))
    with pytest.raises(ValueError, match="mel frames"):
        ao.build_layout(TINY, ao.OmniShapes(batch=1, images=0, audio_seconds=31.0))  # n_ctx 1500: 30 s at most
    with pytest.raises(ValueError, match="no vision tower"):
        ao.build_layout(TINY.replace(vision=None), ao.OmniShapes(batch=1, images=1, audio_seconds=0))
    with pytest.raises(ValueError, match="batch"):
        ao.build_layout(TINY, ao.OmniShapes(batch=0))
    with pytest.raises(sharding.ShardingError, match="unknown sharding preset"):
        ao.tower_rules("fsdp_seq", sharding.ShardingRules.preset("ep_fsdp"))


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ming_jax.aot", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)


def test_cli(tmp_path, devices):
    """The CLI refuses omni flags on other steps (before compiling) and compiles the tiny omni prefill (one LLM
    layer, an explicit prompt length, replicated towers) into a JSON plan."""
    r = _cli("--step", "prefill", "--images", "2")
    assert r.returncode != 0 and "--images is for --step omni_prefill only" in r.stdout + r.stderr
    out = tmp_path / "plans.json"
    r = _cli("--step", "omni_prefill", "--omni_preset", "tiny", "--layers", "1", "--topology", TOPOLOGY,
             "--mesh", MESH, "--image_size", "64", "--audio_seconds", "0.5", "--new_tokens", "8", "--seq", "96",
             "--tower_rules", "replicated", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prompts=4" in r.stdout and "towers' weights: replicated" in r.stdout and "analytic TFLOP" in r.stdout
    (plan,) = json.load(open(out))
    assert plan["step"] == "omni_prefill" and plan["rules"] == "ep_fsdp, towers replicated" and plan["fits"]
    assert plan["batch"] == 4 and plan["seq"] == 96 and plan["flops"] > 0 and "audio 0.5 s" in plan["note"]


def test_constrain_even_splits_only_what_divides(devices):
    """The towers' activation constraint: rows split over the batch axes when they divide (8 rows on 4 chips), left
    whole when not (6 rows), identity without a mesh."""
    mesh = sharding.make_mesh(MESH, devices)
    rules = sharding.ShardingRules.preset("ep_fsdp")
    fn = lambda x: sharding.constrain_even(x * 2, ("batch", None))  # noqa: E731
    x = jnp.ones((3, 4))
    assert fn(x) is not None and (fn(x) == 2).all()  # no mesh: a plain function
    with sharding.use_mesh(mesh, rules):
        texts = {n: jax.jit(fn).lower(jax.ShapeDtypeStruct((n, 4), jnp.float32)).as_text() for n in (8, 6)}
    assert '<@mesh, [{"data", "fsdp", "expert"}, {}]>' in texts[8]  # data is 1: split 4 ways
    assert "<@mesh, [{}, {}]>" in texts[6]

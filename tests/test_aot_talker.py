"""Ahead-of-time plans of speech generation (`ming_jax.aot.compile.lower_speech_step` / `compile_speech_step`): one
talker step, the talker's whole generation program (prefill + while_loop), the AudioVAE decode.

Here: the release presets' sizes (abstract, nothing compiled), the tiny configs compiled by libtpu for v5p:2x2x1 (a
few seconds each) with the utterance batch split 4 ways (fsdp=4) and 2 ways (data=2, tensor=2: `replicated` splits
the batch over data / fsdp / expert only), and the CLI. The full-size compiles: `python -m benchmarks.talker_aot`
(docs/scaling.md, docs/data/talker_aot.json), not CI.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from tpu_compile import need_libtpu

from ming_jax import sharding
from ming_jax.aot import compile as aot
from ming_jax.config.audio_vae import AudioVAEConfig
from ming_jax.config.talker import TalkerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5p:2x2x1"
MESHES = {4: "fsdp=4", 2: "data=2,tensor=2"}  # ways the batch is split under `replicated`
B, MAX_LEN, PROMPT, STEPS, LATENTS = 8, 64, 16, 8, 6
TINY_T, TINY_V = TalkerConfig.tiny(), AudioVAEConfig.tiny()


@pytest.fixture(scope="module")
def devices():
    need_libtpu()
    return aot.topology_devices(TOPOLOGY)


def _plans(step, devices, ways=tuple(MESHES)):
    return {n: aot.compile_speech_step(step, TOPOLOGY, MESHES[n], "replicated", talker=TINY_T, vae=TINY_V, batch=B,
                                       max_len=MAX_LEN, prompt_len=PROMPT, max_steps=STEPS, latents=LATENTS,
                                       devices=devices) for n in ways}


def _positive(plan):
    assert plan.argument > 0 and plan.output > 0 and plan.temp > 0 and plan.code > 0 and plan.flops > 0
    assert plan.fits and plan.total == plan.argument + plan.output + plan.temp + plan.code - plan.alias


def test_release_presets():
    """The sizes the plans are read against: the talker 699M parameters (563M read by a step: all but the LM's
    151936 x 896 token table), its LM Qwen2-0.5B-shaped, the flow DiT and the aggregator 8 x 1024; the AudioVAE
    decoder 361M; 64 utterances split over data x fsdp x expert with every weight replicated by default."""
    t = TalkerConfig.ming_flash_omni_2()
    assert (t.llm.hidden_size, t.llm.num_hidden_layers, t.llm.num_attention_heads, t.llm.num_key_value_heads,
            t.llm.intermediate_size, t.llm.vocab_size) == (896, 24, 14, 2, 4864, 151936)
    assert (t.flow.hidden_size, t.flow.depth, t.flow.num_heads, t.flow.llm_cond_dim) == (1024, 8, 16, 896)
    assert (t.aggregator.hidden_size, t.aggregator.depth, t.aggregator.dropout) == (1024, 8, 0.1)
    assert (t.steps, t.patch_size, t.history_patch_size, t.latent_dim, t.dit_length) == (10, 4, 32, 64, 37)
    assert TalkerConfig.ming_flash_omni_2(steps=5).steps == 5
    assert aot.talker_param_count(t) == 699_065_794
    assert aot.talker_param_count(t) - aot.talker_param_count(t, "step") == 151936 * 896
    assert aot.audio_vae_decoder_param_count(AudioVAEConfig.ming_flash_omni_2()) == 361_127_186
    rules = aot.speech_rules("replicated")
    assert rules.batch == ("data", "fsdp", "expert") and rules.embed is None and rules.mlp is None
    assert aot.speech_rules("fsdp") == sharding.ShardingRules.preset("fsdp")
    assert aot.SPEECH_BATCH == 64 and aot.SPEECH_MAX_LEN == t.generate.max_cache_len == 2048


def test_talker_step_splits_the_batch(devices):
    """One step compiled for 4 chips, the batch split 4 and 2 ways: the parameters are replicated (same bytes), the
    per-chip batched arguments (cache, h_t, history, positions, row keys) double when half as many chips share the
    batch, the cache is donated (aliased), and the per-chip work doubles."""
    plans = {n: plan for n, (plan, _) in _plans("talker_step", devices).items()}
    for plan in plans.values():
        _positive(plan)
        assert plan.seq == MAX_LEN and "CFG batch 16" in plan.note
    llm = TINY_T.llm
    cache = 2 * llm.num_hidden_layers * B * llm.num_key_value_heads * MAX_LEN * llm.head_dim * 2  # bf16 k, v
    assert plans[4].alias >= cache // 4 and plans[2].alias >= cache // 2  # the donated cache (+ its valid mask)
    assert plans[2].alias - plans[4].alias >= cache // 4  # the k / v stacks' per-chip bytes double (TPU tiles pad
    assert 1.9 < plans[2].alias / plans[4].alias <= 2  # the 8-wide head dim; the [rows, 64] valid mask pads alike)
    batched = plans[2].argument - plans[4].argument  # = the per-chip batched bytes at a 4-way split
    assert plans[4].alias <= batched <= 1.2 * plans[4].alias + 4096
    assert plans[2].output > 1.8 * plans[4].output
    assert 1.8 < plans[2].flops / plans[4].flops < 2.2


def test_talker_generate_is_one_loop(devices):
    """The whole generation program lowers from abstract inputs and compiles: one prefill, one while loop; it returns
    the float32 latents [B, max_steps x 4, 64] (its per-chip share) and nothing donated."""
    (plan, compiled), = _plans("talker_generate", devices, ways=(4,)).values()
    _positive(plan)
    assert "while" in compiled.as_text() and plan.alias == 0
    assert plan.seq == PROMPT + STEPS and f"up to {STEPS} steps" in plan.note
    assert plan.output >= B // 4 * STEPS * TINY_T.patch_size * TINY_T.latent_dim * 4  # (+ lengths, steps, stopped)


def test_audio_vae_decode_outputs_the_waveforms(devices):
    """The decode returns each chip's share of the float32 waveforms [B, 1, f T hop] (TPU tiles pad the 576-sample
    rows to 640 here): twice as many bytes per chip when the batch splits half as many ways; the decoder's
    parameters are replicated, the latents split."""
    out = {n: plan for n, (plan, _) in _plans("audio_vae_decode", devices).items()}
    samples = TINY_V.frames_per_latent * LATENTS * TINY_V.decoder.hop  # hop 24 is even: no extra sample
    for n, plan in out.items():
        _positive(plan)
        assert B // n * samples * 4 <= plan.output <= 1.2 * (B // n * samples * 4)
        assert plan.seq == TINY_V.frames_per_latent * LATENTS
    assert out[2].output == 2 * out[4].output
    assert aot.audio_vae_decoder_param_count(TINY_V) * 2 < out[4].argument < out[2].argument


def test_bad_arguments():
    mesh = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    with pytest.raises(ValueError, match="speech step"):
        aot.lower_speech_step("talker", mesh, aot.speech_rules("replicated"), talker=TINY_T)
    with pytest.raises(ValueError, match="max_steps"):
        aot.lower_speech_step("talker_generate", mesh, aot.speech_rules("replicated"), talker=TINY_T, batch=2,
                              max_steps=0)
    with pytest.raises(sharding.ShardingError, match="unknown sharding preset"):
        aot.speech_rules("fsdp_seq")


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ming_jax.aot", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)


def test_cli_rejects_rules_of_other_steps():
    r = _cli("--step", "talker_step", "--rules", "fsdp_seq")
    assert r.returncode != 0 and "is for the image steps" in r.stderr + r.stdout


def test_cli_compiles_a_speech_step_and_writes_its_plan(tmp_path, devices):
    """Default rules `replicated`, default 64 utterances."""
    out = tmp_path / "plans.json"
    r = _cli("--step", "audio_vae_decode", "--audio_vae_preset", "tiny", "--latents", "4", "--topology", TOPOLOGY,
             "--mesh", "fsdp=4", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "AudioVAE tiny" in r.stdout and "utterances=64" in r.stdout and "rules replicated" in r.stdout
    (plan,) = json.load(open(out))
    assert plan["mesh"] == "fsdp=4" and plan["step"] == "audio_vae_decode" and plan["rules"] == "replicated"
    assert plan["batch"] == 64 and plan["fits"] and plan["flops"] > 0
    assert plan["output"] >= 16 * 4 * 4 * 24 * 4  # 64 / 4 rows of 4 latents x 4 frames x 24 samples, float32

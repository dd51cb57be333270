"""Text to speech: the talker prompt (vs the official `omni_audio_generation_func` and `create_instruction`, through
a generator that imports the official file), the kaldi fbank of the speaker front end (vs torchaudio's), voice
registration (resampling, the release's left padding, patches, CAM++ through onnxruntime, named voices), the rows
the voice replaces, the whole pipeline (streaming equal to whole, one batch for every fragment), a release-shaped
talker folder through the checkpoint loader, the WAV writers, the errors, and one run of `python -m ming_jax.tts`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from ming_jax.config.runtime import Runtime
from ming_jax.config.speech import SpeechConfig
from ming_jax.gen import speech, tts
from ming_jax.gen import voice as voice_lib
from ming_jax.models import registry
from ming_jax.models.talker import audio_vae as vae_lib
from ming_jax.processors import audio as audio_proc
from ming_jax.processors import fbank
from ming_jax.processors import prompt as prompt_lib
from ming_jax.processors import talker_prompt as tp
from ming_jax.processors.tokenizer import ReleaseTokenizer
from ming_jax.weights.table import export_arrays, param_arrays

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
PROMPT_REF = DATA / "talker_prompt_reference"
FBANK_REF = DATA / "kaldi_fbank_reference.npz"
# Every pipeline call below runs 2 rows (prompts padded to 256) of 8 steps that never stop early: one compiled loop
# (whole and segmented) and one set of decode programs for all of them.
OPTIONS = tts.Options(max_steps=8, min_new_token=100, prompt_bucket=256)
TEXTS = ["今天天气很好，我们一起去公园散步吧。然后我们再去吃饭。", "Hello there, this is a test."]


@pytest.fixture(scope="module")
def model():
    return tts.tiny_model(0)


def _tone(sr: int, seconds: float, freq: float = 220.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --- the prompt ----------------------------------------------------------------------------------------------------


def test_prompt_matches_the_official_function():
    ref = json.loads((PROMPT_REF / "cases.json").read_text(encoding="utf-8"))
    tok = ReleaseTokenizer(str(PROMPT_REF))
    split_seen = False
    for case in ref["cases"]:
        speakers = 1 if case["speakers"] == "zero" else case["speakers"]
        instruction = None if case["instruction"] is None else tp.instruction_json(
            ref["instructions"][case["instruction"]]["input"])
        p = tp.build_prompt(tok, case["text"], task_prompt=case["task_prompt"], speakers=speakers,
                            prompt_text=case["prompt_text"], prompt_patches=case["prompt_patches"],
                            instruction=instruction)
        rows = np.asarray(case["rows"])
        assert p.length == len(rows), case["name"]
        kind = np.zeros(p.length, int)
        kind[p.speaker_rows], kind[p.patch_rows] = 1, 2
        np.testing.assert_array_equal(kind, rows[:, 1], err_msg=case["name"])
        np.testing.assert_array_equal(p.ids[kind == 0], rows[kind == 0, 0], err_msg=case["name"])
        np.testing.assert_array_equal(rows[kind == 1, 0], np.arange(p.speaker_rows.size))  # speaker k at slot k
        np.testing.assert_array_equal(rows[kind == 2, 0], np.arange(p.patch_rows.size))  # patch j at row j
        assert repr(tok.decode(p.ids)) == case["logged"], case["name"]
        assert p.ids[p.audio_row] == tok.token_id(tp.AUDIO)
        assert all(p.ids[p.speaker_rows] == tok.token_id(tp.SPEAKER_SLOT))
        assert all(p.ids[p.patch_rows] == tok.token_id(tp.AUDIO_PATCH))
        split_seen |= tok.encode(tok.decode(p.ids)) != p.ids.tolist()
    assert split_seen  # piece-wise encoding differs from encoding the joined string, and we follow the release


def test_instruction_json_matches_the_official_builder():
    ref = json.loads((PROMPT_REF / "cases.json").read_text(encoding="utf-8"))["instructions"]
    for name, case in ref.items():
        assert tp.instruction_json(case["input"], strict=False) == case["json"], name
        assert tp.instruction_json(json.dumps(case["input"], ensure_ascii=False), strict=False) == case["json"]
    with pytest.raises(tp.TalkerPromptError, match="not_an_attribute"):
        tp.instruction_json(ref["unknown_key_ignored"]["input"])
    full = json.loads(ref["emotion"]["json"])
    assert tp.instruction_json(full) == ref["emotion"]["json"]  # a whole caption is used as it is
    with pytest.raises(tp.TalkerPromptError, match="not valid JSON"):
        tp.instruction_json("{情感: 高兴}")
    with pytest.raises(tp.TalkerPromptError, match="BGM must be an object"):
        tp.instruction_json({"BGM": "loud"})


def test_prompt_errors(model):
    tok = model.tokenizer
    for empty in ("", "   \n"):
        with pytest.raises(tp.TalkerPromptError, match="empty text"):
            tp.build_prompt(tok, empty)
    with pytest.raises(tp.TalkerPromptError, match="special token"):
        tp.build_prompt(tok, "say <audioPatch> now")
    lacking = prompt_lib.StandInTokenizer({s: i for s, i in tts.TINY_SPECIALS.items() if s != tp.AUDIO})
    with pytest.raises(tp.TalkerPromptError, match="'<audio>'"):
        tp.build_prompt(lacking, "hello")
    with pytest.raises(tts.TTSError, match="empty text"):
        tts.plan(model, [""], options=OPTIONS)
    with pytest.raises(tts.TTSError, match="nothing to speak"):
        tts.plan(model, ["!!!"], options=OPTIONS)
    with pytest.raises(tts.TTSError, match="no text"):
        tts.plan(model, [], options=OPTIONS)


# --- the speaker front end -------------------------------------------------------------------------------------------


def test_kaldi_fbank_matches_torchaudio():
    ref = np.load(FBANK_REF)
    for name in ("chirp", "short"):
        ours = fbank.kaldi_fbank(ref[f"{name}_wave"])
        assert ours.shape == ref[f"{name}_fbank"].shape
        np.testing.assert_allclose(ours, ref[f"{name}_fbank"], atol=5e-4, rtol=0)  # log energies, float32 FFTs
    try:
        import torchaudio.compliance.kaldi as kaldi
    except ImportError:
        kaldi = None
    if kaldi is not None:  # the installed torchaudio too, when there is one
        import torch

        wave = ref["chirp_wave"]
        want = kaldi.fbank(torch.from_numpy(wave)[None], num_mel_bins=80, dither=0, sample_frequency=16000).numpy()
        np.testing.assert_allclose(fbank.kaldi_fbank(wave), want, atol=5e-4, rtol=0)
    feats = fbank.speaker_features(ref["chirp_wave"])
    np.testing.assert_allclose(feats.mean(axis=0), 0.0, atol=1e-5)
    with pytest.raises(audio_proc.AudioError, match="shorter than one"):
        fbank.kaldi_fbank(np.zeros(399, np.float32))
    banks = fbank.mel_banks(80, 512, 16000.0)
    assert banks.shape == (80, 257) and not banks[:, -1].any() and np.all(banks.max(axis=1) > 0.4)


def _write_campplus(path: str, seed: int = 0) -> np.ndarray:
    """A stand-in CAM++ graph with the release's interface: feats [1, T, 80] -> mean over T -> x W [1, 192]."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(80, 192)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["feats"], ["pooled"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["embedding"])],
        "campplus_stand_in", [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, None, 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 192])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return w


# --- voices ----------------------------------------------------------------------------------------------------------


def test_voice_registration(model, tmp_path):
    talker, vae = model.talker, model.audio_vae
    unit = voice_lib.pad_unit(talker, vae)
    assert unit == tts.TINY_HOP * 4 * talker.cfg.patch_size  # hop * VAE patch * talker patch (14112 in the release)
    clip16 = _tone(16000, 0.3)  # 4800 samples at 16 kHz: resampled to 13230 at 44.1 kHz, padded to 14112
    v = voice_lib.register_voice(talker, vae, [(clip16, 16000)], "hi", deterministic=True)
    up = audio_proc.resample(clip16, 16000, 44100)
    padded = voice_lib.pad_left(up, unit)
    assert up.shape == (13230,) and padded.shape == (4 * unit,) and not padded[:-up.shape[0]].any()
    n = padded.shape[0] // (tts.TINY_HOP * 4)  # latents
    assert v.prompt_latents.shape == (n, talker.cfg.latent_dim) and n % talker.cfg.patch_size == 0
    assert v.prompt_embeds.shape == (n // talker.cfg.patch_size, talker.cfg.hidden_size)
    assert v.num_patches == n // talker.cfg.patch_size and v.speaker_embeds is None
    # the same clip given at 44.1 kHz (padded by hand: the padding is idempotent) gives the same voice
    same = voice_lib.register_voice(talker, vae, [(padded, 44100)], "hi", deterministic=True)
    np.testing.assert_allclose(same.prompt_latents, v.prompt_latents, atol=1e-6)
    mean = np.asarray(vae_lib.encode(vae, jnp.asarray(padded)[None], noise=jnp.zeros((1, n, 8)))[1][0])
    np.testing.assert_allclose(v.prompt_latents, mean, atol=1e-6)  # deterministic: the posterior mean
    agg = np.asarray(voice_lib._aggregate(talker, jnp.asarray(mean).reshape(-1, 2, 8)))  # patch p = latents 2p, 2p+1
    np.testing.assert_allclose(v.prompt_embeds, agg, atol=1e-5)
    sampled = voice_lib.register_voice(talker, vae, [(clip16, 16000)], "hi", key=jax.random.key(3))
    assert not np.allclose(sampled.prompt_latents, v.prompt_latents)
    with pytest.raises(ValueError, match="key"):
        voice_lib.encode_prompt_audio(talker, vae, padded)

    # two speakers: the clips are joined (after resampling) before padding; one speaker row per clip
    clip1, clip2 = clip16[:2400], _tone(22050, 0.1, 330.0)  # 6615 + 4410 samples at 44.1 kHz, padded to 14112
    raw = np.random.default_rng(0).normal(size=(2, 192)).astype(np.float32)
    two = voice_lib.register_voice(talker, vae, [(clip1, 16000), (clip2, 22050)], "a|b", speaker_embeddings=raw,
                                   deterministic=True)
    joined = voice_lib.pad_left(np.concatenate([audio_proc.resample(clip1, 16000, 44100),
                                                audio_proc.resample(clip2, 22050, 44100)]), unit)
    assert joined.shape == padded.shape
    mean2 = np.asarray(vae_lib.encode(vae, jnp.asarray(joined)[None], noise=jnp.zeros((1, n, 8)))[1][0])
    np.testing.assert_allclose(two.prompt_latents, mean2, atol=1e-6)
    spk = np.asarray(jnp.asarray(raw) @ talker.spk_head.kernel.get_value() + talker.spk_head.bias.get_value())
    np.testing.assert_allclose(two.speaker_embeds, spk, rtol=1e-5, atol=1e-5)
    assert two.num_speakers == 2
    # a precomputed embedding file; the all-zero slot; a saved voice round trip
    np.save(tmp_path / "spk.npy", raw[0])
    from_file = voice_lib.register_voice(talker, vae, [(clip1, 16000)], None, deterministic=True,
                                         speaker_embeddings=voice_lib.load_speaker_embedding(str(tmp_path / "spk.npy")))
    np.testing.assert_allclose(from_file.speaker_embeds, two.speaker_embeds[:1], rtol=1e-6, atol=1e-6)
    zero = voice_lib.text_only_voice(talker, speaker="zero")
    assert zero.speaker_embeds.shape == (1, talker.cfg.hidden_size) and not zero.speaker_embeds.any()
    two.save(str(tmp_path / "voice.npz"))
    back = voice_lib.Voice.load(str(tmp_path / "voice.npz"))
    assert back.prompt_text == "a|b" and np.array_equal(back.speaker_embeds, two.speaker_embeds)
    np.save(tmp_path / "bad.npy", np.zeros(7))
    with pytest.raises(voice_lib.VoiceError, match=r"expected finite \[192\]"):
        voice_lib.load_speaker_embedding(str(tmp_path / "bad.npy"))


def test_campplus_through_onnxruntime(model, tmp_path):
    pytest.importorskip("onnxruntime")
    path = str(tmp_path / "campplus.onnx")
    w = _write_campplus(path)
    cam = voice_lib.CampPlus(path)
    clips = [_tone(16000, 0.15), audio_proc.resample(_tone(22050, 0.1, 330.0), 22050, 16000)]
    for clip in clips:  # the graph sees the mean-normalised fbank of the 16 kHz clip
        np.testing.assert_allclose(cam(clip), fbank.speaker_features(clip).mean(axis=0) @ w, rtol=1e-4, atol=1e-4)
    v = voice_lib.register_voice(model.talker, model.audio_vae, [(clips[0], 16000), (_tone(22050, 0.1, 330.0), 22050)],
                                 "a|b", speaker=cam, deterministic=True)
    want = voice_lib.speaker_rows(model.talker, np.stack([cam(c) for c in clips]))
    np.testing.assert_allclose(v.speaker_embeds, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(voice_lib.VoiceError, match="onnxruntime cannot load"):
        (tmp_path / "broken.onnx").write_bytes(b"not a model")
        voice_lib.CampPlus(str(tmp_path / "broken.onnx"))


def test_named_voices_and_clip_errors(model, tmp_path):
    folder = tmp_path / "talker"
    (folder / "data" / "spks").mkdir(parents=True)
    soundfile.write(folder / "data" / "spks" / "a.wav", _tone(24000, 0.2), 24000)
    (folder / "data" / "spks" / "corrupt.wav").write_bytes(b"RIFF\x00\x00not a wave file at all")
    entries = {"rel": {"prompt_text": "你好", "prompt_wav_path": "data/spks/a.wav"},
               "authoring": {"prompt_text": "hi", "prompt_wav_path": "/home/someone/ckpt/talker/data/spks/a.wav"},
               "gone": {"prompt_text": "x", "prompt_wav_path": "data/spks/missing.wav"},
               "corrupt": {"prompt_text": "x", "prompt_wav_path": "data/spks/corrupt.wav"}}
    (folder / "data" / "voice_name.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    for name in ("rel", "authoring"):
        assert voice_lib.named_voice(str(folder), name).wav == str(folder / "data" / "spks" / "a.wav")
    with pytest.raises(voice_lib.VoiceError, match=r"voice 'gone'.*data/spks/missing.wav"):
        voice_lib.named_voice(str(folder), "gone")
    with pytest.raises(voice_lib.VoiceError, match=r"unknown voice 'DB30'.*authoring, corrupt, gone, rel"):
        voice_lib.named_voice(str(folder), "DB30")
    with pytest.raises(voice_lib.VoiceError, match="unknown voice 'DB30'.*no talker folder"):
        tts.make_voice(model, name="DB30")  # the tiny model has no voices
    with pytest.raises(voice_lib.VoiceError, match="corrupt.wav"):
        voice_lib.read_clip(voice_lib.named_voice(str(folder), "corrupt").wav)
    with pytest.raises(voice_lib.VoiceError, match="not found"):
        voice_lib.read_clip(str(tmp_path / "nowhere.wav"))
    with pytest.raises(voice_lib.VoiceError, match="sample rate"):
        voice_lib.register_voice(model.talker, model.audio_vae, [(_tone(16000, 0.1), 0)], None, deterministic=True)
    with pytest.raises(voice_lib.VoiceError, match="empty"):
        voice_lib.register_voice(model.talker, model.audio_vae, [(np.zeros(0, np.float32), 16000)], None,
                                 deterministic=True)


# --- the pipeline ----------------------------------------------------------------------------------------------------


def _voice(model, speakers: int = 1):
    talker = model.talker
    rng = np.random.default_rng(1)
    lat = rng.normal(size=(6, talker.cfg.latent_dim)).astype(np.float32)
    return voice_lib.Voice(lat, voice_lib.prompt_embeddings(talker, lat), "参考文本",
                           rng.normal(size=(speakers, talker.cfg.hidden_size)).astype(np.float32), "test")


def test_the_voice_rows_are_substituted(model):
    voice = _voice(model, speakers=2)
    reqs = tts.plan(model, TEXTS, voice, OPTIONS)
    assert [(r.text_index, r.fragment_index) for r in reqs] == [(0, 0), (0, 1), (1, 0)]
    embeds, lengths = tts.embed(model, reqs, voice)
    table = np.asarray(model.talker.llm.embed.get_value())
    for i, r in enumerate(reqs):
        e = np.asarray(embeds[i])
        np.testing.assert_array_equal(e[r.prompt.speaker_rows], voice.speaker_embeds)
        np.testing.assert_array_equal(e[r.prompt.patch_rows], voice.prompt_embeds)
        keep = np.setdiff1d(np.arange(r.prompt.length), np.concatenate([r.prompt.speaker_rows, r.prompt.patch_rows]))
        np.testing.assert_array_equal(e[keep], table[r.prompt.ids[keep]])
        assert lengths[i] == r.prompt.length and r.prompt.patch_rows.size == 3 and r.prompt.speaker_rows.size == 2
    with pytest.raises(voice_lib.VoiceError, match="does not fit"):
        tts.plan(model, TEXTS, voice_lib.Voice(prompt_latents=np.zeros((5, 8), np.float32)), OPTIONS)


def test_streaming_equals_whole_and_segments_equal_the_loop(model):
    voice = _voice(model)
    texts = [TEXTS[1], "Second text."]
    whole = tts.synthesize(model, texts, voice, key=0, options=OPTIONS)
    assert [u.steps for u in whole] == [[8], [8]] and all(u.sample_rate == 44100 for u in whole)
    streamer = tts.SpeechStreamer(model, texts, voice, key=0, options=OPTIONS, chunk_steps=3)
    chunks = list(streamer)
    assert len(chunks) >= 4 and {c.text_index for c in chunks} == {0, 1}
    for t, u in enumerate(whole):
        got = np.concatenate([c.audio for c in chunks if c.text_index == t])
        assert got.shape == u.audio.shape
        np.testing.assert_allclose(got, u.audio, atol=1e-5)
    assert 0 < streamer.first_audio <= streamer.elapsed and np.isfinite(streamer.rtf)
    assert streamer.audio_seconds == pytest.approx(sum(u.seconds for u in whole))

    # the segmented loop emits the latents of one generate_speech call
    reqs = tts.plan(model, texts, voice, OPTIONS)
    embeds, lengths = tts.embed(model, reqs, voice)
    lat = np.broadcast_to(voice.prompt_latents[None], (2,) + voice.prompt_latents.shape)
    args = dict(prompt_latents=lat, key=jax.random.key(0), max_steps=8, min_new_token=100, prompt_bucket=256)
    full = speech.generate_speech(model.talker, embeds, lengths, **args)
    stream = speech.SpeechStream(model.talker, embeds, lengths, **args)
    parts = []
    while not stream.finished:
        parts.append(np.asarray(stream.advance(3).latents))
    np.testing.assert_allclose(np.concatenate(parts, axis=1)[:, :16], np.asarray(full.latents), atol=1e-5)


def test_fragments_of_a_text_play_in_order_and_the_length_guard(model):
    streamer = tts.SpeechStreamer(model, [TEXTS[0]], key=1, options=OPTIONS, chunk_steps=3)
    seen = [c.fragment_index for c in streamer]
    assert seen == sorted(seen) and set(seen) == {0, 1}
    assert streamer.steps == [8, 8]
    # the release's guard on a first fragment: audio past 2 s and past len(text) * 5818 / 16000 s ends it
    req = tts.plan(model, ["好"], options=OPTIONS)[0]
    row = tts._Row(model, req, 64, guarded=True)
    row.chunks, row.samples = [np.zeros(1)], int(2.01 * 44100)
    assert row.guard_tripped() and row.feed(np.zeros((4, 8), np.float32), False, OPTIONS) is None and row.halted
    long_text = tts.plan(model, ["一二三四五六七八九十"], options=OPTIONS)[0]  # 10 chars: 3.6 s allowed
    assert not tts._Row(model, long_text, 64, guarded=True).guard_tripped()
    row = tts._Row(model, long_text, 64, guarded=True)
    row.chunks, row.samples = [np.zeros(1)], int(3.7 * 44100)
    assert row.guard_tripped() and not tts._Row(model, req, 64, guarded=False).guard_tripped()


def test_a_halted_row_ends_without_touching_the_others(model):
    reqs = tts.plan(model, [TEXTS[1], "Second text."], options=OPTIONS)
    embeds, lengths = tts.embed(model, reqs)
    args = dict(key=jax.random.key(0), max_steps=8, min_new_token=100, prompt_bucket=256)
    free, halted = (speech.SpeechStream(model.talker, embeds, lengths, **args) for _ in range(2))
    a = [np.asarray(free.advance(3).latents) for _ in range(3)]
    b = [np.asarray(halted.advance(3, halt=[False, i > 0]).latents) for i in range(3)]
    assert halted.finished and free.finished
    np.testing.assert_allclose(np.concatenate(b, 1)[0], np.concatenate(a, 1)[0], atol=1e-6)
    assert not np.concatenate(b, 1)[1, 6:].any() and np.allclose(b[0][1], a[0][1], atol=1e-6)


# --- a release-shaped talker folder through the checkpoint loader -----------------------------------------------------


def _write_talker_folder(model, folder: pathlib.Path) -> None:
    """A bare talker folder as the release lays it out, holding `model`'s weights under the official names."""
    speech_cfg = SpeechConfig(talker=model.talker.cfg, vae=model.audio_vae.cfg)
    part = registry.talker_part(speech_cfg, "", Runtime())
    arrays = {f"talker.{k}": v for k, v in param_arrays(model.talker).items()}
    arrays.update({f"audio_vae.{k}": v for k, v in param_arrays(model.audio_vae).items()})
    tensors = export_arrays(part.table, arrays)
    from safetensors.numpy import save_file

    for key, rel in registry.TALKER_CONFIG_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(dict(speech_cfg.to_official()[key], torch_dtype="float32")))
    vae = registry.TALKER_VAE_PREFIX
    save_file({k: v for k, v in tensors.items() if not k.startswith(vae)}, str(folder / "model.safetensors"))
    save_file({k[len(vae):]: v for k, v in tensors.items() if k.startswith(vae)},
              str(folder / "vae" / "model.safetensors"))
    model.tokenizer.save(str(folder / "llm"))
    (folder / "data" / "spks").mkdir(parents=True)
    soundfile.write(folder / "data" / "spks" / "demo.wav", _tone(16000, 0.3), 16000)
    (folder / "data" / "voice_name.json").write_text(json.dumps(
        {"demo": {"prompt_text": "感谢你的认可。", "prompt_wav_path": "data/spks/demo.wav"}}, ensure_ascii=False))
    try:
        _write_campplus(str(folder / "campplus.onnx"))
    except pytest.skip.Exception:  # no onnx to write the stand-in CAM++ with: the folder goes without one
        pass


def test_checkpoint_branch_loads_a_talker_folder(model, tmp_path):
    folder = tmp_path / "talker"
    folder.mkdir()
    _write_talker_folder(model, folder)
    loaded = tts.load_model(str(folder), dtype="float32")
    assert loaded.folder == str(folder) and not loaded.random and loaded.sample_rate == 44100
    voice, notes = tts.make_voice(loaded, name="demo", deterministic=True)
    if voice_lib.onnxruntime_available() and (folder / "campplus.onnx").exists():
        assert voice.num_speakers == 1 and not notes
    else:
        assert voice.num_speakers == 0 and "no speaker embedding" in notes[0]
    assert voice.prompt_text == "感谢你的认可。" and voice.num_patches == 4
    a = tts.synthesize(loaded, TEXTS[1:] * 2, voice, key=2, options=OPTIONS)
    b = tts.synthesize(model, TEXTS[1:] * 2, voice, key=2, options=OPTIONS)
    np.testing.assert_array_equal(a[0].audio, b[0].audio)  # the loaded weights are the tiny model's
    with pytest.raises(voice_lib.VoiceError, match="unknown voice 'DB30'.*known voices: demo"):
        tts.make_voice(loaded, name="DB30")


# --- WAV files and the CLI ------------------------------------------------------------------------------------------


def test_wav_writers_are_atomic(tmp_path):
    out = tmp_path / "sub" / "a.wav"
    clipped = tts.write_wav(str(out), np.array([0.5, 2.0, -3.0], np.float32), 44100)
    data, sr = soundfile.read(out)
    assert sr == 44100 and clipped == 2 and np.allclose(data, [0.5, 1.0, -1.0], atol=1e-4)
    stream = tts.WavStream(str(tmp_path / "b.wav"), 44100, "FLOAT")
    stream.write(np.ones(10, np.float32))
    assert not (tmp_path / "b.wav").exists() and os.path.exists(stream.tmp) and stream.tmp.endswith(".partial")
    stream.write(np.zeros(5, np.float32))
    stream.close()
    data, sr = soundfile.read(tmp_path / "b.wav")
    assert data.shape == (15,) and soundfile.info(tmp_path / "b.wav").subtype == "FLOAT"
    aborted = tts.WavStream(str(tmp_path / "c.wav"), 44100)
    aborted.write(np.ones(3, np.float32))
    aborted.abort()
    assert sorted(os.listdir(tmp_path)) == ["b.wav", "sub"]
    assert tts.numbered("x/o.wav", 1, 2) == "x/o_1.wav" and tts.numbered("o.wav", 0, 1) == "o.wav"


def test_cli_streams_into_a_wav(tmp_path):
    out = tmp_path / "out.wav"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ming_jax.tts", "--text", "Hello there.", "--speaker", "zero",
                        "--instruction", '{"情感": "高兴"}', "--stream", "--chunk_steps", "3", "--max_steps", "8",
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "TINY talker and AudioVAE with RANDOM weights" in r.stderr
    assert "time to first audio" in r.stderr and "RTF" in r.stderr and "1 speaker slot" in r.stderr
    info = soundfile.info(out)
    assert info.samplerate == 44100 and info.channels == 1 and info.subtype == "PCM_16" and info.frames > 0
    assert os.listdir(tmp_path) == ["out.wav"]  # no .partial file left

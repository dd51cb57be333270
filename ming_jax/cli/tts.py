"""Text-to-speech CLI (the talker).

    python -m ming_jax.tts --checkpoint DIR --text "你好，欢迎使用百灵。" --voice DB30 --out hello.wav
    python -m ming_jax.tts --checkpoint DIR --text "..." --voice_wav ref.wav --voice_text "what ref.wav says" --stream
    python -m ming_jax.tts --checkpoint DIR --text "..." --instruction '{"情感": "高兴"}' --voice_wav ref.wav
    python -m ming_jax.tts --checkpoint DIR --task music --text " Genre: jazz. Mood: calm. Instrument: piano. \
        Theme: night. Duration: 30s." --out music.wav
    python -m ming_jax.tts --text "anything"       # no checkpoint: TINY components with RANDOM weights

DIR is an omni release folder (its talker/ sub-folder), a bare talker/ folder, or a converted checkpoint of either;
the talker and its AudioVAE load through `ming_jax.checkpoint.load(components=["talker"])`. Voices: a name from the
folder's data/voice_name.json, reference clips (--voice_wav, repeatable: one speaker each) with their transcript
(--voice_text), or a voice saved with --save_voice (--voice_npz). The speaker embedding (CAM++, campplus.onnx)
needs onnxruntime (pip install 'ming_jax[campplus]') or a precomputed --speaker_embedding .npy. The text is cut into
the release's fragments (--task speech; --nocut keeps it whole), every fragment of every --text runs as one batch.
--stream writes audio to OUT's .partial file as it is produced and renames it at the end; the time to first audio
and the real-time factor are printed either way. WAVs are written atomically (16-bit PCM, or --wav_format FLOAT).
"""

from __future__ import annotations

import sys
import time

import jax
from absl import app, flags

from ming_jax import cli
from ming_jax.checkpoint.safetensors import CheckpointError
from ming_jax.gen import tts
from ming_jax.gen import voice as voice_lib
from ming_jax.processors import audio as audio_proc
from ming_jax.processors import talker_prompt as tp

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Omni release folder (with talker/), a talker folder, or a "
                                  "converted checkpoint of either.")
_TEXT = flags.DEFINE_multi_string("text", ["Hello! This is the talker speaking."], "Text to speak; repeat for a "
                                  "batch (one WAV each: OUT_0.wav, OUT_1.wav, ...).")
_VOICE = flags.DEFINE_string("voice", None, "A voice name of the talker folder's data/voice_name.json (the release "
                             "uses DB30 by default).")
_VOICE_WAV = flags.DEFINE_multi_string("voice_wav", [], "Reference clip to clone (any rate; repeat for the speakers "
                                       "of a dialogue, in order).")
_VOICE_TEXT = flags.DEFINE_string("voice_text", None, "What the reference clip(s) say (without it the clip only "
                                  "seeds the latent history, as in the release).")
_VOICE_NPZ = flags.DEFINE_string("voice_npz", None, "A voice saved with --save_voice.")
_SAVE_VOICE = flags.DEFINE_string("save_voice", None, "Also save the voice used to this .npz.")
_SPEAKER = flags.DEFINE_enum("speaker", "auto", list(tts.SPEAKER_MODES), "Speaker embedding: auto (CAM++ when "
                             "possible), campplus (required), zero (the release's all-zero slot), none.")
_SPEAKER_EMB = flags.DEFINE_multi_string("speaker_embedding", [], "A precomputed 192-d CAM++ embedding (.npy), one "
                                         "per reference clip.")
_INSTRUCTION = flags.DEFINE_string("instruction", None, "JSON of caption attributes, e.g. '{\"情感\": \"高兴\"}' or "
                                   "'{\"语速\": \"快速\"}', or a full caption with audio_sequence.")
_TASK = flags.DEFINE_enum("task", "speech", ["speech", "audio", "music"], "The talker's task prompt: speech, audio "
                          "events (TTA), music (BGM).")
_CUT = flags.DEFINE_bool("cut", None, "Cut the text into the release's fragments (default: yes for --task speech).")
_OUT = flags.DEFINE_string("out", "speech.wav", "Output WAV path.")
_STREAM = flags.DEFINE_bool("stream", False, "Stream: write audio as it is produced.")
_CHUNK = flags.DEFINE_integer("chunk_steps", 4, "Streaming: talker steps per decoded chunk.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling noise (and of the random tiny weights).")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance strength (default: the config's, 2.0).")
_SIGMA = flags.DEFINE_float("sigma", None, "SDE noise scale (default: the config's, 0.25).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "SDE temperature (default: the config's, 0).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Talker steps per fragment at most (default: the config's).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter and compute dtype (default: the "
                           "checkpoint's; float32 for the tiny default).")
_WAV_FORMAT = flags.DEFINE_enum("wav_format", "PCM_16", list(tts.WAV_SUBTYPES), "WAV sample format.")
_DETERMINISTIC_VOICE = flags.DEFINE_bool("deterministic_voice", False, "Use the VAE posterior mean of the reference "
                                         "clip instead of a sample.")

_TASK_PROMPTS = {"speech": tp.SPEECH_TASK, "audio": tp.AUDIO_EVENT_TASK, "music": tp.MUSIC_TASK}


def _model() -> tts.TTSModel:
    if _CHECKPOINT.value:
        print(f"loading the talker of {_CHECKPOINT.value} ...", file=sys.stderr)
        return tts.load_model(_CHECKPOINT.value, dtype=_DTYPE.value)
    print("No --checkpoint given: running a TINY talker and AudioVAE with RANDOM weights and a byte-level stand-in "
          "tokenizer. The audio is noise; it only shows the pipeline (prompt -> talker loop -> AudioVAE -> WAV) "
          "working end to end.", file=sys.stderr)
    return tts.tiny_model(_SEED.value, _DTYPE.value)


def _voice(model: tts.TTSModel, key) -> voice_lib.Voice:
    if _VOICE_NPZ.value:
        if _VOICE.value or _VOICE_WAV.value:
            raise app.UsageError("--voice_npz excludes --voice / --voice_wav")
        return voice_lib.Voice.load(_VOICE_NPZ.value)
    if _VOICE.value and _VOICE_WAV.value:
        raise app.UsageError("give --voice or --voice_wav, not both")
    if _VOICE_TEXT.value is not None and not _VOICE_WAV.value:
        raise app.UsageError("--voice_text describes --voice_wav, which is not given")
    voice, notes = tts.make_voice(model, name=_VOICE.value, wavs=_VOICE_WAV.value, prompt_text=_VOICE_TEXT.value,
                                  speaker=_SPEAKER.value, speaker_files=_SPEAKER_EMB.value, key=key,
                                  deterministic=_DETERMINISTIC_VOICE.value)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return voice


def _describe(voice: voice_lib.Voice) -> str:
    if voice.prompt_latents is None and not voice.num_speakers:
        return "no voice prompt"
    parts = [f"{voice.num_patches} prompt patch(es)" if voice.prompt_latents is not None else "no prompt audio",
             f"{voice.num_speakers} speaker slot(s)",
             "no prompt text" if voice.prompt_text is None else f"prompt text {voice.prompt_text!r}"]
    return f"voice {voice.name!r}: " + ", ".join(parts)


def _stream(model, texts, voice, options, key) -> None:
    streamer = tts.SpeechStreamer(model, texts, voice, key=key, options=options, chunk_steps=_CHUNK.value)
    paths = [tts.numbered(_OUT.value, i, len(texts)) for i in range(len(texts))]
    writers = [tts.WavStream(p, model.sample_rate, _WAV_FORMAT.value) for p in paths]
    try:
        for chunk in streamer:
            writers[chunk.text_index].write(chunk.audio)
            sys.stderr.write(f"\r{streamer.audio_seconds:.2f} s of audio after {chunk.elapsed:.2f} s ")
            sys.stderr.flush()
        sys.stderr.write("\n")
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for p, w, n in zip(paths, writers, streamer.samples):
        clipped = f", {w.clipped} samples clipped to [-1, 1]" if w.clipped else ""
        print(f"wrote {p}: {n / model.sample_rate:.2f} s at {model.sample_rate} Hz{clipped}", file=sys.stderr)
    first = "none" if streamer.first_audio is None else f"{streamer.first_audio:.2f} s"
    print(f"time to first audio {first}; {streamer.elapsed:.2f} s for {streamer.audio_seconds:.2f} s of audio: "
          f"RTF {streamer.rtf:.2f} (including compilation)", file=sys.stderr)


def _whole(model, texts, voice, options, key) -> None:
    t0 = time.perf_counter()
    utterances = tts.synthesize(model, texts, voice, key=key, options=options)
    wall = time.perf_counter() - t0
    total = 0.0
    for i, u in enumerate(utterances):
        path = tts.numbered(_OUT.value, i, len(texts))
        clipped = tts.write_wav(path, u.audio, u.sample_rate, _WAV_FORMAT.value)
        total += u.seconds
        stops = sum(u.stopped)
        print(f"wrote {path}: {u.seconds:.2f} s at {u.sample_rate} Hz, {len(u.fragments)} fragment(s), "
              f"{sum(u.steps)} talker steps ({stops} ended by the stop head)"
              f"{f', {clipped} samples clipped to [-1, 1]' if clipped else ''}", file=sys.stderr)
    rtf = wall / total if total else float("inf")
    print(f"time to first audio {wall:.2f} s (not streaming: the whole batch); {wall:.2f} s for {total:.2f} s of "
          f"audio: RTF {rtf:.2f} (including compilation)", file=sys.stderr)


def main(argv):
    del argv
    if _CHUNK.value < 1:
        raise app.UsageError(f"--chunk_steps {_CHUNK.value}: at least one step")
    if _MAX_STEPS.value is not None and _MAX_STEPS.value < 1:
        raise app.UsageError(f"--max_steps {_MAX_STEPS.value}: at least one step")
    texts = list(_TEXT.value)
    try:
        instruction = tp.instruction_json(_INSTRUCTION.value)
        model = _model()
        key = jax.random.key(_SEED.value)
        voice = _voice(model, jax.random.fold_in(key, 1))
        if _SAVE_VOICE.value:
            voice.save(_SAVE_VOICE.value)
        cut = _TASK.value == "speech" if _CUT.value is None else _CUT.value
        options = tts.Options(task_prompt=_TASK_PROMPTS[_TASK.value], instruction=instruction, cut=cut,
                              cfg=_CFG.value, sigma=_SIGMA.value, temperature=_TEMPERATURE.value,
                              max_steps=_MAX_STEPS.value)
        tts.plan(model, texts, voice, options)  # bad texts fail before any compilation
        print(f"{len(texts)} text(s); {_describe(voice)}; task {_TASK.value}"
              f"{', instruction ' + instruction if instruction else ''}", file=sys.stderr)
        run = _stream if _STREAM.value else _whole
        run(model, texts, voice, options, jax.random.fold_in(key, 0))
    except (tts.TTSError, voice_lib.VoiceError, tp.TalkerPromptError, audio_proc.AudioError, CheckpointError) as e:
        print(f"tts: {e}", file=sys.stderr)
        return 1
    return 0


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()

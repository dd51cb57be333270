"""Text to speech with the talker: texts + a voice -> 44.1 kHz audio, whole or streamed.

    text -> fragments             `processors.speech_text.speech_fragments` (the release's sentence gathering and
                                  cut to at most `max_length` characters) and `prepare_fragment` (number reading
                                  for non-Chinese text, the text normaliser, a leading "，" dropped); cut=False
                                  keeps the text whole (the release's TTA / BGM / podcast / style tasks)
                                  (`speech_tn.make_normaliser()` unless Options.normaliser says otherwise)
    fragment -> talker prompt     `processors.talker_prompt.build_prompt` with the voice's speaker slots, prompt
                                  text and audio-patch rows
    prompt -> embeddings          the LM's embedding table, the speaker / patch rows replaced by the voice's
    embeddings -> latents         `gen.speech.generate_speech`: EVERY fragment of EVERY text as one row of one batch
                                  (one jitted prefill + one while_loop; rows stop on their own)
    latents -> audio              AudioVAE decode per row, the release's trailing-silence trim per fragment, the
                                  fragments of a text joined in order

Streaming (`SpeechStreamer`) runs the same batch through `gen.speech.SpeechStream` in segments of `chunk_steps`
steps; after each segment every row's new latents go through its own streaming AudioVAE decode
(`audio_vae.decode_chunk`, one latent of look-ahead: a row's first segment is held back) and silence trim, and the
audio of each text is yielded in order as soon as it exists (a later fragment's audio waits until the fragments
before it are complete). The release streams by polling every 0.1 s and decoding whatever steps arrived; here a
chunk is a fixed number of steps, and the audio is the same either way (the streaming decode equals the full one to
float rounding). As in the release, the FIRST fragment of each text has a streaming length guard: once its audio
passes both 2 s and len(text) * 5818 / 16000 s, no further chunk is emitted and the row is ended.

The random tiny model (`tiny_model`) and the checkpoint loader (`load_model`) give the same `TTSModel`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.checkpoint import folders
from ming_jax.checkpoint import restore
from ming_jax.config.audio_vae import AudioVAEConfig, AudioVAEDecoderConfig, AudioVAEEncoderConfig
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.config.runtime import Runtime
from ming_jax.config.talker import AggregatorConfig, FlowModelConfig, GenerateConfig, TalkerConfig
from ming_jax.gen import speech
from ming_jax.gen import voice as voice_lib
from ming_jax.gen.voice import NO_VOICE, Voice, VoiceError
from ming_jax.models.talker import audio_vae as vae_lib
from ming_jax.models.talker import talker as talker_lib
from ming_jax.models.talker.audio_vae import AudioVAE
from ming_jax.models.talker.talker import Talker
from ming_jax.processors import prompt as prompt_lib
from ming_jax.processors import speech_text, speech_tn
from ming_jax.processors import talker_prompt as tp
from ming_jax.processors import tokenizer as tokenizer_lib

FRAGMENT_LENGTH = 50  # the release's max_length of a text piece
GUARD_MIN_SECONDS = 2.0  # the release's streaming guard: audio longer than 2 s ...
GUARD_SECONDS_PER_CHAR = 5818 / 16000  # ... and than this many seconds per character of the fragment
DEFAULT_VOICE = "DB30"  # the release's default voice_name


class TTSError(ValueError):
    """A synthesis request that cannot run: nothing to speak, a prompt that does not fit, a bad option."""


# --- the model ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TTSModel:
    talker: Talker
    audio_vae: AudioVAE
    tokenizer: object
    folder: str | None = None  # the talker folder (llm/, data/voice_name.json, campplus.onnx); None: tiny
    random: bool = False  # random weights (the tiny demo)

    @property
    def sample_rate(self) -> int:
        return int(self.audio_vae.cfg.sample_rate)


TINY_SPECIALS = {s: 256 + i for i, s in enumerate(tp.SPECIAL_TOKENS + ("<|endoftext|>",))}
TINY_VOCAB = 256 + len(TINY_SPECIALS)
TINY_HOP = 441  # 10 ms frames at 44.1 kHz: a tiny latent is 40 ms, a tiny talker step 80 ms


def tiny_configs() -> tuple[TalkerConfig, AudioVAEConfig]:
    """A talker whose LM vocabulary holds the byte stand-in tokenizer + the talker's special tokens, and a 44.1 kHz
    AudioVAE with 10 ms frames and the talker's latent width."""
    latent = 8
    llm = Qwen2Config.tiny(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48)
    flow = FlowModelConfig(hidden_size=16, depth=1, num_heads=2, in_channels=latent, qk_norm="rms_norm",
                           llm_cond_dim=32, attn_backend="torch", dropout=0.0)
    agg = AggregatorConfig(hidden_size=24, depth=1, num_heads=2, in_channels=latent, attn_backend="torch",
                           dropout=0.0)
    talker = TalkerConfig(llm=llm, flow=flow, aggregator=agg, steps=2, patch_size=2, history_patch_size=6,
                          latent_dim=latent, generate=GenerateConfig(min_new_token=2, max_steps=64))
    bb = Qwen2Config(vocab_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    vae = AudioVAEConfig(encoder=AudioVAEEncoderConfig(bb.replace(num_hidden_layers=4), input_dim=TINY_HOP,
                                                       hop_size=TINY_HOP, latent_dim=latent),
                         decoder=AudioVAEDecoderConfig(bb, output_dim=TINY_HOP, latent_dim=latent), patch_size=4,
                         sample_rate=44100)
    return talker, vae


def _host_random(abstract, seed: int):
    """Fill an abstract module's parameters from a numpy RNG (norm scales near 1, the iSTFT window the Hann window
    it is stored as): no init program to compile, which dominates a tiny model's start-up otherwise."""
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = list(nnx.to_flat_state(params))
    for path, var in flat:
        shape, dtype = var.get_value().shape, var.get_value().dtype
        name = str(path[-1])
        if name == "window":
            value = vae_lib.hann_window(shape[0])
        elif name == "scale":
            value = 1 + 0.1 * rng.normal(size=shape)
        else:
            value = (0.15 if len(shape) > 1 else 0.05) * rng.normal(size=shape)
        var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def tiny_model(seed: int = 0, dtype: str | None = None) -> TTSModel:
    """TINY components with RANDOM weights and a byte-level stand-in tokenizer (the demo / test default)."""
    talker_cfg, vae_cfg = tiny_configs()
    runtime = Runtime(dtype=dtype, param_dtype=dtype) if dtype else Runtime()
    talker = _host_random(talker_lib.create_abstract(talker_cfg, runtime), seed)
    vae = _host_random(nnx.eval_shape(lambda: AudioVAE(vae_cfg, runtime, rngs=nnx.Rngs(0))), seed + 1)
    return TTSModel(talker, vae, prompt_lib.StandInTokenizer(TINY_SPECIALS), None, True)


def load_model(path: str, *, dtype: str | None = None, mesh=None, rules=None) -> TTSModel:
    """The talker, its AudioVAE and its tokenizer from an omni release / converted checkpoint / talker folder
    (`ming_jax.checkpoint.load(path, components=["talker"])`)."""
    folder = folders.talker_dir(path)
    tok_dir = os.path.join(folder, "llm")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise TTSError(f"{path}: the talker's tokenizer {os.path.join(tok_dir, 'tokenizer.json')} is missing")
    dtype = dtype or restore.checkpoint_dtype(path)
    loaded = restore.load(path, components=["talker"], mesh=mesh, rules=rules, dtype=dtype, compute_dtype=dtype)
    return TTSModel(loaded.modules["talker"], loaded.modules["audio_vae"], tokenizer_lib.ReleaseTokenizer(tok_dir),
                    folder, False)


# --- voices ----------------------------------------------------------------------------------------------------------

SPEAKER_MODES = ("auto", "campplus", "zero", "none")


def make_voice(model: TTSModel, *, name: str | None = None, wavs: Sequence[str] = (), prompt_text: str | None = None,
               speaker: str = "auto", speaker_files: Sequence[str] = (), key=None,
               deterministic: bool = False) -> tuple[Voice, list[str]]:
    """The voice a CLI asks for, and notes worth printing. name: a voice of the talker folder's voice_name.json;
    wavs (+ prompt_text): reference clips (one per speaker). speaker: "auto" (precomputed files if given, else CAM++
    when the folder has campplus.onnx and onnxruntime is installed, else no speaker slot), "campplus" (required),
    "zero" (the all-zero slot), "none"."""
    if speaker not in SPEAKER_MODES:
        raise VoiceError(f"speaker={speaker!r} (one of {SPEAKER_MODES})")
    notes: list[str] = []
    if name is not None:
        if wavs or prompt_text is not None:
            raise VoiceError("give a voice name or reference clips with their text, not both")
        entry = voice_lib.named_voice(model.folder, name)
        wavs, prompt_text = [entry.wav], entry.prompt_text
    embeddings = None
    if speaker_files:
        if speaker in ("zero", "none", "campplus"):
            raise VoiceError(f"speaker embedding files and speaker={speaker!r} exclude each other")
        embeddings = np.concatenate([voice_lib.load_speaker_embedding(f, model.talker.cfg.speaker_dim)
                                     for f in speaker_files])
    if speaker == "campplus" and not wavs:
        raise VoiceError("speaker=campplus needs a reference clip to embed")
    extractor = None
    if speaker in ("auto", "campplus") and embeddings is None and wavs:
        path = voice_lib.campplus_path(model.folder)
        if path is not None and voice_lib.onnxruntime_available():
            extractor = voice_lib.CampPlus(path)
        elif speaker == "campplus":
            why = "onnxruntime is not installed" if path else f"no {voice_lib.CAMPPLUS_FILE} in the talker folder"
            raise VoiceError(f"speaker=campplus: {why}")
        else:
            why = ("onnxruntime is not installed (pip install 'ming_jax[campplus]')" if path else
                   f"there is no {voice_lib.CAMPPLUS_FILE}")
            notes.append(f"no speaker embedding for this voice: {why}; the release always uses one with a voice "
                         "(give --speaker_embedding FILE.npy to supply it)")
    mode = extractor if extractor is not None else ("zero" if speaker == "zero" else None)
    if not wavs:
        return voice_lib.text_only_voice(model.talker, speaker=mode if mode == "zero" else None,
                                         speaker_embeddings=embeddings, name=name or ""), notes
    if embeddings is not None and embeddings.shape[0] != len(wavs):
        raise VoiceError(f"{embeddings.shape[0]} speaker embedding(s) for {len(wavs)} clip(s)")
    clips = [voice_lib.read_clip(w) for w in wavs]
    if key is None and not deterministic:
        key = jax.random.key(0)
    v = voice_lib.register_voice(model.talker, model.audio_vae, clips, prompt_text, speaker=mode,
                                 speaker_embeddings=embeddings, key=None if deterministic else key,
                                 deterministic=deterministic, name=name or "|".join(wavs))
    return v, notes


# --- requests ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    task_prompt: str = tp.SPEECH_TASK
    instruction: str | None = None  # the JSON string (`talker_prompt.instruction_json`)
    cut: bool = True  # cut texts into fragments (False: each text whole)
    max_length: int = FRAGMENT_LENGTH
    cfg: float | None = None  # None: the talker config's generate defaults
    sigma: float | None = None
    temperature: float | None = None
    min_new_token: int | None = None
    max_steps: int | None = None  # per fragment (and the loop's buffer); None: the config's
    prompt_bucket: int = 64
    trim: bool = True  # the release's trailing-silence trim
    normaliser: object = None  # a `speech_tn.Normaliser` for the fragments; None: `speech_tn.make_normaliser()`


@dataclasses.dataclass(frozen=True)
class Request:
    text_index: int
    fragment_index: int
    text: str  # what the talker reads
    prompt: tp.TalkerPrompt


def fragments(text: str, options: Options) -> list[str]:
    """The pieces the talker reads for `text` (the release's text path), or [text] with cut=False."""
    if not isinstance(text, str) or not text.strip():
        raise TTSError(f"empty text to speak ({text!r})")
    if not options.cut:
        return [text]
    normaliser = speech_tn.make_normaliser() if options.normaliser is None else options.normaliser
    out = [speech_text.prepare_fragment(f, normaliser) for f in speech_text.speech_fragments(text, options.max_length)]
    return [f for f in out if f and f.strip()]


def plan(model: TTSModel, texts: Sequence[str], voice: Voice = NO_VOICE, options: Options = Options()) -> list[Request]:
    """One request (a batch row) per fragment of every text, in order."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise TTSError("no text to speak")
    voice_lib.check_voice(voice, model.talker)
    vocab = model.talker.cfg.llm.vocab_size
    out = []
    for t, text in enumerate(texts):
        pieces = fragments(text, options)
        if not pieces:
            raise TTSError(f"text {t} ({text!r}) has nothing to speak after normalisation")
        for f, piece in enumerate(pieces):
            try:
                prompt = tp.build_prompt(model.tokenizer, piece, task_prompt=options.task_prompt,
                                         speakers=voice.num_speakers, prompt_text=voice.prompt_text,
                                         prompt_patches=voice.num_patches, instruction=options.instruction)
            except tp.TalkerPromptError as e:
                raise TTSError(f"text {t}: {e}") from None
            if prompt.ids.max() >= vocab:
                raise TTSError(f"text {t}: token id {int(prompt.ids.max())} is outside the talker's vocabulary "
                               f"({vocab}): the tokenizer does not belong to this talker")
            out.append(Request(t, f, piece, prompt))
    return out


def embed(model: TTSModel, requests: Sequence[Request], voice: Voice = NO_VOICE):
    """(embeds [B, T, H] right-padded, lengths [B]): the LM's token embeddings with each row's speaker slots and
    audio-patch rows replaced by the voice's rows."""
    b = len(requests)
    t = max(r.prompt.length for r in requests)
    ids = np.zeros((b, t), np.int32)
    for i, r in enumerate(requests):
        ids[i, :r.prompt.length] = r.prompt.ids
    embeds = model.talker.llm.embed_tokens(jnp.asarray(ids))
    dt = embeds.dtype
    for i, r in enumerate(requests):
        if r.prompt.speaker_rows.size:
            embeds = embeds.at[i, r.prompt.speaker_rows].set(jnp.asarray(voice.speaker_embeds, dt))
        if r.prompt.patch_rows.size:
            embeds = embeds.at[i, r.prompt.patch_rows].set(jnp.asarray(voice.prompt_embeds, dt))
    return embeds, np.asarray([r.prompt.length for r in requests], np.int32)


def _prompt_latents(voice: Voice, batch: int):
    if voice.prompt_latents is None:
        return None
    return np.broadcast_to(voice.prompt_latents[None], (batch,) + voice.prompt_latents.shape)


def _key(key):
    return jax.random.key(key) if isinstance(key, (int, np.integer)) else key


def _loop_args(options: Options) -> dict:
    return dict(max_steps=options.max_steps, cfg=options.cfg, sigma=options.sigma, temperature=options.temperature,
                min_new_token=options.min_new_token, prompt_bucket=options.prompt_bucket)


# --- whole utterances --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Utterance:
    audio: np.ndarray  # float32 [L] at sample_rate
    sample_rate: int
    fragments: list[str]
    steps: list[int]  # talker steps per fragment
    stopped: list[bool]  # per fragment: the stop head ended it (False: a cap did)

    @property
    def seconds(self) -> float:
        return self.audio.shape[0] / self.sample_rate


def decode_rows(model: TTSModel, latents, lengths) -> list[np.ndarray]:
    """Each row's latents [:lengths[b]] -> its waveform [L_b] (full decode; rows of equal length in one call)."""
    latents = np.asarray(latents, np.float32)
    out: list[np.ndarray | None] = [None] * latents.shape[0]
    for n in sorted(set(int(x) for x in lengths)):
        rows = [b for b, x in enumerate(lengths) if int(x) == n]
        if n == 0:
            for b in rows:
                out[b] = np.zeros((0,), np.float32)
            continue
        wave = np.asarray(vae_lib.decode(model.audio_vae, jnp.asarray(latents[rows, :n])), np.float32)
        for j, b in enumerate(rows):
            out[b] = wave[j, 0]
    return out


def _trim(model: TTSModel, audio: np.ndarray, options: Options) -> np.ndarray:
    if not options.trim or audio.shape[-1] == 0:
        return audio
    return vae_lib.trim_silence(audio, model.sample_rate)[0]


def synthesize(model: TTSModel, texts: Sequence[str] | str, voice: Voice = NO_VOICE, *, key=0,
               options: Options = Options()) -> list[Utterance]:
    """Speak every text (one `generate_speech` call for all their fragments); one Utterance per text."""
    requests = plan(model, texts, voice, options)
    embeds, lengths = embed(model, requests, voice)
    n = len(requests)
    out = speech.generate_speech(model.talker, embeds, lengths, prompt_latents=_prompt_latents(voice, n),
                                 key=_key(key), **_loop_args(options))
    lat_len = np.asarray(out.lengths)
    waves = decode_rows(model, out.latents, lat_len)
    steps, stopped = np.asarray(out.steps), np.asarray(out.stopped)
    result = []
    for t in range(max(r.text_index for r in requests) + 1):
        rows = [i for i, r in enumerate(requests) if r.text_index == t]
        audio = [_trim(model, waves[i], options) for i in rows]
        result.append(Utterance(np.concatenate(audio) if audio else np.zeros((0,), np.float32), model.sample_rate,
                                [requests[i].text for i in rows], [int(steps[i]) for i in rows],
                                [bool(stopped[i]) for i in rows]))
    return result


# --- streaming ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AudioChunk:
    text_index: int
    fragment_index: int
    audio: np.ndarray  # float32 [n] (n >= 1)
    elapsed: float  # seconds since the stream started when this chunk was ready


class _Row:
    """One fragment's streaming decode, silence trim and (first fragments) length guard."""

    def __init__(self, model: TTSModel, request: Request, capacity: int, guarded: bool):
        self.model, self.request, self.capacity, self.guarded = model, request, capacity, guarded
        self.state = None
        self.silence = vae_lib.SilenceState()
        self.chunks: list[np.ndarray] = []  # emitted (trimmed) chunks, empty ones included (the guard counts them)
        self.samples = 0
        self.finished = False
        self.halted = False

    def guard_tripped(self) -> bool:
        if not self.guarded or not self.chunks:
            return False
        seconds = self.samples / self.model.sample_rate
        return seconds / GUARD_SECONDS_PER_CHAR >= len(self.request.text) and seconds > GUARD_MIN_SECONDS

    def feed(self, latents: np.ndarray, last: bool, options: Options) -> np.ndarray | None:
        """This segment's latents [n, C] -> the audio to emit now (None once the guard has ended the fragment)."""
        if self.guard_tripped():
            self.finished = self.halted = True
            return None
        if self.state is None:
            self.state = vae_lib.StreamState.create(self.model.audio_vae, 1, self.capacity)
        audio, self.state = vae_lib.decode_chunk(self.model.audio_vae, self.state, jnp.asarray(latents)[None], last)
        audio = np.asarray(audio, np.float32)[0, 0]
        if options.trim:  # (a last call always decodes audio: the trim's end-of-stream rule applies)
            audio, self.silence = vae_lib.trim_silence(audio, self.model.sample_rate, self.silence, last)
        self.chunks.append(audio)
        self.samples += audio.shape[-1]
        self.finished = last
        return audio


class SpeechStreamer:
    """Iterate to get `AudioChunk`s of every text as they are produced:

        streamer = SpeechStreamer(model, ["Hello."], voice, key=0, chunk_steps=4)
        for chunk in streamer: play(chunk.audio)
        streamer.first_audio, streamer.rtf

    The requests are planned (and bad texts refused) on construction; the work runs during the iteration.
    first_audio: seconds from the start of the iteration to the first audio (compilation included on a first
    run); rtf: the iteration's wall time over the seconds of audio produced."""

    def __init__(self, model: TTSModel, texts: Sequence[str] | str, voice: Voice = NO_VOICE, *, key=0,
                 options: Options = Options(), chunk_steps: int = 4, length_guard: bool = True):
        if chunk_steps < 1:
            raise TTSError(f"chunk_steps={chunk_steps} must be >= 1")
        self.model, self.voice, self.options, self.key = model, voice, options, _key(key)
        self.chunk_steps, self.length_guard = chunk_steps, length_guard
        self.requests = plan(model, texts, voice, options)
        self.first_audio: float | None = None
        self.elapsed = 0.0
        self.samples = [0] * (max(r.text_index for r in self.requests) + 1)
        self.steps = [0] * len(self.requests)

    @property
    def audio_seconds(self) -> float:
        return sum(self.samples) / self.model.sample_rate

    @property
    def rtf(self) -> float:
        return self.elapsed / self.audio_seconds if self.audio_seconds else float("inf")

    def __iter__(self) -> Iterator[AudioChunk]:
        t0 = time.perf_counter()
        model, options, requests = self.model, self.options, self.requests
        embeds, lengths = embed(model, requests, self.voice)
        n = len(requests)
        stream = speech.SpeechStream(model.talker, embeds, lengths, prompt_latents=_prompt_latents(self.voice, n),
                                     key=self.key, **_loop_args(options))
        caps = stream.caps
        p = model.talker.cfg.patch_size
        rows = [_Row(model, r, max(1, int(caps[i])) * p, self.length_guard and r.fragment_index == 0)
                for i, r in enumerate(requests)]
        pending: dict[int, list[np.ndarray]] = {i: [] for i in range(n)}  # decoded audio not yet released
        order = {t: [i for i, r in enumerate(requests) if r.text_index == t] for t in range(len(self.samples))}
        cursor = {t: 0 for t in order}  # the fragment of each text being played
        halt = np.zeros((n,), bool)

        def release():
            for t, idx in order.items():
                while cursor[t] < len(idx):
                    i = idx[cursor[t]]
                    for audio in pending[i]:
                        if audio.shape[-1]:
                            now = time.perf_counter() - t0
                            if self.first_audio is None:
                                self.first_audio = now
                            self.samples[t] += audio.shape[-1]
                            self.elapsed = now
                            yield AudioChunk(t, requests[i].fragment_index, audio, now)
                    pending[i] = []
                    if not rows[i].finished:
                        break
                    cursor[t] += 1

        while not stream.finished:
            seg = stream.advance(self.chunk_steps, halt)
            latents = np.asarray(seg.latents)
            new, done = np.asarray(seg.new_steps), np.asarray(seg.done)
            for i, row in enumerate(rows):
                if row.finished or new[i] == 0:
                    if done[i] and not row.finished:  # ended without new steps (halted): nothing more to emit
                        row.finished = True
                    continue
                self.steps[i] += int(new[i])
                audio = row.feed(latents[i, :new[i] * p], bool(done[i]), options)
                if audio is None:
                    halt[i] = True
                else:
                    pending[i].append(audio)
            yield from release()
        for row in rows:  # rows the loop's buffer ended (max_steps) without a last chunk
            row.finished = True
        yield from release()
        self.elapsed = time.perf_counter() - t0


# --- WAV files ---------------------------------------------------------------------------------------------------

WAV_SUBTYPES = ("PCM_16", "FLOAT")


def _for_file(audio: np.ndarray, subtype: str) -> tuple[np.ndarray, int]:
    audio = np.asarray(audio, np.float32).reshape(-1)
    if subtype == "PCM_16":
        clipped = int(np.count_nonzero(np.abs(audio) > 1.0))
        return np.clip(audio, -1.0, 1.0), clipped
    return audio, 0


def _temp_next_to(path: str) -> tuple[int, str]:
    """A unique temp file in `path`'s folder, with the permissions a plainly created file would get (mkstemp's are
    0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def write_wav(path: str, audio, sample_rate: int, subtype: str = "PCM_16") -> int:
    """Write mono `audio` atomically (a temp file in the same folder, then rename); returns the samples clipped to
    [-1, 1] (PCM_16 only)."""
    import soundfile

    if subtype not in WAV_SUBTYPES:
        raise TTSError(f"WAV subtype {subtype!r} (one of {WAV_SUBTYPES})")
    data, clipped = _for_file(audio, subtype)
    fd, tmp = _temp_next_to(path)
    try:
        with os.fdopen(fd, "wb") as f:
            soundfile.write(f, data, sample_rate, subtype=subtype, format="WAV")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return clipped


class WavStream:
    """A WAV written chunk by chunk into a `.partial` temp file next to `path`, renamed to `path` by `close()`
    (`abort()` removes it). Each chunk is flushed to the file as it comes."""

    def __init__(self, path: str, sample_rate: int, subtype: str = "PCM_16"):
        import soundfile

        if subtype not in WAV_SUBTYPES:
            raise TTSError(f"WAV subtype {subtype!r} (one of {WAV_SUBTYPES})")
        self.path, self.subtype, self.clipped, self.samples = path, subtype, 0, 0
        fd, self.tmp = _temp_next_to(path)
        os.close(fd)
        self._file = soundfile.SoundFile(self.tmp, "w", samplerate=sample_rate, channels=1, subtype=subtype,
                                         format="WAV")

    def write(self, audio) -> None:
        data, clipped = _for_file(audio, self.subtype)
        self._file.write(data)
        self._file.flush()
        self.clipped += clipped
        self.samples += data.shape[0]

    def close(self) -> None:
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def numbered(path: str, i: int, n: int) -> str:
    """`path` itself for a single output, else stem_i.ext."""
    if n == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{i}{ext or '.wav'}"


def speak(model: TTSModel, texts: Sequence[str], out: str, *, voice: Voice = NO_VOICE, key=0,
          options: Options = Options(), log=sys.stderr) -> list[str]:
    """Synthesize `texts` and write one WAV each (`numbered(out, i, n)`); the paths written."""
    t0 = time.perf_counter()
    utterances = synthesize(model, texts, voice, key=key, options=options)
    wall = time.perf_counter() - t0
    paths = []
    for i, u in enumerate(utterances):
        path = numbered(out, i, len(utterances))
        clipped = write_wav(path, u.audio, u.sample_rate)
        paths.append(path)
        print(f"wrote {path}: {u.seconds:.2f} s at {u.sample_rate} Hz, {len(u.fragments)} fragment(s), "
              f"{sum(u.steps)} talker steps{f', {clipped} samples clipped' if clipped else ''}", file=log)
    total = sum(u.seconds for u in utterances)
    print(f"speech: {wall:.1f} s for {total:.2f} s of audio (RTF {wall / total if total else float('inf'):.2f}, "
          "including compilation)", file=log)
    return paths

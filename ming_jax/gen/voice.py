"""Voices for the talker (the release's `register_prompt_wav` / `get_prompt_emb`): a reference clip (or several,
one per speaker of a dialogue) and its transcript -> what the prompt and the generation loop take.

    clips, each at any rate      -> channel 0, resampled to the AudioVAE's rate (44.1 kHz; `processors.audio.resample`,
                                    torchaudio's sinc resampler) and joined end to end
    joined clip                  -> left-padded with zeros to a multiple of hop * max(1, VAE patch) * talker patch
                                    samples (one talker step's worth of audio; 14112 in the release)
    AudioVAE encoder             -> prompt latents [N, C] (the posterior sample from a JAX key, or its mean)
    latents in patches [N/P, P, C] -> the aggregator -> prompt embeddings [N/P, H] (the <audioPatch> rows)
    each clip at 16 kHz          -> kaldi fbank (80) minus its time mean -> CAM++ (onnxruntime) -> [192]
                                    -> spk_head -> one speaker row [H] per clip (the <|vision_pad|> rows)

The speaker embedding can also come from a precomputed 192-d file (.npy, e.g. written by `save_speaker_embedding`
from a machine that has onnxruntime), be the release's all-zero speaker row (`zero_speaker`, its STYLE / IP
tasks: zeros of the LM width, no spk_head), or be left out (no speaker slots).

Named voices: the release's `data/voice_name.json` ({name: {prompt_text, prompt_wav_path}}) in the talker folder;
wav paths are relative to that folder. Paths some checkpoints carry as absolute authoring paths are resolved by
their longest tail that exists under the folder (then as they are); a missing file is an error naming the voice and
the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.models.talker import audio_vae as vae_lib
from ming_jax.models.talker.audio_vae import AudioVAE
from ming_jax.models.talker.talker import Talker
from ming_jax.processors import audio as audio_proc
from ming_jax.processors import fbank

SPEAKER_RATE = 16000  # CAM++ input rate
VOICE_FILE = os.path.join("data", "voice_name.json")
CAMPPLUS_FILE = "campplus.onnx"


class VoiceError(ValueError):
    """A voice that cannot be made: unknown name, missing or unreadable clip, bad speaker embedding."""


@dataclasses.dataclass(frozen=True)
class Voice:
    """What one voice contributes to a talker prompt (host numpy, float32)."""

    prompt_latents: np.ndarray | None = None  # [N, C], N a multiple of the talker patch: seeds the history
    prompt_embeds: np.ndarray | None = None  # [N / P, H]: the <audioPatch> rows
    prompt_text: str | None = None  # the clip's transcript (no patch rows without it, as in the release)
    speaker_embeds: np.ndarray | None = None  # [S, H]: the <|vision_pad|> rows
    name: str = ""

    @property
    def num_speakers(self) -> int:
        return 0 if self.speaker_embeds is None else int(self.speaker_embeds.shape[0])

    @property
    def num_patches(self) -> int:
        return 0 if self.prompt_embeds is None else int(self.prompt_embeds.shape[0])

    def save(self, path: str) -> None:
        """An .npz of the voice (reusable without the clip, the VAE encoder or CAM++)."""
        arrays = {k: v for k, v in (("prompt_latents", self.prompt_latents), ("prompt_embeds", self.prompt_embeds),
                                    ("speaker_embeds", self.speaker_embeds)) if v is not None}
        meta = json.dumps({"prompt_text": self.prompt_text, "name": self.name}, ensure_ascii=False)
        np.savez(path, meta=np.asarray(meta), **arrays)

    @classmethod
    def load(cls, path: str) -> "Voice":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                get = lambda k: np.asarray(z[k], np.float32) if k in z.files else None  # noqa: E731
                return cls(get("prompt_latents"), get("prompt_embeds"), meta.get("prompt_text"),
                           get("speaker_embeds"), meta.get("name", ""))
        except (OSError, ValueError, KeyError) as e:
            raise VoiceError(f"{path}: not a saved voice ({e})") from None


NO_VOICE = Voice(name="none")


def check_voice(voice: Voice, talker: Talker) -> None:
    cfg = talker.cfg
    h, c, p = cfg.hidden_size, cfg.latent_dim, cfg.patch_size
    problems = []
    if voice.prompt_latents is not None and (voice.prompt_latents.ndim != 2 or voice.prompt_latents.shape[1] != c
                                             or voice.prompt_latents.shape[0] % p):
        problems.append(f"prompt_latents {voice.prompt_latents.shape} is not [N (a multiple of {p}), {c}]")
    if voice.prompt_embeds is not None:
        n = None if voice.prompt_latents is None else voice.prompt_latents.shape[0] // p
        if voice.prompt_embeds.ndim != 2 or voice.prompt_embeds.shape[1] != h or (
                n is not None and voice.prompt_embeds.shape[0] != n):
            problems.append(f"prompt_embeds {voice.prompt_embeds.shape} is not [{n if n is not None else 'N'}, {h}]")
    if voice.speaker_embeds is not None and (voice.speaker_embeds.ndim != 2 or voice.speaker_embeds.shape[1] != h):
        problems.append(f"speaker_embeds {voice.speaker_embeds.shape} is not [S, {h}]")
    if problems:
        raise VoiceError(f"voice {voice.name!r} does not fit this talker (hidden {h}, latent {c}, patch {p}): "
                         + "; ".join(problems))


# --- the prompt audio ----------------------------------------------------------------------------------------------


def pad_unit(talker: Talker, audio_vae: AudioVAE) -> int:
    """Samples the joined clip is padded to a multiple of: encoder hop * max(1, VAE patch) * talker patch."""
    return audio_vae.cfg.encoder.hop_size * max(1, audio_vae.cfg.patch_size) * talker.cfg.patch_size


def pad_left(wave: np.ndarray, unit: int) -> np.ndarray:
    """Zeros in front of `wave` [L] up to the next multiple of `unit` (unchanged when L already is one)."""
    extra = -wave.shape[-1] % unit
    return np.pad(wave, (extra, 0)) if extra else wave


def _mono(wave, what: str) -> np.ndarray:
    try:
        return audio_proc.to_mono_float32(wave)
    except audio_proc.AudioError as e:
        raise VoiceError(f"{what}: {e}") from None


@nnx.jit
def _encode(audio_vae: AudioVAE, wave, noise):  # `audio_vae.encode` (the same draw as its key= path) in one program
    return vae_lib.encode(audio_vae, wave, noise=noise)[0]


@nnx.jit
def _aggregate(talker: Talker, patches):
    return talker.aggregator(patches)[:, 0]  # [n, P, C] -> [n, H]


@nnx.jit
def _speaker_head(talker: Talker, emb):
    return talker.spk_head(emb.astype(talker.runtime.dtype))


def prompt_embeddings(talker: Talker, latents) -> np.ndarray:
    """latents [N, C] (N a multiple of the patch) -> the aggregator outputs [N / P, H] float32."""
    p = talker.cfg.patch_size
    lat = jnp.asarray(latents, jnp.float32).reshape(-1, p, talker.cfg.latent_dim)
    return np.asarray(_aggregate(talker, lat), np.float32)


def encode_prompt_audio(talker: Talker, audio_vae: AudioVAE, wave, *, key=None, deterministic: bool = False):
    """A clip already at the VAE's rate, [L] -> (prompt latents [N, C], prompt embeddings [N / P, H]), the clip
    left-padded first. The posterior is sampled from `key`, or its mean taken with deterministic=True."""
    wav = pad_left(np.asarray(wave, np.float32), pad_unit(talker, audio_vae))
    if deterministic == (key is not None):
        raise ValueError("encode_prompt_audio: give a key (sampled latents) or deterministic=True (the mean)")
    shape = (1, vae_lib.latent_count(audio_vae.cfg, wav.shape[0]), audio_vae.cfg.encoder.latent_dim)
    noise = jnp.zeros(shape, jnp.float32) if deterministic else jax.random.normal(key, shape, jnp.float32)
    latent = np.asarray(_encode(audio_vae, jnp.asarray(wav)[None], noise)[0], np.float32)  # [N, C]
    if latent.shape[0] % talker.cfg.patch_size:
        raise AssertionError(f"{latent.shape[0]} prompt latents are not whole talker patches")
    return latent, prompt_embeddings(talker, latent)


# --- speaker embeddings ----------------------------------------------------------------------------------------------


class CampPlus:
    """The release's CAM++ speaker encoder (`campplus.onnx`) through onnxruntime on the CPU: a 16 kHz clip ->
    its 192-d embedding. Needs the optional `onnxruntime` (pip install 'ming_jax[campplus]')."""

    def __init__(self, path: str, *, threads: int = 2):
        try:
            import onnxruntime
        except ImportError:
            raise VoiceError("the CAM++ speaker embedding needs onnxruntime (pip install 'ming_jax[campplus]'), "
                             "or give a precomputed 192-d embedding (.npy)") from None
        if not os.path.isfile(path):
            raise VoiceError(f"CAM++ model not found: {path}")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(path, sess_options=options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise VoiceError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        self.path = path

    def __call__(self, wave_16k) -> np.ndarray:
        feats = fbank.speaker_features(wave_16k)[None]  # [1, frames, 80]
        name = self.session.get_inputs()[0].name
        out = np.asarray(self.session.run(None, {name: feats})[0], np.float32).reshape(-1)
        return out


def load_speaker_embedding(path: str, dim: int = 192) -> np.ndarray:
    """A precomputed speaker embedding file (.npy of [dim], [1, dim] or [S, dim]) -> [S, dim] float32."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise VoiceError(f"speaker embedding {path}: cannot read it as .npy ({e})") from None
    arr = np.asarray(arr, np.float32)
    arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] == 0 or not np.all(np.isfinite(arr)):
        raise VoiceError(f"speaker embedding {path}: expected finite [{dim}] or [S, {dim}], got {arr.shape}")
    return arr


def save_speaker_embedding(path: str, embedding) -> None:
    np.save(path, np.asarray(embedding, np.float32))


def speaker_rows(talker: Talker, embeddings) -> np.ndarray:
    """Raw speaker embeddings [S, 192] -> spk_head -> the speaker rows [S, H] float32."""
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 2 or emb.shape[1] != talker.cfg.speaker_dim:
        raise VoiceError(f"speaker embeddings must be [S, {talker.cfg.speaker_dim}], got {emb.shape}")
    return np.asarray(_speaker_head(talker, jnp.asarray(emb)), np.float32)


def zero_speaker(talker: Talker) -> np.ndarray:
    """The release's `use_zero_spk_emb` row: one speaker slot holding zeros of the LM width [1, H]."""
    return np.zeros((1, talker.cfg.hidden_size), np.float32)


# --- registering a voice ---------------------------------------------------------------------------------------------


def read_clip(path: str) -> tuple[np.ndarray, int]:
    """An audio file -> (float32 [T] channel 0, rate); VoiceError naming the file when it is missing or unreadable."""
    try:
        wav, sr = audio_proc.load_audio(path)
    except audio_proc.AudioError as e:
        raise VoiceError(f"voice clip: {e}") from None
    return _mono(wav, path), sr


def register_voice(talker: Talker, audio_vae: AudioVAE, clips: Sequence[tuple[Any, int]], prompt_text: str | None,
                   *, speaker: str | Any = None, speaker_embeddings=None, key=None, deterministic: bool = False,
                   name: str = "") -> Voice:
    """The voice of `clips` [(waveform, rate), ...] (several: one speaker each, joined in order) and their
    transcript `prompt_text` (None: the latents seed the history only, no prompt text / patch rows).

    speaker: None (no speaker slots), "zero" (one all-zero slot), or a callable 16 kHz clip -> [192] (`CampPlus`):
    one slot per clip. speaker_embeddings [S, 192] (or a list of [192]): precomputed instead of `speaker`.
    key / deterministic: the VAE posterior sample (see `encode_prompt_audio`)."""
    if not clips:
        raise VoiceError("register_voice: no clip given")
    sr_vae = audio_vae.cfg.sample_rate
    joined, slots = [], []
    for i, (wave, sr) in enumerate(clips):
        what = f"voice clip {i}"
        if not isinstance(sr, (int, np.integer)) or sr <= 0:
            raise VoiceError(f"{what}: sample rate must be a positive integer, got {sr!r}")
        wav = _mono(wave, what)
        joined.append(audio_proc.resample(wav, int(sr), sr_vae))
        if callable(speaker) and speaker_embeddings is None:
            slots.append(speaker(audio_proc.resample(wav, int(sr), SPEAKER_RATE)))
    latents, embeds = encode_prompt_audio(talker, audio_vae, np.concatenate(joined), key=key,
                                          deterministic=deterministic)
    if speaker_embeddings is not None:
        rows = speaker_rows(talker, np.asarray(speaker_embeddings, np.float32).reshape(-1, talker.cfg.speaker_dim))
    elif speaker == "zero":
        rows = zero_speaker(talker)
    elif callable(speaker):
        rows = speaker_rows(talker, np.stack(slots))
    elif speaker is None:
        rows = None
    else:
        raise VoiceError(f"register_voice: speaker={speaker!r} (None, 'zero' or a CAM++ extractor)")
    return Voice(latents, embeds, prompt_text, rows, name)


def text_only_voice(talker: Talker, *, speaker: str | None = None, speaker_embeddings=None, name: str = "") -> Voice:
    """A voice without prompt audio: no speaker slot (None), the all-zero slot ("zero"), or precomputed
    embeddings [S, 192]."""
    if speaker_embeddings is not None:
        rows = speaker_rows(talker, np.asarray(speaker_embeddings, np.float32).reshape(-1, talker.cfg.speaker_dim))
    elif speaker == "zero":
        rows = zero_speaker(talker)
    elif speaker is None:
        rows = None
    else:
        raise VoiceError(f"text_only_voice: speaker={speaker!r} (None or 'zero')")
    return Voice(speaker_embeds=rows, name=name)


# --- named voices ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NamedVoice:
    name: str
    prompt_text: str
    wav: str  # resolved path
    listed: str  # the path as voice_name.json gives it


def _resolve(folder: str, listed: str) -> str | None:
    if not os.path.isabs(listed):
        path = os.path.join(folder, listed)
        return path if os.path.isfile(path) else None
    parts = [p for p in os.path.normpath(listed).split(os.sep) if p]
    for k in range(len(parts)):  # the longest tail of an authoring path that exists under the folder
        path = os.path.join(folder, *parts[k:])
        if os.path.isfile(path):
            return path
    return listed if os.path.isfile(listed) else None


def voice_names(talker_folder: str) -> dict[str, dict]:
    """The raw entries of the folder's data/voice_name.json ({} when there is none)."""
    file = os.path.join(talker_folder, VOICE_FILE)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VoiceError(f"{file}: not a readable voice list ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise VoiceError(f"{file}: expected {{name: {{prompt_text, prompt_wav_path}}}}")
    return data


def named_voice(talker_folder: str | None, name: str) -> NamedVoice:
    """The entry `name` of data/voice_name.json with its clip resolved; VoiceError for an unknown name (listing
    the known ones) or a missing clip (naming the voice and the path)."""
    data = {} if talker_folder is None else voice_names(talker_folder)
    if name not in data:
        where = "no talker folder" if talker_folder is None else os.path.join(talker_folder, VOICE_FILE)
        known = ", ".join(sorted(data)) or "none"
        raise VoiceError(f"unknown voice {name!r} ({where}; known voices: {known})")
    entry = data[name]
    listed, text = entry.get("prompt_wav_path"), entry.get("prompt_text")
    if not isinstance(listed, str) or not isinstance(text, str):
        raise VoiceError(f"voice {name!r}: entry needs string prompt_text and prompt_wav_path, got {entry}")
    path = _resolve(talker_folder, listed)
    if path is None:
        raise VoiceError(f"voice {name!r}: its clip {listed!r} is missing (looked under {talker_folder}"
                         f"{' for every tail of the path' if os.path.isabs(listed) else ''})")
    return NamedVoice(name, text, path, listed)


def campplus_path(talker_folder: str | None) -> str | None:
    if talker_folder is None:
        return None
    path = os.path.join(talker_folder, CAMPPLUS_FILE)
    return path if os.path.isfile(path) else None


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


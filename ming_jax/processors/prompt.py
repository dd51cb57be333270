"""Prompt building: conversation + media -> the token ids and tensors the omni model takes (host side, numpy).

This is the official `BailingMM2Processor` (+ `apply_chat_template`, `process_vision_info`) for one sample:

1. Chat format. `<role>SYSTEM</role>{system}\\n\\ndetailed thinking off<|role_end|>`, then per message
   `<role>HUMAN</role>` / `<role>ASSISTANT</role>` + its content + `<|role_end|>`, then `<role>ASSISTANT</role>`.
   Content items go in order: an image becomes the placeholder `<IMAGE>` (several images of one item: one per line),
   a video `<VIDEO>`, an audio clip `<AUDIO>` (several: one per line), text itself.
2. Media. Images through the image processor (`processors.image`), videos through `processors.video` (sampling,
   resize, per-temporal-patch time stamps), audio through the whisper front end (`processors.audio`).
3. Placeholder expansion, in the official layout (`merge` = spatial merge size, 2):
   image  -> `<image>` + (t*h*w / merge^2) x `<imagePatch>` + `</image>\\n`
   video  -> `<video>` + per temporal patch: `<x.x seconds><image>` + (h*w / merge^2) x `<framePatch>` + `</image>`,
             then `</video>` (interleaved time stamps, the release's mode; the grid becomes one t=1 row per patch).
             Without interleaving: `<video>` + (t*h*w / merge^2) x `<framePatch>` + `</video>\\n`.
   audio  -> `<audio>` + L x `<audioPatch>` + `</audio>` with L the audio tower's output length for the clip's mel
             frames (two stride-2 convs).
4. Tokenise; `audio_placeholder_loc_lens` = (index after each `<audio>`, L) per clip.

Stricter than the official (which appends surplus audio clips at the end of the text, indexes past its image list,
or silently leaves text placeholders in place): the numbers of placeholders and media must agree, every special
token the layout needs must exist in the tokenizer and match the model's ids, and a prompt longer than the context
is refused, each with a `PromptError` naming the problem. Images smaller than the processor's `min_pixels` are
upscaled as the official does, or refused with `upscale_small_images=False`.

Contextual ASR (the release's cookbook prompts): `asr_prompt(topic, hotwords)` and the `{language}\\t` answer prefix
(`assistant_prefix=`) the cookbook appends after the final `<role>ASSISTANT</role>` for ASR in a known language.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ming_jax.models.inputs import OmniInputs
from ming_jax.processors import audio as audio_proc
from ming_jax.processors import image as image_proc
from ming_jax.processors import video as video_proc

# --- the release's special strings --------------------------------------------------------------------------------

IMAGE_PATCH, IMAGE_START, IMAGE_END = "<imagePatch>", "<image>", "</image>"
VIDEO_START, VIDEO_END, FRAME_PATCH = "<video>", "</video>", "<framePatch>"
AUDIO_PATCH, AUDIO_START, AUDIO_END = "<audioPatch>", "<audio>", "</audio>"
IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER = "<IMAGE>", "<VIDEO>", "<AUDIO>"
ROLE_END = "<|role_end|>"  # the tokenizer's eos token; ends every turn
SYSTEM_PREFIX, USER_PREFIX, ASSISTANT_PREFIX = "<role>SYSTEM</role>", "<role>HUMAN</role>", "<role>ASSISTANT</role>"
DEFAULT_SYSTEM = "你是一个友好的AI助手。"  # "You are a friendly AI assistant." (the release's default)
ASR_INSTRUCTION = "Please recognize the language of this speech and transcribe it. Format: oral."

# Strings a user text may not contain: they would add placeholders or patch tokens the media do not account for.
RESERVED = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER, IMAGE_PATCH, FRAME_PATCH, AUDIO_PATCH)
# Every special string the layout writes, by the `SpecialTokens` field holding its id.
SPECIAL_STRINGS = {
    "image_patch": IMAGE_PATCH, "image_start": IMAGE_START, "image_end": IMAGE_END, "video_start": VIDEO_START,
    "video_end": VIDEO_END, "frame_patch": FRAME_PATCH, "audio_patch": AUDIO_PATCH, "audio_start": AUDIO_START,
    "audio_end": AUDIO_END, "role_end": ROLE_END,
}


class PromptError(ValueError):
    """A prompt that cannot be built: placeholder / media mismatch, unknown special tokens, too long, bad media."""


class Tokenizer(Protocol):
    """What prompt building needs of a tokenizer (`ming_jax.processors.tokenizer.ReleaseTokenizer` is one): special strings
    must come out as their single ids."""

    def encode(self, text: str) -> list[int]: ...

    def token_id(self, token: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special strings of the layout (the release: `<imagePatch>` 157157, `<image>` 157158, ...)."""

    image_patch: int
    image_start: int
    image_end: int
    video_start: int
    video_end: int
    frame_patch: int
    audio_patch: int
    audio_start: int
    audio_end: int
    role_end: int

    @classmethod
    def from_vocab(cls, lookup: Mapping[str, int] | Any) -> "SpecialTokens":
        """From a tokenizer (`token_id(str)`) or a {string: id} mapping; names every string it lacks."""
        ids, missing = {}, []
        for field, s in SPECIAL_STRINGS.items():
            try:
                tid = lookup[s] if isinstance(lookup, Mapping) else lookup.token_id(s)
            except KeyError:
                tid = None
            (missing.append(s) if tid is None else ids.__setitem__(field, int(tid)))
        if missing:
            raise PromptError(f"the tokenizer has no token for {missing}: it is not the release's tokenizer (or a "
                              "stand-in with its special tokens)")
        return cls(**ids)

    @classmethod
    def from_tokenizer_config(cls, config: Mapping[str, Any]) -> "SpecialTokens":
        """From a `tokenizer_config.json` dict (its `added_tokens_decoder`)."""
        decoder = config.get("added_tokens_decoder")
        if not isinstance(decoder, Mapping):
            raise PromptError("tokenizer_config has no added_tokens_decoder")
        return cls.from_vocab({entry["content"]: int(tid) for tid, entry in decoder.items()})

    def check_model(self, llm_cfg) -> None:
        """The tokenizer and the LLM config must agree on the ids the LLM looks for."""
        pairs = [("image_patch", "image_patch_token"), ("frame_patch", "video_patch_token"),
                 ("image_start", "image_start_token")]
        bad = [f"{SPECIAL_STRINGS[ours]} is {getattr(self, ours)} in the tokenizer but {theirs}="
               f"{getattr(llm_cfg, theirs)} in the model config" for ours, theirs in pairs
               if getattr(llm_cfg, theirs) is not None and getattr(self, ours) != getattr(llm_cfg, theirs)]
        if bad:
            raise PromptError("tokenizer and model disagree: " + "; ".join(bad))


# --- chat format --------------------------------------------------------------------------------------------------


def system_prompt(system: str | None = None, *, thinking: bool = False) -> str:
    """The release's system turn body; `system` replaces only the default persona sentence, as the official does."""
    return (f"{SYSTEM_PREFIX}{DEFAULT_SYSTEM if system is None else system}\n\n"
            f"detailed thinking {'on' if thinking else 'off'}")


def _check_text(text: str, where: str) -> None:
    if not isinstance(text, str):
        raise PromptError(f"{where}: text must be a string, got {type(text).__name__}")
    found = [r for r in RESERVED if r in text]
    if found:
        raise PromptError(f"{where}: text contains the reserved placeholder string(s) {found}; put media in their "
                          "own content items instead")


def _many(kind: str, value) -> bool:
    """Whether a content item's value is a list of media rather than one medium: a video may be a list of frame
    paths, an audio clip a (waveform, sample_rate) pair."""
    if not isinstance(value, (list, tuple)) or kind == "video":
        return False
    is_pair = kind == "audio" and len(value) == 2 and isinstance(value[1], (int, np.integer))
    return not is_pair


def _count(item: Mapping[str, Any], key: str) -> int:
    value = item.get(key)
    if value is None:
        raise PromptError(f"content item of type {key!r} has no {key!r} entry")
    return len(value) if _many(key, value) else 1


def apply_chat_template(conversation: Sequence[Mapping[str, Any]], *, system: str | None = None,
                        thinking: bool = False, eos: str = ROLE_END) -> str:
    """The official `apply_chat_template`: messages `{"role": "HUMAN" | "ASSISTANT", "content": [items] | str}`,
    items `{"type": "text", "text"}`, `{"type": "image", "image"}` (one or a list), `{"type": "video", "video"}`,
    `{"type": "audio", "audio"}` (one or a list). The last message must be the human's."""
    if not conversation:
        raise PromptError("the conversation is empty")
    text = system_prompt(system, thinking=thinking) + eos
    for i, message in enumerate(conversation):
        role = message.get("role")
        if role not in ("HUMAN", "ASSISTANT"):
            raise PromptError(f"message {i}: role {role!r} (expected 'HUMAN' or 'ASSISTANT')")
        text += USER_PREFIX if role == "HUMAN" else ASSISTANT_PREFIX
        content = message.get("content", [])
        items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        videos = 0
        for item in items:
            kind = item.get("type")
            if kind == "text":
                _check_text(item.get("text", ""), f"message {i}")
                text += item.get("text", "")
            elif kind == "image":
                text += "\n".join([IMAGE_PLACEHOLDER] * _count(item, "image"))
            elif kind == "video":
                _count(item, "video")
                videos += 1
                if videos > 1:
                    raise PromptError(f"message {i}: at most one video per message (the release's rule)")
                text += VIDEO_PLACEHOLDER
            elif kind == "audio":
                text += "\n".join([AUDIO_PLACEHOLDER] * _count(item, "audio"))
            else:
                raise PromptError(f"message {i}: content item type {kind!r} (text, image, video, audio)")
        text += eos
    if conversation[-1].get("role") != "HUMAN":
        raise PromptError("the last message must be the human's (the model answers it)")
    return text + ASSISTANT_PREFIX


def media_items(conversation: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Images, videos and audio clips of a conversation, each list in prompt order (official `process_vision_info`)."""
    out: dict[str, list] = {"image": [], "video": [], "audio": []}
    for message in conversation:
        content = message.get("content", [])
        for item in ([] if isinstance(content, str) else content):
            kind = item.get("type")
            if kind in out:
                value = item.get(kind)
                out[kind].extend(value if _many(kind, value) else [value])
    return out


def asr_prompt(topic: str | None = None, hotwords: Sequence[str] = ()) -> str:
    """The release's (contextual) ASR instruction: optional topic sentence and a list of words likely to occur."""
    text = ASR_INSTRUCTION
    if topic:
        text += f"This is an audio about {topic}."
    words = [w.strip() for w in hotwords if w and w.strip()]
    if words:
        text += "This audio may contains the following words or phrases:" + ",".join(words) + "."
    return text


def asr_conversation(audio, *, topic: str | None = None, hotwords: Sequence[str] = ()) -> list[dict]:
    """One human turn asking to transcribe `audio` (instruction first, then the clip, as the cookbook)."""
    return [{"role": "HUMAN", "content": [{"type": "text", "text": asr_prompt(topic, hotwords)},
                                          {"type": "audio", "audio": audio}]}]


# --- placeholder expansion ----------------------------------------------------------------------------------------


def image_block(grid: Sequence[int], merge: int = 2) -> str:
    t, h, w = (int(v) for v in grid)
    return IMAGE_START + IMAGE_PATCH * (t * h * w // merge**2) + IMAGE_END + "\n"


def video_block(grid: Sequence[int], timestamps: Sequence[float] | None = None, merge: int = 2,
                interleaved: bool = True) -> str:
    t, h, w = (int(v) for v in grid)
    if not interleaved:
        return VIDEO_START + FRAME_PATCH * (t * h * w // merge**2) + VIDEO_END + "\n"
    if timestamps is None or len(timestamps) != t:
        raise PromptError(f"interleaved video layout needs one time stamp per temporal patch: grid t={t}, "
                          f"{0 if timestamps is None else len(timestamps)} time stamps")
    frames = "".join(video_proc.timestamp_text(s) + IMAGE_START + FRAME_PATCH * (h * w // merge**2) + IMAGE_END
                     for s in timestamps)
    return VIDEO_START + frames + VIDEO_END


def audio_block(num_tokens: int) -> str:
    return AUDIO_START + AUDIO_PATCH * int(num_tokens) + AUDIO_END


def _replace_each(text: str, placeholder: str, blocks: Sequence[str], what: str) -> str:
    n = text.count(placeholder)
    if n != len(blocks):
        raise PromptError(f"the prompt has {n} {placeholder} placeholder(s) but {len(blocks)} {what} given")
    parts = text.split(placeholder)
    return parts[0] + "".join(b + p for b, p in zip(blocks, parts[1:]))


def expand_placeholders(text: str, *, image_grids: Sequence = (), video_grids: Sequence = (),
                        video_timestamps: Sequence = (), audio_tokens: Sequence[int] = (), merge: int = 2,
                        interleaved: bool = True) -> str:
    """Replace `<IMAGE>`, `<VIDEO>`, `<AUDIO>` in order by their token blocks; the counts must match the media."""
    text = _replace_each(text, IMAGE_PLACEHOLDER, [image_block(g, merge) for g in image_grids], "image(s)")
    stamps = list(video_timestamps) if interleaved else [None] * len(video_grids)
    if len(stamps) != len(video_grids):
        raise PromptError(f"{len(video_grids)} video grid(s) but {len(stamps)} time stamp list(s)")
    text = _replace_each(text, VIDEO_PLACEHOLDER,
                         [video_block(g, s, merge, interleaved) for g, s in zip(video_grids, stamps)], "video(s)")
    return _replace_each(text, AUDIO_PLACEHOLDER, [audio_block(n) for n in audio_tokens], "audio clip(s)")


# --- model inputs -------------------------------------------------------------------------------------------------


def _read_image(source, index: int):
    """A path (or file:// URL), PIL image or uint8 array -> something `image.process_image` takes."""
    if isinstance(source, (str, os.PathLike)):
        from PIL import Image

        path = os.fspath(source)
        path = path[len("file://"):] if path.startswith("file://") else path
        if not os.path.isfile(path):
            raise PromptError(f"image {index}: file not found: {path}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises several unrelated types for unreadable files
            raise PromptError(f"image {index}: cannot read {path}: {type(e).__name__}: {e}") from e
    return source


def _read_audio(source, index: int) -> tuple[Any, int]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        path = path[len("file://"):] if path.startswith("file://") else path
        try:
            return audio_proc.load_audio(path)
        except audio_proc.AudioError as e:
            raise PromptError(f"audio clip {index}: {e}") from e
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return source[0], int(source[1])
    raise PromptError(f"audio clip {index}: give a file path or a (waveform, sample_rate) pair, got "
                      f"{type(source).__name__}")


class PromptBuilder:
    """Turns conversations with media into `OmniInputs` for one model (its processor, tokenizer and towers).

    `llm_cfg` / `audio_cfg` / `vision_cfg` (from an `OmniConfig`) let the builder check the tokenizer's ids, size
    audio placeholders with the model's own length formula, and refuse media a tower cannot take; `max_context`
    (default: the LLM's max_position_embeddings) bounds the prompt length.
    """

    def __init__(self, tokenizer: Tokenizer, processor: image_proc.ProcessorConfig | None = None, *, llm_cfg=None,
                 vision_cfg=None, audio_cfg=None, video: video_proc.VideoSamplingConfig | None = None,
                 max_context: int | None = None, interleaved: bool | None = None, upscale_small_images: bool = True):
        self.tokenizer = tokenizer
        self.processor = processor or image_proc.ProcessorConfig.ming_flash_omni_2()
        self.video = video or video_proc.VideoSamplingConfig.for_processor(self.processor)
        self.special = SpecialTokens.from_vocab(tokenizer)
        self.llm_cfg, self.vision_cfg, self.audio_cfg = llm_cfg, vision_cfg, audio_cfg
        if llm_cfg is not None:
            self.special.check_model(llm_cfg)
        if vision_cfg is not None:
            p, v = self.processor, vision_cfg
            if (p.patch_size, p.temporal_patch_size, p.merge_size) != (v.patch_size, v.temporal_patch_size,
                                                                        v.spatial_merge_size):
                raise PromptError(f"processor patch geometry (patch {p.patch_size}, temporal {p.temporal_patch_size},"
                                  f" merge {p.merge_size}) differs from the vision tower's ({v.patch_size}, "
                                  f"{v.temporal_patch_size}, {v.spatial_merge_size})")
        if audio_cfg is not None and audio_cfg.encoder.n_mels != self.processor.audio.n_mels:
            raise PromptError(f"the audio front end makes {self.processor.audio.n_mels} mel bins but the audio "
                              f"tower takes {audio_cfg.encoder.n_mels}")
        self.max_context = max_context if max_context is not None else (
            llm_cfg.max_position_embeddings if llm_cfg is not None else None)
        self.interleaved = interleaved if interleaved is not None else (
            llm_cfg.use_interleaved_frame_timestamp if llm_cfg is not None else True)
        self.upscale_small_images = upscale_small_images

    @classmethod
    def for_model(cls, tokenizer: Tokenizer, omni_cfg, processor=None, **kw) -> "PromptBuilder":
        return cls(tokenizer, processor, llm_cfg=omni_cfg.llm, vision_cfg=omni_cfg.vision,
                   audio_cfg=omni_cfg.audio, **kw)

    # -- media --
    def images(self, sources: Sequence) -> dict[str, np.ndarray]:
        if self.llm_cfg is not None and self.vision_cfg is None:
            raise PromptError("this model has no vision tower: it cannot take images or videos")
        rows, grids = [], []
        for i, src in enumerate(sources):
            if src is None:
                raise PromptError(f"image {i} is None")
            try:
                img = image_proc.to_rgb_uint8(_read_image(src, i))
                h, w = img.shape[:2]
                if not self.upscale_small_images and h * w < self.processor.min_pixels:
                    raise PromptError(f"image {i} is {w}x{h} = {h * w} pixels, below min_pixels="
                                      f"{self.processor.min_pixels} (upscale_small_images=False)")
                r, g = image_proc.process_image(img, self.processor)
            except image_proc.ImageError as e:
                raise PromptError(f"image {i}: {e}") from e
            rows.append(r)
            grids.append(g)
        return {"pixel_values": np.concatenate(rows), "image_grid_thw": np.asarray(grids, np.int64)}

    def videos(self, sources: Sequence) -> tuple[dict[str, np.ndarray], list[list[float]]]:
        if self.llm_cfg is not None and self.vision_cfg is None:
            raise PromptError("this model has no vision tower: it cannot take images or videos")
        rows, grids, stamps = [], [], []
        for i, src in enumerate(sources):
            try:
                r, g, ts = video_proc.process_video(video_proc.load_video(src, self.video), self.processor)
            except (video_proc.VideoError, image_proc.ImageError) as e:
                raise PromptError(f"video {i}: {e}") from e
            rows.append(r)
            grids.append(g)
            stamps.append(ts)
        return {"pixel_values_videos": np.concatenate(rows), "video_grid_thw": np.asarray(grids, np.int64)}, stamps

    def audios(self, sources: Sequence) -> tuple[dict[str, np.ndarray], list[int]]:
        if self.llm_cfg is not None and self.audio_cfg is None:
            raise PromptError("this model has no audio tower: it cannot take audio")
        clips = [_read_audio(s, i) for i, s in enumerate(sources)]
        try:
            out = audio_proc.process_audios(clips, self.processor.audio)
        except audio_proc.AudioError as e:
            raise PromptError(f"audio: {e}") from e
        lengths = out["audio_feats_lengths"][0]
        if self.audio_cfg is not None:
            too_long = [i for i, n in enumerate(lengths) if n > self.audio_cfg.max_mel_frames]
            if too_long:
                i = too_long[0]
                raise PromptError(f"audio clip {i} has {lengths[i]} mel frames ({lengths[i] / 100:.1f} s); the audio "
                                  f"encoder takes at most {self.audio_cfg.max_mel_frames}")
            tokens = [self.audio_cfg.output_frames(int(n)) for n in lengths]
        else:
            tokens = [int(n) for n in out["encoder_feats_lengths"][0]]
        return {"audio_feats": out["audio_feats"], "audio_feats_lengths": out["audio_feats_lengths"]}, tokens

    # -- whole prompts --
    def build(self, conversation: Sequence[Mapping[str, Any]], *, system: str | None = None, thinking: bool = False,
              assistant_prefix: str = "", max_new_tokens: int = 0) -> OmniInputs:
        """Chat template + media of the conversation -> model inputs (batch of one). `assistant_prefix` is text
        the answer starts with (e.g. `"English\\t"` for ASR in a known language)."""
        text = apply_chat_template(conversation, system=system, thinking=thinking) + assistant_prefix
        media = media_items(conversation)
        return self.build_text(text, images=media["image"], videos=media["video"], audios=media["audio"],
                               max_new_tokens=max_new_tokens)

    def build_text(self, text: str, *, images: Sequence = (), videos: Sequence = (), audios: Sequence = (),
                   max_new_tokens: int = 0) -> OmniInputs:
        """A prompt text already holding `<IMAGE>` / `<VIDEO>` / `<AUDIO>` placeholders (one per medium, in order)."""
        out: dict[str, Any] = {}
        img_grids, vid_grids, stamps, audio_tokens = [], [], [], []
        if images:
            out.update(self.images(images))
            img_grids = out["image_grid_thw"].tolist()
        if videos:
            v, stamps = self.videos(videos)
            out.update(v)
            vid_grids = v["video_grid_thw"].tolist()
        if audios:
            a, audio_tokens = self.audios(audios)
            out.update(a)
        merge = self.processor.merge_size
        expanded = expand_placeholders(text, image_grids=img_grids, video_grids=vid_grids, video_timestamps=stamps,
                                       audio_tokens=audio_tokens, merge=merge, interleaved=self.interleaved)
        ids = np.asarray(self.tokenizer.encode(expanded), np.int64)
        if ids.size == 0:
            raise PromptError("the prompt is empty")
        if self.max_context is not None and ids.size + max_new_tokens > self.max_context:
            raise PromptError(f"the prompt is {ids.size} tokens{f' + {max_new_tokens} new' if max_new_tokens else ''}"
                              f", longer than the model's context of {self.max_context} positions")
        self._check_layout(ids, img_grids, vid_grids, audio_tokens, merge)
        if videos and self.interleaved:  # the processor's output: one t=1 grid row per temporal patch
            g = out["video_grid_thw"]
            g = np.repeat(g, g[:, 0], axis=0)
            g[:, 0] = 1
            out["video_grid_thw"] = g
        if audios:
            starts = np.flatnonzero(ids == self.special.audio_start) + 1
            out["audio_placeholder_loc_lens"] = np.stack(
                [starts, np.asarray(audio_tokens, np.int64)], axis=-1)[None].astype(np.int64)
        return OmniInputs(input_ids=ids[None], attention_mask=np.ones((1, ids.size), bool), text=expanded, **out)

    def _check_layout(self, ids, img_grids, vid_grids, audio_tokens, merge):
        """The tokenizer must have kept every special string as one token: count what the layout promised."""
        sp = self.special
        want = {
            IMAGE_PATCH: (sp.image_patch, sum(t * h * w for t, h, w in img_grids) // merge**2),
            FRAME_PATCH: (sp.frame_patch, sum(t * h * w for t, h, w in vid_grids) // merge**2),
            AUDIO_PATCH: (sp.audio_patch, sum(audio_tokens)),
            AUDIO_START: (sp.audio_start, len(audio_tokens)),
        }
        for name, (tid, n) in want.items():
            got = int(np.sum(ids == tid))
            if got != n:
                raise PromptError(f"the tokenised prompt holds {got} {name} tokens (id {tid}) where the media need "
                                  f"{n}: the tokenizer does not keep special strings whole, or the text contains them")
        starts = np.flatnonzero(ids == sp.audio_start) + 1
        for j, (s, n) in enumerate(zip(starts, audio_tokens)):
            if not (ids[s:s + n] == sp.audio_patch).all():
                raise PromptError(f"audio clip {j}: its {n} {AUDIO_PATCH} tokens do not follow its {AUDIO_START}")


# --- a stand-in tokenizer -----------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The printable stand-in character of each byte value used by byte-level BPE vocabularies (GPT-2's table):
    printable Latin-1 bytes map to themselves, the rest to code points from 256 upwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


class StandInTokenizer:
    """A byte-level tokenizer (ids 0..255 = UTF-8 bytes) holding the release's special strings at given ids.

    For random-weight tiny models and tests, where the release's tokenizer.json is not at hand; built with the
    `tokenizers` library, so `save(dir)` writes a real tokenizer.json that `ming_jax.processors.tokenizer.ReleaseTokenizer`
    loads."""

    def __init__(self, special_ids: Mapping[str, int]):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        special_ids = dict(special_ids)
        clash = sorted(s for s, i in special_ids.items() if 0 <= i < 256)
        if clash or len(set(special_ids.values())) != len(special_ids):
            raise PromptError(f"special token ids must be unique and >= 256 (bytes use 0..255): {special_ids}")
        vocab = {sym: b for b, sym in enumerate(_byte_symbols())}
        vocab.update(special_ids)
        taken = set(vocab.values())
        # Unreachable fillers keep the id range contiguous (a saved vocabulary with holes is refused by some readers).
        vocab.update({f"<|unused_{i}|>": i for i in range(256, max(taken) + 1) if i not in taken})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_ids])
        self._tok = tok
        self.special = special_ids

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(int(i) for i in ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"unknown token {token!r} for this tokenizer")
        return tid

    def save(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "tokenizer.json")
        self._tok.save(path)
        return path


def tiny_special_ids(llm_cfg) -> dict[str, int]:
    """Special-string ids for a tiny LLM config: its own placeholder / pad / eos ids where it has them (the golden
    cases' numbering: `<imagePatch>` 990, `<framePatch>` 991, `<image>` 992, ...), the rest just below them."""
    v = llm_cfg.vocab_size
    eos = llm_cfg.eos_ids[0] if llm_cfg.eos_ids else v - 11
    ids = {
        IMAGE_PATCH: llm_cfg.image_patch_token, FRAME_PATCH: llm_cfg.video_patch_token,
        IMAGE_START: llm_cfg.image_start_token, VIDEO_START: llm_cfg.video_start_token,
        IMAGE_END: v - 6, VIDEO_END: v - 5, AUDIO_START: v - 4, AUDIO_PATCH: v - 3, AUDIO_END: v - 2,
        "<|endoftext|>": llm_cfg.pad_token_id if llm_cfg.pad_token_id is not None else v - 1, ROLE_END: eos,
        "<role>": v - 13, "</role>": v - 12,
    }
    if any(i is None for i in ids.values()) or len(set(ids.values())) != len(ids):
        raise PromptError(f"cannot lay out distinct special ids for this config: {ids}")
    return ids


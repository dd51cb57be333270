"""The talker's chat prompt and its instruction JSON (host side): text + voice -> token ids and the rows whose
embeddings the voice replaces.

The release (`BailingTalker2.omni_audio_generation_func`) tokenises a Qwen2 chat in PIECES, each piece encoded on
its own and the id lists concatenated (so the ids differ from encoding the joined string wherever a BPE merge would
cross a piece boundary); this module keeps that. In order:

    "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"
    "<|im_start|>user\\n"
    task prompt                                   (default SPEECH_TASK)
    per speaker i = 1 .. S:  "  speaker_{i}:" | "<|vision_start|>" | "<|vision_pad|>" | "<|vision_end|>\\n"
                             (the <|vision_pad|> row's embedding is replaced by speaker i's embedding)
    " Text input:\\n"                              (left out when the text is a music description: it holds all of
                                                   "Genre: ", "Mood: ", "Instrument: ", "Theme: ", "Duration: ")
    the voice's prompt text                       (only with voice-prompt audio, and only when a prompt text is given)
    the text
    "<|im_end|>\\n" | "<|im_start|>assistant\\n"
    instruction JSON | "<|im_end|>"                (only with an instruction)
    "<audio>"
    N x "<audioPatch>"                            (N = the voice prompt's latent patches, under the same condition as
                                                   its prompt text; each row replaced by the aggregator output of
                                                   one patch of the prompt latents)

`build_prompt` returns the ids and the positions of the speaker rows and of the audio-patch rows, known by
construction (the release finds them by searching the ids for <|vision_start|> / <audio>, which a text containing
those strings would confuse; such texts are refused here instead). A tokenizer lacking one of the special tokens
is refused with an error naming it.

`create_instruction` / `instruction_json` are the release's instruction builder (test_talker.py): a caption
template with one speaker item, the user's keys filled in, the item's keys reordered when a BGM SNR is given, and
`json.dumps(..., ensure_ascii=False)`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

# --- the release's strings ---------------------------------------------------------------------------------------

SPEECH_TASK = "Please generate speech based on the following description.\n"
AUDIO_EVENT_TASK = "Please generate audio events based on given text.\n"  # test_talker.py, TTA
MUSIC_TASK = "Please generate music based on the following description.\n"  # test_talker.py, BGM

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPEAKER_START, SPEAKER_SLOT, SPEAKER_END = "<|vision_start|>", "<|vision_pad|>", "<|vision_end|>"
AUDIO, AUDIO_PATCH = "<audio>", "<audioPatch>"
SPECIAL_TOKENS = (IM_START, IM_END, SPEAKER_START, SPEAKER_SLOT, SPEAKER_END, AUDIO, AUDIO_PATCH)

SYSTEM_TURN = f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
USER_OPEN = f"{IM_START}user\n"
TEXT_INPUT = " Text input:\n"
TURN_END = f"{IM_END}\n"
ASSISTANT_OPEN = f"{IM_START}assistant\n"
MUSIC_FIELDS = ("Genre: ", "Mood: ", "Instrument: ", "Theme: ", "Duration: ")


class TalkerPromptError(ValueError):
    """A talker prompt that cannot be built: empty text, reserved strings in it, a tokenizer without the talker's
    special tokens, a bad instruction."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def speaker_label(i: int) -> str:
    """The text before speaker i's slot (1-based, as the release numbers them)."""
    return f"  speaker_{i}:"


def is_music_description(text: str) -> bool:
    """The release's test for a BGM description, whose prompt has no " Text input:" line."""
    return all(field in text for field in MUSIC_FIELDS)


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{special string: id} for the talker's special tokens; TalkerPromptError naming any the tokenizer lacks (or
    splits into several ids)."""
    out, problems = {}, []
    lookup = getattr(tokenizer, "token_id", None)
    for s in SPECIAL_TOKENS:
        known = None
        if lookup is not None:
            try:
                known = int(lookup(s))
            except (KeyError, ValueError):
                problems.append(f"{s!r} is not a token of this tokenizer")
                continue
        ids = list(tokenizer.encode(s))
        if len(ids) != 1 or (known is not None and ids[0] != known):
            problems.append(f"{s!r} encodes to {ids}, not to one special token"
                            + (f" (its id is {known})" if known is not None else ""))
            continue
        out[s] = ids[0]
    if problems:
        raise TalkerPromptError("the talker tokenizer lacks special tokens the prompt needs (is this the talker's "
                                "llm/tokenizer.json?): " + "; ".join(problems))
    return out


@dataclasses.dataclass(frozen=True)
class TalkerPrompt:
    ids: np.ndarray  # int32 [T]
    speaker_rows: np.ndarray  # int32 [S]: the <|vision_pad|> positions, speaker 1 first
    patch_rows: np.ndarray  # int32 [N]: the <audioPatch> positions, patch 0 first (consecutive)
    audio_row: int  # the position of <audio>

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def _check_text(value: str, what: str) -> None:
    found = [s for s in SPECIAL_TOKENS if s in value]
    if found:
        raise TalkerPromptError(f"{what} contains the talker's special token(s) {found}; they would add rows the "
                                "voice does not fill")


def build_prompt(tokenizer: Tokenizer, text: str, *, task_prompt: str = SPEECH_TASK, speakers: int = 0,
                 prompt_text: str | None = None, prompt_patches: int = 0,
                 instruction: str | None = None) -> TalkerPrompt:
    """The talker prompt for `text`: `speakers` speaker slots, the voice prompt's text and `prompt_patches`
    audio-patch rows when the voice has prompt audio (prompt_patches > 0) AND a prompt text (None: no prompt text;
    then no patch rows either, as in the release, though the voice's latents still seed the history), and an
    instruction JSON string (see `instruction_json`)."""
    if not isinstance(text, str) or not text.strip():
        raise TalkerPromptError(f"empty text to speak ({text!r})")
    if speakers < 0 or prompt_patches < 0:
        raise TalkerPromptError(f"speakers={speakers} and prompt_patches={prompt_patches} must be >= 0")
    for value, what in ((text, "the text"), (task_prompt, "the task prompt"), (prompt_text, "the prompt text"),
                        (instruction, "the instruction")):
        if value is not None:
            if not isinstance(value, str):
                raise TalkerPromptError(f"{what} must be a string, got {type(value).__name__}")
            _check_text(value, what)
    ids = special_ids(tokenizer)
    enc = lambda s: [int(i) for i in tokenizer.encode(s)]  # noqa: E731
    with_prompt_audio = prompt_patches > 0 and prompt_text is not None
    pieces: list[list[int]] = [enc(SYSTEM_TURN), enc(USER_OPEN), enc(task_prompt)]
    out: list[int] = [i for p in pieces for i in p]
    speaker_rows = []
    for i in range(1, speakers + 1):
        out += enc(speaker_label(i)) + [ids[SPEAKER_START]]
        speaker_rows.append(len(out))
        out += [ids[SPEAKER_SLOT]] + enc(SPEAKER_END + "\n")
    if not is_music_description(text):
        out += enc(TEXT_INPUT)
    if with_prompt_audio:
        out += enc(prompt_text)
    out += enc(text) + enc(TURN_END) + enc(ASSISTANT_OPEN)
    if instruction is not None:
        out += enc(instruction) + [ids[IM_END]]
    audio_row = len(out)
    out.append(ids[AUDIO])
    n = prompt_patches if with_prompt_audio else 0
    patch_rows = list(range(len(out), len(out) + n))
    out += [ids[AUDIO_PATCH]] * n
    return TalkerPrompt(np.asarray(out, np.int32), np.asarray(speaker_rows, np.int32),
                        np.asarray(patch_rows, np.int32), audio_row)


# --- the instruction JSON (test_talker.py `create_instruction`) ----------------------------------------------------

BGM_FIELDS = ("Genre", "Mood", "Instrument", "Theme", "ENV", "SNR")
# The item's keys in the template's order, and in the order used when a BGM SNR is given.
ITEM_KEYS = ("序号", "说话人", "方言", "风格", "语速", "基频", "音量", "情感", "BGM", "IP")
SNR_ORDER = ("序号", "说话人", "BGM", "情感", "方言", "风格", "语速", "基频", "音量", "IP")


def caption_template() -> dict:
    """A fresh copy of the release's caption: one item for speaker_1, every attribute None."""
    item: dict[str, Any] = {k: None for k in ITEM_KEYS}
    item["序号"], item["说话人"] = 1, "speaker_1"
    item["BGM"] = {k: None for k in BGM_FIELDS}
    return {"audio_sequence": [item]}


def create_instruction(user_input: Mapping[str, Any], *, strict: bool = True) -> dict:
    """The caption dict for `user_input` ({attribute: value}, e.g. {"情感": "高兴"} or {"BGM": {...}}): each key the
    item has is set (a BGM value replaces the whole BGM dict); keys the item lacks are an error (strict) or ignored
    (strict=False, the release). With a BGM SNR the item's keys take the release's SNR order."""
    if not isinstance(user_input, Mapping):
        raise TalkerPromptError(f"an instruction is a JSON object of attributes, got {type(user_input).__name__}")
    caption = caption_template()
    item = caption["audio_sequence"][0]
    unknown = [k for k in user_input if k not in item]
    if unknown and strict:
        raise TalkerPromptError(f"instruction: unknown attribute(s) {unknown} (known: {list(ITEM_KEYS)})")
    for key, value in user_input.items():
        if key in item:
            item[key] = value
    if not isinstance(item["BGM"], Mapping):
        raise TalkerPromptError(f"instruction: BGM must be an object of {list(BGM_FIELDS)}, got {item['BGM']!r}")
    if item["BGM"].get("SNR") is not None:
        caption["audio_sequence"][0] = {k: item[k] for k in SNR_ORDER if k in item}
    return caption


def instruction_json(instruction: str | Mapping[str, Any] | None, *, strict: bool = True) -> str | None:
    """The instruction string the prompt takes: None stays None; a JSON string or a dict of attributes goes through
    `create_instruction`; a full caption (a dict with "audio_sequence") is used as it is. Both are written with
    `json.dumps(ensure_ascii=False)`, as the release does."""
    if instruction is None:
        return None
    if isinstance(instruction, str):
        try:
            instruction = json.loads(instruction)
        except json.JSONDecodeError as e:
            raise TalkerPromptError(f"instruction is not valid JSON ({e}): {instruction!r}") from None
    if isinstance(instruction, Mapping) and "audio_sequence" in instruction:
        return json.dumps(instruction, ensure_ascii=False)
    return json.dumps(create_instruction(instruction, strict=strict), ensure_ascii=False)


def podcast_text(turns: Sequence[tuple[str, str]]) -> str:
    """A dialogue as the release's podcast example writes it: " speaker_1:text\\n speaker_2:text\\n"."""
    return " " + "\n ".join(f"{who}:{what}" for who, what in turns) + "\n"

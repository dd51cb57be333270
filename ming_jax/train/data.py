"""Training data: JSONL text conversations -> packed next-token batches (grain), resumable and deterministic.

Dataset format
--------------
JSONL, UTF-8, one conversation per line (empty lines are skipped):

    {"messages": [{"role": "HUMAN", "content": "reverse: abcd"},
                  {"role": "ASSISTANT", "content": [{"type": "text", "text": "dcba"}]}],
     "system": "optional system text"}

- `messages`: a non-empty list; `role` is "HUMAN" or "ASSISTANT"; `content` is a string or a list of
  `{"type": "text", "text": ...}` items (joined without separator, as the chat template does). With the default
  label mode ("assistant") a conversation needs at least one ASSISTANT message.
- `system`: optional; it replaces the release's default persona sentence in the system turn (`system_prompt`),
  which also carries `detailed thinking on|off` (`TrainData.thinking`).
- No other keys. A HUMAN message's content list may hold `{"type": "image", "image": "path"}` items (relative to the
  JSONL file's folder; `TrainData.media` must then be set, see `MediaConfig` and docs/training.md); `audio` and
  `video` items are refused (not built).
  Text may not contain the media placeholders / patch tokens (`prompt.RESERVED`), nor the role markers
  (`<|role_end|>`, `<role>SYSTEM</role>`, `<role>HUMAN</role>`, `<role>ASSISTANT</role>`), which would forge turns.
  Every problem is a `DataError` (a ValueError) naming `file:line`, raised when the files are read, before training.

Rendering (`render`)
--------------------
The official chat template (`prompt.apply_chat_template`), tokenised segment by segment so that label boundaries
are exact: `system_prompt(system) <|role_end|>`, then per message `<role>HUMAN</role>` or `<role>ASSISTANT</role>`,
its text, `<|role_end|>`. Labels: "assistant" marks each assistant text and its closing `<|role_end|>` (not the
role prefix); "all" marks every token. A next-token `example` shifts by one: inputs = tokens[:-1], targets =
tokens[1:], loss_mask = mask[1:] (a token is learned where its own mask is set).

Pipeline (`make_iterator`)
--------------------------
All lines of all files are read and checked; this host keeps conversations `shard_index::shard_count`; then
(grain) shuffle (a fresh deterministic order each epoch: grain seeds epoch e with `seed + e`), repeat
`num_epochs` times (None: forever), render + shift in the map (the tokenizer is built once per process from a
picklable `tokenizer_spec`), truncate overlong examples to `seq_len` or drop them, first-fit pack into
`batch_size` rows of `seq_len` (bins shuffled when `shuffle`), batch, and optionally run all of that in
`worker_count` processes (`mp_prefetch`). Batches are dicts of numpy arrays, [B, T] with B = `batch_size` (this
host's rows) and T = `seq_len`:

    input_ids   int32    tokens (0 on padding)
    targets     int32    next tokens (0 on padding)
    loss_mask   float32  1 where the target is learned, 0 elsewhere and on padding
    segment_ids int32    0 on padding, 1, 2, ... for the documents packed into the row
    positions   int32    position within its document, from 0 (0 on padding)

Attention must stay within a segment (`segment_ids` equal) and rotary positions come from `positions`.
`it.get_state()` is a JSON-able dict (`save_state` / `restore_state`); a new iterator for the same config and
data restored to it yields exactly the batches the saved one would have yielded next. The stream depends on the
config (seed, seq_len, batch_size, shard, worker_count), so resume with the same one. The final partial batch of a
finite run (`num_epochs`) is dropped.

Worker processes (`worker_count` > 0) are started with `spawn`: the launching script needs the usual
`if __name__ == "__main__":` guard (absl mains have it), and `it.close()` stops them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from ming_jax.config.llm import LLMConfig
from ming_jax.config.modality import TEXT, VISION
from ming_jax.config.vision import VisionConfig
from ming_jax.models import inputs as multimodal
from ming_jax.models import vision as vision_lib
from ming_jax.processors import image as image_proc
from ming_jax.processors import prompt
from ming_jax.processors.image import ProcessorConfig
from ming_jax.processors.tokenizer import ReleaseTokenizer

LABEL_MODES = ("assistant", "all")
OVERLONG_MODES = ("truncate", "drop")
ROLES = ("HUMAN", "ASSISTANT")
MEDIA_TYPES = ("image", "audio", "video")
# Strings that would forge turn structure if a text carried them (each is one special token or starts a turn).
ROLE_MARKERS = (prompt.ROLE_END, prompt.SYSTEM_PREFIX, prompt.USER_PREFIX, prompt.ASSISTANT_PREFIX)
OUTPUT_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class DataError(ValueError):
    """A training file or conversation that cannot be used; the message names `file:line` where it has one."""


# --- reading and checking -----------------------------------------------------------------------------------------


def _check_text(text: Any, where: str) -> str:
    try:
        prompt._check_text(text, where)
    except prompt.PromptError as e:
        raise DataError(str(e)) from None
    forged = [m for m in ROLE_MARKERS if m in text]
    if forged:
        raise DataError(f"{where}: text contains the chat template's role marker(s) {forged}")
    return text


def _image_path(item: Mapping[str, Any], at: str, base: str | None) -> str:
    extra = sorted(set(item) - {"type", "image"})
    path = item.get("image")
    if extra or not isinstance(path, str) or not path:
        raise DataError(f"{at}: an image item has exactly the keys 'type' and 'image' (one file path), got "
                        f"{sorted(item)}" + ("" if isinstance(path, str) else f" with image={path!r}"))
    path = path[len("file://"):] if path.startswith("file://") else path
    if base is not None and not os.path.isabs(path):
        path = os.path.join(base, path)
    if not os.path.isfile(path):
        raise DataError(f"{at}: image file not found: {path}")
    return os.path.abspath(path)


def _message_content(content: Any, where: str, role: str, base: str | None) -> str | list:
    """A message's content -> its text (a string) or, when it holds images, its parts in order: strings and
    `{"image": absolute path}`."""
    if isinstance(content, str):
        return _check_text(content, where)
    if not isinstance(content, list):
        raise DataError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
    parts: list = []
    for j, item in enumerate(content):
        at = f"{where}, item {j}"
        if not isinstance(item, Mapping):
            raise DataError(f"{at}: a content item must be an object, got {type(item).__name__}")
        kind = item.get("type")
        if kind == "image":
            if role != "HUMAN":
                raise DataError(f"{at}: images go in HUMAN messages (an ASSISTANT image would be image generation, "
                                "which this training data does not cover)")
            parts.append({"image": _image_path(item, at, base)})
            continue
        if kind in MEDIA_TYPES:
            raise DataError(f"{at}: {kind} items in training data are not supported yet (images are; the train step "
                            "runs the vision tower, not video sampling or the audio tower)")
        if kind != "text":
            raise DataError(f"{at}: content item type {kind!r} (expected 'text' or 'image')")
        extra = sorted(set(item) - {"type", "text"})
        if extra or "text" not in item:
            raise DataError(f"{at}: a text item has exactly the keys 'type' and 'text', got {sorted(item)}")
        text = _check_text(item["text"], at)
        if parts and isinstance(parts[-1], str):
            parts[-1] += text
        else:
            parts.append(text)
    if not any(isinstance(p, dict) for p in parts):
        return "".join(parts)
    return parts


def normalize(record: Any, where: str = "conversation", *, labels: str = "assistant", base: str | None = None) -> dict:
    """A conversation record (the JSONL format) checked and reduced to `{"system": str | None, "messages":
    [{"role", "content"}]}`, content a string, or a list of strings and `{"image": absolute path}` for a message
    with images (relative image paths are taken from `base`, the JSONL file's folder, and must exist); `where`
    prefixes every error."""
    if labels not in LABEL_MODES:
        raise DataError(f"labels={labels!r} (expected one of {LABEL_MODES})")
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a conversation must be a JSON object, got {type(record).__name__}")
    extra = sorted(set(record) - {"messages", "system"})
    if extra:
        raise DataError(f"{where}: unknown key(s) {extra} (a conversation has 'messages' and optional 'system')")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    system = record.get("system")
    if system is not None:
        _check_text(system, f"{where}: system")
    out = []
    for i, message in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(message, Mapping):
            raise DataError(f"{at}: a message must be an object, got {type(message).__name__}")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise DataError(f"{at}: unknown key(s) {extra} (a message has 'role' and 'content')")
        role = message.get("role")
        if role not in ROLES:
            hint = " (put system text in the conversation's 'system' key)" if role == "SYSTEM" else ""
            raise DataError(f"{at}: role {role!r} (expected 'HUMAN' or 'ASSISTANT'){hint}")
        if "content" not in message:
            raise DataError(f"{at}: no 'content'")
        out.append({"role": role, "content": _message_content(message["content"], at, role, base)})
    if labels == "assistant" and not any(m["role"] == "ASSISTANT" for m in out):
        raise DataError(f"{where}: no ASSISTANT message, so nothing to learn with labels='assistant'")
    return {"system": system, "messages": out}


def read_conversations(paths: Sequence[str | os.PathLike], *, labels: str = "assistant") -> list[tuple[str, dict]]:
    """Every conversation of the JSONL files, in file and line order, as (`"file:line"`, normalized record)."""
    if not paths:
        raise DataError("no training data files given")
    out = []
    for path in paths:
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
                out.append((where, normalize(record, where, labels=labels,
                                             base=os.path.dirname(os.path.abspath(path)))))
    return out


# --- tokenizer, rendering, examples -------------------------------------------------------------------------------


def tokenizer_from_spec(spec: str | os.PathLike | Mapping[str, Any]):
    """A picklable tokenizer description -> tokenizer: a folder holding tokenizer.json (`ReleaseTokenizer`), or
    `{"stand_in": {special string: id}}` (`prompt.StandInTokenizer`, e.g. `prompt.tiny_special_ids(llm_cfg)`)."""
    if isinstance(spec, (str, os.PathLike)):
        return ReleaseTokenizer(os.fspath(spec))
    if isinstance(spec, Mapping) and set(spec) == {"stand_in"}:
        return prompt.StandInTokenizer(spec["stand_in"])
    raise DataError(f"tokenizer_spec must be a folder with tokenizer.json or {{'stand_in': ids}}, got {spec!r}")


_TOKENIZERS: dict[str, Any] = {}  # per process: worker processes build their own on first use


def _spec_key(spec) -> str:
    return os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else json.dumps(spec, sort_keys=True)


def cached_tokenizer(spec):
    """`tokenizer_from_spec`, built once per process and spec."""
    key = _spec_key(spec)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = tokenizer_from_spec(spec)
    return _TOKENIZERS[key]


def render(conversation: Mapping[str, Any], tokenizer, *, labels: str = "assistant", thinking: bool = False,
           where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """A conversation (JSONL record) -> (tokens int32[L], loss_mask bool[L]) in the release's chat template.

    Segments are tokenised apart (system body, each role prefix, each text) and joined by `<|role_end|>` ids, so
    the mask covers exactly the assistant texts and their closing `<|role_end|>` (labels="assistant") or everything
    (labels="all"). For a tokenizer that keeps special strings whole this equals tokenising the whole text."""
    conv = normalize(conversation, where, labels=labels)
    role_end = tokenizer.token_id(prompt.ROLE_END)
    learn_all = labels == "all"
    ids: list[int] = []
    mask: list[bool] = []

    def add(tokens: Iterable[int], learned: bool):
        tokens = list(tokens)
        ids.extend(tokens)
        mask.extend([learned or learn_all] * len(tokens))

    add(tokenizer.encode(prompt.system_prompt(conv["system"], thinking=thinking)) + [role_end], False)
    for message in conv["messages"]:
        assistant = message["role"] == "ASSISTANT"
        add(tokenizer.encode(prompt.ASSISTANT_PREFIX if assistant else prompt.USER_PREFIX), False)
        add(tokenizer.encode(message["content"]) + [role_end], assistant)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


@dataclasses.dataclass(frozen=True)
class MediaConfig:
    """How the images of training conversations become model inputs (`TrainData.media`; None: text only, and a
    conversation with an image is an error). `llm` gives the image block's token ids and the 3-D rope rules,
    `vision` the patch width, merge size and position table, `processor` the release's image processor settings
    (resize bounds, normalisation); `patches_per_row` is the number of patch slots beside each packed row of
    `seq_len` tokens (a multiple of merge_size**2): the documents packed into a row bring their images' patches
    there, and the ViT attends within each image over those slots (`ming_jax.models.vision.PackedLayout`)."""

    llm: LLMConfig
    vision: VisionConfig
    processor: ProcessorConfig = ProcessorConfig()
    patches_per_row: int = 1024

    def __post_init__(self):
        v, pr = self.vision, self.processor
        unit = v.spatial_merge_size ** 2
        problems = []
        if self.llm.image_patch_token is None:
            problems.append("the LLM config has no image_patch_token")
        if (pr.patch_size, pr.temporal_patch_size, pr.merge_size) != (
                v.patch_size, v.temporal_patch_size, v.spatial_merge_size):
            problems.append(f"processor patch / temporal patch / merge sizes {(pr.patch_size, pr.temporal_patch_size, pr.merge_size)} "
                            f"differ from the vision tower's {(v.patch_size, v.temporal_patch_size, v.spatial_merge_size)}")
        if self.patches_per_row < unit or self.patches_per_row % unit:
            problems.append(f"patches_per_row={self.patches_per_row} must be a positive multiple of "
                            f"merge_size**2={unit}")
        if problems:
            raise DataError("MediaConfig: " + "; ".join(problems))

    @property
    def tokens_per_row(self) -> int:
        """Merged image tokens the patch slots of one row can hold."""
        return self.patches_per_row // self.vision.spatial_merge_size ** 2


def _load_image(path: str, where: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises several unrelated types for unreadable files
        raise DataError(f"{where}: cannot read image {path}: {type(e).__name__}: {e}") from None


def has_images(conversation: Mapping[str, Any]) -> bool:
    """Whether a normalized conversation (`normalize`) holds an image."""
    return any(not isinstance(m["content"], str) for m in conversation["messages"])


def render_images(conversation: Mapping[str, Any], tokenizer, media: MediaConfig, *, labels: str = "assistant",
                  thinking: bool = False, where: str = "conversation"):
    """`render` for a normalized conversation (`normalize`, `read_conversations`) that may hold images -> (tokens int32[L], loss_mask bool[L], pixel rows float32
    [n, patch_dim], grids [(t, h, w)] per image). Each image is read and processed (`process_image`) and its place
    in the text becomes the release's image block (`<image>`, one `<imagePatch>` per merged token, `</image>`,
    newline); a message is tokenised whole, as the chat template's text would be. Image blocks take no loss."""
    conv = conversation
    role_end = tokenizer.token_id(prompt.ROLE_END)
    merge = media.vision.spatial_merge_size
    ids: list[int] = []
    mask: list[bool] = []
    pixels, grids = [], []

    def add(tokens: Iterable[int], learned: bool):
        tokens = list(tokens)
        ids.extend(tokens)
        mask.extend([learned or labels == "all"] * len(tokens))

    add(tokenizer.encode(prompt.system_prompt(conv["system"], thinking=thinking)) + [role_end], False)
    for message in conv["messages"]:
        assistant = message["role"] == "ASSISTANT"
        add(tokenizer.encode(prompt.ASSISTANT_PREFIX if assistant else prompt.USER_PREFIX), False)
        content = message["content"]
        if isinstance(content, str):
            add(tokenizer.encode(content) + [role_end], assistant)
            continue
        text, expected = "", 0
        for part in content:
            if isinstance(part, str):
                text += part
                continue
            try:
                rows, grid = image_proc.process_image(_load_image(part["image"], where), media.processor)
            except image_proc.ImageError as e:
                raise DataError(f"{where}: image {part['image']}: {e}") from None
            pixels.append(rows)
            grids.append(tuple(int(g) for g in grid))
            text += prompt.image_block(grid, merge)
            expected += rows.shape[0] // merge ** 2
        tokens = tokenizer.encode(text)
        found = sum(t == media.llm.image_patch_token for t in tokens)
        if found != expected:
            raise DataError(f"{where}: the tokenizer turned {expected} {prompt.IMAGE_PATCH} into {found} tokens of "
                            f"id {media.llm.image_patch_token} (the LLM config's image_patch_token): tokenizer and "
                            "model config disagree")
        add(tokens + [role_end], assistant)
    k = media.vision.patch_dim
    rows = np.concatenate(pixels) if pixels else np.zeros((0, k), np.float32)
    return np.asarray(ids, np.int32), np.asarray(mask, bool), rows.astype(np.float32), grids


def example_images(tokens, loss_mask, pixels, grids, media: MediaConfig, *, seq_len: int | None = None,
                   where: str = "conversation") -> dict[str, np.ndarray]:
    """The next-token `example` of a conversation with images (`render_images`), plus what packing carries for
    them: `positions3` [L, 3] (the release's 3-D rope positions of the inputs), `modality` [L] (VISION on image
    patch tokens), per patch `patches` [n, patch_dim], `patch_rows` / `patch_cols`, `patch_pos_index` /
    `patch_pos_weight` [n, 4] (`vision_layout`'s values), `patch_segment` [n] (the image within the document, from
    1), and `token_index` [n / merge**2] (the input position each merged token fills). `seq_len` cuts the example
    to its first seq_len positions, which must not cut into an image (DataError)."""
    cfg, v = media.llm, media.vision
    unit = v.spatial_merge_size ** 2
    ex = example(tokens, loss_mask)
    grid_arr = np.asarray(grids, np.int64).reshape(-1, 3) if grids else None
    prep = multimodal.prepare(cfg, np.asarray(tokens)[None], None,
                              multimodal.MultimodalInputs(image_grid_thw=grid_arr))
    ex["positions3"] = np.ascontiguousarray(prep.positions[:, 0, :-1].T.astype(np.int32))  # [L, 3]
    if seq_len is not None and len(ex["inputs"]) > seq_len:
        ex = {key: a[:seq_len] for key, a in ex.items()}
    inputs = ex["inputs"]
    ex["modality"] = np.where(inputs == cfg.image_patch_token, VISION, TEXT).astype(np.int32)
    token_index = np.flatnonzero(inputs == cfg.image_patch_token).astype(np.int32)
    if token_index.size * unit != pixels.shape[0]:
        raise DataError(f"{where}: {len(inputs)} positions hold {token_index.size} of the images' "
                        f"{pixels.shape[0] // unit} tokens: seq_len={seq_len} cuts into an image; raise seq_len or "
                        "use overlong='drop'")
    rows, cols, index, weight, segment = [], [], [], [], []
    for n, grid in enumerate(grids):
        lay = vision_lib.vision_layout((tuple(grid),), v.spatial_merge_size, v.position_grid_side)
        rows.append(lay.rows)
        cols.append(lay.cols)
        index.append(lay.pos_index.T)
        weight.append(lay.pos_weight.T)
        segment.append(lay.segment_ids + 1 + sum(g[0] for g in grids[:n]))  # one segment per (image, frame)
    cat = lambda xs, shape, dt: (np.concatenate(xs) if xs else np.zeros(shape, dt)).astype(dt)  # noqa: E731
    ex.update(patches=pixels.astype(np.float32), patch_rows=cat(rows, (0,), np.int32),
              patch_cols=cat(cols, (0,), np.int32), patch_pos_index=cat(index, (0, 4), np.int32),
              patch_pos_weight=cat(weight, (0, 4), np.float32), patch_segment=cat(segment, (0,), np.int32),
              token_index=token_index)
    return ex


def example(tokens: np.ndarray, loss_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token example of L-1 positions: predict tokens[1:] from tokens[:-1], learn where mask[1:] is set."""
    tokens, loss_mask = np.asarray(tokens, np.int32), np.asarray(loss_mask, bool)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask[1:]}


# --- the pipeline -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainData:
    """What `make_iterator` reads and how. `batch_size` is this host's rows per step (the global batch is
    `batch_size * shard_count`); `shard_index` / `shard_count` default to `jax.process_index()` /
    `jax.process_count()` when the iterator is made. `worker_count` 0 runs the pipeline in this process.
    `overlong`: an example longer than `seq_len` is cut to its first `seq_len` positions ("truncate") or skipped
    ("drop")."""

    paths: tuple[str, ...]
    seq_len: int
    batch_size: int
    seed: int = 0
    labels: str = "assistant"
    thinking: bool = False
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    overlong: str = "truncate"
    shard_index: int | None = None
    shard_count: int | None = None
    media: MediaConfig | None = None

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else self.paths
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        problems = []
        if not self.paths:
            problems.append("no paths")
        if self.seq_len < 1 or self.batch_size < 1:
            problems.append(f"seq_len={self.seq_len} and batch_size={self.batch_size} must be >= 1")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed={self.seed} must be in [0, 2**32)")
        if self.labels not in LABEL_MODES:
            problems.append(f"labels={self.labels!r} (one of {LABEL_MODES})")
        if self.overlong not in OVERLONG_MODES:
            problems.append(f"overlong={self.overlong!r} (one of {OVERLONG_MODES})")
        if self.num_epochs is not None and self.num_epochs < 1:
            problems.append(f"num_epochs={self.num_epochs} must be >= 1 or None (forever)")
        if self.worker_count < 0:
            problems.append(f"worker_count={self.worker_count} must be >= 0")
        if (self.shard_index is None) != (self.shard_count is None):
            problems.append("give both shard_index and shard_count, or neither")
        elif self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            problems.append(f"shard_index={self.shard_index} must be in [0, shard_count={self.shard_count})")
        if problems:
            raise DataError("TrainData: " + "; ".join(problems))

    def shard(self) -> tuple[int, int]:
        """(index, count) of this host's shard of the conversations."""
        if self.shard_count is not None:
            return self.shard_index, self.shard_count
        return jax.process_index(), jax.process_count()


@dataclasses.dataclass
class _Render:
    """The map of the pipeline: (where, record) -> example, truncated to seq_len when overlong='truncate'.
    Picklable: worker processes get the spec and build their tokenizer on first use."""

    tokenizer_spec: Any
    labels: str
    thinking: bool
    seq_len: int
    truncate: bool
    media: MediaConfig | None = None

    def __call__(self, item: tuple[str, dict]) -> dict[str, np.ndarray]:
        where, record = item
        tokenizer = cached_tokenizer(self.tokenizer_spec)
        if self.media is not None:
            tokens, mask, pixels, grids = render_images(record, tokenizer, self.media, labels=self.labels,
                                                        thinking=self.thinking, where=where)
            if self.truncate and pixels.shape[0] > self.media.patches_per_row:
                raise DataError(f"{where}: its images have {pixels.shape[0]} patches, more than patches_per_row="
                                f"{self.media.patches_per_row}: raise patches_per_row, lower the processor's "
                                "max_pixels, or use overlong='drop'")
            return example_images(tokens, mask, pixels, grids, self.media,
                                  seq_len=self.seq_len if self.truncate else None, where=where)
        tokens, mask = render(record, tokenizer, labels=self.labels, thinking=self.thinking, where=where)
        if self.truncate:
            tokens, mask = tokens[:self.seq_len + 1], mask[:self.seq_len + 1]
        return example(tokens, mask)


@dataclasses.dataclass
class _Fits:
    """The filter of overlong='drop'. Raises once it has dropped `shard_size` examples without keeping one (every
    conversation too long), which an endless repeat would otherwise spin on silently."""

    seq_len: int
    shard_size: int
    patches: int | None = None  # patch slots per row (media), or None
    kept: int = 0
    dropped: int = 0

    def __call__(self, ex: dict[str, np.ndarray]) -> bool:
        if len(ex["inputs"]) <= self.seq_len and (self.patches is None or len(ex["patches"]) <= self.patches):
            self.kept += 1
            return True
        self.dropped += 1
        if not self.kept and self.dropped >= self.shard_size:
            raise DataError(f"every conversation seen ({self.dropped}) is longer than seq_len={self.seq_len} "
                            "tokens" + ("" if self.patches is None else f" or patches_per_row={self.patches}")
                            + " with overlong='drop': raise seq_len or use overlong='truncate'")
        return False


TEXT_FEATURES = ("inputs", "targets", "loss_mask")
MEDIA_TOKEN_FEATURES = ("positions3", "modality")  # packed like the tokens
PATCH_FEATURES = ("patches", "patch_rows", "patch_cols", "patch_pos_index", "patch_pos_weight", "patch_segment")


def _length_struct(cfg: TrainData) -> dict[str, int]:
    lengths = {k: cfg.seq_len for k in TEXT_FEATURES}
    if cfg.media is not None:
        lengths.update({k: cfg.seq_len for k in MEDIA_TOKEN_FEATURES})
        lengths.update({k: cfg.media.patches_per_row for k in PATCH_FEATURES})
        lengths["token_index"] = cfg.media.tokens_per_row
    return lengths


def _output_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed row (grain's `<key>_segment_ids` / `<key>_positions`; grain numbers a row's documents alike in every
    feature) -> the output names."""
    seg = row["inputs_segment_ids"]
    out = {"input_ids": row["inputs"], "targets": row["targets"], "loss_mask": row["loss_mask"].astype(np.float32),
           "segment_ids": seg, "positions": row["inputs_positions"]}
    if "patches" not in row:
        return out
    t = seg.shape[0]
    out["positions"] = np.ascontiguousarray(row["positions3"].T)  # [3, T]
    out["modality"] = row["modality"]
    doc = row["patches_segment_ids"]  # [P] the document of each patch slot, 0 on empty slots
    key = doc.astype(np.int64) * (doc.shape[0] + 1) + row["patch_segment"]  # (document, image frame) of a slot
    change = np.concatenate([[True], key[1:] != key[:-1]])
    out["pixel_values"] = row["patches"]
    out["patch_rows"], out["patch_cols"] = row["patch_rows"], row["patch_cols"]
    out["patch_pos_index"], out["patch_pos_weight"] = row["patch_pos_index"], row["patch_pos_weight"]
    out["patch_segment_ids"] = np.where(doc > 0, np.cumsum(change), 0).astype(np.int32)
    starts = np.zeros(t + 1, np.int64)  # first slot of each document of the row
    ids, first = np.unique(seg, return_index=True)
    starts[ids] = first
    tok_doc = row["token_index_segment_ids"]
    out["vision_index"] = np.where(tok_doc > 0, starts[tok_doc] + row["token_index"], t).astype(np.int32)
    return out


def _positions_first(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked rows' 3-D positions [B, 3, T] -> [3, B, T], the train step's layout."""
    return dict(batch, positions=np.ascontiguousarray(batch["positions"].transpose(1, 0, 2)))


def _own_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain numpy copies of a batch that came from a worker through shared memory (grain's SharedMemoryArray),
    so that the shared block is freed now and the batch outlives the iterator."""
    return {k: np.array(v) for k, v in batch.items()}


def _absl_flags_for_grain_workers() -> None:
    """grain's multiprocess prefetch reads an absl flag (`grain_enable_multiprocess_worker_profiling`) when it
    starts workers, which fails with UnparsedFlagAccessError outside an absl main (tests, notebooks). Outside one,
    take the flags' defaults, as `app.run` would with no arguments."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(cfg: TrainData, tokenizer_spec) -> grain.IterDataset:
    """The grain dataset behind `make_iterator` (for composing further); reads and checks every file now."""
    records = read_conversations(cfg.paths, labels=cfg.labels)
    index, count = cfg.shard()
    records = records[index::count]
    if not records:
        raise DataError(f"shard {index} of {count} holds no conversations (the files hold fewer than {count})")
    cached_tokenizer(tokenizer_spec)  # a bad spec fails here, not in a worker
    ds = grain.MapDataset.source(records)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    if cfg.media is None:
        imaged = next((where for where, r in records if has_images(r)), None)
        if imaged is not None:
            raise DataError(f"{imaged}: the conversation holds images, but TrainData.media is None (training on "
                            "images needs a MediaConfig and a model with a vision tower)")
    ds = ds.map(_Render(tokenizer_spec, cfg.labels, cfg.thinking, cfg.seq_len, cfg.overlong == "truncate",
                        cfg.media))
    if cfg.overlong == "drop":
        ds = ds.filter(_Fits(cfg.seq_len, len(records), None if cfg.media is None else cfg.media.patches_per_row))
    # In workers the map runs in the worker's own thread (grain's advice for in-memory sources); in process a few
    # threads render ahead of the training loop.
    read = grain.ReadOptions(num_threads=0 if cfg.worker_count else 4, prefetch_buffer_size=4 * cfg.batch_size)
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(read), length_struct=_length_struct(cfg),
        num_packing_bins=cfg.batch_size, seed=cfg.seed, shuffle_bins=cfg.shuffle)
    out = packed.map(_output_row).batch(cfg.batch_size, drop_remainder=True)
    if cfg.media is not None:
        out = out.map(_positions_first)
    if cfg.worker_count:
        _absl_flags_for_grain_workers()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count)).map(_own_arrays)
    return out


def make_iterator(cfg: TrainData, tokenizer_spec):
    """Batches (dicts of numpy arrays, see the module docstring) of this host's shard; a grain iterator with
    `get_state()` / `set_state()`. Close it (`it.close()`) when done if `worker_count` > 0."""
    return iter(make_dataset(cfg, tokenizer_spec))


def save_state(it) -> str:
    """The iterator's position as JSON text (store it beside the model checkpoint)."""
    return json.dumps(it.get_state(), sort_keys=True)


def restore_state(it, blob: str | bytes) -> None:
    """Move a fresh iterator of the same config to a position from `save_state`."""
    it.set_state(json.loads(blob))


@dataclasses.dataclass(frozen=True)
class DataStats:
    conversations: int
    tokens: int  # example positions before truncation
    supervised_tokens: int  # positions with loss_mask set, before truncation
    overlong: int  # examples longer than seq_len (truncated or dropped)
    longest: int


def dataset_stats(cfg: TrainData, tokenizer_spec) -> DataStats:
    """One pass over this host's shard (every conversation rendered once): sizes and how many exceed seq_len."""
    records = read_conversations(cfg.paths, labels=cfg.labels)
    index, count = cfg.shard()
    tokenizer = tokenizer_from_spec(tokenizer_spec)
    lengths, supervised = [], 0
    for where, record in records[index::count]:
        if cfg.media is not None:  # reads and processes every image
            tokens, mask, _, _ = render_images(record, tokenizer, cfg.media, labels=cfg.labels,
                                               thinking=cfg.thinking, where=where)
        elif has_images(record):
            raise DataError(f"{where}: the conversation holds images, but TrainData.media is None")
        else:
            tokens, mask = render(record, tokenizer, labels=cfg.labels, thinking=cfg.thinking, where=where)
        lengths.append(len(tokens) - 1)
        supervised += int(mask[1:].sum())
    return DataStats(conversations=len(lengths), tokens=sum(lengths), supervised_tokens=supervised,
                     overlong=sum(n > cfg.seq_len for n in lengths), longest=max(lengths, default=0))


# --- a sample data set --------------------------------------------------------------------------------------------

_LETTERS = "abcdefgh"
_SYSTEMS = ("You are a precise string tool.", "Answer with the result only.")


def _task(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of a small learnable ASCII task."""
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 8)))
    kind = rng.randrange(6)
    if kind == 0:
        return f"reverse: {word}", word[::-1]
    if kind == 1:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"add {a} and {b}", str(a + b)
    if kind == 2:
        return f"copy: {word}", word
    if kind == 3:
        return f"sort: {word}", "".join(sorted(word))
    if kind == 4:
        return f"upper: {word}", word.upper()
    return f"count the letters in: {word}", str(len(word))


def sample_conversations(n: int = 256, seed: int = 0) -> list[dict]:
    """`n` short text conversations (JSONL records) a tiny model can overfit: string and arithmetic tasks, about
    one in five with two or three turns, one in four with a system text, some content as a list of text items."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.choice((1, 1, 1, 1, 2, 3))):
            question, answer = _task(rng)
            messages.append({"role": "HUMAN", "content": question})
            content = [{"type": "text", "text": answer}] if rng.random() < 0.25 else answer
            messages.append({"role": "ASSISTANT", "content": content})
        record = {"messages": messages}
        if rng.random() < 0.25:
            record["system"] = rng.choice(_SYSTEMS)
        out.append(record)
    return out


def write_sample(path: str | os.PathLike, n: int = 256, seed: int = 0) -> str:
    """Write `sample_conversations(n, seed)` as JSONL to `path`, atomically (temporary file + rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_conversations(n, seed))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

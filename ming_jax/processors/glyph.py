"""The glyph branch's host side: which text of an image prompt gets rendered, and its ByT5 byte tokens.

    prompt  --glyph_text-->  'Text "<last quoted span>". '  (or "" when nothing is quoted / the prompt removes text)
            --ByteTokenizer(texts, max_length)-->  ids [B, L] int32, mask [B, L] int32  (the encoder's input)

The release derives `image_gen_text` in its processor with `glyph_text` applied to each (chat-formatted) prompt;
`generate(image_gen_text=...)` also takes the list directly, and the branch runs only when some text is non-empty
(`uses_glyphs`). Only the LAST quoted span is rendered; quotes are "...", ‘...’ and “...”, and '...' when every
single-quoted span is short (see `glyph_text`).

The tokenizer is ByT5's as transformers 4.57 runs it, with the release's added special tokens:
  * ids 0 / 1 / 2 are <pad> / </s> / <unk>; a UTF-8 byte b is b + 3; `<extra_id_i>` is 259 + i (`extra_ids` of
    them, 125 for google/byt5-small); added tokens follow in the order given (duplicates and known tokens skipped);
  * special tokens written in the text are matched first (leftmost, longest) and become one id each; <pad>, </s>,
    <unk> also swallow the whitespace on both sides, the others none;
  * </s> ends every sequence (not doubled when the text already ends with it), after truncating to max_length - 1;
    padding with 0 to max_length, mask 1 on every token of the text (a literal <pad> included).
numpy only (no jax): this runs before any device work.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ming_jax.config.glyph import GlyphConfig

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_OFFSET = 3  # ids of the three specials precede the 256 bytes
_BYTES = 256
_STRIPPING = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}  # eat adjacent whitespace on both sides
LANGUAGE_PREFIXES = ("cn-", "en-", "jp-", "kr-")  # font codes with these prefixes get language-tagged tokens


class GlyphError(ValueError):
    """Malformed tokenizer input: a bad max_length, added token or annotation file."""


# --- what text to render --------------------------------------------------------------------------------------------

_QUOTES = (re.compile(r'"(.*?)"'), re.compile("\u2018(.*?)\u2019"), re.compile("\u201c(.*?)\u201d"))
_OPENERS = ('"', "\u2018", "\u201c")
_REMOVAL_WORDS = ("remove", "delete", "erase")
_SHORT_SPAN = 20  # a single-quoted span weighing this much or more is prose, not a label


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def _single_quotes_are_labels(prompt: str) -> bool:
    """An even number of ' whose consecutive pairs each enclose a short span (a CJK character weighs 3, any other
    character 1; short: < 20). Then the release reads '...' as quotes; otherwise ' is an apostrophe."""
    at = [i for i, ch in enumerate(prompt) if ch == "'"]
    if len(at) % 2:
        return False
    for open_, close in zip(at[0::2], at[1::2]):
        span = prompt[open_ + 1:close]
        cjk = sum(_is_cjk(ch) for ch in span)
        if 3 * cjk + (len(span) - cjk) >= _SHORT_SPAN:
            return False
    return True


def glyph_text(prompt: str) -> str:
    """The text the release renders for one prompt: 'Text "<span>". ' or "".

    Quoted spans are collected per quote style in the order "...", ‘...’, “...” (each style's spans left to right;
    a span never crosses a line break), and the last one collected is kept. When there is exactly one span and
    "remove" / "delete" / "erase" (any case) appears before the first opening quote, nothing is rendered. An empty
    span renders nothing either.
    """
    if "'" in prompt and _single_quotes_are_labels(prompt):
        prompt = prompt.replace("'", '"')
    spans = [s for rx in _QUOTES for s in rx.findall(prompt)]
    if len(spans) == 1:
        start = min(i for i in (prompt.find(q) for q in _OPENERS) if i >= 0)
        lowered = prompt.lower()
        if any(w in lowered and lowered.find(w) < start for w in _REMOVAL_WORDS):
            spans = []
    text = spans[-1] if spans else ""
    return f'Text "{text}". ' if text else ""


def glyph_texts(prompts: Sequence[str]) -> list[str]:
    """`glyph_text` of each prompt of a batch: the release's `image_gen_text`."""
    return [glyph_text(p) for p in prompts]


def uses_glyphs(texts: Sequence[str] | None) -> bool:
    """Whether the release runs the glyph branch at all: some text of the batch is non-empty. When it does not,
    the condition gets no glyph rows (its length changes)."""
    return texts is not None and any(len(t) > 0 for t in texts)


# --- the added special tokens -----------------------------------------------------------------------------------


def _load(ann: Mapping[str, Any] | Sequence[Any] | str | os.PathLike):
    if isinstance(ann, (str, os.PathLike)):
        with open(ann, encoding="utf-8") as f:
            return json.load(f)
    return ann


def special_tokens(fonts, colors, *, color: bool = True, font: bool = True, multilingual: bool = True) -> list[str]:
    """The added tokens, in the release's order: `<color-i>` for i < len(colors), then one font token per entry.

    fonts / colors: the annotation JSON (a path, or its parsed value). Colors count only. Fonts: `multilingual`: a
    dict {font code: index}, each code giving `<{prefix}font-{index}>` for a language prefix "cn-" / "en-" / "jp-"
    / "kr-" (its first three characters) or `<font-{index}>` otherwise, in the dict's order; else `<font-i>` for
    i < len(fonts)."""
    out: list[str] = []
    if color:
        out += [f"<color-{i}>" for i in range(len(_load(colors)))]
    if font:
        fonts = _load(fonts)
        if not multilingual:
            out += [f"<font-{i}>" for i in range(len(fonts))]
        else:
            if not isinstance(fonts, Mapping):
                raise GlyphError(f"multilingual font annotations must be a dict {{code: index}}, got "
                                 f"{type(fonts).__name__}")
            for code, index in fonts.items():
                prefix = code[:3] if code[:3] in LANGUAGE_PREFIXES else ""
                out.append(f"<{prefix}font-{index}>")
    return out


def release_special_tokens(cfg: GlyphConfig, fonts, colors) -> list[str]:
    """`special_tokens` as byt5.json switches them (none unless `special_token`; align tokens never)."""
    return special_tokens(fonts, colors, color=cfg.adds_colors, font=cfg.adds_fonts, multilingual=cfg.multilingual)


# --- the byte tokenizer -----------------------------------------------------------------------------------------


class ByteTokenizer:
    """ByT5's byte tokenizer plus added special tokens (see the module docstring for the exact rules)."""

    def __init__(self, added_tokens: Sequence[str] = (), *, extra_ids: int = 125):
        if extra_ids < 0:
            raise GlyphError(f"extra_ids={extra_ids} must be >= 0")
        self.specials: dict[str, int] = dict(_STRIPPING)
        first_extra = BYTE_OFFSET + _BYTES
        self.specials.update({f"<extra_id_{i}>": first_extra + i for i in range(extra_ids)})
        self.base_size = first_extra + extra_ids  # len() of the tokenizer before the added tokens
        self.added: list[str] = []
        for tok in added_tokens:
            if not isinstance(tok, str) or len(tok) < 2:
                raise GlyphError(f"added token {tok!r}: expected a string of two or more characters")
            if tok not in self.specials:
                self.specials[tok] = self.base_size + len(self.added)
                self.added.append(tok)
        by_length = sorted(self.specials, key=len, reverse=True)  # leftmost match, longest first
        self._split = re.compile("(" + "|".join(re.escape(t) for t in by_length) + ")")

    @property
    def vocab_size(self) -> int:
        """Rows the encoder's embedding table needs (transformers' `len(tokenizer)`)."""
        return self.base_size + len(self.added)

    def token_id(self, token: str) -> int:
        if token not in self.specials:
            raise GlyphError(f"{token!r} is not a special token of this tokenizer")
        return self.specials[token]

    def _pieces(self, text: str) -> list[str]:
        """The text split around special tokens (odd indices), whitespace eaten next to <pad> / </s> / <unk>."""
        parts = self._split.split(text)
        for i in range(1, len(parts), 2):
            if parts[i] in _STRIPPING:
                parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        return parts

    def tokenize(self, text: str) -> list[int]:
        """Ids of the text, without the closing </s>."""
        ids: list[int] = []
        for i, part in enumerate(self._pieces(text)):
            if i % 2:
                ids.append(self.specials[part])
            else:
                ids.extend(b + BYTE_OFFSET for b in part.encode("utf-8"))
        return ids

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of the text truncated to max_length - 1 (when given), then </s> unless already last."""
        ids = self.tokenize(text)
        if max_length is not None:
            ids = ids[:max_length - 1]
        if not ids or ids[-1] != EOS_ID:
            ids.append(EOS_ID)
        return ids

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids [B, max_length] int32, mask [B, max_length] int32), as the release calls its tokenizer
        (padding="max_length", truncation=True, add_special_tokens=True)."""
        if isinstance(texts, str):
            raise GlyphError("texts must be a list of strings (one per image), not a string")
        if max_length < 2:  # room for one token and </s> (transformers stops truncating at 1 and overflows)
            raise GlyphError(f"max_length={max_length} must be >= 2")
        ids = np.full((len(texts), max_length), PAD_ID, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            seq = self.encode(text, max_length)
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return ids, mask

"""Tokenizers: the release's BPE `tokenizer.json` (via `tokenizers`), and a byte tokenizer for the tiny demo model."""

from __future__ import annotations

import json
import os
from typing import Sequence


class ReleaseTokenizer:
    """The checkpoint folder's `tokenizer.json` (+ `tokenizer_config.json` for special tokens when present)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self._tok = Tokenizer.from_file(file)
        self.special: dict[str, int] = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                cfg = json.load(f)
            for tid, entry in cfg.get("added_tokens_decoder", {}).items():
                self.special[entry["content"]] = int(tid)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"unknown token {token!r} for this tokenizer")
        return tid


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: lets the random tiny model run end to end without any tokenizer file."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs vocab_size >= 256, got {vocab_size}")
        self.special: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

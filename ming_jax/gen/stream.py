"""Token streaming: text as it is generated, from the same jitted decode as `ming_jax.gen.text.generate`.

    for piece in stream_generate(model, prep, sampling, tokenizer):     # an LLM and a `Prepared` prompt
        print(piece, end="", flush=True)
    for piece in stream_generate(omni_model, omni_inputs, sampling, tokenizer):   # the omni model, media included

The decode runs in chunks of `chunk` steps (`text.stream_tokens`: one compiled chunk program, the carry and KV
cache handed from chunk to chunk), and the host detokenises incrementally with `IncrementalDetokenizer`, which
never emits half a multi-byte character: the concatenated pieces equal the text of the finished token list.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ming_jax.gen import omni
from ming_jax.gen import text as generation
from ming_jax.gen.sampling import SamplingConfig

REPLACEMENT = "\ufffd"  # what byte-level decoders give for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Token ids in, new text out, UTF-8-safe (the offsets scheme of vLLM's `detokenize_incrementally`).

    Text is only emitted up to a point where the decoded text does not end in U+FFFD (an incomplete multi-byte
    character, or a token that only completes together with the next ones); what is held back comes out with the
    tokens that complete it, or from `flush()` at the end. Decoding restarts at the last emitted boundary, so the
    cost per token does not grow with the length of the answer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # decode from here (a boundary where emitted text ended cleanly)
        self._read = 0  # ids up to here are emitted

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        if len(self.ids) == self._read:
            return ""
        done_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(new_text) > len(done_text) and not new_text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(done_text):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an answer that really ends in an incomplete character gets its U+FFFD here)."""
        done_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(done_text):]


def _prepared(model, inputs):
    """(LLM, Prepared) of an LLM + `Prepared`, or of the omni model + `OmniInputs` (media encoded here)."""
    if isinstance(model, omni.OmniModel):
        media = omni.encode_media(model, inputs)
        return model.llm, omni.prepare(model, inputs, media)
    return model, inputs


def stream_generate(model, inputs, sampling: SamplingConfig, tokenizer, *, seed: int = 0, chunk: int = 8,
                    skip_stop: bool = True, pad_id: int | None = None, bucket: int = 64) -> Iterator[str]:
    """Text pieces of the answer to one prompt as they are generated.

    `model` / `inputs`: a `BailingMoeV2` and a `Prepared` prompt (`multimodal.prepare`), or an `OmniModel` and
    `OmniInputs` (`PromptBuilder.build`). The tokens are `generate`'s (same seed, same program body); with
    `skip_stop` the final stop token is not part of the text."""
    llm, prep = _prepared(model, inputs)
    if prep.input_ids.shape[0] != 1:
        raise ValueError(f"stream_generate streams one prompt; got a batch of {prep.input_ids.shape[0]} (use "
                         "text.stream_tokens for batches)")
    stops = set(sampling.stop_tokens)
    detok = IncrementalDetokenizer(tokenizer)
    for chunk_out in generation.stream_tokens(llm, prep, sampling, seed=seed, pad_id=pad_id, bucket=bucket,
                                              chunk=chunk):
        new = np.asarray(chunk_out.tokens[0])
        if skip_stop and chunk_out.done[0] and new.size and int(new[-1]) in stops:
            new = new[:-1]
        piece = detok.push(new.tolist())
        if piece:
            yield piece
    tail = detok.flush()
    if tail:
        yield tail

"""Batch inference over a JSONL file of chat requests, in the OpenAI batch format (vLLM's `run_batch`).

    engine = Engine.tiny()                       # or Engine.load(checkpoint, mesh=..., rules=...)
    summary = run_batch(engine, "requests.jsonl", "results.jsonl")

One request per input line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"messages",
"max_tokens", "temperature", "top_p", "top_k", "seed", "model"}}`; content parts text, image, audio and video as
local paths or file:// URLs. One result line per request, a `chat.completion` body or an error object
(`docs/batch_inference.md`).

How the work is laid out: every request is checked and its prompt built on the host (the release's chat template
and media processors, `ming_jax.processors.prompt`). Two schedulers (`BatchOptions.scheduler`):

* "continuous" (the default): the requests go first in, first out through one `serving.ContinuousEngine` of
  `batch_size` decode slots, each slot refilled as its request finishes (one compiled decode program, one
  admission prefill per prompt-length bucket); each result line is written when its request finishes;
* "static": requests are grouped by kind (text only, or with media: the two prefill programs) and by prompt-length
  bucket (`length_bucket`), sorted by token budget within a group, and run `batch_size` rows at a time through the
  jitted prefill + decode of `ming_jax.gen.text`, each batch until its longest row finishes: each row with its own
  budget, temperature, top-k, top-p and seed (`RowSampling`), a partial batch filled with one-token dummy rows,
  the token budget rounded up to a power of two and the media feature rows to a power of two, so that one compiled
  program serves every batch of a bucket.

Both give a request the same answer (the same sampling code and random stream from its seed). Results are appended
one `write` per line; a rerun reads the output file, drops a partial last line left by a crash, and skips every
request already answered. Bad requests get an error line and never stop the job.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import urllib.parse
import uuid
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ming_jax import sharding
from ming_jax.checkpoint import restore
from ming_jax.checkpoint.manifest import Manifest
from ming_jax.config.modality import TEXT
from ming_jax.config.omni import OmniConfig
from ming_jax.config.runtime import Runtime
from ming_jax.gen import omni, serving
from ming_jax.gen import text as generation
from ming_jax.models import inputs as multimodal
from ming_jax.models import registry
from ming_jax.processors import prompt as prompt_lib
from ming_jax.processors import tokenizer as tok_lib
from ming_jax.processors.image import ProcessorConfig

length_bucket, pow2_bucket = serving.length_bucket, serving.pow2_bucket  # (they live with the engine)

CHAT_URL = "/v1/chat/completions"
TOP_KEYS = frozenset({"custom_id", "method", "url", "body"})
BODY_KEYS = frozenset({"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                       "seed", "n", "stream", "user"})
# OpenAI / vLLM parameters this job knows but does not implement: refused by name rather than ignored.
UNSUPPORTED = frozenset({"stop", "stop_token_ids", "logprobs", "top_logprobs", "presence_penalty",
                         "frequency_penalty", "repetition_penalty", "logit_bias", "min_p", "min_tokens", "tools",
                         "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format",
                         "stream_options", "modalities", "audio", "prediction", "reasoning_effort", "best_of",
                         "ignore_eos", "guided_json", "guided_regex", "guided_choice", "echo"})
# Errors of an input line rather than of a request (no usable custom_id, or a repeated one): a rerun recognises
# them by line number.
LINE_ERRORS = frozenset({"invalid_json", "missing_custom_id", "duplicate_custom_id"})
MEDIA_PARTS = {"image_url": "image", "image": "image", "audio_url": "audio", "audio": "audio",
               "video_url": "video", "video": "video"}
ROLES = {"user": "HUMAN", "assistant": "ASSISTANT"}


SCHEDULERS = ("continuous", "static")


class RequestError(Exception):
    """A request that cannot run: `code` (OpenAI style), a message naming the problem, the field at fault."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


# --- options, engine ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    batch_size: int = 8  # rows per batch, or decode slots (continuous); rounded up to the mesh's batch split
    bucket: int = 64  # prompt lengths are padded to bucket * (1, 2, 3, 4, 6, 8, 12, ...)
    max_tokens: int = 256  # token budget of a request that gives none (capped by the room left in the context)
    temperature: float = 0.0  # of a request that gives none (0: greedy)
    seed: int = 0  # a request without `seed` samples with a seed derived from this and its custom_id
    window: int = 64  # media requests are preprocessed (decoded, resized) this many at a time
    media_root: str | None = None  # relative media paths are relative to this (default: the input file's folder)
    retry_errors: bool = False  # rerun requests whose result line is an error (their lines are dropped first)
    scheduler: str = "continuous"  # or "static" (bucketed batches, each run until its longest row finishes)
    chunk: int = 32  # continuous: the most decode steps per host round trip
    max_len: int | None = None  # continuous: cache positions per slot (None: what the longest request needs)

    def __post_init__(self):
        if self.batch_size < 1 or self.bucket < 1 or self.max_tokens < 1 or self.window < 1 or self.chunk < 1:
            raise ValueError(f"batch_size, bucket, max_tokens, window and chunk must be >= 1: {self}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r}: one of {SCHEDULERS}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len={self.max_len} must be >= 2")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")


@dataclasses.dataclass
class Engine:
    """What requests run on: the omni model (towers optional), its tokenizer and prompt builder, its names."""

    model: omni.OmniModel
    tokenizer: Any
    name: str  # the `model` of every response; a request's `model` must be this or an alias
    builder: prompt_lib.PromptBuilder | None = None  # None: text-only prompts (no media special tokens)
    aliases: tuple[str, ...] = ()
    mesh: Any = None
    rules: Any = None
    text_only_reason: str = ""

    @classmethod
    def create(cls, model: omni.OmniModel, tokenizer, name: str, *, processor=None, aliases: Sequence[str] = (),
               mesh=None, rules=None) -> "Engine":
        """The prompt builder needs the release's special tokens in the tokenizer; without them (the byte
        stand-in of a folder with no tokenizer.json) only text requests run."""
        builder, reason = None, ""
        if not hasattr(tokenizer, "token_id"):
            reason = (f"{type(tokenizer).__name__} has no special tokens (a checkpoint without tokenizer.json); "
                      "text prompts are encoded with it as plain text")
        else:
            try:
                builder = prompt_lib.PromptBuilder.for_model(tokenizer, model.cfg, processor)
            except prompt_lib.PromptError as e:
                reason = str(e)
        return cls(model, tokenizer, name, builder, tuple(aliases), mesh, rules, reason)

    @classmethod
    def tiny(cls, *, seed: int = 0, dtype: str | None = None, cfg=None) -> "Engine":
        """The tiny omni preset with RANDOM weights and the byte-level stand-in tokenizer (meaningless text)."""
        cfg = cfg or OmniConfig.tiny()
        runtime = Runtime(dtype=dtype, param_dtype=dtype) if dtype else Runtime()
        tok = prompt_lib.StandInTokenizer(prompt_lib.tiny_special_ids(cfg.llm))
        return cls.create(omni.create(cfg, runtime, seed=seed), tok, "ming-tiny-random", aliases=("tiny",))

    @classmethod
    def load(cls, checkpoint: str, *, mesh=None, rules=None, dtype: str | None = None,
             name: str | None = None) -> "Engine":
        """A release folder or converted checkpoint: the LLM and whichever towers it holds (not the talker or
        image generation), placed on `mesh` with `rules` when given; its tokenizer.json and
        preprocessor_config.json when present."""
        raw = restore.read_config(checkpoint)
        have = set(registry.describe(raw))
        if restore.detect_format(checkpoint) == restore.CONVERTED:
            have &= set(Manifest.read(checkpoint).components)
        components = [c for c in ("llm", "vision", "audio") if c in have]
        dtype = dtype or restore.checkpoint_dtype(checkpoint)
        loaded = restore.load(checkpoint, components=components, mesh=mesh, rules=rules, dtype=dtype,
                              compute_dtype=dtype)
        model = loaded.omni()
        if os.path.exists(os.path.join(checkpoint, "tokenizer.json")):
            tok = tok_lib.ReleaseTokenizer(checkpoint)
        else:
            tok = tok_lib.ByteTokenizer(model.cfg.llm.vocab_size)
        processor = None
        pre = os.path.join(checkpoint, "preprocessor_config.json")
        if os.path.exists(pre):
            with open(pre) as f:
                processor = ProcessorConfig.from_official(json.load(f))
        path = os.path.normpath(checkpoint)
        return cls.create(model, tok, name or os.path.basename(path), processor=processor,
                          aliases=(checkpoint, path, os.path.abspath(path), os.path.basename(path)), mesh=mesh,
                          rules=loaded.rules if mesh is not None else None)

    @property
    def llm_cfg(self):
        return self.model.cfg.llm

    @property
    def max_context(self) -> int:
        return self.llm_cfg.max_position_embeddings

    @property
    def row_multiple(self) -> int:
        """Batch rows must split evenly over the mesh axes the batch is sharded on."""
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in self.rules.mesh_axes("batch"))

    def context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(self.mesh, self.rules)


# --- requests -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    line: int
    custom_id: str
    conversation: list[dict]  # the release's roles and content items, media as local paths
    system: str | None
    max_tokens: int | None  # None: the job's default (capped by the room left)
    temperature: float
    top_p: float
    top_k: int
    seed: int
    media: bool


def _local_path(url: Any, root: str, where: str) -> str:
    if not isinstance(url, str) or not url:
        raise RequestError("invalid_request", f"{where}: the media location must be a non-empty string", where)
    if url.startswith("file://"):
        path = urllib.parse.unquote(url[len("file://"):])
        path = path[len("localhost"):] if path.startswith("localhost/") else path
    elif "://" in url or url.startswith("data:"):
        scheme = url.split(":", 1)[0]
        raise RequestError("unsupported_media_url", f"{where}: {scheme}: URLs are not supported (only local paths "
                           "and file:// URLs; nothing is downloaded)", where)
    else:
        path = url
    path = os.path.expanduser(path)
    path = path if os.path.isabs(path) else os.path.join(root, path)
    if not os.path.exists(path):
        raise RequestError("missing_file", f"{where}: file not found: {path}", where)
    return path


def _text_of(content, where: str) -> str:
    """The text of a system / assistant message: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError("invalid_request", f"{where}.content[{j}]: only text parts are allowed here",
                                   f"{where}.content[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError("invalid_request", f"{where}.content must be a string or a list of parts", f"{where}.content")


def _user_items(content, root: str, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise RequestError("invalid_request", f"{where}.content must be a string or a non-empty list of parts",
                           f"{where}.content")
    items = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise RequestError("invalid_request", f"{at} must be an object", at)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError("invalid_request", f"{at}: a text part needs a string 'text'", at)
            extra = set(part) - {"type", "text"}
            if extra:
                raise RequestError("unknown_field", f"{at}: unknown field(s) {sorted(extra)}", at)
            items.append({"type": "text", "text": part["text"]})
        elif kind in MEDIA_PARTS:
            medium = MEDIA_PARTS[kind]
            extra = set(part) - {"type", kind}
            if extra:
                raise RequestError("unknown_field", f"{at}: unknown field(s) {sorted(extra)}", at)
            value = part.get(kind)
            if isinstance(value, dict):  # {"url": ..., "detail": ...} (detail is accepted and has no effect)
                extra = set(value) - {"url", "detail"}
                if extra:
                    raise RequestError("unknown_field", f"{at}.{kind}: unknown field(s) {sorted(extra)}", at)
                value = value.get("url")
            items.append({"type": medium, medium: _local_path(value, root, at)})
        elif kind == "input_audio":
            raise RequestError("unsupported_parameter", f"{at}: base64 input_audio is not supported; give the clip "
                               "as an audio_url with a local path", at)
        else:
            raise RequestError("invalid_request", f"{at}: content part type {kind!r} (text, image_url, audio_url, "
                               "video_url, or image / audio / video with a path)", at)
    return items


def _number(body, key, kind, default, ok, what):
    value = body.get(key, default)
    if value is None:
        value = default
    good = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        good = good and float(value).is_integer()
    if not good or not ok(value):
        raise RequestError("invalid_request", f"body.{key}={value!r}: {what}", f"body.{key}")
    return kind(value)


def parse_request(obj: Any, line: int, engine: Engine, options: BatchOptions, root: str) -> Request:
    """One decoded input line -> a `Request`, or `RequestError` naming what is wrong with it."""
    if not isinstance(obj, dict):
        raise RequestError("invalid_request", "a request line must hold a JSON object")
    extra = set(obj) - TOP_KEYS
    if extra:
        raise RequestError("unknown_field", f"unknown field(s) {sorted(extra)} (a request has custom_id, method, "
                           "url, body)", sorted(extra)[0])
    custom_id = obj["custom_id"]
    if obj.get("method", "POST") != "POST":
        raise RequestError("invalid_request", f"method {obj.get('method')!r}: only POST", "method")
    if obj.get("url", CHAT_URL) != CHAT_URL:
        raise RequestError("invalid_request", f"url {obj.get('url')!r}: only {CHAT_URL} is served", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise RequestError("invalid_request", "body must be an object", "body")
    unsupported = sorted(set(body) & UNSUPPORTED)
    if unsupported:
        raise RequestError("unsupported_parameter", f"body parameter(s) {unsupported} are not supported by this "
                           "batch job", f"body.{unsupported[0]}")
    extra = sorted(set(body) - BODY_KEYS)
    if extra:
        raise RequestError("unknown_field", f"unknown body field(s) {extra}", f"body.{extra[0]}")
    model = body.get("model")
    if model is not None and model != engine.name and model not in engine.aliases:
        raise RequestError("model_not_found", f"model {model!r} is not the loaded model ({engine.name!r})",
                           "body.model")
    if body.get("n", 1) != 1:
        raise RequestError("unsupported_parameter", f"n={body.get('n')!r}: one choice per request", "body.n")
    if body.get("stream", False) not in (False, None):
        raise RequestError("unsupported_parameter", "stream=true: a batch job writes whole responses",
                           "body.stream")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError("invalid_request", "give max_tokens or max_completion_tokens, not both",
                           "body.max_completion_tokens")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = None
    if body.get(key) is not None:
        max_tokens = _number(body, key, int, None, lambda v: v >= 1, "must be an integer >= 1")
    temperature = _number(body, "temperature", float, options.temperature, lambda v: v >= 0, "must be >= 0")
    top_p = _number(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")
    top_k = _number(body, "top_k", int, 0, lambda v: v >= -1, "must be an integer >= -1 (-1 or 0: off)")
    default_seed = zlib.crc32(f"{options.seed}:{custom_id}".encode()) & 0x7FFFFFFF
    seed = _number(body, "seed", int, default_seed, lambda v: True, "must be an integer") % (1 << 31)

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("invalid_request", "body.messages must be a non-empty list", "body.messages")
    system, conversation, media = None, [], False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError("invalid_request", f"{where} must be an object", where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise RequestError("unknown_field", f"{where}: unknown field(s) {sorted(extra)}", where)
        role = m.get("role")
        if role in ("system", "developer"):
            if i != 0:
                raise RequestError("invalid_request", f"{where}: a system message must come first (the release has "
                                   "one system turn)", where)
            system = _text_of(m.get("content"), where)
        elif role == "user":
            items = _user_items(m.get("content"), root, where)
            media = media or any(it["type"] != "text" for it in items)
            conversation.append({"role": "HUMAN", "content": items})
        elif role == "assistant":
            conversation.append({"role": "ASSISTANT", "content": _text_of(m.get("content"), where)})
        else:
            raise RequestError("invalid_request", f"{where}: role {role!r} (system, user or assistant)", where)
    if not conversation or conversation[-1]["role"] != "HUMAN":
        raise RequestError("invalid_request", "the last message must be the user's (the model answers it)",
                           "body.messages")
    if media and engine.builder is None:
        raise RequestError("unsupported_media", f"this model's tokenizer cannot lay out media prompts "
                           f"({engine.text_only_reason}); only text requests run", "body.messages")
    return Request(line, custom_id, conversation, system, max_tokens, temperature, top_p,
                   0 if top_k < 0 else top_k, seed, media)


def _prompt_error(e: Exception) -> RequestError:
    text = str(e)
    if "longer than the model's context" in text:
        return RequestError("context_length_exceeded", text, "body.messages")
    if "file not found" in text:
        return RequestError("missing_file", text, "body.messages")
    if "no vision tower" in text or "no audio tower" in text:
        return RequestError("unsupported_media", text, "body.messages")
    if isinstance(e, prompt_lib.PromptError) and not text.startswith(("image", "video", "audio")):
        return RequestError("invalid_prompt", text, "body.messages")
    return RequestError("unreadable_media", f"{type(e).__name__}: {text}" if not isinstance(
        e, prompt_lib.PromptError) else text, "body.messages")


@dataclasses.dataclass
class Item:
    """A request with its prompt built: ready to be batched."""

    request: Request
    inputs: Any  # OmniInputs, batch of one
    n_prompt: int
    max_tokens: int


def build_prompt(engine: Engine, req: Request, options: BatchOptions) -> Item:
    """The request's prompt (chat template, media processed) and its token budget, or `RequestError`."""
    try:
        if engine.builder is not None:
            inputs = engine.builder.build(req.conversation, system=req.system)
        else:
            text = prompt_lib.apply_chat_template(req.conversation, system=req.system)
            ids = np.asarray(engine.tokenizer.encode(text), np.int64)
            if ids.size == 0:
                raise prompt_lib.PromptError("the prompt is empty")
            inputs = multimodal.OmniInputs(input_ids=ids[None], attention_mask=np.ones((1, ids.size), bool),
                                           text=text)
    except Exception as e:  # media readers raise many types; none may stop the job
        raise _prompt_error(e) from e
    n = int(inputs.input_ids.shape[1])
    room = engine.max_context - n
    budget = req.max_tokens if req.max_tokens is not None else min(options.max_tokens, room)
    if budget > room or room < 1:
        raise RequestError("context_length_exceeded", f"the prompt is {n} tokens + {budget} new, longer than the "
                           f"model's context of {engine.max_context} positions", "body.max_tokens")
    return Item(req, inputs, n, budget)


# --- output file --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Finished:
    """What an output file already answers: custom_ids, and input lines of line-level errors."""

    ids: set = dataclasses.field(default_factory=set)
    lines: set = dataclasses.field(default_factory=set)
    dropped_partial: bool = False
    dropped_errors: int = 0


def recover(path: str, *, retry_errors: bool = False, log=None) -> Finished:
    """Read an existing output file: drop a partial last line (a crash mid-write), and with `retry_errors` the
    error lines of requests (rewritten atomically), and return what is answered."""
    done = Finished()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    keep = data
    if data and not data.endswith(b"\n"):
        keep = data[:data.rfind(b"\n") + 1]
        done.dropped_partial = True
        if log:
            log(f"{path}: dropping a partial last line ({len(data) - len(keep)} bytes; its request runs again)")
    lines, kept = keep.splitlines(keepends=True), []
    for raw in lines:
        try:
            obj = json.loads(raw)
            custom_id, error = obj.get("custom_id"), obj.get("error")
        except (ValueError, AttributeError):
            if log:
                log(f"{path}: ignoring an unreadable line: {raw[:80]!r}")
            kept.append(raw)
            continue
        if error and error.get("code") in LINE_ERRORS and error.get("line") is not None:
            done.lines.add(int(error["line"]))
        elif error and retry_errors:
            done.dropped_errors += 1
            continue
        elif custom_id is not None:
            done.ids.add(custom_id)
        kept.append(raw)
    if keep != data or done.dropped_errors:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(b"".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return done


class ResultWriter:
    """Appends result lines: each line is one `write` of the whole encoded line on an O_APPEND descriptor, so a
    crash leaves whole lines (and at worst an unterminated last one, which `recover` drops)."""

    def __init__(self, path: str):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, obj: Mapping) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self.fd, data):]

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def success_line(custom_id: str, model: str, content: str, finish: str, n_prompt: int, n_completion: int) -> dict:
    rid = uuid.uuid4().hex
    body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion}}
    return {"id": f"batch_req_{rid}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def error_line(custom_id, err: RequestError, line: int) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": err.code, "message": err.message, "param": err.param, "line": line}}


# --- the job ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    requests: int = 0  # lines holding a request
    skipped: int = 0  # already answered in the output file (resume)
    succeeded: int = 0
    failed: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by code
    finish: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # stop / length
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batches: int = 0
    programs: set = dataclasses.field(default_factory=set)  # (kind, rows, prompt slots, budget, feature rows)
    seconds: float = 0.0
    scheduler: str = "static"
    decode_steps: int = 0  # continuous: decode steps of all slots, and how many slot-steps were busy
    slot_steps: int = 0
    active_slot_steps: int = 0

    def text(self) -> str:
        rate = lambda n: n / max(self.seconds, 1e-9)  # noqa: E731
        what = (f"{self.batches} batch(es) over {len(self.programs)} program shape(s)" if self.scheduler == "static"
                else f"continuous batching: {self.decode_steps} decode steps in {self.batches} round trip(s), slots "
                f"{100 * self.active_slot_steps / max(self.slot_steps, 1):.0f}% busy")
        lines = [f"{self.requests} request(s): {self.succeeded} answered, {self.failed} failed, {self.skipped} "
                 f"already answered (skipped)",
                 f"{what} in {self.seconds:.1f} s: {rate(self.succeeded + self.failed):.2f} requests/s, "
                 f"{rate(self.completion_tokens):.1f} generated tokens/s",
                 f"tokens: {self.prompt_tokens} prompt, {self.completion_tokens} generated"]
        if self.finish:
            lines.append("finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(self.finish.items())))
        if self.errors:
            lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())))
        return "\n".join(lines)


class _Bar:
    """tqdm over the pending requests, with requests/s and generated tokens/s."""

    def __init__(self, total: int, show: bool):
        from tqdm import tqdm

        self.t0 = time.perf_counter()
        self.tokens = 0
        self.bar = tqdm(total=total, unit="req", file=sys.stderr, disable=not show, dynamic_ncols=True,
                        desc="batch")

    def update(self, requests: int, tokens: int = 0) -> None:
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{(self.bar.n + requests) / dt:.2f} req/s, {self.tokens / dt:.1f} tok/s",
                                 refresh=False)
        self.bar.update(requests)

    def close(self):
        self.bar.close()


class _Job:
    def __init__(self, engine: Engine, writer: ResultWriter, options: BatchOptions, summary: Summary, bar: _Bar,
                 on_batch: Callable[[Summary], None] | None):
        self.engine, self.writer, self.options, self.summary, self.bar = engine, writer, options, summary, bar
        self.on_batch = on_batch
        m = engine.row_multiple
        self.rows = -(-options.batch_size // m) * m
        cfg = engine.llm_cfg
        self.pad_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
        self.stops = tuple(int(t) for t in cfg.eos_ids)

    def fail(self, custom_id, err: RequestError, line: int) -> None:
        self.writer.write(error_line(custom_id, err, line))
        self.summary.failed += 1
        self.summary.errors[err.code] += 1
        self.bar.update(1)

    def build(self, requests: Iterable[Request]) -> list[Item]:
        items = []
        for req in requests:
            try:
                items.append(build_prompt(self.engine, req, self.options))
            except RequestError as e:
                self.fail(req.custom_id, e, req.line)
        return items

    def run(self, items: list[Item]) -> None:
        if self.options.scheduler == "continuous":
            return self.continuous(items)
        groups: dict[tuple, list[Item]] = collections.defaultdict(list)
        for it in items:
            kind = "media" if it.request.media else "text"
            groups[(kind, length_bucket(it.n_prompt, self.options.bucket))].append(it)
        for (kind, length), group in sorted(groups.items()):
            group.sort(key=lambda it: it.max_tokens)
            for i in range(0, len(group), self.rows):
                self.batch(kind, length, group[i:i + self.rows])
                if self.on_batch is not None:
                    self.on_batch(self.summary)

    def batch(self, kind: str, length: int, items: list[Item]) -> None:
        model = self.engine.model
        preps, ok = [], []
        for it in items:
            try:
                preps.append(omni.prepare(model, it.inputs, omni.encode_media(model, it.inputs)))
                ok.append(it)
            except Exception as e:  # a tower refusing a medium fails that request only
                self.fail(it.request.custom_id, RequestError("unreadable_media", f"{type(e).__name__}: {e}",
                                                             "body.messages"), it.request.line)
        if not ok:
            return
        budget = pow2_bucket(max(it.max_tokens for it in ok), 16)
        prep = stack_prepared(preps, length, self.rows, self.pad_id)
        dummies = self.rows - len(ok)
        reqs = [it.request for it in ok]
        rows = generation.RowSampling.make(
            [it.max_tokens for it in ok] + [1] * dummies, [r.temperature for r in reqs] + [0.0] * dummies,
            [r.top_k for r in reqs] + [0] * dummies, [r.top_p for r in reqs] + [1.0] * dummies,
            [r.seed for r in reqs] + [0] * dummies)
        sampling = generation.SamplingConfig(max_new_tokens=budget, stop_tokens=self.stops)
        features = 0 if prep.features is None else prep.features.shape[0]
        self.summary.programs.add((kind, self.rows, length, budget, features))
        try:
            out = generation.as_numpy(generation.generate(model.llm, prep, sampling, rows=rows,
                                                          bucket=self.options.bucket, pad_id=self.pad_id))
        except Exception as e:  # noqa: BLE001 - reported per request; the job goes on
            for it in ok:
                self.fail(it.request.custom_id, RequestError("generation_failed", f"{type(e).__name__}: {e}"),
                          it.request.line)
            return
        tokens = 0
        for r, it in enumerate(ok):
            tokens += self.answer(it, out.tokens[r, :int(out.lengths[r])])
        self.writer.sync()
        self.summary.batches += 1
        self.bar.update(len(ok), tokens)

    def answer(self, it: Item, ids: np.ndarray) -> int:
        """Write the result line of a generated request (`ids`: its tokens, a stop token last) -> its length."""
        n = len(ids)
        stopped = n > 0 and int(ids[-1]) in self.stops
        content = self.engine.tokenizer.decode((ids[:-1] if stopped else ids).tolist())
        finish = "stop" if stopped else "length"
        self.writer.write(success_line(it.request.custom_id, self.engine.name, content, finish, it.n_prompt, n))
        self.summary.succeeded += 1
        self.summary.finish[finish] += 1
        self.summary.prompt_tokens += it.n_prompt
        self.summary.completion_tokens += n
        return n

    def continuous(self, items: list[Item]) -> None:
        """Every request through one `serving.ContinuousEngine` of `batch_size` decode slots, refilled as
        requests finish (first in, first out); each result line is written as its request finishes."""
        model, options = self.engine.model, self.options
        ready = []
        for it in items:
            try:
                ready.append((it, omni.prepare(model, it.inputs, omni.encode_media(model, it.inputs))))
            except Exception as e:  # noqa: BLE001 - a tower refusing a medium fails that request only
                self.fail(it.request.custom_id, RequestError("unreadable_media", f"{type(e).__name__}: {e}",
                                                             "body.messages"), it.request.line)
        if not ready:
            return
        max_len = options.max_len or -(-max(length_bucket(p.input_ids.shape[1], options.bucket) + it.max_tokens
                                           for it, p in ready) // 128) * 128
        engine = serving.ContinuousEngine(model.llm, slots=self.rows, max_len=max_len, chunk=options.chunk,
                                          bucket=options.bucket, stop_tokens=self.stops, pad_id=self.pad_id)
        requests = []
        for it, prep in ready:
            r = it.request
            req = serving.Request(it, prep, it.max_tokens, r.temperature, r.top_k, r.top_p, r.seed)
            try:
                engine.plan(req)
            except ValueError as e:  # longer than a slot (--max_len)
                self.fail(r.custom_id, RequestError("context_length_exceeded", str(e), "body.max_tokens"), r.line)
                continue
            requests.append(req)
        self.summary.programs.add(("continuous", self.rows, max_len, options.chunk))
        last_sync = [time.perf_counter()]
        fresh = [0, 0]  # requests, tokens answered since the last round trip

        def on_result(res: serving.Result) -> None:
            fresh[0] += 1
            fresh[1] += self.answer(res.id, res.tokens)

        def on_error(req: serving.Request, e: Exception) -> None:
            self.fail(req.id.request.custom_id, RequestError("generation_failed", f"{type(e).__name__}: {e}"),
                      req.id.request.line)

        def on_round(stats: serving.Stats) -> None:
            if not fresh[0]:
                return
            if time.perf_counter() - last_sync[0] > 1.0:  # at most one fsync a second (lines are whole anyway)
                self.writer.sync()
                last_sync[0] = time.perf_counter()
            self.bar.update(fresh[0], fresh[1])
            fresh[0] = fresh[1] = 0
            if self.on_batch is not None:
                self.on_batch(self.summary)

        try:
            engine.run(requests, on_result=on_result, on_error=on_error, on_round=on_round)
        finally:
            st = engine.stats
            self.summary.batches += st.round_trips
            self.summary.decode_steps += st.steps
            self.summary.slot_steps += st.slot_steps
            self.summary.active_slot_steps += st.active_slot_steps
            self.writer.sync()


def stack_prepared(preps: Sequence[multimodal.Prepared], length: int, rows: int, pad_id: int) -> multimodal.Prepared:
    """Prompts prepared one by one ([1, S_i] each) -> one [rows, length] batch: each left-padded to `length`,
    then one-token dummy rows up to `rows`. Media feature rows are padded to a power of two with rows whose
    destination lies past the batch (dropped by the scatter), so batches of a bucket share one prefill program."""
    padded = [multimodal.left_pad(p, length, pad_id) for p in preps]
    n_dummy = rows - len(padded)
    ids = np.full((n_dummy, length), pad_id, np.int32)
    mask = np.zeros((n_dummy, length), bool)
    mask[:, -1] = True
    pos = np.ones((3, n_dummy, length), np.int32)
    pos[:, :, -1] = 0
    with_modality = any(p.modality is not None for p in padded)
    features = [p.features for p in padded if p.features is not None]
    index = [p.feature_index + r * length for r, p in enumerate(padded) if p.feature_index is not None]
    prep = multimodal.Prepared(
        input_ids=np.concatenate([p.input_ids for p in padded] + [ids]),
        attention_mask=np.concatenate([p.attention_mask for p in padded] + [mask]),
        positions=np.concatenate([p.positions for p in padded] + [pos], axis=1),
        rope_deltas=np.concatenate([p.rope_deltas for p in padded] + [np.full((n_dummy,), 1 - length, np.int32)]),
        modality=(np.concatenate([p.modality if p.modality is not None else np.full((1, length), TEXT, np.int32)
                                  for p in padded] + [np.full((n_dummy, length), TEXT, np.int32)])
                  if with_modality else None),
        features=None, feature_index=None)
    if features:
        f = np.concatenate(features)
        idx = np.concatenate(index).astype(np.int32)
        total = pow2_bucket(f.shape[0], 64)
        prep.features = np.concatenate([f, np.zeros((total - f.shape[0], f.shape[1]), f.dtype)])
        prep.feature_index = np.concatenate([idx, np.full((total - f.shape[0],), rows * length, np.int32)])
    return prep


def read_requests(path: str) -> Iterable[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


@dataclasses.dataclass
class _Line:
    n: int  # 1-based input line number
    custom_id: str | None
    obj: Any = None  # the decoded request
    error: RequestError | None = None  # a line-level error


def _lines(path: str) -> list[_Line]:
    """Every non-blank input line, decoded, with line-level errors (bad JSON, no custom_id, a repeated one)."""
    out, seen = [], {}
    for n, line in read_requests(path):
        try:
            obj = json.loads(line)
        except ValueError as e:
            out.append(_Line(n, None, error=RequestError("invalid_json", f"line {n} is not valid JSON: {e}")))
            continue
        custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            out.append(_Line(n, None, error=RequestError("missing_custom_id", f"line {n} has no custom_id (a "
                                                         "non-empty string)", "custom_id")))
        elif custom_id in seen:
            out.append(_Line(n, custom_id, error=RequestError(
                "duplicate_custom_id", f"custom_id {custom_id!r} is already used on line {seen[custom_id]}; this "
                f"line (line {n}) is not run", "custom_id")))
        else:
            seen[custom_id] = n
            out.append(_Line(n, custom_id, obj))
    return out


def run_batch(engine: Engine, input_path: str, output_path: str, options: BatchOptions = BatchOptions(), *,
              progress: bool = True, log: Callable[[str], None] | None = None,
              on_batch: Callable[[Summary], None] | None = None) -> Summary:
    """Answer every request of `input_path` not yet answered in `output_path` (appending to it); see the module
    docstring. `on_batch(summary)` is called after each batch's lines are written."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    done = recover(output_path, retry_errors=options.retry_errors, log=log)
    if done.dropped_errors:
        log(f"{output_path}: {done.dropped_errors} error line(s) dropped to run those requests again")
    root = options.media_root or os.path.dirname(os.path.abspath(input_path))
    summary = Summary(scheduler=options.scheduler)
    lines = _lines(input_path)
    summary.requests = len(lines)
    todo = [ln for ln in lines if not (ln.n in done.lines if ln.error is not None else ln.custom_id in done.ids)]
    summary.skipped = len(lines) - len(todo)
    if summary.skipped:
        log(f"{output_path}: {summary.skipped} request(s) already answered, skipped")
    bar = _Bar(len(todo), progress)
    writer = ResultWriter(output_path)
    job = _Job(engine, writer, options, summary, bar, on_batch)
    try:
        text, media = [], []
        for ln in todo:
            if ln.error is not None:
                job.fail(ln.custom_id, ln.error, ln.n)
                continue
            try:
                req = parse_request(ln.obj, ln.n, engine, options, root)
            except RequestError as e:
                job.fail(ln.custom_id, e, ln.n)
                continue
            (media if req.media else text).append(req)
        writer.sync()
        with engine.context():
            job.run(job.build(text))
            for i in range(0, len(media), options.window):
                job.run(job.build(media[i:i + options.window]))
    finally:
        writer.close()
        bar.close()
        summary.seconds = time.perf_counter() - t0
    return summary

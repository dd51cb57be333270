"""Batch inference CLI: a JSONL file of chat requests (the OpenAI batch format) -> a JSONL file of results.

    python -m ming_jax.batch --input requests.jsonl --output results.jsonl --checkpoint DIR
    python -m ming_jax.batch --input requests.jsonl --output results.jsonl --checkpoint CKPT --mesh expert=8
    python -m ming_jax.batch --input requests.jsonl --output results.jsonl     # tiny preset, RANDOM weights
    python -m ming_jax.batch --input requests.jsonl --output results.jsonl --scheduler static

A rerun with the same --output skips the requests already answered there (resume after a crash). Request and
result formats, bucketing and what is not supported: docs/batch_inference.md. All logic lives in
`ming_jax.gen.batch`; this file only parses flags and prints.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from ming_jax import cli, sharding

_INPUT = flags.DEFINE_string("input", None, "Requests, one JSON object per line.")
_OUTPUT = flags.DEFINE_string("output", None, "Results, one JSON object per line (appended to; a rerun resumes).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Release folder or converted checkpoint (default: the tiny "
                                  "preset with random weights).")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh to load onto and run under, e.g. 'expert=8' or "
                            "'fsdp=2,expert=4' (default: one device).")
_RULES = flags.DEFINE_enum("rules", "ep_fsdp", list(sharding.PRESETS), "Sharding preset used with --mesh.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter and compute dtype (default: the "
                           "checkpoint's; float32 for the random tiny preset).")
_NAME = flags.DEFINE_string("served_model_name", None, "The `model` of every response, and the name a request's "
                            "`model` must match (default: the checkpoint folder's name).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per jitted batch, or decode slots with --scheduler continuous "
                               "(rounded up to the mesh's batch split).")
_BUCKET = flags.DEFINE_integer("bucket", 64, "Prompt-length bucket unit: prompts are padded to this times 1, 2, 3, "
                               "4, 6, 8, 12, ...")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Token budget of a request without max_tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Temperature of a request without one (0: greedy).")
_SEED = flags.DEFINE_integer("seed", 0, "Random-weights seed, and the base of the seeds of requests without one.")
_WINDOW = flags.DEFINE_integer("window", 64, "Media requests are preprocessed this many at a time.")
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "Relative media paths are relative to this folder (default: "
                                  "the input file's folder).")
_RETRY = flags.DEFINE_bool("retry_errors", False, "Drop the error lines of --output and run those requests again.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
_SCHEDULER = flags.DEFINE_enum("scheduler", "continuous", ["continuous", "static"], "continuous: --batch_size "
                               "decode slots refilled as requests finish; static: bucketed batches, each run until "
                               "its longest row finishes.")
_CHUNK = flags.DEFINE_integer("chunk", 32, "Continuous: the most decode steps per host round trip.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Continuous: KV cache positions per slot (default: what the "
                                "longest request needs).")


def main(argv):
    del argv
    from ming_jax.gen import batch

    if not _INPUT.value or not _OUTPUT.value:
        raise app.UsageError("--input and --output are required")
    if not os.path.isfile(_INPUT.value):
        raise app.UsageError(f"--input {_INPUT.value}: no such file")
    if _RULES.present and not _MESH.value:
        raise app.UsageError("--rules applies to --mesh, which is not given")
    if os.path.abspath(_INPUT.value) == os.path.abspath(_OUTPUT.value):
        raise app.UsageError("--output must not be the --input file")
    try:
        options = batch.BatchOptions(batch_size=_BATCH.value, bucket=_BUCKET.value, max_tokens=_MAX_TOKENS.value,
                                     temperature=_TEMPERATURE.value, seed=_SEED.value, window=_WINDOW.value,
                                     media_root=_MEDIA_ROOT.value, retry_errors=_RETRY.value,
                                     scheduler=_SCHEDULER.value, chunk=_CHUNK.value, max_len=_MAX_LEN.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    mesh, rules = cli.mesh_and_rules(_MESH.value, _RULES.value)
    if _CHECKPOINT.value:
        where = f" onto mesh {dict(mesh.shape)} ({_RULES.value})" if mesh is not None else ""
        print(f"loading {_CHECKPOINT.value}{where} ...", file=sys.stderr)
        engine = batch.Engine.load(_CHECKPOINT.value, mesh=mesh, rules=rules, dtype=_DTYPE.value,
                                   name=_NAME.value)
    else:
        print("=" * 100 + "\nNo --checkpoint given: running the TINY OMNI preset with RANDOM weights and a byte-level "
              "stand-in tokenizer.\nEvery answer is MEANINGLESS text; this only shows the batch pipeline working end "
              "to end.\n" + "=" * 100, file=sys.stderr)
        if mesh is not None:
            raise app.UsageError("--mesh needs --checkpoint (the random tiny preset runs on one device)")
        engine = batch.Engine.tiny(seed=_SEED.value, dtype=_DTYPE.value)
        if _NAME.value:
            engine.name = _NAME.value
    if engine.builder is None:
        print(f"text requests only: {engine.text_only_reason}", file=sys.stderr)
    summary = batch.run_batch(engine, _INPUT.value, _OUTPUT.value, options, progress=_PROGRESS.value)
    print(summary.text(), file=sys.stderr)
    print(f"results: {_OUTPUT.value}", file=sys.stderr)
    return 0


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()

"""Convert the Ming-flash-omni 2.0 PyTorch release into a ming_jax orbax checkpoint, or export one back.

    python -m ming_jax.convert --src RELEASE_DIR --dst CKPT_DIR [--dtype bf16|f32|int8|fp8] [--components llm,...]
    python -m ming_jax.convert --reverse --src CKPT_DIR --dst OUT_DIR [--max_shard_size 5GB]

(also `python tools/convert_torch.py ...` from a checkout). The release folder holds config.json,
model.safetensors.index.json and the shards, the image-generation sub-folders (mlp/, connector/, transformer/, vae/,
scheduler/, byt5/) and the talker (talker/ with talker/vae/); a bare talker/ folder converts on its own. A
converted checkpoint keeps the sub-folders' configs and the talker's other files (tokenizer, voices, speaker model)
at their release paths. Other sub-folders are skipped with a note. Progress goes to stderr; errors (truncated or missing shards, a wrong index, tensors that
do not fit the config, ...) print one message and exit with status 1. All logic lives in
`ming_jax.checkpoint.convert` / `.export`; load the result with `ming_jax.checkpoint.load` (or
`python -m ming_jax.generate --checkpoint CKPT_DIR`).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags

from ming_jax import cli
from ming_jax.checkpoint import convert, export
from ming_jax.quant import QuantConfig

_SRC = flags.DEFINE_string("src", None, "Release folder (or, with --reverse, a converted checkpoint).")
_DST = flags.DEFINE_string("dst", None, "Output folder; must not exist unless --overwrite.")
_DTYPE = flags.DEFINE_string("dtype", None, "Store every parameter in this dtype: bf16 | f32 (default: as in the "
                             "source); int8 | fp8 quantizes the LLM's projections and expert stacks (values + float32 "
                             "scales per output channel; int8:BLOCK / fp8:BLOCK: sub-channel) and stores the rest "
                             "in bf16.")
flags.register_validator("dtype", lambda v: v is None or v in ("bf16", "f32") or _quant_ok(v),
                         "--dtype: bf16, f32, int8, fp8, int8:BLOCK or fp8:BLOCK")
_COMPONENTS = flags.DEFINE_list("components", None, "Sub-models to convert: llm, vision, audio, image_gen, talker "
                                "(default: all the folder describes).")
_REVERSE = flags.DEFINE_bool("reverse", False, "Export a converted checkpoint back to official safetensors.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "--reverse: largest output shard (e.g. 5GB, 500MB).")
_COMPRESSION = flags.DEFINE_enum("compression", "zstd", ["zstd", "none"], "zarr chunk compression.")
_FLUSH = flags.DEFINE_string("flush_size", "256MB", "Written data buffered before each commit (bounds memory).")
_READ = flags.DEFINE_string("read_size", "256MB", "Tensor bytes being read / re-laid out at once (bounds memory).")
_WORKERS = flags.DEFINE_integer("workers", None, "Threads re-laying out tensors (default: min(4, CPUs)).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --dst (only once the new one is complete).")
_RESTART = flags.DEFINE_bool("restart", False, "Discard an interrupted earlier run instead of resuming it.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")


def _quant_ok(value: str) -> bool:
    try:
        return QuantConfig.parse(value) is not None
    except ValueError:
        return False


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise app.UsageError(f"size {text!r}: expected a number with an optional unit (KB, MB, GB, GiB, ...)")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
             "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _SRC.value or not _DST.value:
        raise app.UsageError("--src and --dst are required")
    try:
        if _REVERSE.value:
            export.export_official(_SRC.value, _DST.value, max_shard_bytes=parse_size(_MAX_SHARD.value),
                                    overwrite=_OVERWRITE.value, progress=not _QUIET.value)
        else:
            convert.convert(_SRC.value, _DST.value, dtype=_DTYPE.value, components=_COMPONENTS.value,
                            compression=None if _COMPRESSION.value == "none" else "zstd",
                            flush_bytes=parse_size(_FLUSH.value), read_bytes=parse_size(_READ.value),
                            workers=_WORKERS.value, overwrite=_OVERWRITE.value,
                            restart=_RESTART.value, progress=not _QUIET.value)
    except ValueError as e:  # ConversionError, WeightError, ConfigError, CheckpointFormatError: all name the problem
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


def run(prog: str = "convert") -> None:
    """The absl main; `prog` names the program in error messages ("convert_torch" for the tools/ shim)."""
    global _PROG
    _PROG = prog
    cli.run(main, __name__)


_PROG = "convert"


if __name__ == "__main__":
    run()

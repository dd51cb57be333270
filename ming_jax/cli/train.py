"""Training CLI: the BailingMoeV2 backbone on JSONL conversations, with checkpoints that resume exactly.

    python -m ming_jax.train --flagfile=configs/train/tiny.flags            # CPU smoke run (~50 s on 2 cores)
    python -m ming_jax.train --workdir runs/a --data train.jsonl --checkpoint CKPT --steps 10000 --mesh fsdp=8

Starts from --checkpoint (a release folder or a converted checkpoint, with --tokenizer when it has no
tokenizer.json; only its LLM is trained) or from a random init of --preset; with no --data a small sample dataset is written into the work directory and used. Running the
same command again resumes from the newest checkpoint in --workdir (model, optimizer, expert biases and the data
iterator's position); a run whose data, optimizer, schedule or dtype settings changed is refused (to extend
--steps, keep --schedule_steps). Paths are local (mount a bucket for shared storage). At the end the model is exported as a
release-format folder (<workdir>/export, --export) that `python -m ming_jax.generate --checkpoint` loads.
With --lora_rank only LoRA adapters on --lora_targets train (the base frozen; --quantize int8|fp8: QLoRA, the base
quantized), and the export is the adapters as a PEFT folder (<workdir>/adapter, `ming_jax.lora.export_peft`).
Launch on a TPU pod slice: the same command with --distributed on every host (`gcloud compute tpus tpu-vm ssh ...
--worker=all`), see docs/training.md.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from flax import nnx

from ming_jax import cli, lora, quant, sharding
from ming_jax.checkpoint import manifest, restore
from ming_jax.config.llm import PRESETS
from ming_jax.config.runtime import Runtime
from ming_jax.models import llm as model_lib
from ming_jax.models import registry
from ming_jax.processors import prompt as prompt_lib
from ming_jax.train import data as data_lib
from ming_jax.train import loop
from ming_jax.train.config import TrainConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/, export/.")
_DATA = flags.DEFINE_multi_string("data", [], "JSONL conversation file(s) (format: ming_jax.train.data); none: a "
                                  "sample dataset is written to <workdir>/sample.jsonl.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Start from this release folder or converted checkpoint "
                                  "(its LLM); default: random init of --preset.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Folder with the release's tokenizer.json (default: the "
                                 "--checkpoint folder's; a random --preset uses the byte stand-in tokenizer).")
_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "ming-flash-omni-2.0"], "Model when no --checkpoint.")
_STEPS = flags.DEFINE_integer("steps", 100, "Optimizer steps of the run (a resumed run continues up to this).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per step on this host (global batch: x hosts).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row (conversations are packed).")
_LR = flags.DEFINE_float("learning_rate", 3e-4, "Peak learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 10, "Linear warmup steps.")
_TOTAL = flags.DEFINE_integer("schedule_steps", 0, "Steps of the cosine schedule (0: --steps).")
_FINAL = flags.DEFINE_float("final_lr_ratio", 0.1, "Learning rate at the end of the cosine, relative to the peak.")
_WD = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
_CLIP = flags.DEFINE_float("max_grad_norm", 1.0, "Global-norm gradient clipping (0: off).")
_ZLOSS = flags.DEFINE_float("z_loss", 0.0, "z-loss coefficient.")
_ACCUM = flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step.")
_BIAS = flags.DEFINE_float("bias_update_rate", 1e-3, "Expert-bias balancing rate (0: off).")
_AUX = flags.DEFINE_float("seq_aux_loss", 0.0, "Sequence-wise balance loss coefficient (0: off).")
_FREEZE = flags.DEFINE_multi_string("freeze", [], "Regex over parameter paths that do not train (repeatable), "
                                    "e.g. 'embed' or 'router/kernel'.")
_TRAIN_ONLY = flags.DEFINE_multi_string("train_only", [], "If given, only parameters matching these regexes train.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "LoRA: train rank-r adapters on --lora_targets only, the base "
                                  "frozen (0: full training). Exported as a PEFT folder <workdir>/adapter.")
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", 16.0, "LoRA scale numerator: the delta is (alpha / rank) * A @ B.")
_LORA_TARGETS = flags.DEFINE_string("lora_targets", "attention,mlp,shared_expert", "Comma-separated LoRA targets: "
                                    "presets (attention, mlp, shared_expert, experts, lm_head) or regexes over "
                                    "dotted parameter paths.")
_QUANTIZE = flags.DEFINE_string("quantize", "", "QLoRA: the frozen base as int8 / fp8 weights (int8, fp8, "
                                "fp8:128); needs --lora_rank.")
_LABELS = flags.DEFINE_enum("labels", "assistant", list(data_lib.LABEL_MODES), "Which tokens take the loss.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Parameter (master weight) dtype; AdamW moments are float32 either way.")
_REMAT = flags.DEFINE_bool("remat", False, "Recompute each MoE layer's activations in the backward pass.")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'fsdp=8' or 'fsdp=16,expert=4' (default: one device).")
_RULES = flags.DEFINE_enum("rules", "fsdp", list(sharding.PRESETS), "Sharding preset used with --mesh.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Data worker processes (0: in this process).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the init and of the data order.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps between logged metrics.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 500, "Steps between checkpoints (the last step is always saved).")
_KEEP = flags.DEFINE_integer("keep", 3, "Checkpoints kept.")
_EXPORT = flags.DEFINE_bool("export", True, "Write <workdir>/export (release format) at the end.")
_TB = flags.DEFINE_bool("tensorboard", True, "Write TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (every host of a TPU "
                                 "pod slice runs the same command; also automatic when JAX_COORDINATOR_ADDRESS is "
                                 "set).")


def _model_source():
    """(llm config, runtime, model_fn, abstract model, tokenizer spec, description)."""
    runtime = Runtime(dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, remat=_REMAT.value)
    if _CHECKPOINT.value:
        raw = manifest.read_config(_CHECKPOINT.value)
        described = registry.describe(raw, runtime)
        if "llm" not in described:
            raise app.UsageError(f"--checkpoint {_CHECKPOINT.value} holds no language model")
        llm_cfg = described["llm"].config
        tok = _TOKENIZER.value or _CHECKPOINT.value
        if not os.path.exists(os.path.join(tok, "tokenizer.json")):
            raise app.UsageError(f"no tokenizer.json in {tok}: a trained checkpoint needs its own tokenizer "
                                 "(--tokenizer RELEASE_FOLDER; converted checkpoints do not carry one)")

        def model_fn(mesh, rules):
            return restore.load(_CHECKPOINT.value, components=("llm",), mesh=mesh, rules=rules,
                                runtime=runtime).llm
        what = _CHECKPOINT.value
    else:
        llm_cfg = PRESETS[_PRESET.value]()
        tok = _TOKENIZER.value
        if tok is not None and not os.path.exists(os.path.join(tok, "tokenizer.json")):
            raise app.UsageError(f"--tokenizer {tok}: no tokenizer.json there")

        def model_fn(mesh, rules):
            if mesh is None:
                return model_lib.create(llm_cfg, runtime, seed=_SEED.value)
            return sharding.init_sharded(lambda: model_lib.BailingMoeV2(llm_cfg, runtime, rngs=nnx.Rngs(_SEED.value)),
                                         mesh, rules)
        what = f"random {_PRESET.value}"
    spec = tok if tok is not None else {"stand_in": prompt_lib.tiny_special_ids(llm_cfg)}
    return llm_cfg, runtime, model_fn, model_lib.create_abstract(llm_cfg, runtime), spec, what


def _adapted(model_fn, abstract, qcfg, lcfg):
    """(model_fn, abstract model) with the base quantized (QLoRA) and LoRA adapters added, when asked for."""
    if qcfg is None and lcfg is None:
        return model_fn, abstract

    def adapt(model):
        if qcfg is not None:
            quant.quantize_model(model, qcfg)
        return model if lcfg is None else lora.add_lora(model, lcfg, seed=_SEED.value)

    return (lambda mesh, rules: adapt(model_fn(mesh, rules))), adapt(abstract)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    for name, value in (("workdir", _WORKDIR.value), ("checkpoint", _CHECKPOINT.value),
                        ("tokenizer", _TOKENIZER.value)) + tuple(("data", d) for d in _DATA.value):
        if value and "://" in value:
            raise app.UsageError(f"--{name} {value}: local paths only (mount a bucket, e.g. with gcsfuse)")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save step at INFO; the progress bar says enough
        logging.set_verbosity(logging.WARNING)
    loop.maybe_initialize_distributed(_DISTRIBUTED.value)
    _, runtime, model_fn, abstract, spec, what = _model_source()
    lcfg = qcfg = None
    try:
        if _LORA_RANK.value:
            lcfg = lora.LoraConfig(_LORA_RANK.value, _LORA_ALPHA.value, tuple(_LORA_TARGETS.value.split(",")))
        qcfg = quant.QuantConfig.parse(_QUANTIZE.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if qcfg is not None and lcfg is None:
        raise app.UsageError("--quantize: quantized weights are frozen; train adapters on them with --lora_rank")
    bias_rate = _BIAS.value
    if lcfg is not None and bias_rate:
        if flags.FLAGS["bias_update_rate"].present:
            raise app.UsageError("--bias_update_rate with --lora_rank: the experts' biases belong to the frozen base "
                                 "(the exported adapter could not carry them); a LoRA run keeps them (0)")
        bias_rate = 0.0
    model_fn, abstract = _adapted(model_fn, abstract, qcfg, lcfg)
    paths = tuple(_DATA.value)
    if not paths:
        sample = os.path.join(_WORKDIR.value, "sample.jsonl")
        if not os.path.exists(sample):
            data_lib.write_sample(sample)
        paths = (sample,)
    total = _TOTAL.value or _STEPS.value
    train_cfg = TrainConfig(learning_rate=_LR.value, warmup_steps=min(_WARMUP.value, total - 1), total_steps=total,
                            final_lr_ratio=_FINAL.value, weight_decay=_WD.value,
                            max_grad_norm=_CLIP.value or None, z_loss=_ZLOSS.value, grad_accum=_ACCUM.value,
                            bias_update_rate=bias_rate, seq_aux_loss=_AUX.value, freeze=tuple(_FREEZE.value),
                            train_only=tuple(_TRAIN_ONLY.value))
    data_cfg = data_lib.TrainData(paths=paths, seq_len=_SEQ.value, batch_size=_BATCH.value, seed=_SEED.value,
                                  labels=_LABELS.value, worker_count=_WORKERS.value)
    run_cfg = loop.RunConfig(workdir=_WORKDIR.value, steps=_STEPS.value, log_every=_LOG_EVERY.value,
                             save_every=_SAVE_EVERY.value, keep=_KEEP.value, mesh=_MESH.value, rules=_RULES.value,
                             tensorboard=_TB.value)
    meta = {"model": what, "train": {k: v for k, v in vars(train_cfg).items()}, "data_paths": list(paths),
            "runtime": vars(runtime), "lora": None if lcfg is None else lcfg.to_json(),
            "quantize": None if qcfg is None else str(qcfg)}
    n_params = model_lib.param_count(abstract)
    if lcfg is not None:
        n_params = lora.param_count(abstract)
        what_trains = (f"LoRA r={lcfg.rank} alpha={lcfg.alpha:g} on {len(lora.adapters(abstract))} weights "
                       f"({n_params:,} adapter parameters), base {qcfg or runtime.param_dtype} frozen")
        print(f"training {what}: {what_trains} on {jax.device_count()} device(s): {', '.join(paths)}")
    else:
        print(f"training {what} ({n_params:,} parameters) on {jax.device_count()} device(s): {', '.join(paths)}")
    result = loop.run(model_fn, abstract, train_cfg, data_cfg, spec, run_cfg, meta=json.loads(json.dumps(
        meta, default=str)))
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}")
    if result.history:
        last = result.history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s")
    if result.stopped_early:
        print("preempted: checkpoint saved, stopping")
        return
    if _EXPORT.value and jax.process_count() > 1:
        print("not exported: several processes (export_release gathers the model on one host)")
    elif _EXPORT.value and lcfg is not None:
        dst = lora.export_peft(loop.trained_model(result), os.path.join(_WORKDIR.value, "adapter"),
                               base_model_name_or_path=_CHECKPOINT.value)
        print(f"exported the adapters {dst} (PEFT: adapter_model.safetensors + adapter_config.json)")
    elif _EXPORT.value:
        dst = loop.export_release(loop.trained_model(result), os.path.join(_WORKDIR.value, "export"),
                                  tokenizer_spec=spec)
        print(f"exported {dst} (python -m ming_jax.generate --checkpoint {dst})")


def run() -> None:
    cli.run(main, __name__)


if __name__ == "__main__":
    run()

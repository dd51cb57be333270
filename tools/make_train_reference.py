"""Make the train-step reference: the official BailingMoeV2ForCausalLM's loss and the gradient of every parameter,
for a text batch and a multimodal batch, at a tiny random config (float32, CPU).

    python tools/make_train_reference.py --official /path/to/Ming2 --out tests/data/train_reference

`--official` is a folder holding the release's python files, unmodified (a scratch export of github
Zihhan318/Ming2, snapshot 2a3732a; the blob ids it was run with are written to the output's README.md). Nothing
of the official code is stored in this project; this script imports it from that folder. Run it outside the test
suite (it needs torch and transformers); the test `tests/test_train_parity.py` reads only what it writes.

What the script does to the official code at run time (files untouched):
1. `BailingMoeV2SparseMoeBlock.moe_infer` is decorated `@torch.no_grad()` in the release (inference code): the
   routed experts' output would be a constant, their weights and the routers' kernels would get no gradient and
   every earlier layer a wrong one. The undecorated function (`moe_infer.__wrapped__`, what `functools.wraps`
   keeps) is put back on the class, so the backward runs through the routed experts exactly as the forward does.
2. The release's labels path calls `CrossEntropyLoss(inplace_backward=True)`, flash-attn's signature, which
   torch's `CrossEntropyLoss` refuses. The loss is therefore computed here the way that path means it: mean
   cross-entropy of the shifted logits over labels != -100 (torch's `F.cross_entropy`, ignore_index=-100).
3. `DynamicCache.get_usable_length` (gone in transformers 4.57) is only reached with a cache; the forward runs
   with `use_cache=False`. Attention is the eager implementation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

OFFICIAL_FILES = ("modeling_bailing_moe_v2.py", "configuration_bailing_moe_v2.py", "modeling_utils.py")

# Special ids of the tiny vocabulary (the release's layout, renumbered to fit vocab 320).
SPECIAL = dict(eos_token_id=309, image_patch_token=310, video_patch_token=311, image_start_token=312,
               video_start_token=313, image_end=314, video_end=315, audio_start=316, audio_patch=317,
               audio_end=318, pad_token_id=319)
TEXT_IDS = 309  # ordinary tokens are drawn from [0, 309)

CONFIG = dict(
    architectures=["BailingMoeV2ForCausalLM"], model_type="bailing_moe_v2", vocab_size=320, hidden_size=64,
    intermediate_size=96, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=1,
    head_dim=128,  # the official rotary hard-codes mrope_section [8, 12, 12]: 64 rotary dims = 128 * 0.5
    partial_rotary_factor=0.5, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, router_type="MultiRouter", use_expert_bias=True,
    rms_norm_eps=1e-6, rope_theta=2400000, rope_scaling={"type": "video_rope", "factor": None},
    max_position_embeddings=4096, use_qkv_bias=False, use_bias=False, tie_word_embeddings=False,
    spatial_merge_size=2, use_interleaved_frame_timestamp=True, tokens_per_second=2, hidden_act="silu",
    attention_dropout=0.0, output_dropout=0.0, embedding_dropout=0.0, norm_topk_prob=True, use_cache=False,
    eos_token_id=SPECIAL["eos_token_id"], pad_token_id=SPECIAL["pad_token_id"],
    image_patch_token=SPECIAL["image_patch_token"], video_patch_token=SPECIAL["video_patch_token"],
    image_start_token=SPECIAL["image_start_token"], video_start_token=SPECIAL["video_start_token"],
)


def blob_id(path: str) -> str:
    """The git blob id of a file (what `git hash-object` prints)."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fill_weights(model, torch, seed: int) -> None:
    """Every parameter overwritten from one seeded generator, in sorted-name order: expert_bias ~ N(0, 0.1), 1-D
    weights (norm scales) ~ 1 + N(0, 0.1), embeddings ~ N(0, 1), other matrices ~ N(0, 1) / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("expert_bias"):
                p.copy_(0.1 * r)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * r)
            elif "word_embeddings" in name:
                p.copy_(r)
            else:
                p.copy_(r / np.sqrt(p.shape[1]))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def text_batch(rng) -> dict:
    """Two rows of 24 tokens, no padding; labels -100 on each row's prompt (5 and 9 tokens)."""
    ids = rng.integers(0, TEXT_IDS, (2, 24))
    labels = ids.copy()
    labels[0, :5] = -100
    labels[1, :9] = -100
    labels[1, 15] = -100  # a masked token inside the answer too
    return dict(input_ids=ids, labels=labels)


def multimodal_batch(rng, hidden: int) -> dict:
    """One row: text, an image (grid 1x4x6 -> 6 tokens), text, an audio clip (14 feature rows, 12 valid), text,
    an interleaved two-frame video (grids 1x4x4 -> 4 tokens per frame) with time-stamp tokens, text. Labels on the
    text after the video only (the assistant's answer)."""
    s = SPECIAL
    t = lambda n: list(rng.integers(0, TEXT_IDS, n))  # noqa: E731
    ids = t(4) + [s["image_start_token"]] + [s["image_patch_token"]] * 6 + [s["image_end"]] + t(3)
    audio_start = len(ids) + 1
    ids += [s["audio_start"]] + [s["audio_patch"]] * 12 + [s["audio_end"]] + t(2)
    ids += [s["video_start_token"]]
    for _ in range(2):
        ids += t(2) + [s["image_start_token"]] + [s["video_patch_token"]] * 4 + [s["image_end"]]
    ids += [s["video_end"]]
    answer = len(ids)
    ids += t(8)
    ids = np.asarray([ids], np.int64)
    labels = np.full_like(ids, -100)
    labels[:, answer:] = ids[:, answer:]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return dict(
        input_ids=ids, labels=labels,
        query_embeds_image=unit(rng.standard_normal((6, hidden))).astype(np.float32),
        query_embeds_video=unit(rng.standard_normal((8, hidden))).astype(np.float32),
        query_embeds_audio=unit(rng.standard_normal((1, 14, hidden))).astype(np.float32),
        query_embeds_audio_lengths=np.asarray([[12]], np.int64),
        placeholder_audio_loc_lens=np.asarray([[[audio_start, 12]]], np.int64),
        image_grid_thw=np.asarray([[1, 4, 6]], np.int64),
        image_grid_thw_video=np.asarray([[1, 4, 4], [1, 4, 4]], np.int64),
    )


def loss_and_grads(model, torch, batch: dict) -> tuple[float, dict]:
    F = torch.nn.functional
    model.zero_grad(set_to_none=True)
    kw = {k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}
    out = model(**kw, use_cache=False, return_dict=True)
    logits = out.logits
    labels = torch.from_numpy(batch["labels"])
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name] = (np.zeros(p.shape, np.float32) if p.grad is None
                           else p.grad.detach().numpy().astype(np.float32))
    return float(loss.detach()), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="folder with the official python files")
    ap.add_argument("--out", required=True, help="output folder (written atomically)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    missing = [f for f in OFFICIAL_FILES if not os.path.exists(os.path.join(args.official, f))]
    if missing:
        sys.exit(f"--official {args.official}: missing {missing}")
    sys.path.insert(0, os.path.abspath(args.official))
    import torch
    import transformers
    from safetensors.numpy import save_file

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    import configuration_bailing_moe_v2 as conf
    import modeling_bailing_moe_v2 as mod

    block = mod.BailingMoeV2SparseMoeBlock
    block.moe_infer = getattr(block.moe_infer, "__wrapped__")  # undo @torch.no_grad (see the module docstring)

    cfg = conf.BailingMoeV2Config(**CONFIG)
    cfg._attn_implementation = "eager"
    model = mod.BailingMoeV2ForCausalLM(cfg).float().eval()  # eval: no dropout; gradients still flow
    fill_weights(model, torch, args.seed)

    rng = np.random.default_rng(args.seed)
    batches = {"text": text_batch(rng), "mm": multimodal_batch(rng, cfg.hidden_size)}
    inputs, outputs = {}, {}
    for tag, batch in batches.items():
        loss, grads = loss_and_grads(model, torch, batch)
        for k, v in batch.items():
            inputs[f"{tag}.{k}"] = np.ascontiguousarray(v)
        outputs[f"{tag}.loss"] = np.asarray(loss, np.float32)
        for k, v in grads.items():
            outputs[f"{tag}.grad.{k}"] = v
    weights = {k: v.detach().numpy().astype(np.float32).copy() for k, v in model.state_dict().items()}

    out_dir = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".train_reference.", dir=os.path.dirname(out_dir))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1, sort_keys=True, default=str)
    save_file(weights, os.path.join(tmp, "weights.safetensors"))
    save_file(inputs, os.path.join(tmp, "inputs.safetensors"))
    save_file(outputs, os.path.join(tmp, "outputs.safetensors"))
    commit = subprocess.run(["git", "-C", args.official, "rev-parse", "HEAD"], capture_output=True, text=True)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write("# train_reference: official BailingMoeV2ForCausalLM loss + gradients (made by "
                "tools/make_train_reference.py)\n\n")
        f.write(f"seed {args.seed}; torch {torch.__version__}, transformers {transformers.__version__}, "
                f"numpy {np.__version__}; float32, CPU, deterministic algorithms.\n")
        if commit.returncode == 0:
            f.write(f"official folder at commit {commit.stdout.strip()}\n")
        f.write("\n| official file | git blob id |\n|---|---|\n")
        for name in OFFICIAL_FILES:
            f.write(f"| {name} | {blob_id(os.path.join(args.official, name))} |\n")
        f.write("\nBatches: `text` (2 x 24 tokens, prompt labels -100) and `mm` (1 row: image, audio, two-frame "
                "video features at their placeholders, labels on the answer). `<tag>.loss`: mean cross-entropy of "
                "the shifted logits over labels != -100; `<tag>.grad.<official name>`: its gradient "
                "(expert_bias takes none: it is not trainable).\n")
        f.write(f"\nweights: {len(weights)} tensors, {sum(v.size for v in weights.values())} values.\n")
    if os.path.exists(out_dir):
        old = out_dir + ".old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        subprocess.run(["rm", "-rf", old], check=True)
    else:
        os.replace(tmp, out_dir)
    print(f"wrote {out_dir}: text loss {outputs['text.loss']:.6f}, mm loss {outputs['mm.loss']:.6f}")


if __name__ == "__main__":
    main()

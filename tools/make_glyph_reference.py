"""Make the glyph-branch reference: the official ByT5 loader, encoder and T5EncoderBlockByT5Mapper at a tiny random
config, and the official prompt -> glyph text rule (float32, CPU).

    python tools/make_glyph_reference.py --official /path/to/Ming2 --out tests/data/glyph_reference

`--official` is a folder holding the release's python files, unmodified (a scratch export of github
Zihhan318/Ming2, snapshot 2a3732a; the blob ids it was run with are written to the output's README.md). Nothing of
the official code is stored in this project; this script imports it from that folder. Run it outside the test suite
(it needs torch, transformers and diffusers); `tests/test_image_glyph.py` reads only what it writes.

What it runs, and what it does around the official code at run time (files untouched):
1. A release-shaped `byt5/` folder is written to a temporary directory: byt5.json, a tiny base T5 + ByT5 tokenizer
   saved with save_pretrained (`transformers.ByT5Tokenizer(extra_ids=125)`, the layout of google/byt5-small, stands
   in for the unpublished copy), font / color annotation JSONs, `byt5_model/base.pt` (prefixed names plus an
   unrelated tensor, seed + 1 values), `byt5_model/byt5_model.pt` and `byt5_mapper/byt5_mapper.pt` (seed values).
2. The official `load_byt5` (a method of the release's model class, taken out of modeling_bailingmm2.py with `ast`
   and called on a bare namespace) loads that folder. Its imports of `bizgen.utils` / `bizgen.custom_diffusers` are
   served by stand-in package modules that expose the official submodules' names, so the packages' `__init__`
   files (diffusers pipelines, drawing helpers) are not imported; `peft` (only used for LoRA training) is a stub.
3. The lines of the release's `generate` that use the loaded branch are re-enacted here: tokenise
   `image_gen_text` (padding to byt5_max_length, truncation, special tokens), encoder(ids, mask.float())[0],
   mapper(hidden, mask), times mask. A second mapper (num_layers 0, no channel mapper) runs on the same hidden states.
4. `get_text_from_prompt` (and its helper) are taken out of processing_bailingmm2.py with `ast` and run on a list
   of prompts.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

OFFICIAL_FILES = ("modeling_bailingmm2.py", "processing_bailingmm2.py", "bizgen/utils/load_byt5_and_byt5_tokenizer.py",
                  "bizgen/utils/constants.py", "bizgen/custom_diffusers/modeling_t5.py",
                  "bizgen/custom_diffusers/models/byt5_block_byt5_mapper.py")

T5 = dict(vocab_size=384, d_model=16, d_kv=6, num_heads=3, d_ff=24, num_layers=2, num_decoder_layers=1,
          relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
          dropout_rate=0.0, layer_norm_epsilon=1e-6, tie_word_embeddings=False, decoder_start_token_id=0,
          pad_token_id=0, eos_token_id=1)
BYT5_JSON = {
    "byt5_config": {"byt5_ckpt_path": "base", "byt5_name": "google/byt5-small", "special_token": True,
                    "color_special_token": True, "font_special_token": True, "multilingual": True,
                    "font_ann_path": "fonts.json", "color_ann_path": "colors.json"},
    "byt5_mapper_config": {"num_layers": 2, "sdxl_channels": 20},
    "byt5_max_length": 32,
    "byt5_mapper_type": "T5EncoderBlockByT5Mapper",
}
# Language-prefixed, unprefixed and a repeated index (its token is added once).
FONTS = {"cn-SourceHanSans": 0, "en-Roboto": 1, "jp-NotoSerif": 2, "kr-Nanum": 3, "Arial": 4, "en-Roboto-Bold": 1,
         "xx-Other": 5}
COLORS = {"white": 0, "black": 1, "red": 2, "blue": 3}

PROMPTS = [
    'A poster with the title "Grand Opening" in gold letters',
    "A sign that says 'OPEN' on a door",
    "It's a sunny day and the board reads \"Welcome\"",
    'Remove the text "SALE" from the window',
    'Write "SALE" and then remove the logo',
    "ERASE the word \"old\" please",
    "海报上写着“百灵 Ming Omni”，背景是蓝色",
    "Two labels: 'left' and 'right'",
    "She said 'this is a very long sentence that is not a label at all' loudly",
    "A cat on a sofa",
    "Label ‘中文标签’ and “second” and \"third\"",
    'Empty quotes "" here',
    "Write “Hello\nWorld” on the wall",
    "门上写着'三个字'",
    "门上写着'七个中文字符啊'",
    ("<role>SYSTEM</role>你是一个友好的AI助手。\n\ndetailed thinking off<role>HUMAN</role>Draw a mug with "
     "\"Coffee Time\" printed on it<role>ASSISTANT</role>"),
]
# The encoded batch: glyph texts the rule produces, one with added special tokens, one truncated, one empty.
ENCODE = [
    'A poster with the title "Grand Opening" in gold letters',
    'A logo reading "<color-2><cn-font-0>百灵 <font-5>Ming"',
    'A banner with "this text is far too long for thirty-two bytes of budget"',
    "A cat on a sofa",
]


def blob_id(path: str) -> str:
    """The git blob id of a file (what `git hash-object` prints)."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def official_functions(path: str, names: tuple[str, ...], namespace: dict) -> dict:
    """Compile the named function definitions (top level or methods) of an official file into `namespace`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in names]
    if sorted({n.name for n in found}) != sorted(names):
        sys.exit(f"{path}: could not find {names}")
    exec(compile(ast.Module(body=found, type_ignores=[]), path, "exec"), namespace)  # noqa: S102
    return namespace


def install_packages(official: str) -> None:
    """Stand-in `bizgen.*` packages whose submodules are the official files (see the module docstring, step 2)."""
    import importlib

    import diffusers  # noqa: F401  (before the peft stub: diffusers probes for peft when it is first imported)

    def package(name: str, folder: str):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(official, folder)]
        sys.modules[name] = mod
        return mod

    package("bizgen", "bizgen")
    utils = package("bizgen.utils", "bizgen/utils")
    custom = package("bizgen.custom_diffusers", "bizgen/custom_diffusers")
    package("bizgen.custom_diffusers.models", "bizgen/custom_diffusers/models")
    peft = types.ModuleType("peft")
    peft.LoraConfig = None
    sys.modules["peft"] = peft
    constants = importlib.import_module("bizgen.utils.constants")
    loader = importlib.import_module("bizgen.utils.load_byt5_and_byt5_tokenizer")
    mapper = importlib.import_module("bizgen.custom_diffusers.models.byt5_block_byt5_mapper")
    for name in ("BYT5_BASE_CKPT_NAME", "BYT5_CKPT_NAME", "BYT5_MAPPER_CKPT_NAME"):
        setattr(utils, name, getattr(constants, name))
    utils.load_byt5_and_byt5_tokenizer = loader.load_byt5_and_byt5_tokenizer
    custom.T5EncoderBlockByT5Mapper = mapper.T5EncoderBlockByT5Mapper


def filled(module, torch, seed: int) -> dict:
    """A state dict of `module`'s names and shapes from one seeded generator, in sorted-name order: norm scales
    ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), embeddings and position tables ~ N(0, 1), matrices ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(module.state_dict().items()):
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("bias"):
            out[name] = 0.1 * r
        elif p.ndim == 1:
            out[name] = 1.0 + 0.1 * r
        elif "embed_tokens" in name or "relative_attention_bias" in name:
            out[name] = r
        else:
            out[name] = r / np.sqrt(p.shape[1])
    return out


def write_release_folder(root: str, torch, transformers, t5_mod, mapper_cls, loader_mod, seed: int) -> dict:
    """The byt5/ folder of step 1; returns the fine-tuned encoder and mapper state dicts written into it."""
    with open(os.path.join(root, "byt5.json"), "w") as f:
        json.dump(BYT5_JSON, f)
    for name, value in (("fonts.json", FONTS), ("colors.json", COLORS)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(value, f)
    base_dir = os.path.join(root, BYT5_JSON["byt5_config"]["byt5_ckpt_path"])
    t5_mod.T5ForConditionalGeneration(transformers.T5Config(**T5)).save_pretrained(base_dir)
    transformers.ByT5Tokenizer(extra_ids=125).save_pretrained(base_dir)
    enc_kw = dict(BYT5_JSON["byt5_config"], byt5_ckpt_path=base_dir, font_ann_path=os.path.join(root, "fonts.json"),
                  color_ann_path=os.path.join(root, "colors.json"))
    skeleton, _ = loader_mod.load_byt5_and_byt5_tokenizer(**enc_kw)  # the resized encoder: names and shapes
    encoder_sd = filled(skeleton, torch, seed)
    base_sd = {"module.text_tower.encoder." + k: v for k, v in filled(skeleton, torch, seed + 1).items()}
    base_sd["module.text_tower.proj.weight"] = torch.zeros(3, 3)  # not the encoder's: filtered out by the loader
    mapper_sd = filled(mapper_cls(skeleton.config, **BYT5_JSON["byt5_mapper_config"]), torch, seed + 2)
    os.makedirs(os.path.join(root, "byt5_model"))
    os.makedirs(os.path.join(root, "byt5_mapper"))
    torch.save({"state_dict": base_sd}, os.path.join(root, "byt5_model", "base.pt"))
    torch.save(encoder_sd, os.path.join(root, "byt5_model", "byt5_model.pt"))
    torch.save(mapper_sd, os.path.join(root, "byt5_mapper", "byt5_mapper.pt"))
    return {"encoder": encoder_sd, "mapper": mapper_sd}


def run_branch(holder, torch, texts: list[str]) -> dict:
    """Step 3: the release's generate lines for the glyph branch, on the loaded holder."""
    enc = holder.byt5_tokenizer(texts, padding="max_length", max_length=holder.byt5_config.byt5_max_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
    mask = enc.attention_mask
    with torch.no_grad():
        hidden = holder.byt5_model(enc.input_ids, attention_mask=mask.float())[0]
        mapped = holder.byt5_mapper(hidden, mask)
        rows = mapped * mask.unsqueeze(-1)
    return {"ids": enc.input_ids, "mask": mask, "encoder_hidden": hidden, "mapper_out": mapped, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="folder with the official python files")
    ap.add_argument("--out", required=True, help="output folder (written atomically)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    official = os.path.abspath(args.official)
    missing = [f for f in OFFICIAL_FILES if not os.path.exists(os.path.join(official, f))]
    if missing:
        sys.exit(f"--official {official}: missing {missing}")

    import torch
    import transformers
    from safetensors.numpy import save_file

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    install_packages(official)
    t5_mod = sys.modules["bizgen.custom_diffusers.modeling_t5"]
    loader_mod = sys.modules["bizgen.utils.load_byt5_and_byt5_tokenizer"]
    mapper_cls = sys.modules["bizgen.custom_diffusers"].T5EncoderBlockByT5Mapper
    text_rule = official_functions(os.path.join(official, "processing_bailingmm2.py"),
                                   ("check_single_quotes", "get_text_from_prompt"), {})["get_text_from_prompt"]
    load_byt5 = official_functions(os.path.join(official, "modeling_bailingmm2.py"), ("load_byt5",),
                                   {"os": os, "torch": torch})["load_byt5"]

    with tempfile.TemporaryDirectory() as scratch:
        root = os.path.join(scratch, "byt5")
        os.makedirs(root)
        written = write_release_folder(root, torch, transformers, t5_mod, mapper_cls, loader_mod, args.seed)
        holder = types.SimpleNamespace()
        load_byt5(holder, root, torch_dtype=torch.float32, device="cpu")
        holder.byt5_model.eval()
        holder.byt5_mapper.eval()
        got = holder.byt5_model.state_dict()
        assert set(got) == set(written["encoder"]) and all(torch.equal(got[k], v) for k, v in
                                                           written["encoder"].items()), "byt5_model.pt not final"
        texts = [text_rule(p) for p in ENCODE]
        out = run_branch(holder, torch, texts)
        plain = mapper_cls(holder.byt5_model.config, num_layers=0, sdxl_channels=None).eval()
        plain_sd = filled(plain, torch, args.seed + 3)
        plain.load_state_dict(plain_sd, strict=True)
        with torch.no_grad():
            out["plain_mapper_out"] = plain(out["encoder_hidden"], out["mask"])
        added = {t: holder.byt5_tokenizer.convert_tokens_to_ids(t)
                 for t in holder.byt5_tokenizer.get_added_vocab() if t.startswith(("<color", "<font", "<cn-",
                                                                                   "<en-", "<jp-", "<kr-"))}
        encoder_config = holder.byt5_model.config.to_dict()
        encoder_config.pop("_name_or_path", None)  # the scratch folder: differs per run

    to_np = lambda sd: {k: v.detach().numpy().astype(np.float32).copy() for k, v in sd.items()}
    arrays = {k: v.detach().numpy().copy() for k, v in out.items()}
    arrays["ids"] = arrays["ids"].astype(np.int32)
    arrays["mask"] = arrays["mask"].astype(np.int32)
    out_dir = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".glyph_reference.", dir=os.path.dirname(out_dir))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"t5": encoder_config, "byt5": BYT5_JSON, "fonts": FONTS, "colors": COLORS,
                   "added_tokens": added, "plain_mapper": {"num_layers": 0, "sdxl_channels": None}},
                  f, indent=1, default=str, ensure_ascii=False)  # key order kept: the fonts' order matters
    with open(os.path.join(tmp, "texts.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "glyph_texts": [text_rule(p) for p in PROMPTS], "encode_prompts": ENCODE,
                   "encoded_texts": texts}, f, indent=1, ensure_ascii=False)
    save_file(to_np(written["encoder"]), os.path.join(tmp, "encoder.safetensors"))
    save_file(to_np(written["mapper"]), os.path.join(tmp, "mapper.safetensors"))
    save_file(to_np(plain_sd), os.path.join(tmp, "plain_mapper.safetensors"))
    save_file(arrays, os.path.join(tmp, "outputs.safetensors"))
    commit = subprocess.run(["git", "-C", official, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write("# glyph_reference: the official ByT5 glyph branch at a tiny config (made by "
                "tools/make_glyph_reference.py)\n\n")
        f.write(f"seed {args.seed}; torch {torch.__version__}, transformers {transformers.__version__}, "
                f"numpy {np.__version__}; float32, CPU, deterministic algorithms.\n")
        if commit.returncode == 0:
            f.write(f"official folder at commit {commit.stdout.strip()}\n")
        f.write("\n| official file | git blob id |\n|---|---|\n")
        f.writelines(f"| {name} | {blob_id(os.path.join(official, name))} |\n" for name in OFFICIAL_FILES)
        f.write("\nFiles: `config.json` (the loaded encoder's T5 config, the byt5.json used, the annotation dicts, the "
                "added tokens and their ids); `texts.json` (prompts -> the official glyph text; the encoded batch); "
                "`encoder.safetensors` (byt5_model.pt: T5Stack names, what the official loader ends with), "
                "`mapper.safetensors` (byt5_mapper.pt), `plain_mapper.safetensors` (a num_layers 0 mapper without "
                "channel mapper); `outputs.safetensors`: ids, mask [B, L], encoder_hidden [B, L, D], mapper_out and "
                "rows (= mapper_out x mask) [B, L, C], plain_mapper_out [B, L, D].\n")
    if os.path.exists(out_dir):
        old = out_dir + ".old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        subprocess.run(["rm", "-rf", old], check=True)
    else:
        os.replace(tmp, out_dir)
    print(f"wrote {out_dir}: rows {arrays['rows'].shape}, mask sums {arrays['mask'].sum(1).tolist()}")


if __name__ == "__main__":
    main()

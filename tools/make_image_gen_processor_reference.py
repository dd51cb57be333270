"""Make the image-generation preprocessing reference: the release's bucket sizes, default sizes, crop sizes, glyph
texts, editing references and [-1, 1] reference tensors, computed by the official functions themselves.

    python tools/make_image_gen_processor_reference.py --official /tmp/official_ig/src \\
        --out tests/data/image_gen_processor_reference

`--official` is a folder holding the release's `bailingmm_utils.py` and `processing_bailingmm2.py`, unmodified (a
scratch export of github Zihhan318/Ming2; the blob ids are written to the output's README.md). Nothing of the
official code is stored in this project; this script imports it from that folder and calls its functions. Run it
outside the test suite; `tests/test_image_gen_processor.py` reads only what it writes.

Setup used (nothing inside the repository):

    mkdir -p /tmp/official_ig/src && for f in bailingmm_utils.py processing_bailingmm2.py; do
        git -C <Ming2 mirror> show HEAD:$f > /tmp/official_ig/src/$f; done
    pip install --no-deps --target /tmp/official_ig/site torchvision==0.28.0   # matches torch 2.13; no CUDA torch
    PYTHONPATH=/tmp/official_ig/site python tools/make_image_gen_processor_reference.py --official ... --out ...

Needs torch, transformers, tqdm, requests and torchvision importable. torchvision is used as it is (its PIL resize,
to_tensor and CenterCrop); a build whose compiled operators do not load against the installed torch (the local
torchvision 0.28.0 wheel is a CUDA build) fails in `torchvision._meta_registrations`, the fake-tensor
registrations of the detection operators (nms, roi_align, ...). That one module is then replaced by an empty one:
the transforms used here are pure Python over PIL and never reach those operators. The release's video reader
(`bailingmm_utils_video`, imported at module level, never called here) is an empty stand-in.

Reference tensors are 256..2048 pixels a side, too big to store: each is kept as its sha256 (float32 bytes, C
order), per-channel sums and sums of squares, 32 x 32 block means and 256 sampled values at stored positions.
Input images are small PNGs written beside them (their pixels are what both sides read).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

OFFICIAL_FILES = ("bailingmm_utils.py", "processing_bailingmm2.py")
BLOCK = 32  # block-mean side; every bucket side is a multiple of 32
SAMPLES = 256  # sampled values per reference tensor
RANDOM_SIZES = 250  # log-uniform random (h, w) in [1, 8192] for process_ratio
HIGHRES_SWEEP = (512, 672, 1024)  # tables swept with every size
HIGHRES_CHOICE = (None, False, True, 0, 300, 592, 600, 700, 848, 1023.5, 1024, 2048)  # which table a value selects


def blob_id(path: str) -> str:
    """The git blob id of a file (what `git hash-object` prints)."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def import_official(folder: str):
    """(bailingmm_utils, processing_bailingmm2, torchvision, [stub notes]) imported from `folder`."""
    notes = []
    video = types.ModuleType("bailingmm_utils_video")
    video.v1_fetch_video = video.v2_fetch_video = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError)
    video.VideoInput = object
    sys.modules["bailingmm_utils_video"] = video
    notes.append("`bailingmm_utils_video` (the video reader, imported at module level, never called): empty stand-in")
    try:
        import torchvision
    except RuntimeError as e:  # compiled operators of another torch build: see the module docstring
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
        notes.append(f"`torchvision._meta_registrations` replaced by an empty module ({type(e).__name__}: {e}); the "
                     "transforms used (functional.resize / to_tensor on PIL images, transforms.CenterCrop) are "
                     "torchvision's own code, unchanged")
    sys.path.insert(0, os.path.abspath(folder))
    utils = importlib.import_module("bailingmm_utils")
    processing = importlib.import_module("processing_bailingmm2")
    return utils, processing, torchvision, notes


# --- inputs -------------------------------------------------------------------------------------------------------


def make_inputs(rng):
    """name -> PIL image: small noise images (upsampled to their bucket), a blocky 600 x 1000 and a tall 999 x 241
    one (downsampled, antialiased), in RGB, RGBA, L and P (with a transparent palette entry) modes."""
    from PIL import Image

    def noise(h, w, c):
        return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)

    def blocky(h, w, cell):
        small = noise(-(-h // cell), -(-w // cell), 3)
        big = np.repeat(np.repeat(small, cell, 0), cell, 1)[:h, :w].copy()
        yy, xx = np.mgrid[:h, :w]
        checker = ((yy + xx) % 2 * 255).astype(np.uint8)
        big[h // 4:h // 4 + 64, w // 4:w // 4 + 96] = checker[h // 4:h // 4 + 64, w // 4:w // 4 + 96, None]
        big[:, w // 2] = (255, 0, 0)  # one-pixel lines: the filter's support shows around them
        big[h // 2] = (0, 0, 255)
        return big

    palette = Image.fromarray(noise(33, 47, 3)).quantize(colors=16)
    palette.info["transparency"] = 3
    return {
        "noise_rgb_37x53": Image.fromarray(noise(37, 53, 3)),
        "noise_rgba_61x29": Image.fromarray(noise(61, 29, 4), "RGBA"),
        "gray_45x45": Image.fromarray(noise(45, 45, 1)[..., 0], "L"),
        "palette_33x47": palette,
        "blocks_600x1000": Image.fromarray(blocky(600, 1000, 20)),
        "tall_999x241": Image.fromarray(blocky(999, 241, 9)),
    }


def rgb_sha(image) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image.convert("RGB"))).tobytes()).hexdigest()


# --- cases --------------------------------------------------------------------------------------------------------


def table_dump(utils) -> dict:
    """The three tables process_ratio uses (its dict literals, keys as the release writes them), caught by running
    it with a recording get_closest_ratio."""
    seen = {}
    original = utils.get_closest_ratio
    try:
        for res in (512, 672, 1024):
            utils.get_closest_ratio = lambda h, w, aspect_ratios, res=res: (
                seen.setdefault(res, aspect_ratios), original(h, w, aspect_ratios))[1]
            utils.process_ratio(512, 512, res)
    finally:
        utils.get_closest_ratio = original
    return {str(res): [[key, int(h), int(w)] for key, (h, w) in table.items()] for res, table in seen.items()}


def tie_sizes(tables: dict) -> list[tuple[int, int]]:
    """(h, w) whose h / w lies exactly (in floats) halfway between two neighbouring keys, or nearest to halfway."""
    sizes = []
    for entries in tables.values():
        keys = [float(k) for k, _, _ in entries]
        for k1, k2 in itertools.pairwise(keys):
            exact, near = [], None
            for w in range(1, 2001):
                for h in {math.floor((k1 + k2) / 2 * w), math.ceil((k1 + k2) / 2 * w)}:
                    if h < 1:
                        continue
                    r = h / w
                    gap = abs(abs(k1 - r) - abs(k2 - r))
                    if gap == 0.0 and len(exact) < 2:
                        exact.append((h, w))
                    if gap > 0 and (near is None or gap < near[0]):
                        near = (gap, h, w)
            sizes += exact + ([near[1:]] if near else [])
    return sizes


def ratio_sizes(tables: dict, rng) -> list[tuple[int, int]]:
    sizes = set()
    for entries in tables.values():
        for _, h, w in entries:
            sizes |= {(h, w), (h + 1, w), (h - 1, w), (h, w + 1), (h, w - 1)}
    sizes |= {(1, 1), (1, 10000), (10000, 1), (1, 2), (2, 1), (1, 4), (4, 1), (1, 5), (5, 1), (3000, 4000),
              (4000, 3000), (1080, 1920), (1920, 1080), (720, 1280), (1280, 720), (768, 1024), (1024, 768),
              (100, 101), (7, 5), (5, 7), (999, 1000), (37, 53), (61, 29), (45, 45), (33, 47), (600, 1000),
              (999, 241), (600, 337), (8192, 8192), (3, 10)}
    sizes |= set(tie_sizes(tables))
    logs = rng.uniform(0, math.log(8192), size=(RANDOM_SIZES, 2))
    sizes |= {(max(1, int(math.exp(a))), max(1, int(math.exp(b)))) for a, b in logs}
    return sorted(sizes)


def process_ratio_cases(utils, tables, rng) -> list:
    cases = []
    for res in HIGHRES_SWEEP:
        for h, w in ratio_sizes(tables, rng):
            closest, resize = utils.process_ratio(h, w, res)
            cases.append([h, w, res, list(closest), list(resize)])
    for res in HIGHRES_CHOICE:
        for h, w in [(512, 512), (600, 1000), (1000, 333), (77, 1999)]:
            closest, resize = utils.process_ratio(h, w, res)
            cases.append([h, w, res, list(closest), list(resize)])
    return cases


def outcome(fn, *args):
    try:
        value = fn(*args)
    except Exception as e:  # the official's own errors are part of the reference
        return {"error": type(e).__name__}
    return {"value": value}


def default_cases(utils) -> list:
    cases = []
    for res in (None, False, True, 512, 672, 1024, 800):
        for ar in (None, 1.0, 0.25, 0.3, 0.5, 0.5625, 0.7, 0.75, 1 / 3, 4 / 3, 1.5, 16 / 9, 9 / 16, 2.0, 2.5, 3.0,
                   4.0, 5.0, 10.0, 0.1, 0.01, 0.002, 0.001, 1.1):
            got = outcome(utils.get_default_image_gen_hw, res, ar)
            case = {"highres": res, "aspect_ratio": ar, **({"error": got["error"]} if "error" in got else
                                                           {"size": list(got["value"])})}
            if "size" in case:  # what generate then makes of it
                closest, resize = utils.process_ratio(*case["size"], res)
                case["generate"] = [list(closest), list(resize)]
            cases.append(case)
    return cases


def crop_cases(processing) -> list:
    from PIL import Image

    cases = []
    sizes = [(600, 1000), (1000, 600), (512, 512), (37, 53), (53, 37), (1, 1), (1, 1000), (1000, 1), (3000, 4000),
             (1080, 1920), (7, 3), (241, 999)]
    ratios = [1.0, 16 / 9, 9 / 16, 0.5, 2.0, 4 / 3, 0.75, 1 / 3, 3.0, 100.0, 0.01, 1e-9, 1e9, 0.0, -1.0,
              float("inf"), float("nan")]
    for h, w in sizes:
        image = Image.new("L", (w, h))
        for r in ratios:
            got = outcome(processing.crop_to_aspect_max, image, r)
            rr = r if math.isfinite(r) else str(r)
            cases.append({"size": [h, w], "aspect_ratio": rr, **({"error": got["error"]} if "error" in got else
                                                                  {"crop": [got["value"].height, got["value"].width]})})
    return cases


PROMPTS = [
    "a red fox in the snow",
    'a sign that says "OPEN"',
    "a sign that says \u201c\u7406\u89e3\u4e0e\u751f\u6210\u7edf\u4e00\u201d",
    "a mug with \u2018hello\u2019 printed on it",
    "write 'Ming' on the wall",
    "don't write anything, it's fine",
    "the word 'a very long single quoted phrase indeed' on a card",
    "'\u4e00\u4e8c\u4e09\u56db\u4e94\u516d\u4e03' on a banner",
    "'\u4e00\u4e8c\u4e09\u56db\u4e94\u516d' on a banner",
    'remove the text "SALE" from the window',
    'REMOVE the "SALE"',
    'add "NEW" and then remove the old sticker',
    'delete "A" and "B"',
    'erase it, then write "C"',
    'change "cat" to "dog"',
    'a poster: "first" \u201csecond\u201d \u2018third\u2019',
    'empty quotes "" here',
    'a "line\nbreak" quote',
    'unbalanced "quote here',
    "it's John's 'cake'",
    'nested "outer \u2018inner\u2019 text"',
    "\u628a\u6807\u9898\u6539\u6210\u201c\u6625\u8282\u5feb\u4e50\u201d",
    "\u5220\u9664\u6587\u5b57\u201c\u4fc3\u9500\u201d",
    'the letters "A" then "B" then "C"',
    "",
]
CONVERSATIONS_FOR_TEXT = [
    [{"role": "HUMAN", "content": [{"type": "text", "text": 'a sign that says "OPEN"'}]}],
    [{"role": "HUMAN", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": 'add "HI"'}]}],
    [{"role": "HUMAN", "content": [{"type": "text", "text": 'draw "A"'}]},
     {"role": "ASSISTANT", "content": [{"type": "text", "text": "done"}]},
     {"role": "HUMAN", "content": [{"type": "text", "text": "now remove the letter"}]}],
    [{"role": "HUMAN", "content": [{"type": "text", "text": "write 'Hi' please"}]}],
]


def text_cases(processing) -> list:
    cases = [{"text": p, "glyph": processing.get_text_from_prompt(p)} for p in PROMPTS]
    fake = types.SimpleNamespace(tokenizer=types.SimpleNamespace(eos_token="<|role_end|>"))
    fake.apply_system_template = lambda *a: processing.BailingMM2Processor.apply_system_template(fake, *a)
    for conv in CONVERSATIONS_FOR_TEXT:
        text = processing.BailingMM2Processor.apply_chat_template(fake, conv)
        cases.append({"conversation": conv, "text": text, "glyph": processing.get_text_from_prompt(text)})
    return cases


# Conversations of the editing reference; "@how:name" stands for input `name` given as a PIL image ("pil"), a path
# ("path"), a file:// URL ("file") or a data:image base64 URL ("data").
REFERENCE_CONVERSATIONS = {
    "text_only": [{"role": "HUMAN", "content": [{"type": "text", "text": "a cat"}]}],
    "two_items": [{"role": "HUMAN", "content": [{"type": "text", "text": "edit"},
                                                {"type": "image", "image": "@pil:noise_rgba_61x29"},
                                                {"type": "image", "image": "@pil:noise_rgb_37x53"}]}],
    "list_item": [{"role": "HUMAN", "content": [{"type": "image", "image": ["@path:palette_33x47",
                                                                            "@path:noise_rgb_37x53"]},
                                                {"type": "text", "text": "edit"}]}],
    "image_url": [{"role": "HUMAN", "content": [{"type": "image_url", "image_url": {"url": "@file:gray_45x45"}},
                                                {"type": "text", "text": "edit"}]}],
    "data_url": [{"role": "HUMAN", "content": [{"type": "image", "image": "@data:noise_rgb_37x53"}]}],
    "assistant_first": [{"role": "HUMAN", "content": [{"type": "text", "text": "draw"}]},
                        {"role": "ASSISTANT", "content": [{"type": "image", "image": "@pil:gray_45x45"}]},
                        {"role": "HUMAN", "content": [{"type": "image", "image": "@pil:noise_rgb_37x53"},
                                                      {"type": "text", "text": "again"}]}],
    "batch": [[{"role": "HUMAN", "content": [{"type": "text", "text": "a"}]}],
              [{"role": "HUMAN", "content": [{"type": "image", "image": "@pil:palette_33x47"}]}]],
    "with_audio": [{"role": "HUMAN", "content": [{"type": "image", "image": "@pil:gray_45x45"},
                                                 {"type": "audio", "audio": "clip.wav"}]}],
    "with_video": [{"role": "HUMAN", "content": [{"type": "video", "video": "clip.mp4"},
                                                 {"type": "image", "image": "@pil:gray_45x45"}]}],
    "plain_content": [{"role": "HUMAN", "content": "just text"}],
}


def resolve(obj, images: dict, folder: str):
    """A conversation with its "@how:name" strings replaced by the images they stand for."""
    if isinstance(obj, list):
        return [resolve(o, images, folder) for o in obj]
    if isinstance(obj, dict):
        return {k: resolve(v, images, folder) for k, v in obj.items()}
    if isinstance(obj, str) and obj.startswith("@"):
        how, name = obj[1:].split(":", 1)
        path = os.path.join(folder, "inputs", name + ".png")
        if how == "pil":
            return images[name]
        if how == "path":
            return path
        if how == "file":
            return "file://" + path
        with open(path, "rb") as f:
            return "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return obj


def conversation_cases(utils, images: dict, folder: str) -> list:
    cases = []
    for name, conv in REFERENCE_CONVERSATIONS.items():
        got = outcome(utils.process_reference_vision_info, resolve(conv, images, folder))
        case = {"name": name, "conversation": conv}
        if "error" in got:
            case["error"] = got["error"]
        elif got["value"] is None:
            case["reference"] = None
        else:
            (ref,) = got["value"]
            case["reference"] = {"size": [ref.height, ref.width], "mode": ref.mode, "rgb_sha256": rgb_sha(ref)}
        cases.append(case)
    return cases


REFERENCES = [  # (name, input names, aspect_ratio (width / height), image_gen_highres)
    ("rgb_small", ["noise_rgb_37x53"], None, 512),
    ("rgba", ["noise_rgba_61x29"], None, 512),
    ("gray", ["gray_45x45"], None, 512),
    ("palette", ["palette_33x47"], None, 512),
    ("big_512", ["blocks_600x1000"], None, 512),
    ("big_672", ["blocks_600x1000"], None, 672),
    ("big_1024", ["blocks_600x1000"], None, 1024),
    ("crop_square", ["blocks_600x1000"], 1.0, 512),
    ("crop_tall", ["blocks_600x1000"], 9 / 16, 512),
    ("crop_wide", ["noise_rgb_37x53"], 16 / 9, 512),
    ("batch", ["noise_rgb_37x53", "blocks_600x1000"], None, 512),
    ("tall_1024", ["tall_999x241"], None, 1024),
]


def summarize(x: np.ndarray, rng) -> tuple[dict, dict]:
    """(json facts, arrays) of one [B, 3, H, W] float32 tensor."""
    b, c, h, w = x.shape
    x64 = x.astype(np.float64)
    blocks = x64.reshape(b, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(3, 5))
    index = np.stack([rng.integers(0, n, SAMPLES) for n in x.shape], axis=1).astype(np.int32)  # [K, 4]
    facts = {"shape": list(x.shape), "dtype": str(x.dtype),
             "sha256": hashlib.sha256(np.ascontiguousarray(x, "<f4").tobytes()).hexdigest(),
             "sum": x64.sum(axis=(2, 3)).tolist(), "sum_sq": (x64 * x64).sum(axis=(2, 3)).tolist(),
             "min": float(x.min()), "max": float(x.max())}
    arrays = {"blocks": blocks.astype(np.float32), "sample_index": index,
              "sample_value": x[tuple(index.T)].astype(np.float32)}
    return facts, arrays


def reference_cases(utils, processing, images: dict, rng) -> tuple[list, dict, dict]:
    cases, tensors = [], {}
    for name, inputs, aspect, res in REFERENCES:
        loaded = [utils.fetch_image_wo_resize({"type": "image", "image": images[n]}) for n in inputs]
        tensor, h, w = processing.transform_reference_images(loaded, aspect, res)
        closest, resize = utils.process_ratio(ori_h=h, ori_w=w, highres=res)  # generate's size step
        x = tensor.numpy()
        assert tuple(closest) == x.shape[-2:], (name, closest, x.shape)  # generate's own assertion
        facts, arrays = summarize(x, rng)
        cases.append({"name": name, "inputs": inputs, "aspect_ratio": aspect, "highres": res, "hw": [h, w],
                      "generate": [list(closest), list(resize)], **facts})
        tensors.update({f"{name}.{k}": v for k, v in arrays.items()})
    # The release's transform on its own keeps a non-RGB mode's channels (its reader converts to RGB first).
    raw = processing.transform_reference_images([images["noise_rgba_61x29"]], None, 512)[0]
    return cases, tensors, {"rgba_without_reader_shape": list(raw.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="folder with the official python files")
    ap.add_argument("--out", required=True, help="output folder (written atomically)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    missing = [f for f in OFFICIAL_FILES if not os.path.exists(os.path.join(args.official, f))]
    if missing:
        sys.exit(f"--official {args.official}: missing {missing}")
    utils, processing, torchvision, notes = import_official(args.official)
    import PIL
    import torch
    from safetensors.numpy import save_file

    rng = np.random.default_rng(args.seed)
    out_dir = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".image_gen_processor_reference.", dir=os.path.dirname(out_dir))
    os.makedirs(os.path.join(tmp, "inputs"))
    images = make_inputs(rng)
    for name, image in images.items():
        image.save(os.path.join(tmp, "inputs", name + ".png"))
    from PIL import Image

    images = {name: Image.open(os.path.join(tmp, "inputs", name + ".png")) for name in images}  # as read back
    tables = table_dump(utils)
    refs, tensors, extra = reference_cases(utils, processing, images, rng)
    cases = {
        "tables": tables,
        "inputs": {n: {"mode": im.mode, "size": [im.height, im.width], "rgb_sha256": rgb_sha(im)}
                   for n, im in images.items()},
        "process_ratio": process_ratio_cases(utils, tables, rng),
        "default_size": default_cases(utils),
        "crop_size": crop_cases(processing),
        "text": text_cases(processing),
        "conversations": conversation_cases(utils, images, tmp),
        "references": refs,
        "notes": extra,
    }
    with open(os.path.join(tmp, "cases.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, separators=(",", ":"))
    save_file(tensors, os.path.join(tmp, "references.safetensors"))
    commit = subprocess.run(["git", "-C", args.official, "rev-parse", "HEAD"], capture_output=True, text=True)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write("# image_gen_processor_reference: the release's image-generation preprocessing (made by "
                "tools/make_image_gen_processor_reference.py)\n\n")
        f.write("Made with `PYTHONPATH=<torchvision 0.28.0 --no-deps --target folder> python "
                "tools/make_image_gen_processor_reference.py --official <scratch export> --out <this folder>` "
                "(setup in the script's docstring).\n\n")
        f.write(f"seed {args.seed}; torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow "
                f"{PIL.__version__}, numpy {np.__version__}.\n")
        if commit.returncode == 0:
            f.write(f"official folder at commit {commit.stdout.strip()}\n")
        f.write("\n| official file | git blob id |\n|---|---|\n")
        for name in OFFICIAL_FILES:
            f.write(f"| {name} | {blob_id(os.path.join(args.official, name))} |\n")
        f.write("\nStand-ins while importing the official files (no other change):\n")
        f.writelines(f"- {note}\n" for note in notes)
        f.write(
            "\nWhat was run (all official functions, on the inputs in inputs/):\n"
            f"- `process_ratio(h, w, highres)`: {len(cases['process_ratio'])} cases: every bucket of the three "
            "tables and its +-1 neighbours, exact float ties and near-ties halfway between neighbouring ratio keys, "
            f"extreme ratios (1 x 10000 ...), {RANDOM_SIZES} log-uniform random sizes, at highres 512, 672 and "
            f"1024; and a few sizes at highres {list(HIGHRES_CHOICE)} (which table a value selects). Rows [h, w, "
            "highres, closest, resize].\n"
            "- `tables`: the three tables process_ratio uses, keys as written in the release.\n"
            "- `get_default_image_gen_hw(highres, aspect_ratio)` and `process_ratio` on its result (generate's "
            "size step), errors recorded by exception name.\n"
            "- `crop_to_aspect_max(image, ratio)`: the crop's (h, w), errors by name.\n"
            "- `get_text_from_prompt`: bare prompts, and chat-formatted conversations (the processor's "
            "`apply_chat_template` run unbound with eos `<|role_end|>`).\n"
            "- `process_reference_vision_info(conversation)`: which image it keeps (size, mode, RGB sha256) or "
            "the error; `@how:name` in a conversation stands for input `name` as a PIL image / path / file:// URL / "
            "data:image base64 URL.\n"
            "- `transform_reference_images(images, aspect_ratio, highres)` on images read by "
            "`fetch_image_wo_resize` (the processor's path), then `process_ratio(h, w, highres)` on the size it "
            "returns (generate's step, whose bucket equals the tensor's H, W). Each tensor: shape, sha256 of its "
            f"float32 bytes, per-channel sum and sum of squares, min / max in cases.json; {BLOCK} x {BLOCK} block "
            f"means and {SAMPLES} values at stored [b, c, y, x] positions in references.safetensors (`<case>.blocks`, "
            "`<case>.sample_index`, `<case>.sample_value`).\n"
            f"- notes: the release's transform alone keeps an RGBA image's 4 channels "
            f"({extra['rgba_without_reader_shape']}); its reader converts to RGB first, as ours always does.\n")
    for folder, _, files in os.walk(tmp):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    if os.path.exists(out_dir):
        old = out_dir + ".old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        subprocess.run(["rm", "-rf", old], check=True)
    else:
        os.replace(tmp, out_dir)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    print(f"wrote {out_dir}: {len(cases['process_ratio'])} process_ratio cases, {len(refs)} reference tensors, "
          f"{size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

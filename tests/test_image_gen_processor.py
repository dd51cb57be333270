"""Image-generation preprocessing against the release's own functions (tests/data/image_gen_processor_reference,
made by tools/make_image_gen_processor_reference.py): bucket tables and sizes, default sizes, crop sizes, glyph
text, the editing reference of a conversation and the [-1, 1] reference tensors; then bad inputs.

Integers and choices are compared exactly; reference tensors (too big to store) by their sha256 (bit-exact), and
by block means, sampled values and per-channel sums through `numerics.assert_close` at the float32 tolerance.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from ming_jax.parity import numerics
from ming_jax.processors import image_gen
from ming_jax.processors import prompt as prompt_lib
from ming_jax.processors.image_gen import ImageGenError

DATA = pathlib.Path(__file__).resolve().parent / "data" / "image_gen_processor_reference"
CASES = json.loads((DATA / "cases.json").read_text()) if (DATA / "cases.json").exists() else None
BLOCK = 32  # the generator's block-mean side


@pytest.fixture(scope="module")
def cases() -> dict:
    if CASES is None:
        pytest.fail(f"reference data not found at {DATA} (run tools/make_image_gen_processor_reference.py)")
    return CASES


@pytest.fixture(scope="module")
def tensors() -> dict:
    return load_file(str(DATA / "references.safetensors"))


def _input(name: str) -> Image.Image:
    with Image.open(DATA / "inputs" / f"{name}.png") as im:
        im.load()
        return im


def _resolve(obj):
    """A reference conversation with its "@how:name" strings as the images they stand for (see the generator)."""
    if isinstance(obj, list):
        return [_resolve(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, str) and obj.startswith("@"):
        how, name = obj[1:].split(":", 1)
        path = DATA / "inputs" / f"{name}.png"
        if how == "pil":
            return _input(name)
        if how == "path":
            return str(path)
        if how == "file":
            return f"file://{path}"
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return obj


def _sha(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, "<f4").tobytes()).hexdigest()


def _rgb_sha(image: Image.Image) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()


# --- sizes --------------------------------------------------------------------------------------------------------


def test_tables_are_the_release_tables(cases):
    for res, entries in cases["tables"].items():
        assert [(float(k), h, w) for k, h, w in entries] == list(image_gen.TABLES[int(res)]), res
    assert set(cases["tables"]) == {"512", "672", "1024"}


def test_bucket_size_matches_process_ratio(cases):
    rows = cases["process_ratio"]
    ties = 0
    for h, w, res, closest, resize in rows:
        got = image_gen.bucket_size(h, w, res)
        assert got == (tuple(closest), tuple(resize)), (h, w, res)
        keys = [k for k, _, _ in image_gen.TABLES[image_gen.table_resolution(res)]]
        dist = sorted(abs(k - h / w) for k in keys)
        ties += dist[0] == dist[1]
    assert len(rows) > 2500 and ties >= 20  # the data holds exact float ties, decided as the release does
    used = [(type(res), res) for _, _, res, _, _ in rows]
    assert all((type(v), v) in used for v in (None, False, True, 0, 592, 848, 1023.5, 2048))


def test_every_bucket_is_its_own_bucket():
    for res, table in image_gen.TABLES.items():
        for _, h, w in table:
            assert image_gen.bucket_size(h, w, res) == ((h, w), (h, w))


def test_table_resolution_ties_and_flags():
    assert [image_gen.table_resolution(v) for v in (None, False, True, 592, 593, 848, 849, 1, 5000)] == \
        [512, 512, 1024, 512, 672, 672, 1024, 512, 1024]


def test_default_size_matches_release(cases):
    for case in cases["default_size"]:
        args = (case["highres"], case["aspect_ratio"])
        if "error" in case:  # the release divides by zero; we say why
            with pytest.raises(ImageGenError, match="too small"):
                image_gen.default_size(*args)
            continue
        size = image_gen.default_size(*args)
        assert size == tuple(case["size"]), args
        assert image_gen.bucket_size(*size, case["highres"]) == tuple(map(tuple, case["generate"])), args


def test_crop_size_matches_crop_to_aspect_max(cases):
    for case in cases["crop_size"]:
        ratio = case["aspect_ratio"]
        ratio = float(ratio) if isinstance(ratio, str) else ratio
        if "error" in case:
            with pytest.raises(ImageGenError, match="positive finite"):
                image_gen.crop_size(*case["size"], ratio)
        else:
            assert image_gen.crop_size(*case["size"], ratio) == tuple(case["crop"]), case


# --- text -----------------------------------------------------------------------------------------------------------


def test_image_gen_text_matches_get_text_from_prompt(cases):
    for case in cases["text"]:
        assert image_gen.image_gen_text(case["text"]) == case["glyph"], case["text"]


def test_chat_formatted_text_is_what_the_release_reads(cases):
    """Our chat template gives the release's text, so image_gen_text(apply_chat_template(conv)) is its
    image_gen_text (a quote of an earlier turn counts: the release reads the whole conversation)."""
    convs = [c for c in cases["text"] if "conversation" in c]
    assert convs
    for case in convs:
        assert prompt_lib.apply_chat_template(case["conversation"]) == case["text"]
        assert image_gen.image_gen_text(case["text"]) == case["glyph"]
    multi = [c for c in convs if len(c["conversation"]) > 1]
    assert multi and multi[0]["glyph"] and image_gen.image_gen_text("now remove the letter") == ""


# --- the editing reference --------------------------------------------------------------------------------------


def test_inputs_read_as_rgb_like_the_release(cases):
    for name, facts in cases["inputs"].items():
        image = image_gen.load_reference(DATA / "inputs" / f"{name}.png")
        assert image.mode == "RGB" and [image.height, image.width] == facts["size"]
        assert _rgb_sha(image) == facts["rgb_sha256"], name


def test_reference_from_conversation_matches_release(cases):
    for case in cases["conversations"]:
        conv = _resolve(case["conversation"])
        if "error" in case:
            with pytest.raises(ImageGenError, match="images only"):
                image_gen.reference_from_conversation(conv)
            continue
        got = image_gen.reference_from_conversation(conv)
        if case["reference"] is None:
            assert got is None, case["name"]
            continue
        ref = case["reference"]
        assert got.mode == ref["mode"] and [got.height, got.width] == ref["size"], case["name"]
        assert _rgb_sha(got) == ref["rgb_sha256"], case["name"]


@pytest.mark.parametrize("name", [r["name"] for r in (CASES or {}).get("references", [])] or ["missing"])
def test_reference_pixels_match_transform_reference_images(cases, tensors, name):
    case = next(c for c in cases["references"] if c["name"] == name)
    pixels, hw = image_gen.reference_pixels([_input(n) for n in case["inputs"]], aspect_ratio=case["aspect_ratio"],
                                            resolution=case["highres"])
    assert pixels.dtype == np.float32 and list(pixels.shape) == case["shape"]
    assert list(hw) == case["hw"]
    diffusion, output = image_gen.bucket_size(*hw, case["highres"])
    assert [list(diffusion), list(output)] == case["generate"] and diffusion == pixels.shape[-2:]

    b, c, h, w = pixels.shape
    x64 = pixels.astype(np.float64)
    blocks = x64.reshape(b, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(3, 5))
    numerics.assert_close(f"{name}.blocks", blocks, tensors[f"{name}.blocks"].astype(np.float64))
    index = tensors[f"{name}.sample_index"]
    numerics.assert_close(f"{name}.samples", pixels[tuple(index.T)], tensors[f"{name}.sample_value"])
    numerics.assert_close(f"{name}.sum", x64.sum(axis=(2, 3)), np.asarray(case["sum"]))
    numerics.assert_close(f"{name}.sum_sq", (x64 * x64).sum(axis=(2, 3)), np.asarray(case["sum_sq"]))
    assert (float(pixels.min()), float(pixels.max())) == (case["min"], case["max"])
    assert _sha(pixels) == case["sha256"], f"{name}: not bit-identical to the release (close as checked above)"


def test_aspect_ratio_crops_the_size_not_the_pixels():
    """As the release: the crop picks the bucket and the output size, the whole image is stretched to it."""
    image = _input("blocks_600x1000")
    cropped, hw = image_gen.reference_pixels([image], aspect_ratio=1.0, resolution=512)
    assert hw == (600, 600) and cropped.shape == (1, 3, 512, 512)
    whole = np.asarray(image.resize((512, 512), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_array_equal(cropped[0], ((whole - 0.5) * 2).transpose(2, 0, 1))


def test_reference_accepts_uint8_arrays_and_single_images():
    image = _input("noise_rgb_37x53")
    from_pil, hw = image_gen.reference_pixels(image, resolution=512)
    from_array, hw2 = image_gen.reference_pixels([np.asarray(image)], resolution=512)
    np.testing.assert_array_equal(from_pil, from_array)
    assert hw == hw2 == (37, 53)


def test_resize_output_is_lanczos():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = image_gen.resize_output(image, (70, 101))
    want = np.asarray(Image.fromarray(image).resize((101, 70), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out, want)
    assert image_gen.resize_output(image, (64, 96)) is image


# --- bad inputs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(0, 5), (5, -1), (1.5, 4), (True, 4), ("512", 512), (None, 1)])
def test_bucket_size_refuses_bad_sizes(h, w):
    with pytest.raises(ImageGenError, match="positive integer"):
        image_gen.bucket_size(h, w)


@pytest.mark.parametrize("highres", ["1024", math.nan, math.inf, [512]])
def test_bad_highres(highres):
    with pytest.raises(ImageGenError, match="highres"):
        image_gen.bucket_size(512, 512, highres)


@pytest.mark.parametrize("ratio", [0, -2.0, math.nan, math.inf, "16:9", True])
def test_bad_aspect_ratio(ratio):
    with pytest.raises(ImageGenError, match="aspect_ratio"):
        image_gen.default_size(1024, ratio)
    with pytest.raises(ImageGenError, match="aspect_ratio"):
        image_gen.reference_pixels([_input("gray_45x45")], aspect_ratio=ratio)


def test_load_reference_errors(tmp_path):
    with pytest.raises(ImageGenError, match="not found"):
        image_gen.load_reference(tmp_path / "nope.png")
    with pytest.raises(ImageGenError, match="not a file"):
        image_gen.load_reference(tmp_path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageGenError, match="cannot read"):
        image_gen.load_reference(junk)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((DATA / "inputs" / "blocks_600x1000.png").read_bytes()[:4000])
    with pytest.raises(ImageGenError, match="cannot read"):
        image_gen.load_reference(truncated)
    with pytest.raises(ImageGenError, match="not fetched"):
        image_gen.load_reference("https://example.invalid/cat.png")
    with pytest.raises(ImageGenError, match="data:image"):
        image_gen.load_reference("data:image/png;base64,@@@@")
    with pytest.raises(ImageGenError, match="base64"):
        image_gen.load_reference("data:image/png,rawbytes")
    with pytest.raises(ImageGenError, match="path or a PIL image"):
        image_gen.load_reference(42)
    with pytest.raises(ImageGenError, match="uint8"):
        image_gen.load_reference(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageGenError, match="empty side"):
        image_gen.load_reference(Image.new("RGB", (0, 3)))


def test_reference_pixels_errors():
    with pytest.raises(ImageGenError, match="at least one"):
        image_gen.reference_pixels([])
    with pytest.raises(ImageGenError, match="load_reference"):
        image_gen.reference_pixels(["photo.png"])


def test_conversation_errors():
    with pytest.raises(ImageGenError, match="non-empty list"):
        image_gen.reference_from_conversation([])
    no_value = [{"role": "HUMAN", "content": [{"type": "image"}]}]
    with pytest.raises(ImageGenError, match="images only"):
        image_gen.reference_from_conversation(no_value)
    missing = [{"role": "HUMAN", "content": [{"type": "image", "image": "/nonexistent/x.png"}]}]
    with pytest.raises(ImageGenError, match="not found"):
        image_gen.reference_from_conversation(missing)


def test_image_gen_text_and_output_errors():
    with pytest.raises(ImageGenError, match="string"):
        image_gen.image_gen_text(None)
    with pytest.raises(ImageGenError, match="uint8"):
        image_gen.resize_output(np.zeros((4, 4), np.uint8), (2, 2))
    with pytest.raises(ImageGenError, match="positive integer"):
        image_gen.resize_output(np.zeros((4, 4, 3), np.uint8), (0, 2))

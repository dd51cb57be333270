"""Host side of image generation and editing: the diffusion size, the reference image for the VAE, the glyph text.

What the release's processor and `generate(image_gen=True)` do before the first DiT call (numpy + PIL only):

    text-to-image:  (highres, aspect_ratio) --default_size--> (h, w) --bucket_size--> (diffusion size, output size)
                    or a requested (h, w)                      --bucket_size--> (diffusion size, output size)
    editing:        first image of the conversation --reference_from_conversation / load_reference--> RGB PIL
                    --reference_pixels--> ([B, 3, H, W] in [-1, 1] for the VAE, (h, w)) --bucket_size(h, w)-->
                    (diffusion size == (H, W), output size)

Buckets. `highres` (the release's `image_gen_highres`, 1024 by default) picks one of three aspect-ratio tables
(512, 672, 1024; None / False mean 512, True 1024, any other number the nearest table, ties to the smaller). A
(height, width) goes to the bucket whose ratio key is nearest to height / width (ties to the smaller key, the
tables' order); that bucket is the diffusion size. The output size keeps the request's own aspect ratio at the
bucket's scale: the side with the larger bucket / request scale takes the bucket's length, the other side
int(side * scale) -- so it covers the bucket on both sides and the generated image is resized to it (LANCZOS,
`resize_output`). Every bucket maps to itself, so a size already on a bucket is unchanged.

Release behaviours kept on purpose (parity), each a little surprising:
  * with `aspect_ratio` the reference is center-cropped only to choose the bucket and the output size; the pixels
    the VAE encodes are the whole, uncropped image resized (stretched) to that bucket;
  * the bucket of a batch is the first image's; every image of the batch is resized to it;
  * `image_gen_text` reads the chat-formatted prompt (system turn and all turns included, before the image
    placeholders are expanded): a quote anywhere in the conversation counts.
Stricter than the release: sizes must be positive integers, an aspect ratio positive and finite (the release
divides by zero or asserts), anything else raises `ImageGenError` with the reason.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ming_jax.processors.glyph import glyph_text

DEFAULT_HIGHRES = 1024  # the release's `image_gen_highres` default (processor and generate)
_DEFAULT_SIDE = 512  # default_size asks for a 512-high request of the given aspect ratio
_RESAMPLE_REFERENCE = Image.Resampling.BILINEAR  # torchvision's resize of a PIL image: PIL's (antialiased) bilinear
_RESAMPLE_OUTPUT = Image.Resampling.LANCZOS

# The release's aspect-ratio tables: (ratio key, height, width), keys ascending. The keys are the release's
# (rounded) values, not height / width: they decide the nearest bucket, ties included. Heights and widths are
# multiples of 32.
_TABLE_512 = (
    (0.25, 256, 1024), (0.26, 256, 992), (0.27, 256, 960), (0.28, 256, 928), (0.32, 288, 896), (0.33, 288, 864),
    (0.35, 288, 832), (0.4, 320, 800), (0.42, 320, 768), (0.48, 352, 736), (0.5, 352, 704), (0.52, 352, 672),
    (0.57, 384, 672), (0.6, 384, 640), (0.68, 416, 608), (0.72, 416, 576), (0.78, 448, 576), (0.82, 448, 544),
    (0.88, 480, 544), (0.94, 480, 512), (1.0, 512, 512), (1.07, 512, 480), (1.13, 544, 480), (1.21, 544, 448),
    (1.29, 576, 448), (1.38, 576, 416), (1.46, 608, 416), (1.67, 640, 384), (1.75, 672, 384), (2.0, 704, 352),
    (2.09, 736, 352), (2.4, 768, 320), (2.5, 800, 320), (2.89, 832, 288), (3.0, 864, 288), (3.11, 896, 288),
    (3.62, 928, 256), (3.75, 960, 256), (3.88, 992, 256), (4.0, 1024, 256),
)
_TABLE_1024 = tuple((key, 2 * h, 2 * w) for key, h, w in _TABLE_512)  # the release's 1024 table is exactly 2x
_TABLE_672 = (
    (0.28, 352, 1280), (0.32, 384, 1184), (0.38, 416, 1088), (0.44, 448, 1024), (0.52, 480, 928), (0.57, 512, 896),
    (0.65, 544, 832), (0.75, 576, 768), (0.83, 608, 736), (0.91, 640, 704), (1.0, 672, 672), (1.1, 704, 640),
    (1.21, 736, 608), (1.33, 768, 576), (1.39, 800, 576), (1.53, 832, 544), (1.69, 864, 512), (1.75, 896, 512),
    (1.93, 928, 480), (2.0, 960, 480), (2.21, 992, 448), (2.29, 1024, 448), (2.54, 1056, 416), (2.62, 1088, 416),
    (2.69, 1120, 416), (3.0, 1152, 384), (3.08, 1184, 384), (3.17, 1216, 384), (3.55, 1248, 352), (3.64, 1280, 352),
)
TABLES: dict[int, tuple[tuple[float, int, int], ...]] = {512: _TABLE_512, 672: _TABLE_672, 1024: _TABLE_1024}


class ImageGenError(ValueError):
    """An input the image-generation preprocessing cannot take: a bad size, aspect ratio, resolution or image."""


# --- sizes ----------------------------------------------------------------------------------------------------------


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ImageGenError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _aspect(value, what: str = "aspect_ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ImageGenError(f"{what} (width / height) must be a positive finite number, got {value!r}")
    return float(value)


def table_resolution(highres) -> int:
    """The table (512, 672 or 1024) that `highres` selects: None / False -> 512, True -> 1024, a number -> the
    nearest table (a tie goes to the smaller)."""
    if highres is None or highres is False:
        return 512
    if highres is True:
        return 1024
    if not isinstance(highres, numbers.Real) or not math.isfinite(highres):
        raise ImageGenError(f"highres must be None, a bool or a number (512, 672, 1024), got {highres!r}")
    return min(TABLES, key=lambda res: abs(res - highres))  # dict order 512, 672, 1024: ties to the first


def bucket_size(height: int, width: int, highres=DEFAULT_HIGHRES) -> tuple[tuple[int, int], tuple[int, int]]:
    """((bucket h, bucket w), (output h, output w)) for a requested (height, width) at `highres`.

    The bucket is the diffusion size: the table entry whose ratio key is nearest to height / width (float
    arithmetic as the release: |key - height / width|, the first of equal distances). The output size is the
    request scaled by the larger of bucket_h / height and bucket_w / width, that side exact and the other truncated
    to an integer, so both sides are >= the bucket's."""
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    table = TABLES[table_resolution(highres)]
    ratio = height / width
    _, bh, bw = min(table, key=lambda entry: abs(entry[0] - ratio))
    if bh / height > bw / width:
        out = bh, int(width * bh / height)
    else:
        out = int(height * bw / width), bw
    return (bh, bw), out


def default_size(highres=DEFAULT_HIGHRES, aspect_ratio: float | None = None) -> tuple[int, int]:
    """The size the release asks for without a reference: the bucket of a 512-high request with width
    int(512 * aspect_ratio) (aspect_ratio = width / height, None = square). Pass it through `bucket_size` for the
    output size (it is its own bucket)."""
    ratio = 1.0 if aspect_ratio is None else _aspect(aspect_ratio)
    width = int(_DEFAULT_SIDE * ratio)
    if width < 1:
        raise ImageGenError(f"aspect_ratio {aspect_ratio!r} is too small: a {_DEFAULT_SIDE}-high request would be "
                            f"{width} wide")
    return bucket_size(_DEFAULT_SIDE, width, highres)[0]


def crop_size(height: int, width: int, aspect_ratio: float) -> tuple[int, int]:
    """(h, w) of the largest centered crop of a height x width image with width / height = aspect_ratio: full
    height and floor(aspect_ratio * height) wide when the image is at least that wide, else full width and
    floor(width / aspect_ratio) high (each at least 1 and at most the image's side)."""
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    target = _aspect(aspect_ratio)
    if width / height >= target:
        return height, max(1, min(math.floor(target * height), width))
    return max(1, min(math.floor(width / target), height)), width


# --- the reference image ----------------------------------------------------------------------------------------


def _open(path: str) -> Image.Image:
    if not os.path.exists(path):
        raise ImageGenError(f"reference image not found: {path}")
    if not os.path.isfile(path):
        raise ImageGenError(f"reference image is not a file: {path}")
    try:
        with Image.open(path) as im:
            return _rgb(im, path)
    except ImageGenError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for unreadable or truncated files
        raise ImageGenError(f"cannot read {path} as an image: {type(e).__name__}: {e}") from e


def _rgb(image: Image.Image, what: str) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ImageGenError(f"{what}: image has an empty side ({image.height}x{image.width})")
    return image.convert("RGB")  # decodes the pixels: a truncated file fails here, inside the caller's handler


def load_reference(source) -> Image.Image:
    """The reference image as the release reads it for the VAE: RGB (PIL's convert: alpha dropped, not blended),
    no resize, no EXIF rotation. `source`: a PIL image, a path, a file:// URL or a data:image/...;base64, URL.
    http(s) URLs are not fetched (download the image first). Errors: `ImageGenError` naming the problem."""
    if isinstance(source, Image.Image):
        return _rgb(source, "reference image")
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[-1] != 3:
            raise ImageGenError(f"a reference array must be uint8 [height, width, 3], got {source.dtype} "
                                f"{source.shape}")
        return _rgb(Image.fromarray(source), "reference image")
    if not isinstance(source, (str, os.PathLike)):
        raise ImageGenError(f"reference image: give a path or a PIL image, got {type(source).__name__}")
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        raise ImageGenError(f"reference image {text}: URLs are not fetched; download the image and pass the file")
    if text.startswith("data:image"):
        if "base64," not in text:
            raise ImageGenError("reference image: a data:image URL must be base64-encoded ('...;base64,...')")
        try:
            data = base64.b64decode(text.split("base64,", 1)[1], validate=True)
            with Image.open(io.BytesIO(data)) as im:
                return _rgb(im, "data:image URL")
        except ImageGenError:
            raise
        except Exception as e:
            raise ImageGenError(f"cannot read the data:image URL as an image: {type(e).__name__}: {e}") from e
    return _open(text.removeprefix("file://"))


def _media_items(conversation) -> list[Mapping[str, Any]]:
    """The image / video / audio items of a conversation (or of a list of conversations), in prompt order."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ImageGenError("a conversation must be a non-empty list of messages")
    conversations = [conversation] if isinstance(conversation[0], Mapping) else conversation
    kinds = ("image", "image_url", "video", "video_url", "audio", "audio_url")
    items = []
    for conv in conversations:
        for message in conv:
            content = message.get("content") if isinstance(message, Mapping) else None
            if not isinstance(content, (list, tuple)):
                continue  # plain-text content carries no media
            items.extend(item for item in content
                         if isinstance(item, Mapping) and (any(k in item for k in kinds) or item.get("type") in kinds))
    return items


def reference_from_conversation(conversation) -> Image.Image | None:
    """The release's editing reference: the first image of the conversation (any role, an item's list of images
    counts in order), read by `load_reference`; None without images. Later images go to the ViT only. As the
    release, a video or audio item is refused (its editing path takes images only)."""
    first = None
    for item in _media_items(conversation):
        if "image" in item:
            value = item["image"]
        elif "image_url" in item:
            value = item["image_url"]
            value = value.get("url") if isinstance(value, Mapping) else value
        else:
            kind = next((k for k in ("video", "video_url", "audio", "audio_url") if k in item), item.get("type"))
            raise ImageGenError(f"image editing takes images only; the conversation has a {kind!r} item")
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if first is None and values:
            first = values[0]
    return None if first is None else load_reference(first)


def reference_pixels(images, *, aspect_ratio: float | None = None, resolution=DEFAULT_HIGHRES
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """Reference image(s) -> (float32 [B, 3, H, W] in [-1, 1], (h, w)), what the VAE encodes when editing.

    (H, W) is the bucket (at `resolution`, the release's image_gen_highres) of the first image, center-cropped to
    `aspect_ratio` (width / height) when given; every image, converted to RGB and *not* cropped, is resized to it
    with PIL's bilinear filter and mapped to [-1, 1] as (x / 255 - 0.5) * 2 in float32. (h, w) is the first image's
    (cropped) size, the release's image_gen_height / width: `bucket_size(h, w, resolution)` gives ((H, W), the
    output size)."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ImageGenError("reference_pixels needs at least one image")
    rgb = []
    for i, im in enumerate(images):
        if not isinstance(im, (Image.Image, np.ndarray)):
            raise ImageGenError(f"reference image {i}: give a PIL image or a uint8 [height, width, 3] array (read "
                                f"files with load_reference), got {type(im).__name__}")
        rgb.append(load_reference(im))  # RGB as the release's reader makes it (its resize alone keeps alpha)
    h, w = rgb[0].height, rgb[0].width
    if aspect_ratio is not None:
        h, w = crop_size(h, w, aspect_ratio)
    (bh, bw), _ = bucket_size(h, w, resolution)
    pixels = np.stack([np.asarray(im.resize((bw, bh), _RESAMPLE_REFERENCE)) for im in rgb])  # [B, H, W, 3] uint8
    x = (pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) * np.float32(2)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), (h, w)


# --- text and output ---------------------------------------------------------------------------------------------


def image_gen_text(prompt_text: str) -> str:
    """The release's `image_gen_text` for one sample: the glyph text ('Text "<span>". ' or "") of the
    chat-formatted prompt (`prompt.apply_chat_template(conversation)`, the text the release reads; the bare
    instruction gives the same unless other turns hold quotes or 'remove' / 'delete' / 'erase')."""
    if not isinstance(prompt_text, str):
        raise ImageGenError(f"prompt text must be a string, got {type(prompt_text).__name__}")
    return glyph_text(prompt_text)


def resize_output(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A generated uint8 [H, W, 3] image resized (LANCZOS, as the release) to `size` = (h, w), the output size of
    `bucket_size`. Returns uint8 [h, w, 3]; the same array when it already has that size."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ImageGenError(f"a generated image must be uint8 [height, width, 3], got {image.dtype} {image.shape}")
    h, w = (_positive_int(v, "output size") for v in size)
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), _RESAMPLE_OUTPUT))

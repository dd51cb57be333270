"""Image processor: RGB image in, ViT patch rows + (t, h, w) grid out (host side, numpy + PIL).

Reproduces the official `BailingMM2ImageProcessor` (a Qwen2-VL image processor with patch 16) for still images:

1. `smart_resize`: pick (H', W') divisible by factor = patch_size * merge_size, closest to the input size
   (Python's round, i.e. half-to-even), then scaled down to at most `max_pixels` (floor) or up to at least
   `min_pixels` (ceil) keeping the aspect ratio. Aspect ratios above 200 are refused, as the official does.
2. Resize with PIL (bicubic by default) on the uint8 image, as `transformers.image_transforms.resize` does, so
   the resampled pixels are the very same uint8 values.
3. Rescale (float64 multiply by 1/255, stored as float32) and normalise ((x - mean) / std in float32), in the same
   dtypes as transformers, so the result is bit-identical.
4. Patchify: a still image becomes `temporal_patch_size` identical frames; rows are ordered merge-window by
   merge-window (row-major over the (H'/p/m, W'/p/m) windows, then row-major inside each m x m window) and each row
   is flattened as (channel, frame, patch row, patch col). That is the order the ViT's patch embedding (a Conv3d
   over (C, t, p, p)) and its 2x2 patch merger expect.

`ProcessorConfig` reads the whole official preprocessor_config.json (image and audio keys) strictly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import einops
import numpy as np

from ming_jax.config.base import ConfigError, check_keys
from ming_jax.processors.audio import SAMPLE_RATE, WhisperFrontendConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # the official smart_resize refuses anything more elongated
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC; the official default

# Keys of preprocessor_config.json that configure the processor wrapper, the text template or the (unused with the
# whisper encoder) Kaldi fbank front end. We recognise them so a typo elsewhere still fails, but they do not change
# what this module computes.
_PASSIVE_KEYS = (
    "auto_map image_token video_token audio_token use_interleaved_frame_timestamp processor_class "
    "feature_extractor_type chunk_length dither feature_size frame_length frame_shift inverse_norm lfr_m lfr_n "
    "n_samples num_audio_tokens up_sample return_attention_mask padding_side padding_value wav_frontend_args "
    "do_convert_rgb size"
).split()
_IMAGE_KEYS = ("min_pixels max_pixels patch_size temporal_patch_size merge_size image_mean image_std "
               "rescale_factor resample do_resize do_rescale do_normalize image_processor_type").split()
_AUDIO_KEYS = ("sampling_rate", "whisper_frontend_args")


class ImageError(ValueError):
    """An image the processor cannot handle: wrong type / dtype / shape, empty, or too elongated."""


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """Everything the official preprocessor_config.json sets for the understanding path.

    Field defaults are the official classes' constructor defaults (what an absent key means); the shipped
    Ming-flash-omni 2.0 file differs in `max_pixels` and is the `ming_flash_omni_2()` preset.
    `sampling_rate` is recorded but, as in the official code, audio is always resampled to 16 kHz."""

    min_pixels: int = 64 * 64
    max_pixels: int = 32 * 32 * 1280
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    sampling_rate: int = SAMPLE_RATE
    audio: WhisperFrontendConfig = WhisperFrontendConfig()

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "sampling_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"ProcessorConfig.{name} must be a positive integer, got {v!r}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"ProcessorConfig: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if self.factor**2 > self.max_pixels:
            raise ConfigError(f"ProcessorConfig: max_pixels {self.max_pixels} is below one merge window "
                              f"({self.factor}x{self.factor} pixels)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError(f"ProcessorConfig: image_mean / image_std need 3 (RGB) values, got "
                              f"{len(self.image_mean)} / {len(self.image_std)}")
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"ProcessorConfig: image_std has a zero: {self.image_std}")

    @property
    def factor(self) -> int:
        """Side of one merge window in pixels: resized sides are multiples of it."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: 3 channels x temporal x patch x patch."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def ming_flash_omni_2(cls, **override) -> "ProcessorConfig":
        """The preprocessor_config.json shipped with Ming-flash-omni 2.0."""
        base = dict(min_pixels=4096, max_pixels=16777216, patch_size=16, temporal_patch_size=2, merge_size=2,
                    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, audio=WhisperFrontendConfig(n_mels=128))
        return cls(**{**base, **override})

    @classmethod
    def from_official(cls, d: Mapping[str, Any], defaults: "ProcessorConfig | None" = None) -> "ProcessorConfig":
        """Read a preprocessor_config.json dict. Unknown keys raise `ConfigError`; absent keys take the value in
        `defaults` (the official constructor defaults when None)."""
        check_keys(d, (*_IMAGE_KEYS, *_AUDIO_KEYS, *_PASSIVE_KEYS), "preprocessor_config")
        base = defaults if defaults is not None else cls()
        kind = d.get("image_processor_type", "BailingMM2ImageProcessor")
        if kind != "BailingMM2ImageProcessor":
            raise ConfigError(f"preprocessor_config: image_processor_type {kind!r} is not BailingMM2ImageProcessor")
        size = d.get("size")
        if size is not None and not (isinstance(size, Mapping) and {"shortest_edge", "longest_edge"} <= set(size)):
            # The official constructor raises the same; a well-formed `size` is then ignored by it (min_pixels /
            # max_pixels or the defaults win), and so by us.
            raise ConfigError(f"preprocessor_config: size must hold 'shortest_edge' and 'longest_edge', got {size}")
        over: dict[str, Any] = {}
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "resample",
                    "sampling_rate"):
            if d.get(key) is not None:
                over[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                v = d[key]
                over[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        if d.get("rescale_factor") is not None:
            over["rescale_factor"] = float(d["rescale_factor"])
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                over[key] = bool(d[key])
        if d.get("whisper_frontend_args") is not None:
            over["audio"] = WhisperFrontendConfig.from_official(d["whisper_frontend_args"])
        return dataclasses.replace(base, **over)

    def to_official(self) -> dict[str, Any]:
        return {
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor, "resample": self.resample, "do_resize": self.do_resize,
            "do_rescale": self.do_rescale, "do_normalize": self.do_normalize, "sampling_rate": self.sampling_rate,
            "whisper_frontend_args": self.audio.to_official(),
            "image_processor_type": "BailingMM2ImageProcessor",
        }


# ----------------------------------------------------------------------------------------------------------------
# Pure stages


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels] where the aspect ratio
    allows, aspect ratio kept as closely as the grid permits. Same arithmetic as the official (float division,
    Python round = half-to-even, floor when shrinking, ceil when growing)."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image has an empty side: {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"image {height}x{width} has aspect ratio {ratio:.1f}; the processor accepts at most "
                         f"{MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb_uint8(image) -> np.ndarray:
    """Accept a PIL image (any mode: converted to RGB with PIL, as the official does) or a uint8 [H, W, 3] array.
    Returns uint8 [H, W, 3]. Float arrays are refused rather than guessed at (the official silently rescales some
    and double-rescales others)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency of the image path
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ImageError(f"image has an empty side: {image.height}x{image.width}")
        arr = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ImageError(f"image array must be uint8 pixel values 0..255, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(f"image array must be [height, width, 3] (RGB, channels last), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image has an empty side: {arr.shape[0]}x{arr.shape[1]}")
    return arr


def resize_uint8(image: np.ndarray, height: int, width: int, resample: int = PIL_BICUBIC) -> np.ndarray:
    """PIL resize of a uint8 [H, W, 3] image to [height, width, 3] (uint8), as transformers' `resize` does."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def rescale_normalize(image: np.ndarray, cfg: ProcessorConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3]: x * rescale_factor (computed in float64, stored float32), then
    (x - mean) / std in float32 -- the dtypes transformers uses, so results are bit-identical."""
    x = image.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else image
    x = x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x


def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int
             ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float [T, C, H, W] frames -> (rows [grid_t * grid_h * grid_w, C * temporal * patch * patch], (t, h, w)).

    T is padded to a multiple of `temporal_patch_size` by repeating the last frame. Row order: temporal group, then
    merge windows row-major, then the m x m patches of a window row-major; within a row: channel, frame, pixel row,
    pixel col. H and W must be multiples of patch_size * merge_size."""
    t, c, h, w = frames.shape
    factor = patch_size * merge_size
    if h % factor or w % factor:
        raise ImageError(f"frame size {h}x{w} is not a multiple of patch*merge = {factor}")
    if t % temporal_patch_size:
        pad = np.repeat(frames[-1:], temporal_patch_size - t % temporal_patch_size, axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    grid = (frames.shape[0] // temporal_patch_size, h // patch_size, w // patch_size)
    # (T q) C (A a i) (B b j): T temporal groups of q frames; A x B merge windows of a x b patches of i x j pixels.
    rows = einops.rearrange(frames, "(T q) C (A a i) (B b j) -> (T A B a b) (C q i j)",
                            q=temporal_patch_size, a=merge_size, i=patch_size, b=merge_size, j=patch_size)
    return np.ascontiguousarray(rows), grid


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def resized_size(height: int, width: int, cfg: ProcessorConfig) -> tuple[int, int]:
    """(height, width) the processor resizes an image of this size to."""
    if not cfg.do_resize:
        return height, width
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)


def num_image_patches(height: int, width: int, cfg: ProcessorConfig) -> int:
    """pixel_values rows for one image; the LLM gets this / merge_size**2 image tokens."""
    h, w = resized_size(height, width, cfg)
    return (h // cfg.patch_size) * (w // cfg.patch_size)


def process_image(image, cfg: ProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (float32 [grid_t * grid_h * grid_w, 3 * temporal * patch**2], (grid_t, grid_h, grid_w))."""
    rgb = to_rgb_uint8(image)  # [H, W, 3]
    h, w = resized_size(rgb.shape[0], rgb.shape[1], cfg)
    if cfg.do_resize:
        rgb = resize_uint8(rgb, h, w, cfg.resample)
    pixels = rescale_normalize(rgb, cfg)  # [H', W', 3]
    frames = pixels.transpose(2, 0, 1)[None]  # [1, 3, H', W']
    return patchify(frames, cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size)


def process_images(images: Sequence, cfg: ProcessorConfig) -> dict[str, np.ndarray]:
    """Official `BailingMM2ImageProcessor(images=...)`: each image processed on its own, rows concatenated.
    Returns pixel_values float32 [sum N_i, patch_dim] and image_grid_thw int64 [n_images, 3]."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ImageError("process_images needs at least one image")
    rows, grids = [], []
    for i, image in enumerate(images):
        try:
            r, g = process_image(image, cfg)
        except ImageError as e:
            raise ImageError(f"image {i}: {e}") from None
        rows.append(r)
        grids.append(g)
    return {"pixel_values": np.concatenate(rows, axis=0), "image_grid_thw": np.asarray(grids, dtype=np.int64)}

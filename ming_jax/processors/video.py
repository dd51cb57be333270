"""Video input: decoding, frame sampling, frame size and the per-frame timestamps of the interleaved prompt layout
(host side, numpy + PIL; files are decoded with PyAV).

The release's default path (`bailingmm_utils_video.v1_fetch_video` for a video file) is:

1. Sample frames (its `v2_sample_video`): at most `max_fps` = 2 frames per second of video and at most
   `max_frames` = 170 frames (3072 tokens x 2 frames x 4 oversampling / 144 patches), evenly spread:
   n = max(1, min(170, int(duration * min(2, src_fps) + 0.5))), indices = linspace(0, src_frames - 1, n) truncated
   to int. The sampled rate is fps' = n / src_frames * src_fps and frame i gets the time stamp i / fps'.
2. One frame size for the clip (`smart_resize` with factor 32 = patch x merge): sides multiples of 32, area at least
   `min_pixels` = 128 x 32 x 32 and at most max(total_pixels / n x 2, 1.05 x min_pixels) with `total_pixels` =
   96 x 128 x 32 x 32, aspect ratio kept as closely as the grid allows. Frames are resized bicubically.
3. Pad the frame count to a multiple of the temporal patch (2) by repeating the last frame and its time stamp.
4. The image processor turns frames into patch rows (no further resize); each temporal patch of 2 frames gets the
   mean of its frames' time stamps, written into the prompt as `<x.x seconds>` before that patch's frame block.

A folder of frame images follows the release's other branch (`v1_smart_nframes`): the frames are taken to be at
`folder_fps` = 2 frames per second, between `folder_min_frames` = 4 and `folder_max_frames` = 256 of them are kept
(a multiple of the temporal patch), evenly spread.

Differences from the release, on purpose:
* Decoding uses PyAV (`pip install av`, FFmpeg's libraries in a wheel) instead of torchcodec / decord / OpenCV.
  The frame rate is the stream's average rate (decord's `get_avg_fps`), clamped to [1, 240] as the torchcodec path
  clamps it; the frame count is the container's, or counted by decoding when the container does not say.
* Resizing uses PIL's bicubic filter; the release uses OpenCV's `INTER_CUBIC`, whose kernel (a = -0.75, no
  antialiasing when shrinking) gives slightly different pixel values. Frame sizes, counts, time stamps and the
  prompt layout are the same.
* For a frame folder the release computes the sampled indices but then keeps every frame (the indices only feed a
  shape check); we keep the sampled frames, which is the same whenever the folder holds an even number of at most
  256 frames, and stamp each kept frame with its true time index / folder_fps.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from ming_jax.processors.image import ProcessorConfig, patchify, rescale_normalize

MAX_ASPECT_RATIO = 200
FPS_BOUNDS = (1.0, 240.0)  # the release clamps an implausible container frame rate into this range


class VideoError(ValueError):
    """A video that cannot be read or used: missing / undecodable file, no frames, bad frame arrays."""


@dataclasses.dataclass(frozen=True)
class VideoSamplingConfig:
    max_fps: float = 2.0
    max_frames: int = (3072 * 2 * 4) // 144  # 170: the release's MAX_FRAMES_OS
    frame_factor: int = 2  # frame count multiple: the ViT's temporal patch
    size_factor: int = 32  # frame side multiple: patch_size * merge_size
    min_pixels: int = 128 * 32 * 32
    total_pixels: int = 96 * 128 * 32 * 32
    folder_fps: float = 2.0
    folder_min_frames: int = 4
    folder_max_frames: int = 256

    def __post_init__(self):
        for name in ("max_frames", "frame_factor", "size_factor", "min_pixels", "total_pixels", "folder_min_frames",
                     "folder_max_frames"):
            if getattr(self, name) <= 0:
                raise VideoError(f"VideoSamplingConfig.{name}={getattr(self, name)} must be positive")
        if self.max_fps <= 0 or self.folder_fps <= 0:
            raise VideoError(f"VideoSamplingConfig: max_fps={self.max_fps} / folder_fps={self.folder_fps} must be > 0")

    @classmethod
    def for_processor(cls, cfg: ProcessorConfig, **overrides) -> "VideoSamplingConfig":
        """The release's numbers with the patch geometry of an image processor config."""
        return cls(**{"frame_factor": cfg.temporal_patch_size, "size_factor": cfg.factor, **overrides})


@dataclasses.dataclass
class Video:
    """Sampled, resized and padded frames, ready for the image processor."""

    frames: np.ndarray  # uint8 [T, H, W, 3]; T a multiple of frame_factor; H, W multiples of size_factor
    timestamps: np.ndarray  # float64 [T] seconds of each frame (padding frames repeat the last stamp)
    fps: float  # rate of the sampled frames


# --- pure rules ---------------------------------------------------------------------------------------------------


def sample_indices(src_frames: int, src_fps: float, cfg: VideoSamplingConfig) -> tuple[np.ndarray, float]:
    """Which decoded frames a video file keeps, and the rate of the kept frames (release `v2_sample_video` +
    `load_video`). Returns (int64 [n] increasing indices, fps')."""
    if src_frames <= 0:
        raise VideoError("the video has no frames")
    src_fps = min(max(float(src_fps), FPS_BOUNDS[0]), FPS_BOUNDS[1])
    rate = min(cfg.max_fps, src_fps)
    n = max(1, min(cfg.max_frames, int(src_frames / src_fps * rate + 0.5)))
    indices = np.linspace(0, src_frames - 1, n).astype(np.int64)  # numpy's dtype=int truncates the same way
    return indices, n / src_frames * src_fps


def folder_indices(total_frames: int, cfg: VideoSamplingConfig) -> np.ndarray:
    """Which images of a frame folder are kept (release `v1_smart_nframes` + `v1_sample_frames("sequence")`)."""
    f = cfg.frame_factor
    if total_frames < f:
        raise VideoError(f"a frame folder needs at least {f} frames (one temporal patch), got {total_frames}")
    lo = math.ceil(cfg.folder_min_frames / f) * f
    hi = math.floor(min(cfg.folder_max_frames, total_frames) / f) * f
    n = total_frames / cfg.folder_fps * cfg.folder_fps  # the folder's own rate equals the sampling rate
    n = math.floor(min(min(max(n, lo), hi), total_frames) / f) * f
    return np.linspace(0, total_frames - 1, n).astype(np.int64)


def frame_size(height: int, width: int, num_frames: int, cfg: VideoSamplingConfig) -> tuple[int, int]:
    """Target (height, width) of every frame (release `smart_resize` with the video pixel budget)."""
    if height <= 0 or width <= 0:
        raise VideoError(f"video frames have an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoError(f"video frames {height}x{width} are more elongated than {MAX_ASPECT_RATIO}:1")
    factor = cfg.size_factor
    max_pixels = max(cfg.total_pixels / num_frames * cfg.frame_factor, int(cfg.min_pixels * 1.05))
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise VideoError(f"video frames {height}x{width} leave no whole {factor}-pixel block at the pixel budget")
    return h_bar, w_bar


def pad_to_multiple(frames: np.ndarray, timestamps: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Repeat the last frame (and its time stamp) until the count is a multiple of `factor`."""
    pad = (-len(frames)) % factor
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        timestamps = np.concatenate([timestamps, np.repeat(timestamps[-1:], pad)])
    return frames, timestamps


def patch_timestamps(timestamps: Sequence[float], temporal_patch_size: int) -> list[float]:
    """Time stamp of each temporal patch: the mean of its first and last frame's (the image processor's rule)."""
    ts = list(timestamps)
    if len(ts) % temporal_patch_size:
        raise VideoError(f"{len(ts)} frame time stamps are not a multiple of the temporal patch {temporal_patch_size}")
    return [(ts[i] + ts[i + temporal_patch_size - 1]) / 2.0 for i in range(0, len(ts), temporal_patch_size)]


def timestamp_text(seconds: float) -> str:
    """The text before each frame block of the interleaved layout, e.g. `<1.5 seconds>`."""
    return f"<{seconds:.1f} seconds>"


# --- frames -> Video ----------------------------------------------------------------------------------------------


def _check_frames(frames) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise VideoError(f"video frames must be uint8 [frames, height, width, 3] (RGB), got {arr.dtype} "
                         f"{list(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise VideoError(f"video frames array is empty: shape {list(arr.shape)}")
    return arr


def _resize_all(frames: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = f if f.shape[:2] == (height, width) else np.asarray(
            Image.fromarray(f).resize((width, height), resample=Image.Resampling.BICUBIC))
    return out


def _finish(frames: Sequence[np.ndarray], timestamps: np.ndarray, fps: float, cfg: VideoSamplingConfig) -> Video:
    sizes = collections.Counter(f.shape[:2] for f in frames)
    (h, w), _ = sizes.most_common(1)[0]  # the release resizes odd-sized frames to the most common size
    th, tw = frame_size(h, w, len(frames), cfg)
    resized = _resize_all(frames, th, tw)
    resized, timestamps = pad_to_multiple(resized, np.asarray(timestamps, np.float64), cfg.frame_factor)
    return Video(resized, timestamps, float(fps))


def video_from_frames(frames, fps: float, cfg: VideoSamplingConfig = VideoSamplingConfig()) -> Video:
    """Decoded frames (uint8 [T, H, W, 3]) of a video at `fps`: sampled, resized and padded like a video file."""
    arr = _check_frames(frames)
    if not fps or fps <= 0:
        raise VideoError(f"frame rate must be positive, got {fps}")
    idx, rate = sample_indices(arr.shape[0], fps, cfg)
    return _finish(list(arr[idx]), np.arange(len(idx)) / rate, rate, cfg)


def read_frame_folder(source, cfg: VideoSamplingConfig = VideoSamplingConfig()) -> Video:
    """A folder of frame images (sorted by name), or a list of image paths, as one video."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
    else:
        paths = [os.fspath(p) for p in source]
    if not paths:
        raise VideoError(f"frame folder {source} is empty")
    idx = folder_indices(len(paths), cfg)
    frames = []
    for i in idx:
        try:
            with Image.open(paths[i]) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except Exception as e:  # PIL raises several unrelated types for unreadable files
            raise VideoError(f"cannot read video frame {paths[i]}: {type(e).__name__}: {e}") from e
    return _finish(frames, idx / cfg.folder_fps, cfg.folder_fps, cfg)


def _open_video(path: str):
    try:
        import av
    except ImportError:
        raise VideoError("reading video files needs PyAV: pip install av") from None
    try:
        container = av.open(path)
    except Exception as e:  # av.error.* / OSError
        raise VideoError(f"cannot open video file {path}: {type(e).__name__}: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream")
    return container


def _decode(path: str, wanted: np.ndarray | None):
    """Decode the first video stream; keep frames at `wanted` indices (None: count only). Returns (frames, count)."""
    container = _open_video(path)
    keep = set(int(i) for i in wanted) if wanted is not None else set()
    got: dict[int, np.ndarray] = {}
    n = 0
    try:
        for frame in container.decode(video=0):
            if n in keep:
                got[n] = frame.to_ndarray(format="rgb24")
            n += 1
    except Exception as e:
        raise VideoError(f"cannot decode video file {path} (after {n} frames): {type(e).__name__}: {e}") from e
    finally:
        container.close()
    return got, n


def read_video_file(path, cfg: VideoSamplingConfig = VideoSamplingConfig()) -> Video:
    """Decode a video file with PyAV and sample / resize / pad its frames as the release does."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"video file not found: {path}")
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        src_frames = int(stream.frames or 0)
        rate = stream.average_rate or stream.guessed_rate
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    finally:
        container.close()
    if src_frames <= 0:  # the container does not say: count by decoding
        _, src_frames = _decode(path, None)
        if src_frames == 0:
            raise VideoError(f"video file {path} has no frames")
    fps = float(rate) if rate else (src_frames / duration if duration else 0.0)
    if fps <= 0:
        raise VideoError(f"video file {path} states no frame rate")
    idx, smp_fps = sample_indices(src_frames, fps, cfg)
    got, n = _decode(path, idx)
    if n == 0:
        raise VideoError(f"video file {path} has no frames")
    if n < src_frames:  # the container overstated its length: sample again over the frames that exist
        idx, smp_fps = sample_indices(n, fps, cfg)
        got, n = _decode(path, idx)
    return _finish([got[int(i)] for i in idx], np.arange(len(idx)) / smp_fps, smp_fps, cfg)


def load_video(source, cfg: VideoSamplingConfig = VideoSamplingConfig()) -> Video:
    """A video file path, a folder of frames, a list of frame image paths, or a ready `Video`."""
    if isinstance(source, Video):
        return source
    if isinstance(source, (list, tuple)):
        return read_frame_folder(source, cfg)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        path = path[len("file://"):] if path.startswith("file://") else path
        return read_frame_folder(path, cfg) if os.path.isdir(path) else read_video_file(path, cfg)
    raise VideoError(f"unsupported video input {type(source).__name__}: give a file path, a frame folder, a list "
                     "of frame paths, or a Video (see video_from_frames)")


# --- Video -> patch rows ------------------------------------------------------------------------------------------


def process_video(video: Video, cfg: ProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int], list[float]]:
    """Official image processor on video frames (no resize: frames are already sized): rescale, normalise,
    patchify. Returns (float32 [t * h * w, patch_dim], (t, h, w) in patches, one time stamp per temporal patch)."""
    frames = _check_frames(video.frames)
    if frames.shape[0] % cfg.temporal_patch_size:
        raise VideoError(f"{frames.shape[0]} frames are not a multiple of the temporal patch "
                         f"{cfg.temporal_patch_size}; load videos with load_video")
    if len(video.timestamps) != frames.shape[0]:
        raise VideoError(f"{len(video.timestamps)} time stamps for {frames.shape[0]} frames")
    pixels = rescale_normalize(frames, cfg)  # [T, H, W, 3] float32
    rows, grid = patchify(pixels.transpose(0, 3, 1, 2), cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size)
    return rows, grid, patch_timestamps(video.timestamps, cfg.temporal_patch_size)

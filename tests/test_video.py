"""Video input: the release's sampling / sizing / time-stamp rules (numbers worked out by hand from
bailingmm_utils_video.py and image_processing_bailingmm2.py), decoding of a synthetic video made here, bad input."""

import math

import numpy as np
import pytest
from PIL import Image

from ming_jax.processors import video as V
from ming_jax.processors.image import ProcessorConfig

CFG = V.VideoSamplingConfig()


# --- pure rules ---------------------------------------------------------------------------------------------------


def test_release_constants():
    assert CFG.max_frames == 170  # 3072 tokens * 2 frames * 4 (oversampling) // 144 patches per frame
    assert (CFG.min_pixels, CFG.total_pixels) == (131072, 12582912)
    assert V.VideoSamplingConfig.for_processor(ProcessorConfig.ming_flash_omni_2()) == CFG


@pytest.mark.parametrize("src_frames, src_fps, n, fps", [
    (300, 30.0, 20, 2.0),  # 10 s at 30 fps: 2 frames per second
    (25, 10.0, 5, 2.0),  # 2.5 s: int(5.0 + 0.5) = 5
    (10, 1.0, 10, 1.0),  # slower than 2 fps: every frame, at the source rate
    (31, 30.0, 2, 2 / 31 * 30),  # ~1 s: int(2.07 + 0.5) = 2
    (6000, 30.0, 170, 170 / 6000 * 30),  # 200 s: capped at 170 frames
    (1, 30.0, 1, 30.0),  # a single frame still gives one sample
])
def test_sample_indices(src_frames, src_fps, n, fps):
    idx, rate = V.sample_indices(src_frames, src_fps, CFG)
    assert len(idx) == n and rate == pytest.approx(fps)
    assert idx[0] == 0 and idx[-1] == src_frames - 1 and np.all(np.diff(idx) >= 0)
    # numpy's linspace(..., dtype=int) truncates toward zero
    assert idx.tolist() == [int(x) for x in np.linspace(0, src_frames - 1, n)]


def test_sample_indices_examples():
    assert V.sample_indices(25, 10.0, CFG)[0].tolist() == [0, 6, 12, 18, 24]
    assert V.sample_indices(300, 30.0, CFG)[0][:4].tolist() == [0, 15, 31, 47]
    # an implausible container rate is clamped into [1, 240] first (0.5 fps -> 1 fps)
    assert V.sample_indices(10, 0.5, CFG)[1] == 1.0


def test_folder_indices():
    assert V.folder_indices(8, CFG).tolist() == list(range(8))  # even count <= 256: every frame
    assert V.folder_indices(7, CFG).tolist() == [0, 1, 2, 3, 4, 6]  # floored to the temporal patch
    assert V.folder_indices(3, CFG).tolist() == [0, 2]
    assert len(V.folder_indices(300, CFG)) == 256
    with pytest.raises(V.VideoError, match="at least 2 frames"):
        V.folder_indices(1, CFG)


@pytest.mark.parametrize("hw, n, want", [
    ((48, 64), 5, (320, 448)),  # too small: scaled up to >= 131072 pixels (ceil to 32)
    ((1080, 1920), 20, (832, 1472)),  # budget 12582912 / 20 * 2 pixels: scaled down (floor to 32)
    ((1080, 1920), 170, (288, 512)),  # budget max(148034, 137625.6)
    ((480, 640), 8, (480, 640)),  # already multiples of 32 and within the budget
])
def test_frame_size(hw, n, want):
    h, w = V.frame_size(*hw, n, CFG)
    assert (h, w) == want
    assert h % 32 == 0 and w % 32 == 0 and h * w >= CFG.min_pixels


def test_frame_size_rejects_degenerate_frames():
    with pytest.raises(V.VideoError, match="elongated"):
        V.frame_size(2, 1000, 4, CFG)
    with pytest.raises(V.VideoError, match="empty side"):
        V.frame_size(0, 10, 4, CFG)


def test_padding_and_patch_timestamps():
    frames = np.arange(5)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    padded, ts = V.pad_to_multiple(frames.astype(np.uint8), np.arange(5) / 2.0, 2)
    assert padded.shape[0] == 6 and (padded[5] == padded[4]).all()
    assert ts.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]  # the padding frame repeats the last stamp
    assert V.patch_timestamps(ts, 2) == [0.25, 1.25, 2.0]
    # Python's format rounds half to even on the binary value: 0.25 -> "0.2", 1.25 -> "1.2"
    assert [V.timestamp_text(s) for s in (0.25, 1.25, 2.0, 12.75)] == [
        "<0.2 seconds>", "<1.2 seconds>", "<2.0 seconds>", "<12.8 seconds>"]
    with pytest.raises(V.VideoError, match="multiple of the temporal patch"):
        V.patch_timestamps([0.0, 1.0, 2.0], 2)


# --- decoding a synthetic video -------------------------------------------------------------------------------------


def _write_video(path, frames, fps):
    av = pytest.importorskip("av", reason="PyAV (pip install av) decodes video files")
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _gray_frames(n, h=48, w=64):
    return np.stack([np.full((h, w, 3), 10 * i, np.uint8) for i in range(n)])


def test_read_video_file(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, _gray_frames(25), 10)  # 2.5 s at 10 fps
    v = V.load_video(str(path))
    # 5 frames sampled (indices 0, 6, 12, 18, 24 at 2 fps), padded to 6; sized 320 x 448 (see test_frame_size)
    assert v.frames.shape == (6, 320, 448, 3) and v.frames.dtype == np.uint8
    assert v.timestamps.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0] and v.fps == 2.0
    means = v.frames.reshape(6, -1).mean(axis=1)
    assert np.allclose(means, [0, 60, 120, 180, 240, 240], atol=5)  # lossy codec: near the source values
    rows, grid, ts = V.process_video(v, ProcessorConfig.ming_flash_omni_2())
    assert grid == (3, 20, 28) and rows.shape == (3 * 20 * 28, 3 * 2 * 16 * 16) and rows.dtype == np.float32
    assert ts == [0.25, 1.25, 2.0]
    assert V.load_video("file://" + str(path)).frames.shape == v.frames.shape


def test_video_from_frames_matches_file_rules():
    v = V.video_from_frames(_gray_frames(25), fps=10.0)
    assert v.frames.shape == (6, 320, 448, 3) and v.timestamps.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert [int(f.mean()) for f in v.frames] == [0, 60, 120, 180, 240, 240]  # exactly the sampled frames


def test_frame_folder(tmp_path):
    frames = _gray_frames(7, 64, 64)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{i:03d}.png")
    small = V.VideoSamplingConfig(min_pixels=64 * 64)
    v = V.load_video(str(tmp_path), small)
    # 7 frames -> 6 kept (0, 1, 2, 3, 4, 6) at the folder rate of 2 fps; 64 x 64 is a valid size already
    assert v.frames.shape == (6, 64, 64, 3)
    assert v.timestamps.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    assert [int(f.mean()) for f in v.frames] == [0, 10, 20, 30, 40, 60]
    same = V.load_video(sorted(str(p) for p in tmp_path.iterdir()), small)
    assert (same.frames == v.frames).all()


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_videos(tmp_path):
    with pytest.raises(V.VideoError, match="not found"):
        V.load_video(str(tmp_path / "missing.mp4"))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 10)
    pytest.importorskip("av", reason="PyAV (pip install av) decodes video files")
    with pytest.raises(V.VideoError, match="cannot open video file"):
        V.load_video(str(garbage))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(V.VideoError, match="is empty"):
        V.load_video(str(empty))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"broken")
    with pytest.raises(V.VideoError, match="cannot read video frame"):
        V.load_video(str(folder))
    with pytest.raises(V.VideoError, match="uint8"):
        V.video_from_frames(np.zeros((4, 8, 8, 3), np.float32), fps=2.0)
    with pytest.raises(V.VideoError, match="empty"):
        V.video_from_frames(np.zeros((0, 8, 8, 3), np.uint8), fps=2.0)
    with pytest.raises(V.VideoError, match="frame rate"):
        V.video_from_frames(np.zeros((4, 8, 8, 3), np.uint8), fps=0)
    with pytest.raises(V.VideoError, match="unsupported video input"):
        V.load_video(12)


def test_process_video_checks_its_input():
    v = V.video_from_frames(_gray_frames(4), fps=2.0)
    odd = V.Video(v.frames[:3], v.timestamps[:3], v.fps)
    with pytest.raises(V.VideoError, match="multiple of the temporal patch"):
        V.process_video(odd, ProcessorConfig.ming_flash_omni_2())
    assert math.isclose(v.fps, 2.0)

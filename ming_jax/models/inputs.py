"""Placing image / video / audio features into the LLM sequence (host side, numpy).

Given token ids with placeholder tokens and the encoders' outputs, `prepare` returns everything the jitted backbone
needs, as the official `BailingMoeV2Model.forward` computes it internally:
* where each continuous feature row goes (image / video rows fill the `<imagePatch>` / `<framePatch>` tokens in
  order; audio rows fill the placeholder spans `(start, length)` of each batch row, truncated to the span);
* the 3-D (t, h, w) "video rope" position ids and the per-row decode offset `rope_deltas`
  (`get_t_scale_rope_index` of the release with scale_factor 2 and no absolute time);
* each token's modality for the MultiRouter (vision = image/video patch tokens, audio = placeholder spans; everything
  else, including `<image>`, `</image>` and timestamp tokens, is text). Masks are only built when features are given,
  as in the release.
Bad inputs (placeholder counts that disagree with the features or grids, spans outside the sequence, ids outside the
vocabulary) raise `ValueError` naming the problem.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ming_jax.config.llm import LLMConfig
from ming_jax.config.modality import AUDIO, TEXT, VISION

T_SCALE = 2.0  # the release calls get_t_scale_rope_index with scale_factor=2.0


@dataclasses.dataclass
class MultimodalInputs:
    """The official LLM forward's multimodal keyword arguments, as arrays."""

    image_embeds: np.ndarray | None = None  # [N_img, D] rows for <imagePatch> tokens, batch order
    video_embeds: np.ndarray | None = None  # [N_vid, D] rows for <framePatch> tokens
    audio_embeds: np.ndarray | None = None  # [B, L, D] per batch row, clips concatenated
    audio_lengths: np.ndarray | None = None  # [B, N] valid rows of each clip
    audio_spans: np.ndarray | None = None  # [B, N, 2] (start, length) of each audio placeholder span
    image_grid_thw: np.ndarray | None = None  # [n_images, 3] in 16px patches, before the 2x2 merge
    video_grid_thw: np.ndarray | None = None  # [n_videos or n_frames, 3]

    @property
    def has_features(self) -> bool:
        return any(x is not None for x in (self.image_embeds, self.video_embeds, self.audio_embeds))


@dataclasses.dataclass
class Prepared:
    input_ids: np.ndarray  # [B, S] int32
    attention_mask: np.ndarray  # [B, S] bool
    positions: np.ndarray  # [3, B, S] int32
    rope_deltas: np.ndarray  # [B] int32: decode position = cache slot + rope_deltas
    modality: np.ndarray | None  # [B, S] int32 (TEXT / VISION / AUDIO), None when no features were given
    features: np.ndarray | None  # [N, D] rows to scatter into the embeddings
    feature_index: np.ndarray | None  # [N] int32 flat (b * S + s) destination of each row


def check_token_ids(input_ids: np.ndarray, vocab_size: int) -> None:
    bad = np.argwhere((input_ids < 0) | (input_ids >= vocab_size))
    if bad.size:
        b, s = bad[0]
        raise ValueError(f"token id {int(input_ids[b, s])} at (batch {b}, position {s}) is outside the vocabulary "
                         f"[0, {vocab_size}) ({len(bad)} such ids)")


def prepare(cfg: LLMConfig, input_ids, attention_mask=None, mm: MultimodalInputs | None = None) -> Prepared:
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    input_ids = input_ids.astype(np.int32)
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones((b, s), bool)
    attention_mask = np.asarray(attention_mask).astype(bool)
    if attention_mask.shape != (b, s):
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(b, s)}")
    if not attention_mask.any(axis=1).all():
        raise ValueError(f"batch rows {np.flatnonzero(~attention_mask.any(axis=1)).tolist()} have no real token")
    check_token_ids(np.where(attention_mask, input_ids, 0), cfg.vocab_size)
    mm = mm or MultimodalInputs()

    image_grid = _grid(mm.image_grid_thw, "image_grid_thw")
    video_grid = _grid(mm.video_grid_thw, "video_grid_thw")
    if video_grid is not None and cfg.use_interleaved_frame_timestamp:
        video_grid = np.repeat(video_grid, video_grid[:, 0], axis=0)  # one t=1 row per temporal patch
        video_grid[:, 0] = 1
    if image_grid is not None or video_grid is not None:
        positions, deltas = _vision_positions(cfg, input_ids, attention_mask, image_grid, video_grid)
    else:
        positions, deltas = _text_positions(attention_mask)

    modality = features = index = None
    if mm.has_features and s > 1:
        modality = np.full((b, s), TEXT, np.int32)
        rows, dests = [], []
        for emb, token, name in ((mm.image_embeds, cfg.image_patch_token, "image"),
                                 (mm.video_embeds, cfg.video_patch_token, "video")):
            if emb is None:
                continue
            emb = np.asarray(emb)
            emb = emb.reshape(-1, emb.shape[-1])
            where = np.flatnonzero((input_ids == token) & attention_mask)
            if len(where) != emb.shape[0]:
                raise ValueError(f"{name} features and {name} placeholder tokens do not match: {len(where)} "
                                 f"<{name} patch> tokens (id {token}), {emb.shape[0]} feature rows")
            rows.append(emb)
            dests.append(where)
        vision = np.isin(input_ids, [cfg.image_patch_token, cfg.video_patch_token]) & attention_mask
        modality[vision] = VISION
        if mm.audio_embeds is not None:
            a_rows, a_dest, a_mask = _audio_plan(mm, b, s)
            if (a_mask & vision).any():
                raise ValueError("an audio placeholder span overlaps image / video patch tokens")
            modality[a_mask] = AUDIO
            rows.append(a_rows)
            dests.append(a_dest)
        if rows:
            features = np.concatenate([r.astype(np.float32, copy=False) for r in rows])
            index = np.concatenate(dests).astype(np.int32)
    return Prepared(input_ids, attention_mask, positions.astype(np.int32), deltas.astype(np.int32), modality,
                    features, index)


def _grid(g, name):
    if g is None:
        return None
    g = np.asarray(g, dtype=np.int64).reshape(-1, 3) if np.size(g) else np.zeros((0, 3), np.int64)
    if (g <= 0).any():
        raise ValueError(f"{name} has non-positive entries: {g.tolist()}")
    return g.copy()


def _text_positions(attention_mask):
    """1-D positions counting only real tokens (padding gets 1, as the release), on all three rows."""
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask, pos, 1)
    deltas = pos.max(axis=1) + 1 - attention_mask.shape[1]
    return np.broadcast_to(pos, (3,) + pos.shape).copy(), deltas


def _vision_positions(cfg, input_ids, attention_mask, image_grid, video_grid):
    m = cfg.spatial_merge_size
    img_tok, vid_tok = cfg.image_patch_token, cfg.video_patch_token
    start_tok = cfg.image_start_token if cfg.use_interleaved_frame_timestamp else cfg.video_start_token
    b, s = input_ids.shape
    positions = np.ones((3, b, s), np.int64)
    deltas = np.zeros(b, np.int64)
    img_i = vid_i = 0
    for row in range(b):
        ids = input_ids[row][attention_mask[row]]
        after_start = lambda start: ids[np.flatnonzero(ids[:-1] == start) + 1]  # noqa: E731
        n_img = int((after_start(cfg.image_start_token) == img_tok).sum()) if image_grid is not None else 0
        n_vid = int((after_start(start_tok) == vid_tok).sum()) if video_grid is not None else 0
        pieces, st = [], 0
        left_img, left_vid = n_img, n_vid
        next_t = lambda: int(pieces[-1][0].max()) + 1 if pieces else 0  # noqa: E731
        for _ in range(n_img + n_vid):
            ed_img = _find(ids, img_tok, st) if left_img > 0 else len(ids) + 1
            ed_vid = _find(ids, vid_tok, st) if left_vid > 0 else len(ids) + 1
            if ed_img < ed_vid:
                grid, token, ed = _take(image_grid, img_i, "image"), img_tok, ed_img
                img_i, left_img = img_i + 1, left_img - 1
            else:
                grid, token, ed = _take(video_grid, vid_i, "video"), vid_tok, ed_vid
                vid_i, left_vid = vid_i + 1, left_vid - 1
            t, h, w = int(grid[0]), int(grid[1]), int(grid[2])
            if h % m or w % m:
                raise ValueError(f"grid {grid.tolist()} is not divisible by the spatial merge size {m}")
            gh, gw = h // m, w // m
            n_tok = t * gh * gw
            if ed > len(ids) or ed + n_tok > len(ids) or not (ids[ed:ed + n_tok] == token).all():
                raise ValueError(f"batch row {row}: grid {grid.tolist()} needs {n_tok} consecutive patch tokens "
                                 f"(id {token}) at position {ed}, the prompt has fewer")
            s0 = next_t()
            n_text = ed - st
            pieces.append(np.broadcast_to(np.arange(n_text) + s0, (3, n_text)))
            ti = np.repeat(np.arange(t), gh * gw)
            hi = np.tile(np.repeat(np.arange(gh), gw), t) - (gh - 1) // 2
            wi = np.tile(np.arange(gw), t * gh) - (gw - 1) // 2
            tpos = (ti * T_SCALE).astype(np.int64) + n_text + s0
            pieces.append(np.stack([tpos, hi + tpos, wi + tpos]))
            st = ed + n_tok
        if st < len(ids):
            n_text = len(ids) - st
            pieces.append(np.broadcast_to(np.arange(n_text) + next_t(), (3, n_text)))
        pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, row, attention_mask[row]] = pos
        deltas[row] = pos[0].max() + 1 - s
    for grid, used, name in ((image_grid, img_i, "image"), (video_grid, vid_i, "video")):
        if grid is not None and used != len(grid):
            raise ValueError(f"{len(grid)} {name} grid rows given but the prompt holds {used} {name} blocks")
    return positions, deltas


def _find(ids, token, start):
    hits = np.flatnonzero(ids[start:] == token)
    return int(hits[0]) + start if hits.size else len(ids) + 1


def _take(grid, i, name):
    if i >= len(grid):
        raise ValueError(f"the prompt holds more {name} blocks than the {len(grid)} rows of its grid_thw")
    return grid[i]


def _audio_plan(mm: MultimodalInputs, b: int, s: int):
    """Rows of the audio features, their flat destinations, and the audio router mask [B, S]."""
    emb = np.asarray(mm.audio_embeds)
    if mm.audio_spans is None or mm.audio_lengths is None:
        raise ValueError("audio features need audio_spans (placeholder_audio_loc_lens) and audio_lengths")
    spans = np.asarray(mm.audio_spans).reshape(b, -1, 2)
    lengths = np.asarray(mm.audio_lengths).reshape(b, -1)
    if emb.ndim != 3 or emb.shape[0] != b:
        raise ValueError(f"audio_embeds must be [batch={b}, L, D], got {emb.shape}")
    if lengths.shape[1] != spans.shape[1]:
        raise ValueError(f"audio_lengths {lengths.shape} and audio_spans {spans.shape} disagree on the clip count")
    rows, dest = [], []
    mask = np.zeros((b, s), bool)
    for i in range(b):
        src = 0
        for j in range(spans.shape[1]):
            start, length = int(spans[i, j, 0]), int(spans[i, j, 1])
            if length <= 0:
                break  # padding of the clip list, as in the release
            if start < 0 or start + length > s:
                raise ValueError(f"audio span (start={start}, length={length}) of batch row {i} lies outside the "
                                 f"sequence of length {s}")
            feat = int(lengths[i, j])
            n = min(feat, length)  # the release truncates features longer than their span
            if src + n > emb.shape[1]:
                raise ValueError(f"audio clip {j} of batch row {i} needs feature rows {src}..{src + n} but "
                                 f"audio_embeds has {emb.shape[1]}")
            rows.append(emb[i, src:src + n])
            dest.append(i * s + start + np.arange(n))
            mask[i, start:start + length] = True
            src += feat
    d = emb.shape[-1]
    return (np.concatenate(rows) if rows else np.zeros((0, d), emb.dtype),
            np.concatenate(dest) if dest else np.zeros((0,), np.int64), mask)


def left_pad(prep: Prepared, length: int, pad_id: int = 0) -> Prepared:
    """The same prompts with `length - S` extra padding slots on the left (e.g. to bucket shapes for jit).

    Padding slots are masked out and get position 1 (as the release gives padding); `rope_deltas` shifts so that
    decode positions (cache slot + rope_deltas) are unchanged, and feature destinations move with their tokens.
    """
    b, s = prep.input_ids.shape
    p = length - s
    if p < 0:
        raise ValueError(f"cannot left-pad a length-{s} prompt to {length}")
    if p == 0:
        return prep
    pad2 = lambda a, value: np.pad(a, ((0, 0), (p, 0)), constant_values=value)  # noqa: E731
    index = None
    if prep.feature_index is not None:
        row, col = np.divmod(prep.feature_index, s)
        index = (row * length + col + p).astype(np.int32)
    return Prepared(pad2(prep.input_ids, pad_id), pad2(prep.attention_mask, False),
                    np.pad(prep.positions, ((0, 0), (0, 0), (p, 0)), constant_values=1),
                    (prep.rope_deltas - p).astype(np.int32),
                    None if prep.modality is None else pad2(prep.modality, TEXT), prep.features, index)


@dataclasses.dataclass
class OmniInputs:
    """The official omni model's inputs for one batch (the processor's `BatchFeature`), as numpy arrays."""

    input_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray | None = None  # [B, S] bool (None: every token real)
    pixel_values: np.ndarray | None = None  # [N_img_patches, C*Tp*P*P] float32
    image_grid_thw: np.ndarray | None = None  # [n_images, 3] int64
    pixel_values_videos: np.ndarray | None = None  # [N_vid_patches, C*Tp*P*P]
    video_grid_thw: np.ndarray | None = None  # [n_frames_or_videos, 3]: one t=1 row per temporal patch (interleaved)
    audio_feats: np.ndarray | None = None  # [B, T, n_mels] clips back to back
    audio_feats_lengths: np.ndarray | None = None  # [B, N] mel frames per clip
    audio_placeholder_loc_lens: np.ndarray | None = None  # [B, N, 2] (start, length) of each audio patch span
    text: str | None = None  # the expanded prompt text (for inspection)

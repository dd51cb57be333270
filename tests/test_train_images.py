"""Images in training: the grain pipeline packs them (`train.data.MediaConfig`) and the train step runs the vision
tower on the packed patches (`VisionTransformer.packed`). The reference is independent of the packing: each
document rendered alone, its images through the static-grid tower (grouped attention, `vision_layout`), its 3-D
positions and feature rows from `inputs.prepare` (the inference path), one unpacked row per document."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ming_jax.config.omni import OmniConfig
from ming_jax.layers.norms import l2_normalize
from ming_jax.models import inputs as multimodal
from ming_jax.models import omni
from ming_jax.parity.numerics import TOLERANCES
from ming_jax.processors import prompt
from ming_jax.processors.image import ProcessorConfig
from ming_jax.train import batch as batch_lib
from ming_jax.train import data as D
from ming_jax.train import step as S
from ming_jax.train.config import TrainConfig

SEQ, ROWS, SLOTS = 256, 2, 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 48), (64, 32), (32, 32)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    img = lambda i: {"type": "image", "image": f"im{i}.png"}  # noqa: E731
    text = lambda s: {"type": "text", "text": s}  # noqa: E731
    records = [
        {"messages": [{"role": "HUMAN", "content": [text("see "), img(0)]}, {"role": "ASSISTANT", "content": "red"}]},
        {"messages": [{"role": "HUMAN", "content": "hi"}, {"role": "ASSISTANT", "content": "yo"}]},
        {"messages": [{"role": "HUMAN", "content": [img(1), text("and"), img(2), text("?")]},
                      {"role": "ASSISTANT", "content": "two"}]},
        {"messages": [{"role": "HUMAN", "content": [img(2)]}, {"role": "ASSISTANT", "content": "b"}]},
    ]
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = OmniConfig.tiny().replace(audio=None)
    media = D.MediaConfig(cfg.llm, cfg.vision, ProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64), SLOTS)
    spec = {"stand_in": prompt.tiny_special_ids(cfg.llm)}
    tc = D.TrainData(paths=(str(path),), seq_len=SEQ, batch_size=ROWS, shuffle=False, media=media)
    batch = next(D.make_iterator(tc, spec))
    return cfg, media, spec, str(path), batch


def _documents(path, media, spec):
    tok = D.tokenizer_from_spec(spec)
    return [D.render_images(r, tok, media, where=w) for w, r in D.read_conversations([path])]


def test_packed_batch_holds_each_document_exactly(setup):
    cfg, media, spec, path, batch = setup
    docs = _documents(path, media, spec)
    S.check_batch(batch, vocab_size=cfg.llm.vocab_size)
    found = 0
    for b in range(ROWS):
        seg = batch["segment_ids"][b]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            ids = batch["input_ids"][b, where]
            (tokens, mask, pixels, grids), = [d for d in docs if np.array_equal(d[0][:-1], ids)]
            found += 1
            prep = multimodal.prepare(cfg.llm, tokens[None], None, multimodal.MultimodalInputs(
                image_grid_thw=np.asarray(grids).reshape(-1, 3) if grids else None))
            np.testing.assert_array_equal(batch["positions"][:, b, where], prep.positions[:, 0, :-1])
            patch_tok = np.flatnonzero(tokens[:-1] == cfg.llm.image_patch_token)
            vi = batch["vision_index"][b]
            dest = [int(i) for i in vi if i < SEQ and i in set(where.tolist())]
            np.testing.assert_array_equal(np.asarray(dest) - where[0] if dest else np.zeros(0), patch_tok)
            np.testing.assert_array_equal(batch["modality"][b, where], (tokens[:-1] == cfg.llm.image_patch_token) * 1)
    assert found == len(docs) and batch["segment_ids"].max() >= 2  # every document, some rows hold two
    assert batch["pixel_values"].shape == (ROWS, SLOTS, cfg.vision.patch_dim)


def test_step_with_the_tower_inside_equals_the_static_tower_path(setup):
    """Loss and every gradient (LLM, projector and vision tower) of the packed batch equal those of the reference:
    the same documents as separate rows, images through `VisionTransformer.__call__` (static grid, grouped
    attention), positions and feature rows from `inputs.prepare`."""
    cfg, media, spec, path, batch = setup
    model = omni.create(cfg, seed=3)
    tc = TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=2, bias_update_rate=0.0)
    graphdef, params, frozen = S.split_model(model, tc)
    grad_fn = S.make_grad_fn(graphdef, tc)
    packed = {k: jnp.asarray(v) for k, v in batch.items()}
    g, sums = jax.jit(grad_fn)(params, frozen, packed)

    # The documents of the packed batch, one row each (padded to SEQ + 1 tokens).
    docs = [d for d in _documents(path, media, spec)
            if any(np.array_equal(d[0][:-1], batch["input_ids"][b, batch["segment_ids"][b] == s])
                   for b in range(ROWS) for s in range(1, batch["segment_ids"][b].max() + 1))]
    n = SEQ + 1
    ids = np.zeros((len(docs), n), np.int32)
    am = np.zeros((len(docs), n), bool)
    labels = np.full((len(docs), n), batch_lib.IGNORE, np.int64)
    for i, (tokens, mask, _, _) in enumerate(docs):
        ids[i, :len(tokens)], am[i, :len(tokens)] = tokens, True
        labels[i, :len(tokens)] = np.where(mask, tokens, batch_lib.IGNORE)
    pixels = [d[2] for d in docs if d[3]]
    grids = [g for d in docs for g in d[3]]
    unit = cfg.vision.spatial_merge_size ** 2
    rows = sum(p.shape[0] for p in pixels) // unit
    prep = multimodal.prepare(cfg.llm, ids, am, multimodal.MultimodalInputs(
        image_embeds=np.zeros((rows, cfg.llm.hidden_size), np.float32), image_grid_thw=np.asarray(grids)))
    ref = {k: jnp.asarray(v) for k, v in batch_lib.from_labels(prep, labels).items()}
    all_pixels = jnp.asarray(np.concatenate(pixels))
    grid = tuple(tuple(int(v) for v in g) for g in grids)
    ref_tc = tc

    def ref_grad(params, frozen):
        def loss(params):
            m = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))
            feats = l2_normalize(m.vision_proj(m.vision(all_pixels, grid)))
            nll, _, _, _ = S._forward_losses(m, dict(ref, features=feats), ref_tc)
            return nll / jnp.maximum(ref["loss_mask"].sum(), 1.0)
        return jax.value_and_grad(loss)(params)

    ref_loss, ref_g = jax.jit(ref_grad)(params, frozen)
    assert float(sums["denom"]) == float(ref["loss_mask"].sum()) > 0
    np.testing.assert_allclose(float(sums["total"]), float(ref_loss), rtol=1e-5)
    tol = TOLERANCES["float32"]
    flat, flat_ref = nnx.to_flat_state(g), dict(nnx.to_flat_state(ref_g))
    vision_grads = 0
    for key, value in flat:
        a, r = np.asarray(value.get_value() if hasattr(value, "get_value") else value), np.asarray(
            flat_ref[key].get_value() if hasattr(flat_ref[key], "get_value") else flat_ref[key])
        scale = max(np.abs(r).max(), 1e-30)
        assert np.abs(a - r).max() <= tol * scale, (key, np.abs(a - r).max(), scale)
        vision_grads += key[0] == "vision" and np.abs(r).max() > 0
    assert vision_grads > 10  # the tower's gradients are not all zero: the check covers them


def test_data_errors_name_the_problem(tmp_path, setup):
    cfg, media, spec, _, _ = setup
    bad = [({"messages": [{"role": "HUMAN", "content": [{"type": "image", "image": "nope.png"}]},
                          {"role": "ASSISTANT", "content": "x"}]}, "image file not found"),
           ({"messages": [{"role": "HUMAN", "content": "x"},
                          {"role": "ASSISTANT", "content": [{"type": "image", "image": "a.png"}]}]}, "HUMAN messages"),
           ({"messages": [{"role": "HUMAN", "content": [{"type": "video", "video": "a.mp4"}]},
                          {"role": "ASSISTANT", "content": "x"}]}, "not supported yet")]
    (tmp_path / "a.png").write_bytes(b"not a png")
    for record, message in bad:
        p = tmp_path / "d.jsonl"
        p.write_text(json.dumps(record) + "\n")
        with pytest.raises(D.DataError, match=message):
            D.read_conversations([p])
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "HUMAN", "content": [{"type": "image", "image": "a.png"}]},
                                          {"role": "ASSISTANT", "content": "x"}]}) + "\n")
    with pytest.raises(D.DataError, match=r"d.jsonl:1: the conversation holds images, but TrainData.media is None"):
        D.make_iterator(D.TrainData(paths=(str(p),), seq_len=64, batch_size=1), spec)
    with pytest.raises(D.DataError, match="cannot read image"):
        next(D.make_iterator(D.TrainData(paths=(str(p),), seq_len=64, batch_size=1, media=media), spec))
    with pytest.raises(D.DataError, match="patches_per_row"):
        D.MediaConfig(cfg.llm, cfg.vision, patches_per_row=6)

"""Z-Image DiT: golden parity (text-to-image and editing), an independent reference (diffusers'
`ZImageTransformer2DModel` at another tiny config, captions of different lengths, a non-square latent, editing
emulated by the concatenated frame), the name table both ways, one compilation per shape, bad input, bfloat16.

Models are built abstractly and filled through `ming_jax.weights.dit.dit_table`. Random reference weights are named
by that table and loaded into diffusers with `strict=True`, so the table's names are checked against diffusers' own
state dict too.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax.config.base import ConfigError
from ming_jax.config.dit import DiTConfig
from ming_jax.config.runtime import Runtime
from ming_jax.models.image_gen.dit import ZImageDiT, dit_forward, sequence_layout
from ming_jax.parity import golden, numerics
from ming_jax.parity.cases import image_dit
from ming_jax.sharding import logical_axes
from ming_jax.sharding.rules import ShardingRules
from ming_jax.weights import WeightError, export_arrays, export_state_dict, load_state_dict, param_shapes
from ming_jax.weights.dit import dit_table

# A config unlike the golden one in every size: 3 channels, 3 heads of 16, two patch pairs, 2 refiner layers,
# other eps / theta / t_scale.
REF_CFG = DiTConfig(all_patch_size=(2, 1), all_f_patch_size=(1, 1), in_channels=3, dim=48, n_layers=2,
                    n_refiner_layers=2, n_heads=3, n_kv_heads=3, norm_eps=1e-6, qk_norm=True, cap_feat_dim=20,
                    rope_theta=100.0, t_scale=500.0, axes_dims=(4, 6, 6), axes_lens=(160, 24, 24))


def abstract_dit(cfg: DiTConfig, runtime: Runtime | None = None) -> ZImageDiT:
    return nnx.eval_shape(lambda: ZImageDiT(cfg, runtime, rngs=nnx.Rngs(0)))


def loaded_dit(cfg: DiTConfig, tensors, runtime: Runtime | None = None) -> ZImageDiT:
    return load_state_dict(abstract_dit(cfg, runtime), dit_table(cfg), tensors)


@pytest.fixture(scope="module")
def case(golden_dir):
    return golden.load_case(str(golden_dir / "image_dit"))


@pytest.fixture(scope="module")
def case_model(case):
    return image_dit.build(case.config, case.weights)


def _random_official(cfg: DiTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random official tensors for `cfg`, named by the table: norm scales 1 + N(0, 0.1), biases N(0, 0.05), pad
    tokens N(0, 1), matrices N(0, 1 / fan_in): no layer is zero or an identity by accident, so every term counts."""
    rng = np.random.default_rng(seed)
    zeros = {path: np.zeros(shape, np.float32) for path, shape in param_shapes(abstract_dit(cfg)).items()}
    shapes = {k: v.shape for k, v in export_arrays(dit_table(cfg), zeros).items()}
    out = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("pad_token"):
            v = rng.standard_normal(shape)
        elif name.endswith(".bias"):
            v = 0.05 * rng.standard_normal(shape)
        elif len(shape) == 1:
            v = 1 + 0.1 * rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = v.astype(np.float32)
    return out


# --- golden parity ------------------------------------------------------------------------------------------------


def test_golden_parity(case):
    rows = image_dit.run(case)
    assert {r.name for r in rows} == set(case.outputs)
    assert rows and numerics.all_ok(rows), numerics.report(rows)


def test_golden_integer_outputs_have_integer_dtypes(case, case_model):
    _, taps = dit_forward(case_model, case.inputs["a_x"], case.inputs["a_t"], case.inputs["a_cap_feats"], taps=True)
    assert np.asarray(taps["x_pos_ids"]).dtype == np.int32 and np.asarray(taps["cap_pos_ids"]).dtype == np.int32
    assert np.asarray(taps["x_pad_mask"]).dtype == np.bool_ and np.asarray(taps["cap_pad_mask"]).dtype == np.bool_


# --- independent reference: diffusers ---------------------------------------------------------------------------


def _diffusers_model(cfg: DiTConfig, tensors):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ref = diffusers.ZImageTransformer2DModel(**cfg.to_official()).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    return ref


@pytest.mark.torch
def test_matches_diffusers_with_captions_of_different_lengths():
    """Rows with captions of 20 and 45 tokens (padded to 32 and 64 slots: a per-row image position offset and
    batch padding in the caption stream), a non-square 6 x 10 latent, both configured patch pairs, t per row.
    Row 0's unused caption rows are NaN: they must not be read."""
    torch = pytest.importorskip("torch")
    cfg = REF_CFG
    tensors = _random_official(cfg, seed=1)
    ref = _diffusers_model(cfg, tensors)
    ours = loaded_dit(cfg, tensors)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, cfg.in_channels, 1, 6, 10)).astype(np.float32)
    t = np.array([0.25, 0.9], np.float32)
    lens = np.array([20, 45])
    caps = rng.standard_normal((2, 45, cfg.cap_feat_dim)).astype(np.float32)
    caps[0, 20:] = np.nan
    for patch in cfg.patch_pairs:
        with torch.no_grad():
            want = ref([torch.from_numpy(r) for r in x], torch.from_numpy(t),
                       [torch.from_numpy(caps[i, :n]) for i, n in enumerate(lens)], patch_size=patch[0],
                       f_patch_size=patch[1], return_dict=False)[0]
        got = dit_forward(ours, x, t, caps, cap_lens=lens, patch=patch)
        numerics.assert_close(f"out patch {patch}", got, np.stack([w.numpy() for w in want]))


@pytest.mark.torch
def test_editing_matches_diffusers_on_the_concatenated_frame():
    """Editing is the official text-to-image forward of [x ; ref_x] along F, frame 0 kept: diffusers (which has no
    ref_x) on the concatenated latent gives the reference."""
    torch = pytest.importorskip("torch")
    cfg = REF_CFG
    tensors = _random_official(cfg, seed=3)
    ref = _diffusers_model(cfg, tensors)
    ours = loaded_dit(cfg, tensors)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, cfg.in_channels, 1, 8, 4)).astype(np.float32)
    ref_x = rng.standard_normal((2, cfg.in_channels, 1, 8, 4)).astype(np.float32)
    caps = rng.standard_normal((2, 7, cfg.cap_feat_dim)).astype(np.float32)
    t = np.array([0.5, 0.5], np.float32)
    joined = np.concatenate([x, ref_x], axis=2)
    with torch.no_grad():
        want = ref([torch.from_numpy(r) for r in joined], torch.from_numpy(t), [torch.from_numpy(c) for c in caps],
                   return_dict=False)[0]
    got = dit_forward(ours, x, t, caps, ref_x=ref_x)
    assert got.shape == x.shape
    numerics.assert_close("editing out", got, np.stack([w.numpy() for w in want])[:, :, :1])


# --- layout ------------------------------------------------------------------------------------------------------


def test_layout_per_row_caption_padding():
    layout = sequence_layout((1, 2, 3), 2, 40, np.array([5, 33]), 32)
    assert layout.cap_valid.shape == (2, 64) and layout.x_pos.shape == (2, 32, 3)
    assert np.asarray(layout.cap_valid).sum(1).tolist() == [32, 64]
    assert np.asarray(layout.cap_pad).sum(1).tolist() == [27, 31]
    assert np.asarray(layout.x_pos)[:, 0, 0].tolist() == [33, 65]  # Lcap_pad + 1 + f, per row
    assert np.asarray(layout.x_pos)[:, 5].tolist() == [[33, 1, 2], [65, 1, 2]]
    assert not np.asarray(layout.x_pos)[:, 6:].any() and np.asarray(layout.x_pad)[:, 6:].all()
    assert np.asarray(layout.cap_src)[0, :40].tolist() == list(range(5)) + [4] * 27 + [0] * 8


# --- weights -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [DiTConfig.tiny(), REF_CFG, DiTConfig.tiny(qk_norm=False, n_refiner_layers=0),
                                 DiTConfig.z_image()], ids=["tiny", "ref", "no_qk_norm", "z_image"])
def test_table_covers_every_parameter(cfg):
    dit_table(cfg).check_coverage(param_shapes(abstract_dit(cfg)))


def test_load_export_round_trip_is_exact(case):
    model = loaded_dit(DiTConfig.from_official(case.config), case.weights)
    back = export_state_dict(model, dit_table(DiTConfig.from_official(case.config)))
    assert set(back) == set(case.weights)
    assert sum(int(np.prod(s)) for s in param_shapes(model).values()) == sum(v.size for v in case.weights.values())
    for name, value in case.weights.items():
        assert back[name].shape == value.shape and np.array_equal(back[name], value), name


def test_strict_loading_names_the_bad_tensor(case):
    cfg = DiTConfig.from_official(case.config)
    extra = dict(case.weights, **{"layers.7.ffn_norm1.weight": case.weights["layers.0.ffn_norm1.weight"]})
    with pytest.raises(WeightError, match="layers.7.ffn_norm1.weight"):
        loaded_dit(cfg, extra)
    missing = {k: v for k, v in case.weights.items() if k != "x_pad_token"}
    with pytest.raises(WeightError, match="x_pad_token"):
        loaded_dit(cfg, missing)


@pytest.mark.parametrize("cfg", [DiTConfig.tiny(), DiTConfig.z_image()], ids=["tiny", "z_image"])
def test_logical_axes_and_stacked_layers(cfg):
    """Every parameter names each dim with an axis the sharding rules know, none twice; blocks are stacked."""
    model = abstract_dit(cfg)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = logical_axes(var)
        assert len(axes) == var.get_value().ndim, path
        named = [a for a in axes if a is not None]
        assert len(named) == len(set(named)), f"{path}: logical axis used twice {axes}"
        assert set(named) <= set(ShardingRules.names()), f"{path}: {axes}"
    assert logical_axes(model.layers.attention.q_kernel) == ("layers", "embed", "heads", "head_dim")
    assert model.layers.attention.q_kernel.shape == (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.head_dim)


# --- config ------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_presets(case):
    cfg = DiTConfig.from_official(case.config)
    assert cfg.to_official() == case.config
    assert DiTConfig.from_official(cfg.to_official()) == cfg
    assert (cfg.head_dim, cfg.ffn_hidden, cfg.adaln_dim) == (32, 170, 64)
    big = DiTConfig.z_image()
    assert (big.dim, big.n_layers, big.head_dim, big.ffn_hidden, big.axes_lens) == (3840, 30, 128, 10240,
                                                                                   (1536, 512, 512))
    dumped = dict(big.to_official(), _class_name="ZImageTransformer2DModel", _diffusers_version="0.36.0")
    assert DiTConfig.from_official(dumped) == big
    assert DiTConfig.tiny(dim=96, n_heads=3).head_dim == 32


@pytest.mark.parametrize("mutate, match", [
    (dict(nheads=30), "nheads"),
    (dict(axes_dims=[8, 12, 14]), "head_dim"),
    (dict(dim=65), "multiple of n_heads"),
    (dict(all_f_patch_size=[1, 1]), "equal length"),
    (dict(axes_dims=[8, 12], axes_lens=[256, 64]), "3 entries"),
    (dict(axes_dims=[7, 13, 12]), "even"),
    (dict(_class_name="Lumina2Transformer2DModel"), "_class_name"),
])
def test_from_official_rejects_bad_configs(case, mutate, match):
    with pytest.raises(ConfigError, match=match):
        DiTConfig.from_official(dict(case.config, **mutate))


# --- behaviour ---------------------------------------------------------------------------------------------------


def test_forward_compiles_once_for_new_values(monkeypatch, case_model):
    """Repeated calls with the same shapes and new values trace the model once (shapes unlike any other test)."""
    traced = []
    call = ZImageDiT.__call__

    def counting(self, *a, **k):
        traced.append(1)
        return call(self, *a, **k)

    monkeypatch.setattr(ZImageDiT, "__call__", counting)
    rng = np.random.default_rng(5)
    cfg = case_model.cfg
    outs = []
    for _ in range(3):
        x = rng.standard_normal((3, cfg.in_channels, 1, 4, 6)).astype(np.float32)
        caps = rng.standard_normal((3, 9, cfg.cap_feat_dim)).astype(np.float32)
        outs.append(dit_forward(case_model, x, rng.uniform(size=3).astype(np.float32), caps,
                                cap_lens=rng.integers(1, 10, size=3)))
    assert len(traced) == 1
    assert not np.allclose(outs[0], outs[1])


def test_rows_do_not_see_each_other(case_model):
    """A row's output does not depend on the other rows of the batch (different caption lengths included)."""
    cfg = case_model.cfg
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, cfg.in_channels, 1, 4, 4)).astype(np.float32)
    caps = rng.standard_normal((2, 40, cfg.cap_feat_dim)).astype(np.float32)
    t = np.array([0.2, 0.6], np.float32)
    both = dit_forward(case_model, x, t, caps, cap_lens=np.array([40, 11]))
    alone = dit_forward(case_model, x[1:], t[1:], caps[1:, :11])
    numerics.assert_close("row 1 alone", np.asarray(both)[1:], alone)


@pytest.mark.parametrize("x_shape, cap_shape, kw, match", [
    ((2, 4, 1, 7, 12), (2, 16, 24), {}, "not divisible"),  # H odd with patch 2
    ((2, 4, 1, 8, 12), (2, 16, 20), {}, "cap_feat_dim=24"),
    ((2, 3, 1, 8, 12), (2, 16, 24), {}, r"\[B, 4, F, H, W\]"),
    ((2, 4, 8, 12), (2, 16, 24), {}, r"\[B, 4, F, H, W\]"),
    ((2, 4, 1, 8, 12), (3, 16, 24), {}, "cap_feats must be"),
    ((2, 4, 1, 8, 12), (2, 16, 24), dict(ref_x=np.zeros((2, 4, 1, 8, 10), np.float32)), "ref_x must be"),
    ((2, 4, 1, 8, 12), (2, 16, 24), dict(t=np.zeros(3, np.float32)), "t must be"),
    ((2, 4, 1, 8, 12), (2, 16, 24), dict(cap_lens=np.array([3, 17])), r"\[1, L=16\]"),
    ((2, 4, 1, 8, 12), (2, 16, 24), dict(cap_lens=np.array([3])), "cap_lens must be"),
    ((2, 4, 1, 8, 12), (2, 16, 24), dict(patch=(1, 1)), "not configured"),
    ((2, 4, 1, 8, 140), (2, 16, 24), {}, "axes_lens"),  # 70 columns > 64
    ((2, 4, 1, 8, 12), (2, 250, 24), {}, "axes_lens"),  # 256 caption slots + 1 frame > 256
])
def test_bad_input_raises(case_model, x_shape, cap_shape, kw, match):
    kw = dict(kw)
    t = kw.pop("t", np.zeros(x_shape[0], np.float32))
    with pytest.raises(ValueError, match=match):
        dit_forward(case_model, np.zeros(x_shape, np.float32), t, np.zeros(cap_shape, np.float32), **kw)


def test_bfloat16_run_is_close_to_float32(case):
    """bfloat16 parameters and compute on the golden editing case, against the float32 reference."""
    low = image_dit.build(case.config, case.weights, Runtime.bf16())
    out = dit_forward(low, case.inputs["b_x"], case.inputs["b_t"], case.inputs["b_cap_feats"],
                      ref_x=case.inputs["b_ref_x"])
    assert out.dtype == np.dtype("bfloat16") and bool(jnp.isfinite(out).all())
    numerics.assert_close("bf16 out", np.asarray(out, np.float32), case.outputs["b_out"], dtype="bfloat16")

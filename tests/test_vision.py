"""Vision tower: golden parity, name table, config, an independent `transformers` reference, bad input, and the
attention backends (splash through the dispatcher vs the grouped XLA path; the release-size TPU compile).

Models are built abstractly and filled through `ming_jax.weights.vision` (no random JAX init to compile); random
reference weights are made on the torch side and moved with the same table.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from ming_jax.parity import golden, numerics, run as parity
from ming_jax import weights
from ming_jax.config.base import ConfigError
from ming_jax.config.runtime import Runtime
from ming_jax.config.vision import VisionConfig
from ming_jax.sharding import logical_axes
from ming_jax.weights.vision import OMNI_PROJECTOR_PREFIX, OMNI_VISION_PREFIX, projector_table, vision_table
from ming_jax.models.vision import (VisionProjector, VisionTransformer, as_grid, image_features, vision_forward,
                                    vision_layout)

GOLDEN = "/work/shared/golden"
VISION_CASE = os.path.join(GOLDEN, "vision_encoder")
OMNI_CASE = os.path.join(GOLDEN, "full_mm_forward")
REFERENCE_CONFIG = "/work/shared/reference/config.json"


def abstract_tower(cfg: VisionConfig, use_deepstack: bool = True, runtime: Runtime | None = None,
                   segment_layout: str = "grouped") -> VisionTransformer:
    return nnx.eval_shape(lambda: VisionTransformer(cfg, runtime, use_deepstack=use_deepstack,
                                                    segment_layout=segment_layout, rngs=nnx.Rngs(0)))


def loaded_tower(cfg: VisionConfig, tensors, use_deepstack: bool = True, prefix: str = "",
                 runtime: Runtime | None = None, segment_layout: str = "grouped") -> VisionTransformer:
    model = abstract_tower(cfg, use_deepstack, runtime, segment_layout)
    weights.load_state_dict(model, vision_table(cfg, prefix), tensors)
    return model


@pytest.fixture(scope="module")
def case():
    return golden.load_case(VISION_CASE)


@pytest.fixture(scope="module")
def case_cfg(case):
    return VisionConfig.from_official(case.config)


# --- golden parity ------------------------------------------------------------------------------------------------


def test_golden_parity():
    rows = parity.run_case(VISION_CASE)
    assert rows and numerics.all_ok(rows), numerics.report(rows)


def sub_cases(case):
    return sorted(k[: -len("_pixel_values")] for k in case.inputs if k.endswith("_pixel_values"))


def test_masked_attention_matches_grouped(case, case_cfg):
    """The packed block-diagonal-mask path agrees with the official outputs too (on the sub-case with the most
    distinct segment lengths, where the grouped path has to permute)."""
    name = max(sub_cases(case), key=lambda n: len({h * w for _, h, w in as_grid(case.inputs[f"{n}_grid_thw"])}))
    px, grid = case.inputs[f"{name}_pixel_values"], as_grid(case.inputs[f"{name}_grid_thw"])
    masked = loaded_tower(case_cfg, case.weights, segment_layout="masked")
    hidden, deepstack = vision_forward(masked, px, grid)
    numerics.assert_close(f"{name}_last_hidden", hidden, case.outputs[f"{name}_last_hidden"])
    for j, feature in enumerate(deepstack):
        numerics.assert_close(f"{name}_deepstack_{j}", feature, case.outputs[f"{name}_deepstack_{j}"])


def test_without_deepstack_returns_hidden_only(case, case_cfg):
    name = sub_cases(case)[-1]
    tower = loaded_tower(case_cfg, case.weights, use_deepstack=False)
    hidden = vision_forward(tower, case.inputs[f"{name}_pixel_values"], as_grid(case.inputs[f"{name}_grid_thw"]))
    numerics.assert_close(f"{name}_last_hidden", hidden, case.outputs[f"{name}_last_hidden"])


def test_bfloat16_run_within_bfloat16_tolerance(case):
    cfg = VisionConfig.from_official(case.config)
    name = sub_cases(case)[0]
    tower = loaded_tower(cfg, case.weights, runtime=Runtime.bf16())
    hidden, deepstack = vision_forward(tower, case.inputs[f"{name}_pixel_values"],
                                       as_grid(case.inputs[f"{name}_grid_thw"]))
    assert hidden.dtype == np.dtype("bfloat16")
    numerics.assert_close(f"{name}_last_hidden", hidden.astype(np.float32), case.outputs[f"{name}_last_hidden"],
                          dtype="bfloat16")


def test_full_size_shapes_abstractly():
    """The release's tower on an image and a 4-frame video, traced only: output widths and deepstack count."""
    cfg = VisionConfig.ming_flash_omni_2()
    tower = abstract_tower(cfg, runtime=Runtime.bf16())  # as the release runs
    grid = ((1, 32, 48), (4, 16, 16))
    n = sum(t * h * w for t, h, w in grid)
    hidden, deepstack = nnx.eval_shape(lambda m, px: m(px, grid), tower,
                                       jax.ShapeDtypeStruct((n, cfg.patch_dim), np.float32))
    assert hidden.shape == (n // 4, 4096) and hidden.dtype == np.dtype("bfloat16")
    assert [d.shape for d in deepstack] == [(n // 4, 4096)] * 3


def test_omni_image_features_match_full_mm_forward():
    """Tower + linear_proj + L2 norm, with the omni checkpoint's prefixes, against extract_image_feature."""
    omni = golden.load_case(OMNI_CASE)
    cfg = VisionConfig.from_official(omni.config)
    vision = {k: v for k, v in omni.weights.items() if k.startswith(OMNI_VISION_PREFIX)}
    proj = {k: v for k, v in omni.weights.items() if k.startswith(OMNI_PROJECTOR_PREFIX)}
    tower = loaded_tower(cfg, vision, use_deepstack=False, prefix=OMNI_VISION_PREFIX)
    depth, llm_hidden = omni.config["mlp_depth"], omni.config["llm_config"]["hidden_size"]
    projector = nnx.eval_shape(lambda: VisionProjector(cfg.out_hidden_size, llm_hidden, depth, rngs=nnx.Rngs(0)))
    weights.load_state_dict(projector, projector_table(depth), proj)
    for out, px, grid in (("image_embeds", "pixel_values", "image_grid_thw"),
                          ("video_embeds", "pixel_values_videos", "video_grid_thw")):
        ours = image_features(tower, projector, omni.inputs[px], as_grid(omni.inputs[grid]))
        numerics.assert_close(out, ours, omni.outputs[out])


# --- name table ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "ming_flash_omni_2"])
def test_table_covers_every_parameter(preset):
    cfg = getattr(VisionConfig, preset)()
    shapes = weights.param_shapes(abstract_tower(cfg))
    vision_table(cfg).check_coverage(shapes)
    vision_table(cfg, "vision.", "vision.").check_coverage({f"vision.{k}": v for k, v in shapes.items()})
    proj = nnx.eval_shape(lambda: VisionProjector(cfg.out_hidden_size, 96, 3, rngs=nnx.Rngs(0)))
    projector_table(3).check_coverage(weights.param_shapes(proj))


def test_every_parameter_has_logical_axes():
    model = abstract_tower(VisionConfig.tiny())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = logical_axes(var)
        assert len(axes) == var.get_value().ndim, path
    assert logical_axes(model.blocks.attn.qkv_kernel)[0] == "layers"


def test_table_names_are_the_golden_names(case, case_cfg):
    assert sorted(vision_table(case_cfg).expected_names()) == sorted(case.weights)


def test_load_export_round_trip(case, case_cfg):
    exported = weights.export_state_dict(loaded_tower(case_cfg, case.weights), vision_table(case_cfg))
    assert sorted(exported) == sorted(case.weights)
    for name, value in case.weights.items():
        assert exported[name].shape == value.shape and exported[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_loading_is_strict(case, case_cfg):
    tensors = dict(case.weights)
    missing = dict(tensors)
    missing.pop("blocks.1.attn.qkv.bias")
    with pytest.raises(weights.WeightError, match=r"blocks\.1\.attn\.qkv\.bias"):
        loaded_tower(case_cfg, missing)
    extra = dict(tensors, **{"blocks.9.norm1.weight": tensors["blocks.0.norm1.weight"]})
    with pytest.raises(weights.WeightError, match=r"unexpected.*blocks\.9\.norm1\.weight"):
        loaded_tower(case_cfg, extra)
    bad = dict(tensors, **{"merger.linear_fc2.weight": tensors["merger.linear_fc2.weight"][:, :-1]})
    with pytest.raises(weights.WeightError, match=r"merger\.linear_fc2\.weight"):
        loaded_tower(case_cfg, bad)


# --- config -------------------------------------------------------------------------------------------------------


def test_full_size_preset_matches_reference_config():
    with open(REFERENCE_CONFIG) as f:
        reference = json.load(f)
    ours = VisionConfig.ming_flash_omni_2()
    ref_vision = reference["vision_config"]
    official = ours.to_official()
    for key, value in ref_vision.items():
        if key in official:
            assert official[key] == value, key
    read = VisionConfig.from_official(reference)  # the whole omni config.json holds the section
    assert read == ours
    assert (ours.depth, ours.hidden_size, ours.num_heads, ours.patch_size, ours.temporal_patch_size,
            ours.spatial_merge_size, ours.out_hidden_size) == (27, 1152, 16, 16, 2, 2, 4096)
    assert ours.deepstack_visual_indexes == (8, 16, 24) and ours.position_grid_side == 48


def test_official_round_trip(case, case_cfg):
    assert VisionConfig.from_official(case_cfg.to_official()) == case_cfg
    tiny = VisionConfig.tiny(deepstack_visual_indexes=(2, 0), hidden_act="gelu")
    assert VisionConfig.from_official(tiny.to_official()) == tiny


def test_config_rejects_unknown_keys_and_bad_dims(case):
    with pytest.raises(ConfigError, match="depht"):
        VisionConfig.from_official(dict(case.config, depht=3))
    with pytest.raises(ConfigError, match="model_type"):
        VisionConfig.from_official(dict(case.config, model_type="siglip"))
    with pytest.raises(ConfigError, match="num_heads"):
        VisionConfig.tiny(num_heads=5)
    with pytest.raises(ConfigError, match="multiple of 4"):
        VisionConfig.tiny(hidden_size=24, num_heads=4)  # head_dim 6
    with pytest.raises(ConfigError, match="not a square"):
        VisionConfig.tiny(num_position_embeddings=60)
    with pytest.raises(ConfigError, match="outside the blocks"):
        VisionConfig.tiny(deepstack_visual_indexes=(1, 4))
    with pytest.raises(ConfigError, match="repeat"):
        VisionConfig.tiny(deepstack_visual_indexes=(1, 1))
    with pytest.raises(ConfigError, match="hidden_act"):
        VisionConfig.tiny(hidden_act="relu")
    with pytest.raises(ConfigError, match="unknown field"):
        VisionConfig.tiny().replace(width=3)


# --- independent reference: transformers' Qwen3-VL-MoE vision model ---------------------------------------------


@pytest.mark.torch
def test_matches_transformers_qwen3_vl_moe_vision_model():
    """Other sizes than the golden case (depth 3, 2 heads of 16, 6x6 position grid, deepstack at blocks 2 and 0,
    patch 8). Random torch weights go to our model through the table; our export loads back into the torch
    model strictly, so the names are the transformers names too."""
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    hf_cfg = Qwen3VLMoeVisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=40,
                                    patch_size=8, num_position_embeddings=36, deepstack_visual_indexes=[2, 0])
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Qwen3VLMoeVisionModel(hf_cfg).eval()
    with torch.no_grad():  # every parameter random, so that no bias / norm weight is a trivial 0 or 1
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if p.ndim == 1 else p.shape[-1] ** -0.5) + (p.ndim == 1))
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}

    cfg = VisionConfig.from_official(hf_cfg.to_dict())
    ours = loaded_tower(cfg, tensors)
    exported = weights.export_state_dict(ours, vision_table(cfg))
    hf.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)

    grid = np.array([[1, 4, 6], [2, 2, 4], [1, 8, 2]])
    px = np.random.default_rng(0).standard_normal((int(grid.prod(1).sum()), cfg.patch_dim), dtype=np.float32)
    with torch.no_grad():
        ref_hidden, ref_deepstack = hf(torch.from_numpy(px), grid_thw=torch.from_numpy(grid))
    hidden, deepstack = vision_forward(ours, px, as_grid(grid))
    numerics.assert_close("hidden", hidden, ref_hidden.numpy())
    assert len(deepstack) == len(ref_deepstack) == 2
    for j, (a, b) in enumerate(zip(deepstack, ref_deepstack)):
        numerics.assert_close(f"deepstack_{j}", a, b.numpy())


# --- layout and bad input -----------------------------------------------------------------------------------------


def test_layout_orders_patches_by_merge_window():
    layout = vision_layout(((2, 2, 4), (1, 4, 2)), 2, 8)
    # frame 0 of image 0: window (0,0) then window (0,1), each row-major; frame 1 repeats the positions.
    np.testing.assert_array_equal(layout.rows[:8], [0, 0, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(layout.cols[:8], [0, 1, 0, 1, 2, 3, 2, 3])
    np.testing.assert_array_equal(layout.rows[8:16], layout.rows[:8])
    np.testing.assert_array_equal(np.bincount(layout.segment_ids), [8, 8, 8])
    assert layout.groups == ((8, 3),) and layout.order is None
    np.testing.assert_allclose(layout.pos_weight.sum(0), 1.0, rtol=1e-6)
    mixed = vision_layout(((1, 4, 4), (1, 2, 2), (1, 4, 4)), 2, 8)
    assert mixed.groups == ((4, 1), (16, 2))
    np.testing.assert_array_equal(mixed.order[mixed.inverse], np.arange(36))


def test_bad_inputs_raise_clear_errors():
    cfg = VisionConfig.tiny(patch_size=8)
    tower = abstract_tower(cfg)  # input checks run before any parameter is read
    px = np.zeros((48, 3 * 2 * 8 * 8), np.float32)  # grid (1, 6, 8)
    with pytest.raises(ValueError, match="describes 40 patches but pixel_values has 48 rows"):
        tower(px, np.array([[1, 4, 10]]))
    with pytest.raises(ValueError, match=r"C\*Tp\*P\*P = 384"):
        tower(px[:, :-1], np.array([[1, 6, 8]]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        tower(px, np.array([[1, 3, 16]]))
    with pytest.raises(ValueError, match="positive"):
        tower(px, np.array([[0, 6, 8], [1, 6, 8]]))
    with pytest.raises(ValueError, match=r"\[num_images, 3\]"):
        tower(px, np.array([1, 6, 8]))
    with pytest.raises(ValueError, match="integers"):
        tower(px, np.array([[1.0, 6.0, 8.0]]))
    with pytest.raises(ValueError, match="empty"):
        tower(px[:0], np.zeros((0, 3), np.int64))
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda g: tower(px, g))(np.array([[1, 6, 8]]))


# --- attention backends -------------------------------------------------------------------------------------------


def _random_tower(cfg: VisionConfig, attention: str, segment_layout: str = "grouped") -> VisionTransformer:
    return VisionTransformer(cfg, Runtime(attention=attention), use_deepstack=True, segment_layout=segment_layout,
                             rngs=nnx.Rngs(5))


@pytest.mark.parametrize("segment_layout", ["grouped", "masked"])
def test_splash_dispatch_matches_grouped_xla(segment_layout):
    """The ViT on the attention dispatcher with splash forced (the Pallas interpreter here; head dim 16 zero-padded
    to 128 lanes) gives the grouped XLA tower's outputs, float32, on several images and a video of different sizes:
    per-(image, frame) batch rows ("grouped") or one row with per-(image, frame) segment ids ("masked")."""
    cfg = VisionConfig.tiny(depth=2, deepstack_visual_indexes=(0,), patch_size=4)
    grid = ((1, 4, 6), (2, 4, 4), (1, 2, 2), (1, 6, 4))  # segment lengths 24, 16, 16, 4, 24: three groups
    n = sum(t * h * w for t, h, w in grid)
    px = np.asarray(jax.random.normal(jax.random.key(1), (n, cfg.patch_dim), np.float32))
    ref_hidden, ref_deep = vision_forward(_random_tower(cfg, "xla"), px, grid)
    tower = _random_tower(cfg, "splash", segment_layout)
    assert tower.blocks.attn.attention == "splash"
    assert "pallas_call" in str(jax.make_jaxpr(lambda p: tower(p, grid)[0])(px))  # the blocks ran the kernels
    hidden, deep = vision_forward(tower, px, grid)
    numerics.assert_close("splash_last_hidden", hidden, ref_hidden)
    for j, (a, b) in enumerate(zip(deep, ref_deep)):
        numerics.assert_close(f"splash_deepstack_{j}", a, b)


def test_auto_attention_on_cpu_is_the_xla_formulation(case, case_cfg):
    """"auto" (the default) lowered for CPU holds no Mosaic kernel and equals "xla" bit for bit."""
    name = sub_cases(case)[-1]
    px, grid = case.inputs[f"{name}_pixel_values"], as_grid(case.inputs[f"{name}_grid_thw"])
    outs = {}
    for impl in ("auto", "xla"):
        tower = loaded_tower(case_cfg, case.weights, runtime=Runtime(attention=impl))
        outs[impl] = vision_forward(tower, px, grid)[0]
    assert "tpu_custom_call" not in jax.jit(lambda p: tower(p, grid)[0]).lower(px).as_text()
    np.testing.assert_array_equal(np.asarray(outs["auto"]), np.asarray(outs["xla"]))


def test_release_vit_attention_auto_compiles_to_splash_for_tpu():
    """One release-size ViT attention (16 heads x head dim 72, bf16) on a 1024 x 1024 image (64 x 64 patches) and a
    4-frame video, "auto", compiled for one v5p chip from this CPU host: the splash kernel (head dim padded to 128),
    and no [H, L, L] logits in HBM."""
    from tpu_compile import need_libtpu

    need_libtpu()
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from ming_jax.models.vision import segment_attention

    cfg = VisionConfig.ming_flash_omni_2()
    assert cfg.head_dim == 72
    grid = ((1, 64, 64), (4, 28, 28))
    layout = vision_layout(grid, cfg.spatial_merge_size, cfg.position_grid_side)
    topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
    chip = NamedSharding(Mesh(np.array(topo.devices[:1]), ("chip",)), PartitionSpec())
    arg = jax.ShapeDtypeStruct((layout.num_patches, cfg.num_heads, cfg.head_dim), jax.numpy.bfloat16, sharding=chip)
    lowered = jax.jit(lambda q, k, v: segment_attention(q, k, v, layout, "grouped", "auto")).lower(arg, arg, arg)
    kernels = lowered.as_text().count("custom_call @tpu_custom_call")
    assert kernels == len(layout.groups) == 2, f"expected one splash kernel per segment length, got {kernels}"
    mem = lowered.compile().memory_analysis()
    logits = cfg.num_heads * 4096 * 4096 * 4  # the 1024 x 1024 image's float32 logits: 1 GiB
    assert mem.temp_size_in_bytes < logits / 8, f"temp {mem.temp_size_in_bytes / 2**20:.0f} MiB"

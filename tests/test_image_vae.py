"""Image VAE (diffusers AutoencoderKL, Flux layout): golden parity, an independent diffusers reference at other
configs (quant convs, no attention, non-square, other widths), the name table, jit caching, bad inputs, bfloat16.

Models are built abstractly and filled through `ming_jax.weights.vae.vae_table`; the diffusers reference's random
weights are moved with the same table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax import weights
from ming_jax.config.base import ConfigError
from ming_jax.config.runtime import Runtime
from ming_jax.config.vae import VAEConfig
from ming_jax.models.image_gen import vae
from ming_jax.parity import golden, numerics
from ming_jax.parity.cases import image_vae
from ming_jax.sharding import logical_axes
from ming_jax.weights.vae import vae_table


def abstract_vae(cfg: VAEConfig, runtime: Runtime | None = None) -> vae.AutoencoderKL:
    return nnx.eval_shape(lambda: vae.AutoencoderKL(cfg, runtime, rngs=nnx.Rngs(0)))


def loaded_vae(cfg: VAEConfig, tensors, runtime: Runtime | None = None) -> vae.AutoencoderKL:
    return weights.load_state_dict(abstract_vae(cfg, runtime), vae_table(cfg), tensors)


@pytest.fixture(scope="module")
def case(golden_dir):
    return golden.load_case(str(golden_dir / "image_vae"))


@pytest.fixture(scope="module")
def case_cfg(case):
    return VAEConfig.from_official(case.config)


@pytest.fixture(scope="module")
def model(case, case_cfg):
    return loaded_vae(case_cfg, case.weights)


# --- golden parity ------------------------------------------------------------------------------------------------


def test_golden_parity(case):
    rows = image_vae.run(case)
    assert {r.name for r in rows} == set(case.outputs)
    assert numerics.all_ok(rows), numerics.report(rows)


def test_bfloat16_run_within_bfloat16_tolerance(case, case_cfg):
    model = loaded_vae(case_cfg, case.weights, Runtime.bf16())
    assert model.decoder.conv_in.kernel.get_value().dtype == jnp.bfloat16
    ours = image_vae.outputs(model, case.inputs)
    assert ours["decoded"].dtype == jnp.float32  # results come back in the input's dtype
    for name, ref in case.outputs.items():
        numerics.assert_close(name, ours[name], ref, dtype="bfloat16")


# --- independent reference: diffusers AutoencoderKL at other configs ------------------------------------------------

# (config, image shape [B, C, H, W]): 4 levels x 2 resnets with both quant convs, 3 latent channels, no shift, a
# batch of 2 non-square images; and 2 levels without mid attention, only the post-quant conv, other in / out widths.
REFERENCE_CONFIGS = [
    (dict(block_out_channels=(8, 16, 24, 24), layers_per_block=2, latent_channels=3, norm_num_groups=4,
          use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.5, shift_factor=None), (2, 3, 32, 24)),
    (dict(block_out_channels=(6, 12), layers_per_block=1, latent_channels=2, norm_num_groups=3, in_channels=4,
          out_channels=2, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=True,
          scaling_factor=0.7, shift_factor=-0.2), (1, 4, 10, 14)),
]


def diffusers_reference(cfg: VAEConfig):
    """A diffusers AutoencoderKL at `cfg` with every 1-D parameter (GroupNorm affine, biases) moved off its init."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in cfg.to_official().items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return torch, ref


@pytest.mark.parametrize("overrides,shape", REFERENCE_CONFIGS)
def test_matches_diffusers(overrides, shape):
    cfg = VAEConfig.tiny(**overrides)
    torch, ref = diffusers_reference(cfg)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = loaded_vae(cfg, state)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, shape).astype(np.float32)
    f = cfg.scale_factor
    latents = rng.normal(size=(shape[0], cfg.latent_channels, shape[2] // f, shape[3] // f)).astype(np.float32)
    with torch.no_grad():
        posterior = ref.encode(torch.from_numpy(image)).latent_dist
        z = torch.from_numpy(np.asarray(vae.to_decoder_input(cfg, latents)))
        decoded = ref.decode(z).sample
    mean, logvar = vae.encode(model, image)
    numerics.assert_close("posterior_mean", mean, posterior.mean.numpy())
    numerics.assert_close("posterior_logvar", logvar, posterior.logvar.numpy())
    numerics.assert_close("ref_latent", vae.encode_mode(model, image),
                          ((posterior.mode() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).numpy())
    numerics.assert_close("decoded", vae.decode(model, latents), decoded.numpy())
    numerics.assert_close("decode_sample", vae.decode_sample(model, z.numpy()), decoded.numpy())
    # the same table exports the torch state dict back, name for name and bit for bit
    exported = weights.export_state_dict(model, vae_table(cfg))
    assert sorted(exported) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_flux_preset_names_and_shapes_match_diffusers():
    """The full-size Flux VAE, built on torch's meta device and ours abstractly: the table maps every official
    tensor onto a parameter of the right shape, and covers every parameter exactly once."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = VAEConfig.flux()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**{k: v for k, v in cfg.to_official().items() if not k.startswith("_")})
    official = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = weights.param_shapes(abstract_vae(cfg, Runtime.bf16()))
    table = vae_table(cfg)
    table.check_coverage(shapes)
    for a in table.plan(official):
        assert a.transform.to_ours(np.empty(official[a.official], np.float32)).shape == shapes[a.path], a.official
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(int(np.prod(s)) for s in official.values())


# --- name table ---------------------------------------------------------------------------------------------------


def test_table_names_are_the_golden_names(case, case_cfg):
    assert sorted(vae_table(case_cfg).expected_names()) == sorted(case.weights)


@pytest.mark.parametrize("overrides", [{}] + [o for o, _ in REFERENCE_CONFIGS])
def test_table_covers_every_parameter(overrides):
    cfg = VAEConfig.tiny(**overrides)
    shapes = weights.param_shapes(abstract_vae(cfg))
    vae_table(cfg).check_coverage(shapes)
    vae_table(cfg, "vae.", "vae.").check_coverage({f"vae.{k}": v for k, v in shapes.items()})


def test_load_export_round_trip(case, model, case_cfg):
    exported = weights.export_state_dict(model, vae_table(case_cfg))
    assert sorted(exported) == sorted(case.weights)
    for name, value in case.weights.items():
        assert exported[name].shape == value.shape and exported[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_loading_is_strict(case, case_cfg):
    missing = dict(case.weights)
    missing.pop("decoder.up_blocks.2.resnets.0.conv_shortcut.bias")
    with pytest.raises(weights.WeightError, match=r"missing.*conv_shortcut\.bias"):
        loaded_vae(case_cfg, missing)
    extra = dict(case.weights, **{"quant_conv.weight": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(weights.WeightError, match=r"unexpected.*quant_conv\.weight"):
        loaded_vae(case_cfg, extra)
    name = "encoder.conv_in.weight"
    bad = dict(case.weights, **{name: case.weights[name][:, :2]})
    with pytest.raises(weights.WeightError, match=name.replace(".", r"\.")):
        loaded_vae(case_cfg, bad)


def test_every_parameter_has_logical_axes(case_cfg):
    model = abstract_vae(case_cfg)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert len(logical_axes(var)) == var.get_value().ndim, path
    assert logical_axes(model.encoder.conv_in.kernel) == (None, None, vae.CONV_IN, vae.CONV_OUT)


# --- jit, bad inputs ----------------------------------------------------------------------------------------------


def test_jit_compiles_once_per_shape(model, case, monkeypatch):
    traces = {"decoder": 0, "encoder": 0}

    def counting(kind, original):
        def call(self, x):
            traces[kind] += 1
            return original(self, x)
        return call

    monkeypatch.setattr(vae.VAEDecoder, "__call__", counting("decoder", vae.VAEDecoder.__call__))
    monkeypatch.setattr(vae.VAEEncoder, "__call__", counting("encoder", vae.VAEEncoder.__call__))
    # a batch size no other test uses: jit caches are keyed by the model's structure, shared by equal models
    latents, image = (np.repeat(case.inputs[k], 3, axis=0) for k in ("latents", "ref_image"))
    first = vae.decode(model, latents)
    second = vae.decode(model, latents + 1.0)
    assert traces["decoder"] == 1
    assert not np.allclose(first, second)
    vae.encode(model, image)
    vae.encode_mode(model, -image)
    assert traces["encoder"] == 1
    vae.decode(model, latents[:, :, :4, :4])  # a new shape traces again
    assert traces["decoder"] == 2


def test_bad_inputs_raise_naming_the_shape(model, case_cfg):
    f, c_lat = case_cfg.scale_factor, case_cfg.latent_channels
    with pytest.raises(ValueError, match=r"4 latent channels.*\(1, 3, 8, 12\)"):
        vae.decode(model, np.zeros((1, c_lat - 1, 8, 12), np.float32))
    with pytest.raises(ValueError, match=r"latent channels.*\(4, 8, 12\)"):
        vae.decode(model, np.zeros((c_lat, 8, 12), np.float32))
    with pytest.raises(ValueError, match=r"3 channels.*\(1, 1, 32, 48\)"):
        vae.encode(model, np.zeros((1, 1, 32, 48), np.float32))
    with pytest.raises(ValueError, match=rf"multiples of the scale factor {f}.*30 x 48"):
        vae.encode(model, np.zeros((1, 3, 30, 48), np.float32))
    with pytest.raises(ValueError, match=r"4-D"):
        vae.encode_mode(model, np.zeros((3, 32, 48), np.float32))


def test_postprocess_and_scaling_are_the_pipeline_formulas(case, case_cfg):
    numerics.assert_close("decoder_input", vae.to_decoder_input(case_cfg, case.inputs["latents"]),
                          case.outputs["decoder_input"])
    numerics.assert_close("image_pt", vae.postprocess(case.outputs["decoded"]), case.outputs["image_pt"])
    z = np.linspace(-2, 2, 9, dtype=np.float32)
    np.testing.assert_allclose(vae.to_decoder_input(case_cfg, vae.to_dit_latents(case_cfg, z)), z, rtol=1e-6)


def test_full_size_decode_shapes_abstractly():
    """The release's VAE on a 1024 x 1024 decode / encode, traced only."""
    cfg = VAEConfig.flux()
    model = abstract_vae(cfg, Runtime.bf16())
    lat = jax.ShapeDtypeStruct((1, 16, 128, 128), jnp.float32)
    img = jax.ShapeDtypeStruct((1, 3, 1024, 1024), jnp.float32)
    out = nnx.eval_shape(vae._decode, model, lat)
    mean, logvar = nnx.eval_shape(vae._encode, model, img)
    assert out.shape == (1, 3, 1024, 1024) and out.dtype == jnp.float32
    assert mean.shape == logvar.shape == (1, 16, 128, 128)


# --- config -------------------------------------------------------------------------------------------------------


def test_official_round_trip(case, case_cfg):
    assert case_cfg == VAEConfig.tiny(sample_size=32)
    assert VAEConfig.from_official(case_cfg.to_official()) == case_cfg
    official = case_cfg.to_official()
    for key, value in case.config.items():
        if not key.startswith("_"):
            assert official[key] == value, key
    flux = VAEConfig.flux()
    assert VAEConfig.from_official(flux.to_official()) == flux
    assert (flux.scale_factor, case_cfg.scale_factor, flux.shift, VAEConfig.tiny(shift_factor=None).shift) == \
        (8, 4, 0.1159, 0.0)


def test_config_rejects_what_it_does_not_implement(case):
    with pytest.raises(ConfigError, match="latent_chanels"):
        VAEConfig.from_official(dict(case.config, latent_chanels=4))
    with pytest.raises(ConfigError, match="AutoencoderKLWan"):
        VAEConfig.from_official(dict(case.config, _class_name="AutoencoderKLWan"))
    with pytest.raises(ConfigError, match="act_fn='gelu'"):
        VAEConfig.from_official(dict(case.config, act_fn="gelu"))
    with pytest.raises(ConfigError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_official(dict(case.config, down_block_types=["AttnDownEncoderBlock2D"] * 3))
    with pytest.raises(ConfigError, match="latents_mean"):
        VAEConfig.from_official(dict(case.config, latents_mean=[0.0] * 4))
    with pytest.raises(ConfigError, match="norm_num_groups=5"):
        VAEConfig.from_official(dict(case.config, norm_num_groups=5))
    with pytest.raises(ConfigError, match="up_block_types has 2 entries"):
        VAEConfig.from_official(dict(case.config, up_block_types=["UpDecoderBlock2D"] * 2))
    assert VAEConfig.from_official(dict(case.config, _diffusers_version="0.36.0", _name_or_path="x",
                                        act_fn="swish")).act_fn == "swish"


def test_mid_attention_through_the_splash_kernel(case, case_cfg):
    """The mid-block attention forced onto splash (the Pallas interpreter on CPU, head dim zero-padded to 128 lanes)
    gives the golden decode too."""
    model = loaded_vae(case_cfg, case.weights, Runtime(attention="splash"))
    numerics.assert_close("decoded", vae.decode(model, case.inputs["latents"]), case.outputs["decoded"])

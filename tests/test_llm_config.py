"""LLMConfig: strict reading of official configs, presets equal to the release's numbers, consistency checks."""

import json

import pytest

from ming_jax.config import ConfigError, LLMConfig


def test_preset_equals_release_config(reference_dir):
    raw = json.loads((reference_dir / "config.json").read_text())
    from_release = LLMConfig.from_official(raw)  # the whole omni config: its llm_config section is read
    preset = LLMConfig.ming_flash_omni_2()
    assert from_release == preset
    llm = raw["llm_config"]
    assert preset.num_layers == llm["num_hidden_layers"] == 32
    assert preset.num_experts == llm["num_experts"] == 256
    assert preset.head_dim == llm["hidden_size"] // llm["num_attention_heads"] == 128
    assert (preset.n_group, preset.topk_group) == (llm["n_group"], llm["topk_group"])


@pytest.mark.parametrize("case", ["llm_backbone", "full_mm_forward"])
def test_reads_golden_configs(golden_dir, case):
    cfg = LLMConfig.from_official(json.loads((golden_dir / case / "config.json").read_text()))
    assert cfg.router_type == "MultiRouter" and cfg.rope_type == "video_rope"
    assert cfg.num_moe_layers == cfg.num_layers - cfg.first_k_dense_replace


def test_official_round_trip():
    for cfg in (LLMConfig.tiny(), LLMConfig.ming_flash_omni_2()):
        assert LLMConfig.from_official(cfg.to_official()) == cfg


def test_unknown_key_is_named(golden_dir):
    raw = json.loads((golden_dir / "llm_backbone" / "config.json").read_text())
    raw["num_expertz"] = 3
    with pytest.raises(ConfigError, match="num_expertz"):
        LLMConfig.from_official(raw)


@pytest.mark.parametrize("override, message", [
    (dict(num_heads=6, num_kv_heads=4), "not a multiple of num_kv_heads"),
    (dict(num_experts=18), "not divisible by n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(num_experts_per_tok=9), "exceeds the experts"),
    (dict(first_k_dense_replace=7), "first_k_dense_replace"),
    (dict(router_type="soft"), "router_type"),
    (dict(partial_rotary_factor=0.0), "rotary dim"),
])
def test_inconsistent_dims_raise(override, message):
    with pytest.raises(ConfigError, match=message):
        LLMConfig.tiny(**override)


def test_unsupported_official_features_raise():
    raw = LLMConfig.tiny().to_official()
    with pytest.raises(ConfigError, match="hidden_act"):
        LLMConfig.from_official(dict(raw, hidden_act="gelu"))
    with pytest.raises(ConfigError, match="sliding_window"):
        LLMConfig.from_official(dict(raw, use_sliding_window=True))
    with pytest.raises(ConfigError, match="rope_scaling"):
        LLMConfig.from_official(dict(raw, rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        LLMConfig.from_official({k: v for k, v in raw.items() if k != "num_hidden_layers"})
    with pytest.raises(ConfigError, match="unknown field"):
        LLMConfig.tiny().replace(hidden=3)


def test_full_preset_builds_abstractly_with_release_size():
    """The 100B model is built with no memory (nnx.eval_shape); its size is the release's ~100B total / ~6B active
    (active = attention, dense layer, routers, shared experts, top-8 experts per MoE layer, LM head)."""
    from ming_jax.models import llm as model_lib

    cfg = LLMConfig.ming_flash_omni_2()
    n = model_lib.param_count(model_lib.create_abstract(cfg))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = cfg.num_moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * expert
    active = n - inactive - cfg.vocab_size * cfg.hidden_size  # input embedding rows are looked up, not computed
    assert 100e9 < n < 105e9, n
    assert 5.0e9 < active < 6.5e9, active

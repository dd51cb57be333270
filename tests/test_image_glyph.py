"""The ByT5 glyph branch of image generation: T5 encoder, mapper, byte tokenizer, glyph-text rule, name tables.

References: transformers' `T5EncoderModel` and `ByT5Tokenizer` (tiny random configs, weights moved by our tables),
and `tests/data/glyph_reference` (the official loader, encoder, mapper and prompt rule at a tiny config, made by
`tools/make_glyph_reference.py`).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax.config.base import ConfigError
from ming_jax.config.glyph import GlyphConfig, T5EncoderConfig
from ming_jax.config.runtime import Runtime
from ming_jax.models.image_gen import glyph as glyph_lib
from ming_jax.models.image_gen.glyph import GlyphMapper, T5Encoder, append_glyph_rows, encode_glyphs
from ming_jax.parity import numerics
from ming_jax.processors.glyph import (ByteTokenizer, GlyphError, glyph_text, glyph_texts, release_special_tokens,
                                       special_tokens, uses_glyphs)
from ming_jax.weights.glyph import glyph_mapper_table, t5_encoder_table
from ming_jax.weights.table import (WeightError, export_arrays, export_state_dict, load_state_dict,
                                    param_shapes)

REFERENCE = pathlib.Path(__file__).resolve().parent / "data" / "glyph_reference"


def _torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return torch


def _abstract(make):
    return nnx.eval_shape(make)


def _random(make, table, seed: int):
    """A model with seeded random parameters, moved in through its table (eager init of the scanned stacks is slow
    on CPU; this is abstract init plus one load)."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(_abstract(make))
    arrays = {p: (rng.standard_normal(s) * 0.3 + (1.0 if p.endswith("scale") else 0.0)).astype(np.float32)
              for p, s in shapes.items()}
    return load_state_dict(_abstract(make), table, export_arrays(table, arrays))


# --- the encoder against transformers -----------------------------------------------------------------------------


def _hf_encoder(torch, cfg: T5EncoderConfig):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.T5Config(**{k: v for k, v in cfg.to_official().items()
                                      if k not in ("architectures", "model_type")})
    model = transformers.T5EncoderModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norm scales and a unit-scale position table, so a swapped tensor shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("kw", [dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                     relative_attention_max_distance=128),
                                dict(feed_forward_proj="relu", relative_attention_num_buckets=8,
                                     relative_attention_max_distance=12)])
def test_encoder_against_transformers(kw):
    torch = _torch()
    cfg = T5EncoderConfig(vocab_size=50, d_model=16, d_kv=6, d_ff=24, num_layers=3, num_heads=3, **kw)
    hf = _hf_encoder(torch, cfg)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    table = t5_encoder_table(cfg, prefix="encoder.", shared="shared.weight")
    ours = load_state_dict(_abstract(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0))), table, state)
    ids = torch.randint(0, cfg.vocab_size, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = ours(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    numerics.assert_close("t5_encoder", got, want)


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 12), (16, 20), (32, 64)])
def test_relative_buckets_match_transformers(buckets, distance):
    torch = _torch()
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(400)[None, :] - np.arange(400)[:, None]
    want = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=True, num_buckets=buckets,
                                                 max_distance=distance).numpy()
    got = glyph_lib.relative_position_buckets(400, 400, buckets, distance)
    numerics.assert_close("buckets", got, want.astype(np.int32))


# --- the official reference ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    from safetensors.numpy import load_file

    cfg = json.loads((REFERENCE / "config.json").read_text(encoding="utf-8"))
    texts = json.loads((REFERENCE / "texts.json").read_text(encoding="utf-8"))
    arrays = {name: load_file(str(REFERENCE / f"{name}.safetensors"))
              for name in ("encoder", "mapper", "plain_mapper", "outputs")}
    return cfg, texts, arrays


def _reference_models(reference, runtime=None):
    cfg, _, arrays = reference
    t5 = T5EncoderConfig.from_official(cfg["t5"])
    glyph = GlyphConfig.from_official(cfg["byt5"])
    plain = glyph.replace(mapper_layers=0, mapper_channels=None)
    encoder = load_state_dict(_abstract(lambda: T5Encoder(t5, runtime, rngs=nnx.Rngs(0))), t5_encoder_table(t5),
                              arrays["encoder"])
    mapper = load_state_dict(_abstract(lambda: GlyphMapper(t5, glyph, runtime, rngs=nnx.Rngs(0))),
                             glyph_mapper_table(t5, glyph), arrays["mapper"])
    plain_mapper = load_state_dict(_abstract(lambda: GlyphMapper(t5, plain, runtime, rngs=nnx.Rngs(0))),
                                   glyph_mapper_table(t5, plain), arrays["plain_mapper"])
    return t5, glyph, encoder, mapper, plain_mapper


def test_against_the_official_branch(reference):
    _, _, arrays = reference
    out = arrays["outputs"]
    _, glyph, encoder, mapper, plain_mapper = _reference_models(reference)
    ids, mask = jnp.asarray(out["ids"]), jnp.asarray(out["mask"])
    hidden = encoder(ids, mask)
    numerics.assert_close("encoder_hidden", hidden, out["encoder_hidden"])
    numerics.assert_close("mapper_out", mapper(jnp.asarray(out["encoder_hidden"]), mask), out["mapper_out"])
    numerics.assert_close("plain_mapper_out", plain_mapper(jnp.asarray(out["encoder_hidden"]), mask),
                          out["plain_mapper_out"])
    rows = encode_glyphs(encoder, mapper, out["ids"], out["mask"])
    numerics.assert_close("rows", rows, out["rows"])
    assert rows.shape == (4, glyph.max_length, glyph.mapper_channels)
    assert not np.asarray(rows)[out["mask"] == 0].any()


def test_bf16_run_stays_close_to_the_official_branch(reference):
    out = reference[2]["outputs"]
    _, _, encoder, mapper, _ = _reference_models(reference, Runtime.bf16())
    rows = encode_glyphs(encoder, mapper, out["ids"], out["mask"])
    assert rows.dtype == jnp.bfloat16
    numerics.assert_close("rows_bf16", rows.astype(jnp.float32), out["rows"], dtype=numerics.MODEL_BF16)


def test_tokenizer_and_glyph_text_against_the_official_branch(reference):
    cfg, texts, arrays = reference
    glyph = GlyphConfig.from_official(cfg["byt5"])
    added = release_special_tokens(glyph, cfg["fonts"], cfg["colors"])
    tok = ByteTokenizer(added)
    assert {t: tok.token_id(t) for t in cfg["added_tokens"]} == cfg["added_tokens"]
    assert tok.vocab_size == cfg["t5"]["vocab_size"]  # the resized embedding table
    assert glyph_texts(texts["prompts"]) == texts["glyph_texts"]
    encoded = glyph_texts(texts["encode_prompts"])
    assert encoded == texts["encoded_texts"]
    ids, mask = tok(encoded, glyph.max_length)
    numerics.assert_close("ids", ids, arrays["outputs"]["ids"])
    numerics.assert_close("mask", mask, arrays["outputs"]["mask"])
    assert uses_glyphs(encoded) and not uses_glyphs(["", ""]) and not uses_glyphs(None)


# --- the tokenizer against transformers ----------------------------------------------------------------------------

_ADDED = ["<color-0>", "<color-1>", "<color-10>", "<cn-font-3>", "<color-0>", "<font-1>", "<en-font-12>"]
_TEXTS = ['Text "hi". ', "a<color-1>b <cn-font-3> c", "<color-10><color-1>x", "x </s> y", "ab</s>", "tab\t<unk>\n z",
          "<extra_id_3>z<extra_id_124>", "", "é中文 ✓", "a <pad>b", "  </s>  ", "<color-1 ><font-1><en-font-12>",
          "a" * 40, "b" * 11 + "</s>", "\u3000<pad>\u3000wide space"]


@pytest.mark.parametrize("extra_ids", [125, 0])
def test_tokenizer_against_transformers(extra_ids):
    transformers = pytest.importorskip("transformers")
    hf = transformers.ByT5Tokenizer(extra_ids=extra_ids)
    hf.add_tokens(list(_ADDED), special_tokens=True)
    ours = ByteTokenizer(_ADDED, extra_ids=extra_ids)
    assert ours.vocab_size == len(hf)
    texts = _TEXTS if extra_ids else [t for t in _TEXTS if "extra_id" not in t]
    for max_length in (2, 12, 64):
        want = hf(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                  return_tensors="np")
        ids, mask = ours(texts, max_length)
        numerics.assert_close(f"ids@{max_length}", ids, want["input_ids"].astype(np.int32))
        numerics.assert_close(f"mask@{max_length}", mask, want["attention_mask"].astype(np.int32))


def test_special_tokens_and_tokenizer_errors(tmp_path):
    fonts = {"cn-A": 2, "B": 0, "en-C": 1, "kr-D": 7}
    assert special_tokens(fonts, [1, 2]) == ["<color-0>", "<color-1>", "<cn-font-2>", "<font-0>", "<en-font-1>",
                                             "<kr-font-7>"]
    assert special_tokens(fonts, {}, multilingual=False) == [f"<font-{i}>" for i in range(4)]
    path = tmp_path / "fonts.json"
    path.write_text(json.dumps(fonts))
    assert special_tokens(str(path), [], color=False) == special_tokens(fonts, [], color=False)
    assert release_special_tokens(GlyphConfig.tiny(special_tokens=False), fonts, [1]) == []
    with pytest.raises(GlyphError, match="dict"):
        special_tokens(["x"], [])
    with pytest.raises(GlyphError, match="two or more"):
        ByteTokenizer(["a"])
    with pytest.raises(GlyphError, match="list of strings"):
        ByteTokenizer()("one string", 8)
    with pytest.raises(GlyphError, match=">= 2"):
        ByteTokenizer()(["x"], 1)
    with pytest.raises(GlyphError, match="not a special token"):
        ByteTokenizer().token_id("<color-0>")


def test_glyph_text_rules():
    assert glyph_text('Draw "A" and "B"') == 'Text "B". '
    assert glyph_text('delete the sign "A"') == ""  # one span, a removal word before it
    assert glyph_text('delete "A" and "B"') == 'Text "B". '  # two spans: no removal check
    assert glyph_text("don't") == ""  # an odd ' is an apostrophe
    assert glyph_text("it's 'X'") == ""  # three single quotes: odd, never read as quotes
    assert glyph_text("it's 'X' and it's") == 'Text " and it". '  # four: paired in order, all spans short
    assert glyph_texts(["no quotes", "“中”"]) == ["", 'Text "中". ']


# --- tables, configs, inputs -------------------------------------------------------------------------------------


def test_tables_round_trip_and_refuse_bad_sources(reference):
    cfg, _, arrays = reference
    t5 = T5EncoderConfig.from_official(cfg["t5"])
    glyph = GlyphConfig.from_official(cfg["byt5"])
    for make, table, source in [
            (lambda: T5Encoder(t5, rngs=nnx.Rngs(0)), t5_encoder_table(t5), arrays["encoder"]),
            (lambda: GlyphMapper(t5, glyph, rngs=nnx.Rngs(0)), glyph_mapper_table(t5, glyph), arrays["mapper"])]:
        table.check_coverage(param_shapes(_abstract(make)))
        back = export_state_dict(load_state_dict(_abstract(make), table, source), table)
        assert set(back) == set(source)
        for k, v in back.items():
            np.testing.assert_array_equal(v, source[k])
        name = min(source)
        with pytest.raises(WeightError, match="missing"):
            load_state_dict(_abstract(make), table, {k: v for k, v in source.items() if k != name})
        with pytest.raises(WeightError, match="unexpected"):
            load_state_dict(_abstract(make), table, dict(source, **{"extra.weight": source[name]}))
        with pytest.raises(WeightError, match="needs"):
            load_state_dict(_abstract(make), table, dict(source, **{name: source[name][..., :1]}))
    prefixed = {"encoder." + k: v for k, v in arrays["encoder"].items()}
    shared = dict(prefixed, **{"shared.weight": prefixed["encoder.embed_tokens.weight"] + 1})
    with pytest.raises(WeightError, match="tied"):
        load_state_dict(_abstract(lambda: T5Encoder(t5, rngs=nnx.Rngs(0))),
                        t5_encoder_table(t5, prefix="encoder.", shared="shared.weight"), shared)


def test_configs_read_strictly(reference):
    cfg, _, _ = reference
    t5 = T5EncoderConfig.from_official(cfg["t5"])
    assert T5EncoderConfig.from_official(t5.to_official()) == t5
    assert t5.gated and t5.activation == "gelu_new" and t5.vocab_size == 394
    with pytest.raises(ConfigError, match="unknown"):
        T5EncoderConfig.from_official(dict(cfg["t5"], mystery=1))
    with pytest.raises(ConfigError, match="not modelled"):
        T5EncoderConfig.from_official(dict(cfg["t5"], feed_forward_proj="gated-silu", dense_act_fn="silu"))
    with pytest.raises(ConfigError, match="contradict"):
        T5EncoderConfig.from_official(dict(cfg["t5"], dense_act_fn="gelu"))
    glyph = GlyphConfig.from_official(cfg["byt5"])
    assert GlyphConfig.from_official(glyph.to_official()) == glyph
    assert (glyph.max_length, glyph.mapper_layers, glyph.mapper_channels) == (32, 2, 20)
    byt5 = cfg["byt5"]
    with pytest.raises(ConfigError, match="unknown"):
        GlyphConfig.from_official(dict(byt5, extra=1))
    with pytest.raises(ConfigError, match="unknown"):
        GlyphConfig.from_official(dict(byt5, byt5_config=dict(byt5["byt5_config"], lr=1)))
    with pytest.raises(ConfigError, match="LoRA"):
        GlyphConfig.from_official(dict(byt5, byt5_config=dict(byt5["byt5_config"], train_text_encoder_lora=True)))
    with pytest.raises(ConfigError, match="builds"):
        GlyphConfig.from_official(dict(byt5, byt5_mapper_type="ByT5Mapper"))
    with pytest.raises(ConfigError, match="required"):
        GlyphConfig.from_official({k: v for k, v in byt5.items() if k != "byt5_max_length"})


def test_bad_glyph_inputs_are_refused():
    t5 = T5EncoderConfig.tiny(vocab_size=20)
    glyph = GlyphConfig.tiny(mapper_layers=1)  # the checks run before any compute: abstract models do
    encoder = _abstract(lambda: T5Encoder(t5, rngs=nnx.Rngs(0)))
    mapper = _abstract(lambda: GlyphMapper(t5, glyph, rngs=nnx.Rngs(1)))
    ids, mask = np.ones((2, 6), np.int32), np.ones((2, 6), np.int32)
    with pytest.raises(ValueError, match="span"):
        encode_glyphs(encoder, mapper, np.full((2, 6), 20), mask)
    with pytest.raises(ValueError, match="span"):
        encode_glyphs(encoder, mapper, -ids, mask)
    with pytest.raises(ValueError, match="same shape"):
        encode_glyphs(encoder, mapper, ids, mask[:, :5])
    with pytest.raises(ValueError, match="same shape"):
        encode_glyphs(encoder, mapper, ids[0], mask[0])
    with pytest.raises(ValueError, match="integers"):
        encode_glyphs(encoder, mapper, ids.astype(np.float32), mask)
    with pytest.raises(ValueError, match="only 0"):
        encode_glyphs(encoder, mapper, ids, 2 * mask)


def test_encode_glyphs_compiles_once_and_joins_the_caption():
    t5 = T5EncoderConfig.tiny()
    glyph = GlyphConfig.tiny()
    encoder = _random(lambda: T5Encoder(t5, rngs=nnx.Rngs(0)), t5_encoder_table(t5), 0)
    mapper = _random(lambda: GlyphMapper(t5, glyph, rngs=nnx.Rngs(0)), glyph_mapper_table(t5, glyph), 1)
    tok = ByteTokenizer(special_tokens({"cn-a": 0}, [0, 1]))
    glyph_lib._encode.clear_cache()
    ids_a, mask_a = tok(["Text \"ab\". ", ""], glyph.max_length)
    ids_b, mask_b = tok(["<color-1>x", "Text \"cd\". "], glyph.max_length)
    a = encode_glyphs(encoder, mapper, ids_a, mask_a)
    b = encode_glyphs(encoder, mapper, ids_b, mask_b)
    assert glyph_lib._encode._cache_size() == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))
    cond = jax.random.normal(jax.random.key(0), (2, 5, glyph.mapper_channels))
    pos, neg = append_glyph_rows(cond, jnp.zeros_like(cond), a)
    assert pos.shape == neg.shape == (2, 5 + glyph.max_length, glyph.mapper_channels)
    np.testing.assert_array_equal(np.asarray(pos[:, 5:]), np.asarray(a))
    assert not np.asarray(neg).any()
    with pytest.raises(ValueError, match="sdxl_channels"):
        append_glyph_rows(cond[..., :3], cond[..., :3], a)

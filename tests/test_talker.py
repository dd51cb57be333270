"""The talker (speech generation): config, weights table, the Qwen2 LM's KV cache, the flow head, the history, and
the jitted loop. Golden cases `talker_step` / `talker_generate` (float32 and bfloat16); `transformers.Qwen2Model`
with its own KV cache as an independent reference for the LM; the loop's contracts (one compile per bucket, rows of a
batch stop on their own and equal the rows run alone, caps, bad inputs) on a tiny random talker."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax.config.base import ConfigError
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.config.runtime import Runtime
from ming_jax.config.talker import AggregatorConfig, FlowModelConfig, TalkerConfig
from ming_jax.gen import speech
from ming_jax.models.qwen2 import Qwen2Cache, Qwen2Model
from ming_jax.models.talker import flow
from ming_jax.models.talker import talker as tk
from ming_jax.parity import numerics
from ming_jax.parity.cases import talker_generate, talker_step
from ming_jax.parity.golden import load_case
from ming_jax.sharding import ShardingRules, logical_axes
from ming_jax.weights.qwen2 import qwen2_table
from ming_jax.weights.table import WeightError, load_state_dict
from ming_jax.weights.talker import export_talker, load_talker, talker_table

_CASES = {"talker_step": talker_step, "talker_generate": talker_generate}


def _random(abstract, seed: int):
    """An abstract module with every parameter drawn on the host (norm scales near 1): no init program to compile."""
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = list(nnx.to_flat_state(params))
    for path, var in flat:
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if str(path[-1]) == "scale":
            value = 1 + 0.1 * rng.normal(size=shape)
        else:
            value = (0.15 if len(shape) > 1 else 0.05) * rng.normal(size=shape)
        var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@pytest.fixture(scope="module")
def step_case(golden_dir):
    return load_case(str(golden_dir / "talker_step"))


# --- golden parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, mode", [("talker_step", "float32"), ("talker_generate", "float32"),
                                        ("talker_generate", numerics.MODEL_BF16)])
def test_golden(golden_dir, kind, mode):
    """float32: every output within the float32 bar. bfloat16 (parameters and compute): the whole loop, run to
    its stop, within the whole-model bfloat16 bar and stopping at the same step (talker_step in bfloat16 passes
    too, `python -m ming_jax.parity`, and is left out here for time)."""
    case = load_case(str(golden_dir / kind))
    rows = _CASES[kind].run(case, mode)
    bad = [r.row() for r in rows if not r.ok]
    assert not bad, "\n".join(bad)
    assert {r.name for r in rows} == set(case.outputs)  # every output of the case is compared


# --- config -------------------------------------------------------------------------------------------------------


def test_config_from_the_golden_dict_and_round_trip(step_case):
    cfg = TalkerConfig.from_official(step_case.config)
    assert (cfg.hidden_size, cfg.steps, cfg.patch_size, cfg.history_patch_size, cfg.latent_dim) == (64, 10, 4, 32, 64)
    assert cfg.flow.qk_norm == "rms_norm" and cfg.aggregator.qk_norm is None and cfg.dit_length == 37
    assert (cfg.generate.cfg, cfg.generate.min_new_token, cfg.generate.max_steps) == (2.0, 10, 1000)
    for c in (cfg, TalkerConfig.tiny()):
        assert TalkerConfig.from_official(c.to_official()) == c
    official = dict(step_case.config)
    lm = official.pop("talker_llm_config")
    assert TalkerConfig.from_official(official, llm=lm) == cfg  # the release's separate talker/llm/config.json
    windowed = dict(lm, use_sliding_window=True, sliding_window=64)  # the official talker forces it off
    assert TalkerConfig.from_official(official, llm=windowed).llm == cfg.llm


def test_config_refuses_what_it_cannot_build(step_case):
    d = step_case.config
    bad = [dict(d, vocoder="x"), dict(d, flowmodel=dict(d["flowmodel"], spk_dim=192)),
           dict(d, flowmodel=dict(d["flowmodel"], llm_cond_dim=896)), dict(d, aggregator=dict(d["aggregator"],
                                                                                              in_channels=32)),
           dict(d, history_patch_size=2), dict(d, flowmodel=dict(d["flowmodel"], qk_norm="layer_norm")),
           dict(d, generate_kwargs=dict(top_k=3))]
    for official in bad:
        with pytest.raises(ConfigError):
            TalkerConfig.from_official(official)
    with pytest.raises(ConfigError, match="exactly one"):
        TalkerConfig.from_official(d, llm=d["talker_llm_config"])
    with pytest.raises(ConfigError, match="exactly one"):
        TalkerConfig.from_official({k: v for k, v in d.items() if k != "talker_llm_config"})


# --- weights ------------------------------------------------------------------------------------------------------


def test_table_is_strict_and_round_trips(step_case):
    cfg = TalkerConfig.from_official(step_case.config)
    w = step_case.weights
    model = load_talker(tk.create_abstract(cfg), w)
    back = export_talker(model)
    assert set(back) == set(w)
    for name, value in back.items():
        np.testing.assert_allclose(value, w[name], rtol=1e-6, atol=0, err_msg=name)
    with pytest.raises(WeightError, match="missing"):
        load_talker(tk.create_abstract(cfg), {k: v for k, v in w.items() if k != "stop_head.bias"})
    with pytest.raises(WeightError, match="unexpected"):
        load_talker(tk.create_abstract(cfg), dict(w, **{"cfm.model.spk_embedder.weight": w["spk_head.weight"]}))
    with pytest.raises(WeightError, match="inv_freq"):
        load_talker(tk.create_abstract(cfg), dict(w, **{"aggregator.rotary_embed.inv_freq":
                                                        2 * w["aggregator.rotary_embed.inv_freq"]}))
    swapped = cfg.replace(flow=cfg.flow.replace(qk_norm=None), aggregator=cfg.aggregator.replace(qk_norm="rms_norm"))
    with pytest.raises(WeightError, match="missing"):  # the qk-norm tensors follow the config, both ways
        load_talker(tk.create_abstract(swapped), w)


def test_other_layouts_round_trip_through_the_table():
    cfg = TalkerConfig.tiny(aggregator=AggregatorConfig(hidden_size=24, depth=2, num_heads=3, in_channels=8,
                                                        qk_norm="rms_norm", pe_attn_head=1))
    model = _random(tk.create_abstract(cfg), 1)
    sd = export_talker(model)
    assert "aggregator.blocks.1.attn.q_norm.weight" in sd and "cfm.model.blocks.1.attn.k_norm.weight" in sd
    again = export_talker(load_talker(tk.create_abstract(cfg), sd))
    for name in sd:
        np.testing.assert_array_equal(again[name], sd[name], err_msg=name)
    talker_table(cfg).check_coverage(_shapes(tk.create_abstract(cfg)))  # every leaf filled exactly once


def test_logical_axes_and_stacked_layers(step_case):
    """Every parameter names each dim with an axis the sharding rules know, none twice; blocks are stacked."""
    model = tk.create_abstract(TalkerConfig.from_official(step_case.config))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = logical_axes(var)
        assert len(axes) == var.get_value().ndim, path
        named = [a for a in axes if a is not None]
        assert len(named) == len(set(named)), f"{path}: logical axis used twice {axes}"
        assert set(named) <= set(ShardingRules.names()), f"{path}: {axes}"
    assert logical_axes(model.flow.blocks.layers.attn.q) == ("layers", "embed", "heads", "head_dim")
    assert model.aggregator.blocks.layers.mlp.w_in.shape == (2, 48, 192)


def _shapes(model):
    return {".".join(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model,
                                                                                                       nnx.Param))}


# --- the LM and its KV cache against transformers ------------------------------------------------------------------


def test_lm_kv_cache_matches_transformers_prefill_and_cached_steps():
    """A random transformers Qwen2Model moved by the table: our batched, right-padded prefill and three cached
    single-position steps give what transformers gives each row alone with its own DynamicCache."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=1e6)
    hf = transformers.Qwen2Model(transformers.Qwen2Config(
        vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    tensors = {f"model.{k}": v.numpy() for k, v in hf.state_dict().items()}
    ours = load_state_dict(nnx.eval_shape(lambda: Qwen2Model(cfg, rngs=nnx.Rngs(0))), qwen2_table(cfg), tensors)
    rng = np.random.default_rng(0)
    lengths, t, n = np.array([7, 4]), 7, 3
    prompt = rng.normal(size=(2, t, 32)).astype(np.float32)
    steps = rng.normal(size=(n, 2, 32)).astype(np.float32)

    prefill = nnx.jit(lambda m, x, seg, c: m(x, segment_ids=seg, cache=c, prefill=True))
    step = nnx.jit(lambda m, x, pos, c: m(x, positions=pos, cache=c))
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    hidden, cache = prefill(ours, jnp.asarray(prompt), jnp.asarray(seg), Qwen2Cache.create(cfg, 2, t + n))
    numerics.assert_close("prefill = no-cache forward", hidden[0], ours(jnp.asarray(prompt[:1]))[0])
    got = []
    for j in range(n):
        h, cache = step(ours, jnp.asarray(steps[j][:, None]), jnp.asarray(lengths + j)[:, None], cache)
        got.append(np.asarray(h[:, 0]))
    assert int(cache.length) == t + n
    for b in range(2):
        with torch.no_grad():
            out = hf(inputs_embeds=torch.from_numpy(prompt[b:b + 1, :lengths[b]]), use_cache=True)
            numerics.assert_close(f"prefill row {b}", hidden[b, :lengths[b]], out.last_hidden_state[0].numpy())
            past = out.past_key_values
            for j in range(n):
                out = hf(inputs_embeds=torch.from_numpy(steps[j][b:b + 1, None]), past_key_values=past,
                         use_cache=True)
                past = out.past_key_values
                numerics.assert_close(f"step {j} row {b}", got[j][b], out.last_hidden_state[0, 0].numpy())


def test_lm_cache_refuses_non_causal():
    cfg = Qwen2Config.tiny()
    model = nnx.eval_shape(lambda: Qwen2Model(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="causal"):
        model(jnp.zeros((1, 2, cfg.hidden_size)), causal=False, cache=Qwen2Cache.create(cfg, 1, 4))
    with pytest.raises(ValueError, match="positive"):
        Qwen2Cache.create(cfg, 1, 0)


# --- the flow head and the history --------------------------------------------------------------------------------


def test_time_grids():
    numerics.assert_close("epss 10", flow.epss_times(10), np.array([0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32]) / 32)
    t = flow.epss_times(4)  # not predefined: uniform
    numerics.assert_close("uniform", t, np.linspace(0, 1, 5))
    numerics.assert_close("sway -1", flow.time_grid(4), 1 - np.cos(np.pi / 2 * t))
    numerics.assert_close("no sway", flow.time_grid(4, None), t)
    with pytest.raises(ValueError):
        flow.epss_times(0)
    emb = np.asarray(flow.timestep_sinusoid(jnp.zeros((1,))))
    assert emb.shape == (1, 256) and np.all(emb[:, :128] == 0) and np.all(emb[:, 128:] == 1)  # [sin, cos]


@pytest.mark.parametrize("rope_heads", [0, 2])
def test_head_rope_covers_the_configured_heads(rope_heads):
    """Without rope the blocks are permutation-equivariant over positions; rope on the heads breaks that."""
    cfg = FlowModelConfig(hidden_size=16, depth=1, num_heads=2, in_channels=8, llm_cond_dim=8, pe_attn_head=rope_heads)
    blocks = _random(nnx.eval_shape(lambda: flow.HeadBlocks(cfg, 8, Runtime(), rngs=nnx.Rngs(0))), 0)
    x = jax.random.normal(jax.random.key(0), (1, 5, 16))
    perm = np.array([3, 0, 4, 1, 2])
    same = np.allclose(blocks(x)[:, perm], blocks(x[:, perm]), atol=1e-5)
    assert same == (rope_heads == 0)


def test_history_window():
    cfg = TalkerConfig.tiny()  # Hp 6, P 2, C 8
    lat = np.arange(2 * 9 * 8, dtype=np.float32).reshape(2, 9, 8) + 1
    his = np.asarray(tk.initial_history(cfg, 2, lat, [3, 9]))
    np.testing.assert_array_equal(his[0, :3], 0)
    np.testing.assert_array_equal(his[0, 3:], lat[0, :3])  # right-aligned
    np.testing.assert_array_equal(his[1], lat[1, 3:])  # longer than Hp: the last Hp
    np.testing.assert_array_equal(tk.initial_history(cfg, 2, lat, [0, 0]), 0)
    np.testing.assert_array_equal(tk.initial_history(cfg, 2), 0)
    new = np.ones((2, 2, 8), np.float32)
    upd = np.asarray(tk.update_history(jnp.asarray(his), jnp.asarray(new)))
    np.testing.assert_array_equal(upd[:, :4], his[:, 2:])
    np.testing.assert_array_equal(upd[:, 4:], new)
    np.testing.assert_array_equal(tk.update_history(jnp.asarray(his[:, :2]), jnp.asarray(new)), new)  # Hp == P


# --- the loop -----------------------------------------------------------------------------------------------------

_LOOP = dict(max_steps=12, prompt_bucket=16, min_new_token=1)
_CAPS = (12, 3)
_LENGTHS = (5, 9)
_LATENT_LENGTHS = (3, 10)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny talker whose stop head (bias moved by 0.3) fires at step 10 for the first prompt (and would at
    step 4 for the second, which its cap of 3 steps ends first)."""
    model = _random(tk.create_abstract(TalkerConfig.tiny()), 0)
    model.stop_head.bias.set_value(model.stop_head.bias.get_value() + jnp.array([-0.3, 0.3]))
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(2, 9, 32)).astype(np.float32)
    latents = rng.normal(size=(2, 10, 8)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    return model, embeds, latents, keys


@pytest.fixture(scope="module")
def alone(tiny):
    """Each prompt run on its own (batch 1, both in the same prompt bucket), counting the traces of the loop."""
    model, embeds, latents, keys = tiny
    traces = []
    loop = speech._loop

    def counted(*args, **kwargs):
        traces.append(1)
        return loop(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speech, "_loop", counted)
        outs = [speech.generate_speech(model, embeds[b:b + 1, :_LENGTHS[b]], prompt_latents=latents[b:b + 1],
                                       prompt_latent_lengths=[_LATENT_LENGTHS[b]], key=keys[b:b + 1],
                                       max_new_steps=[_CAPS[b]], taps=True, **_LOOP) for b in range(2)]
    return outs, len(traces)


def test_loop_compiles_once_for_two_utterances_in_one_bucket(alone):
    outs, traces = alone
    assert [int(o.steps[0]) for o in outs] == [11, 3]  # different prompt lengths, different numbers of steps
    assert traces == 1


def test_rows_of_a_batch_stop_on_their_own_and_equal_the_rows_alone(tiny, alone):
    model, embeds, latents, keys = tiny
    outs, _ = alone
    out = speech.generate_speech(model, embeds, list(_LENGTHS), prompt_latents=latents,
                                 prompt_latent_lengths=list(_LATENT_LENGTHS), key=keys, max_new_steps=list(_CAPS),
                                 **_LOOP)
    np.testing.assert_array_equal(out.steps, [11, 3])
    np.testing.assert_array_equal(out.stopped, [True, False])  # row 0: the stop head at step 10; row 1: its cap
    np.testing.assert_array_equal(out.lengths, out.steps * model.cfg.patch_size)
    for b in range(2):
        numerics.assert_close(f"row {b}", out.latents[b], outs[b].latents[0])
        assert np.all(np.asarray(out.latents[b, int(out.lengths[b]):]) == 0)


def test_stop_rule_waits_for_min_new_token(tiny, alone):
    """Step 0's stop probability (0.63) is over 0.5; the row still runs to step 10. With a larger min_new_token
    it runs past that step; the taps record the rule's inputs."""
    model, embeds, latents, keys = tiny
    out = alone[0][0]
    p = np.asarray(out.taps["stop_prob"][:, 0, 1])
    n = int(out.steps[0])
    assert p[0] > 0.5 and n == 11 and p[n - 1] > 0.5 and np.all(p[1:n - 1] <= 0.5)
    hist, lat = np.asarray(out.taps["history"][:, 0]), np.asarray(out.latents[0])
    np.testing.assert_array_equal(hist[1, -2:], lat[:2])  # the history shifts in each step's latents
    later = speech.generate_speech(model, embeds[:1, :_LENGTHS[0]], prompt_latents=latents[:1],
                                   prompt_latent_lengths=[_LATENT_LENGTHS[0]], key=keys[:1], taps=True,
                                   **dict(_LOOP, min_new_token=10))  # the same program: min_new_token is traced
    assert int(later.steps[0]) > 11


def test_one_key_is_split_per_row(tiny):
    model, embeds, _, _ = tiny
    key = jax.random.key(3)
    a = speech.generate_speech(model, embeds, list(_LENGTHS), key=key, **_LOOP)
    b = speech.generate_speech(model, embeds, list(_LENGTHS), key=jax.random.split(key, 2), **_LOOP)
    np.testing.assert_array_equal(a.latents, b.latents)
    assert not np.array_equal(a.latents[0], a.latents[1])


def test_generate_rejects_bad_inputs(tiny):
    model, embeds, latents, keys = tiny
    key = keys[:1]
    noise = speech.Noise(jnp.zeros((3, 1, 2, 8)), jnp.zeros((3, 5, 1, 2, 8)))
    bad = [dict(prompt_embeds=embeds[:1, :, :16], key=key), dict(prompt_embeds=embeds[:1], prompt_lengths=[0],
                                                                  key=key),
           dict(prompt_embeds=embeds[:1], prompt_lengths=[10], key=key), dict(prompt_embeds=embeds[:1]),
           dict(prompt_embeds=embeds[:1], key=key, noise=noise), dict(prompt_embeds=embeds[:1], key=key, max_steps=0),
           dict(prompt_embeds=embeds[:1], noise=dataclasses.replace(noise, sde=noise.sde[:, :4])),
           dict(prompt_embeds=embeds[:1], key=key, prompt_latents=latents[:1, :, :4]),
           dict(prompt_embeds=embeds[:1], key=key, prompt_latents=latents[:1], prompt_latent_lengths=[11]),
           dict(prompt_embeds=embeds[:1], key=keys)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            speech.generate_speech(model, **kwargs)

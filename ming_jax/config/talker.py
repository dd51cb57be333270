"""Config of the talker (release folder `talker/`): the speech-generation head of Ming-flash-omni 2.0.

The talker is a Qwen2 LM that runs one position per 4-latent patch of speech. At each step its last hidden state
conditions a flow-matching DiT ("flowmodel") that turns noise into the next `patch_size` acoustic latents, given the
last `history_patch_size` latents; an "aggregator" transformer folds those latents back into one LM input embedding;
a 2-way stop head on the same hidden state ends the utterance.

Official layout (`BailingTalkerConfig.to_dict()` plus the LM's own `talker/llm/config.json`, which the golden cases
inline as `talker_llm_config`):
    flowmodel:  the DiT's keyword arguments (in_channels, hidden_size, depth, num_heads, mlp_ratio, llm_cond_dim,
                cfg_dropout_prob, grad_checkpointing) plus its blocks' (dropout, qk_norm, pe_attn_head, attn_backend,
                attn_mask_enabled); `llm_cond_dim` must equal the LM width (the DiT ignores the `llm_input_dim` the
                official code passes it; its default 896 would not fit another LM)
    aggregator: the aggregator's keyword arguments (in_channels, hidden_size, depth, num_heads, mlp_ratio) plus the
                same block keys
    steps:      Euler steps of the sampler; patch_size, history_patch_size: latents per step / in the history
    latent_dim, generate_kwargs: written by the golden harness (the official code hard-codes latent_dim = 64 and
                takes the generate arguments as call defaults); both optional here.
Absent keys take the official constructors' defaults. The official talker forces full attention on its LM
(`use_sliding_window = False`, `sliding_window = None`) whatever the LM dict says, so those keys (and the attention
implementation) are dropped before the Qwen2 reader.

Facts of the official code that are not config keys live here as fixed fields: the sinusoid width of the timestep
embedder (256), the sway-sampling coefficient of the time grid (-1), the speaker-embedding width of `spk_head` (192,
CAM++), the DiT / aggregator rope theta (1e4) and their RMSNorm eps (1e-6).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ming_jax.config.base import ConfigError, check_keys, replace
from ming_jax.config.qwen2 import Qwen2Config

TIME_FREQ_DIM = 256  # SinusPositionEmbedding width of the flow DiT's timestep embedder
HEAD_ROPE_THETA = 1e4  # x_transformers RotaryEmbedding default base
HEAD_NORM_EPS = 1e-6  # every RMSNorm of the DiT / aggregator blocks (and the qk norm)
QK_NORMS = (None, "rms_norm")
ATTN_BACKENDS = ("torch", "flash_attn")  # the same math without a mask (no mask is passed at inference)

_BLOCK_KEYS = frozenset({"in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "dropout", "qk_norm",
                         "pe_attn_head", "attn_backend", "attn_mask_enabled"})
_FLOW_KEYS = _BLOCK_KEYS | {"llm_cond_dim", "cfg_dropout_prob", "grad_checkpointing"}
_TOP_KEYS = frozenset({"flowmodel", "aggregator", "steps", "patch_size", "history_patch_size", "latent_dim",
                       "generate_kwargs", "talker_llm_config"})
_GENERATE_KEYS = frozenset({"cfg", "sigma", "temperature", "min_new_token", "max_steps", "max_cache_len"})
_LLM_FORCED = frozenset({"use_sliding_window", "sliding_window", "attn_implementation", "_attn_implementation"})


@dataclasses.dataclass(frozen=True)
class HeadBlocksConfig:
    """The transformer both heads are made of: pre-RMSNorm blocks of attention (q / k / v / out with biases,
    optional per-head RMSNorm on q / k, interleaved rope on all or the first `pe_attn_head` heads) and a tanh-GELU
    MLP of width int(hidden_size * mlp_ratio), then RMSNorm -> Linear. Official defaults for absent keys."""

    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 64
    qk_norm: str | None = None
    pe_attn_head: int | None = None  # rope on the first n heads only; None: all heads
    dropout: float = 0.1  # training only
    attn_backend: str = "flash_attn"  # no effect here (see ATTN_BACKENDS)
    attn_mask_enabled: bool = True  # no effect: inference passes no mask

    def _problems(self) -> list[str]:
        out = [f"{n}={getattr(self, n)} must be positive" for n in ("hidden_size", "depth", "num_heads",
                                                                     "in_channels") if getattr(self, n) <= 0]
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            out.append(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        elif self.num_heads > 0 and self.head_dim % 2:
            out.append(f"head_dim={self.head_dim} must be even for the rope")
        if self.mlp_hidden <= 0:
            out.append(f"mlp_ratio={self.mlp_ratio} gives an empty MLP")
        if self.qk_norm not in QK_NORMS:
            out.append(f"qk_norm={self.qk_norm!r} (known: {QK_NORMS})")
        if self.attn_backend not in ATTN_BACKENDS:
            out.append(f"attn_backend={self.attn_backend!r} (known: {ATTN_BACKENDS})")
        if self.pe_attn_head is not None and not 0 <= self.pe_attn_head <= self.num_heads:
            out.append(f"pe_attn_head={self.pe_attn_head} must be in [0, num_heads={self.num_heads}]")
        return out

    def __post_init__(self):
        problems = self._problems()
        if problems:
            raise ConfigError(f"{type(self).__name__}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def rope_heads(self) -> int:
        return self.num_heads if self.pe_attn_head is None else self.pe_attn_head

    def replace(self, **overrides):
        return replace(self, **overrides)

    @classmethod
    def _read(cls, d: Mapping[str, Any], section: str, keys: frozenset, defaults: Mapping[str, Any], **extra):
        if not isinstance(d, Mapping):
            raise ConfigError(f"{section}: expected a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - keys)
        if unknown:
            raise ConfigError(f"{section}: unknown key(s) {unknown} (known: {sorted(keys)})")
        get = lambda k, conv: conv(d[k]) if k in d and d[k] is not None else defaults.get(k)  # noqa: E731
        return cls(hidden_size=get("hidden_size", int), depth=get("depth", int), num_heads=get("num_heads", int),
                   mlp_ratio=float(d.get("mlp_ratio", 4.0)), in_channels=int(d.get("in_channels", 64)),
                   qk_norm=d.get("qk_norm"), pe_attn_head=None if d.get("pe_attn_head") is None else
                   int(d["pe_attn_head"]), dropout=float(d.get("dropout", 0.1)),
                   attn_backend=str(d.get("attn_backend", "flash_attn")),
                   attn_mask_enabled=bool(d.get("attn_mask_enabled", True)), **extra)

    def _write(self) -> dict[str, Any]:
        out = {"in_channels": self.in_channels, "hidden_size": self.hidden_size, "depth": self.depth,
               "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio, "dropout": self.dropout,
               "qk_norm": self.qk_norm, "attn_backend": self.attn_backend}
        if self.pe_attn_head is not None:
            out["pe_attn_head"] = self.pe_attn_head
        if not self.attn_mask_enabled:
            out["attn_mask_enabled"] = False
        return out


@dataclasses.dataclass(frozen=True)
class FlowModelConfig(HeadBlocksConfig):
    """The CFM's DiT: [t_embed(t) + c_embed(h) ; x_embed(history) ; x_embed(noisy patch)] -> blocks -> final."""

    llm_cond_dim: int = 896
    cfg_dropout_prob: float = 0.1  # training only
    grad_checkpointing: bool = False  # training only

    @classmethod
    def from_official(cls, d: Mapping[str, Any], section: str = "flowmodel") -> "FlowModelConfig":
        return cls._read(d, section, _FLOW_KEYS, dict(hidden_size=1024, depth=28, num_heads=16),
                         llm_cond_dim=int(d.get("llm_cond_dim", 896)),
                         cfg_dropout_prob=float(d.get("cfg_dropout_prob", 0.1)),
                         grad_checkpointing=bool(d.get("grad_checkpointing", False)))

    def to_official(self) -> dict[str, Any]:
        out = dict(self._write(), llm_cond_dim=self.llm_cond_dim, cfg_dropout_prob=self.cfg_dropout_prob)
        if self.grad_checkpointing:
            out["grad_checkpointing"] = True
        return out


@dataclasses.dataclass(frozen=True)
class AggregatorConfig(HeadBlocksConfig):
    """[cls ; x_embed(patch latents)] -> blocks -> RMSNorm -> Linear(hidden, LM width), the cls row kept."""

    @classmethod
    def from_official(cls, d: Mapping[str, Any], section: str = "aggregator") -> "AggregatorConfig":
        return cls._read(d, section, _BLOCK_KEYS, dict(hidden_size=1152, depth=28, num_heads=16))

    def to_official(self) -> dict[str, Any]:
        return self._write()


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Defaults of one utterance's generation (`BailingTalker2.generate`'s keyword defaults and loop caps).

    cfg: classifier-free guidance strength, v = v_c + cfg (v_c - v_u); sigma, temperature: the SDE term
    sigma sqrt(temperature) sqrt(|dt|) eps added after each Euler step (temperature 0: deterministic given y0);
    min_new_token: the stop head is obeyed only at steps > min_new_token (0-based); max_steps (1000) and
    max_cache_len (2048, the official StaticCache) cap a row at min(max_steps, max_cache_len - prompt length) steps.
    """

    cfg: float = 2.0
    sigma: float = 0.25
    temperature: float = 0.0
    min_new_token: int = 10
    max_steps: int = 1000
    max_cache_len: int = 2048

    def __post_init__(self):
        problems = []
        if self.temperature < 0 or self.sigma < 0:
            problems.append(f"temperature={self.temperature} and sigma={self.sigma} must be >= 0")
        if self.max_steps <= 0 or self.max_cache_len <= 0:
            problems.append(f"max_steps={self.max_steps} and max_cache_len={self.max_cache_len} must be positive")
        if problems:
            raise ConfigError("generate_kwargs: " + "; ".join(problems))

    def replace(self, **overrides) -> "GenerateConfig":
        return replace(self, **overrides)

    @classmethod
    def from_official(cls, d: Mapping[str, Any], section: str = "generate_kwargs") -> "GenerateConfig":
        unknown = sorted(set(d) - _GENERATE_KEYS)
        if unknown:
            raise ConfigError(f"{section}: unknown key(s) {unknown} (known: {sorted(_GENERATE_KEYS)})")
        base = cls()
        return cls(**{f.name: type(getattr(base, f.name))(d[f.name]) for f in dataclasses.fields(cls)
                      if d.get(f.name) is not None})

    def to_official(self) -> dict[str, Any]:
        out = {"cfg": self.cfg, "sigma": self.sigma, "temperature": self.temperature,
               "min_new_token": self.min_new_token}
        for name in ("max_steps", "max_cache_len"):  # ours: written only when not the official constants
            if getattr(self, name) != getattr(GenerateConfig, name):
                out[name] = getattr(self, name)
        return out


@dataclasses.dataclass(frozen=True)
class TalkerConfig:
    llm: Qwen2Config
    flow: FlowModelConfig
    aggregator: AggregatorConfig
    steps: int = 10  # Euler steps per patch
    patch_size: int = 4  # latents per LM step
    history_patch_size: int = 32  # latents of history the DiT sees
    latent_dim: int = 64
    generate: GenerateConfig = GenerateConfig()
    speaker_dim: int = 192  # spk_head input (CAM++ embedding); not a config key
    sway_coef: float = -1.0  # CFM's sway_sampling_coef; not a config key

    def __post_init__(self):
        problems = [f"{n}={getattr(self, n)} must be positive" for n in ("steps", "patch_size", "latent_dim",
                                                                          "speaker_dim") if getattr(self, n) <= 0]
        if self.history_patch_size < self.patch_size:
            problems.append(f"history_patch_size={self.history_patch_size} < patch_size={self.patch_size} (the "
                            f"official history update is not defined then)")
        for name, head in (("flowmodel", self.flow), ("aggregator", self.aggregator)):
            if head.in_channels != self.latent_dim:
                problems.append(f"{name}.in_channels={head.in_channels} != latent_dim={self.latent_dim}")
        if self.flow.llm_cond_dim != self.llm.hidden_size:
            problems.append(f"flowmodel.llm_cond_dim={self.flow.llm_cond_dim} != the LM hidden size "
                            f"{self.llm.hidden_size} (the DiT reads llm_cond_dim, not llm_input_dim)")
        if problems:
            raise ConfigError("TalkerConfig: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def dit_length(self) -> int:
        """Tokens of one DiT call: the condition token, the history and the noisy patch."""
        return 1 + self.history_patch_size + self.patch_size

    def replace(self, **overrides) -> "TalkerConfig":
        return replace(self, **overrides)

    @classmethod
    def tiny(cls, **override) -> "TalkerConfig":
        llm = Qwen2Config.tiny(vocab_size=32, hidden_size=32, intermediate_size=48)
        flow = FlowModelConfig(hidden_size=16, depth=2, num_heads=2, in_channels=8, qk_norm="rms_norm",
                               llm_cond_dim=32, attn_backend="torch", dropout=0.0)
        agg = AggregatorConfig(hidden_size=24, depth=1, num_heads=2, in_channels=8, attn_backend="torch",
                               dropout=0.0)
        base = dict(llm=llm, flow=flow, aggregator=agg, steps=5, patch_size=2, history_patch_size=6, latent_dim=8,
                    generate=GenerateConfig(min_new_token=2, max_steps=64))
        return cls(**dict(base, **override))

    @classmethod
    def ming_flash_omni_2(cls, **override) -> "TalkerConfig":
        """The release's talker (`inclusionAI/Ming-flash-omni-2.0`, folders `talker/` and `talker/llm/`), for
        sizing and AOT plans. Neither config.json is in the source snapshot; the values come from:

          * LM (`talker/llm/config.json`): Qwen2-0.5B's shape, hidden 896, 24 layers, 14 heads / 2 KV heads (head
            dim 64), intermediate 4864, vocab 151936, rope theta 1e6, RMSNorm eps 1e-6, tied embeddings. hidden 896,
            24 layers and 2 KV heads are asserted against the released checkpoint by the snapshot-gated config test
            of the mstar port (mstar-project/mstar, test/modular/test_ming_flash_omni_config.py,
            `test_subdir_configs_load_when_present`, which its PORTING_NOTES say passed against the real `talker/`
            tree); the other values are that port's `TalkerLLMConfig` defaults, documented there as mirroring the
            populated keys of the released `talker/llm/config.json`, not asserted. The official code agrees on the
            width: `modeling_bailing_talker.py` hard-codes a 896-wide zero speaker embedding, and sglang-omni calls
            it a "0.5B dense talker (Qwen2, hidden=896)".
          * flowmodel: hidden 1024 and depth 8 are asserted by the same mstar test against the released
            `talker/config.json`; num_heads 16 (head dim 64) and mlp_ratio 4 are that port's defaults (also the
            official DiT's defaults) and are INFERRED; dropout 0 ("0 vs 0.1 on the released ckpt", mstar
            PORTING_NOTES step 6a); attn_mask_enabled False (mstar notes step 6c); qk_norm and pe_attn_head are
            INFERRED to be off (None): a release with qk_norm would add two 64-wide RMSNorm scales per block and
            the strict weight table would refuse this preset.
          * aggregator: dropout 0.1 is asserted by the mstar test; hidden 1024, depth 8, 16 heads, mlp_ratio 4 come
            from the mstar notes ("flowmodel and aggregator share shape, only dropout differs"), not asserted
            (vllm-omni's Ming-omni-tts constants also give an aggregator width of 1024).
          * steps 10, patch_size 4, history_patch_size 32: patch 4 and history 32 are asserted by the mstar test,
            steps 10 is stated in its notes ("the released ckpt's steps=10 schedule"); latent_dim 64 is hard-coded
            by the official talker.
          * generate defaults: the official `generate` keyword defaults (`GenerateConfig()`).

        Replace the inferred values from the real config files before loading weights: the strict weight table
        refuses any shape mismatch."""
        llm = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=True)
        flow = FlowModelConfig(hidden_size=1024, depth=8, num_heads=16, mlp_ratio=4.0, in_channels=64,
                               llm_cond_dim=896, dropout=0.0, attn_mask_enabled=False)
        agg = AggregatorConfig(hidden_size=1024, depth=8, num_heads=16, mlp_ratio=4.0, in_channels=64, dropout=0.1,
                               attn_mask_enabled=False)
        base = dict(llm=llm, flow=flow, aggregator=agg, steps=10, patch_size=4, history_patch_size=32, latent_dim=64,
                    generate=GenerateConfig())
        return cls(**dict(base, **override))

    @classmethod
    def from_official(cls, d: Mapping[str, Any], llm: Mapping[str, Any] | None = None,
                      section: str = "talker") -> "TalkerConfig":
        """`d`: the talker config dict; `llm`: the LM's config.json (`talker/llm/`) unless `d` inlines it as
        `talker_llm_config` (exactly one of the two)."""
        check_keys(d, _TOP_KEYS, section)
        inline = d.get("talker_llm_config")
        if (inline is None) == (llm is None):
            raise ConfigError(f"{section}: give the LM config either inline (talker_llm_config) or as `llm`, "
                              f"exactly one ({'both' if inline is not None else 'neither'} given)")
        lm = {k: v for k, v in (inline if llm is None else llm).items() if k not in _LLM_FORCED}
        return cls(llm=Qwen2Config.from_official(lm, f"{section}.talker_llm_config"),
                   flow=FlowModelConfig.from_official(d.get("flowmodel", {}), f"{section}.flowmodel"),
                   aggregator=AggregatorConfig.from_official(d.get("aggregator", {}), f"{section}.aggregator"),
                   steps=int(d.get("steps", 10)), patch_size=int(d.get("patch_size", 4)),
                   history_patch_size=int(d.get("history_patch_size", 32)), latent_dim=int(d.get("latent_dim", 64)),
                   generate=GenerateConfig.from_official(d.get("generate_kwargs") or {}, f"{section}.generate_kwargs"))

    def to_official(self) -> dict[str, Any]:
        return {"flowmodel": self.flow.to_official(), "aggregator": self.aggregator.to_official(),
                "steps": self.steps, "patch_size": self.patch_size, "history_patch_size": self.history_patch_size,
                "latent_dim": self.latent_dim, "generate_kwargs": self.generate.to_official(),
                "talker_llm_config": self.llm.to_official()}

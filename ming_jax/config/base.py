"""What every sub-model config shares: strict reading of the official (Hugging Face style) config dicts.

The official `config.json` files are `PretrainedConfig.to_dict()` dumps: besides the model's own keys they carry
dozens of generic generation / bookkeeping keys (`top_k`, `id2label`, `torch_dtype`, ...). We accept those, read the
model keys we understand, and refuse anything else so that a typo or a config for another model fails loudly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


class ConfigError(ValueError):
    """A config dict or dataclass that is malformed or internally inconsistent."""


# Keys that `transformers.PretrainedConfig.to_dict()` writes for every model; none of them changes the network.
HF_GENERIC_KEYS = frozenset(
    """
    _name_or_path _attn_implementation _attn_implementation_autoset _commit_hash add_cross_attention architectures
    auto_map bad_words_ids begin_suppress_tokens bos_token_id chunk_size_feed_forward cross_attention_hidden_size
    decoder_start_token_id diversity_penalty do_sample dtype early_stopping encoder_no_repeat_ngram_size eos_token_id
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id id2label
    is_decoder is_encoder_decoder label2id length_penalty max_length min_length model_type no_repeat_ngram_size
    num_beam_groups num_beams num_return_sequences output_attentions output_hidden_states output_scores pad_token_id
    prefix problem_type pruned_heads remove_invalid_values repetition_penalty return_dict return_dict_in_generate
    sep_token_id suppress_tokens task_specific_params temperature tf_legacy_loss tie_encoder_decoder
    tokenizer_class top_k top_p torch_dtype torchscript transformers_version typical_p use_bfloat16 use_cache
    initializer_range output_router_logits tie_word_embeddings
    """.split()
)


def check_keys(d: Mapping[str, Any], known: Iterable[str], section: str) -> None:
    """Raise `ConfigError` naming every key of `d` that is neither model-specific-known nor HF-generic."""
    unknown = sorted(set(d) - set(known) - HF_GENERIC_KEYS)
    if unknown:
        raise ConfigError(f"{section}: unknown config key(s) {unknown}; this is not a config we know how to read")


def require(d: Mapping[str, Any], key: str, section: str) -> Any:
    if key not in d:
        raise ConfigError(f"{section}: required key {key!r} is missing")
    return d[key]


def replace(cfg, **overrides):
    """`dataclasses.replace` that names unknown fields instead of a bare TypeError."""
    names = {f.name for f in dataclasses.fields(cfg)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ConfigError(f"{type(cfg).__name__}: unknown field(s) {bad}")
    return dataclasses.replace(cfg, **overrides)

"""The training data pipeline (`ming_jax.train.data`): rendering and labels, file errors, packing, determinism and
resumption (in process and with grain worker processes), overlong handling."""

import collections
import json
import os

import numpy as np
import pytest

from ming_jax.config.llm import LLMConfig
from ming_jax.processors import prompt as P
from ming_jax.train import data as D

SPEC = {"stand_in": P.tiny_special_ids(LLMConfig.tiny())}
TOK = D.cached_tokenizer(SPEC)
ROLE_END_ID = TOK.token_id(P.ROLE_END)
KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")

CONV = {
    "system": "Answer tersely.",
    "messages": [
        {"role": "HUMAN", "content": "reverse: abc"},
        {"role": "ASSISTANT", "content": "cba"},
        {"role": "HUMAN", "content": [{"type": "text", "text": "add 2 "}, {"type": "text", "text": "and 3"}]},
        {"role": "ASSISTANT", "content": [{"type": "text", "text": "5"}]},
    ],
}


def _runs(mask):
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _docs(batches):
    """The documents of packed batches, row by row and in packing order: (inputs, targets, mask) tuples."""
    out = []
    for b in batches:
        for r in range(b["segment_ids"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, int(seg.max()) + 1):
                idx = np.flatnonzero(seg == s)
                out.append((tuple(b["input_ids"][r, idx]), tuple(b["targets"][r, idx]),
                            tuple(b["loss_mask"][r, idx].astype(bool))))
    return out


def _expected_docs(records, seq_len=None):
    out = []
    for r in records:
        ex = D.example(*D.render(r, TOK))
        out.append(tuple(tuple(ex[k][:seq_len]) for k in ("inputs", "targets", "loss_mask")))
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "sample.jsonl")
    D.write_sample(path, n=40, seed=1)
    return path, D.sample_conversations(40, seed=1)


def _cfg(path, **kw):
    base = {"paths": (path,), "seq_len": 256, "batch_size": 4, "shard_index": 0, "shard_count": 1}
    return D.TrainData(**{**base, **kw})


# --- rendering ----------------------------------------------------------------------------------------------------


def test_render_masks_exactly_the_assistant_texts_and_their_role_end():
    tokens, mask = D.render(CONV, TOK)
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape
    runs = _runs(mask)
    answers = ["cba", "5"]
    assert len(runs) == len(answers)
    prefix = TOK.encode(P.ASSISTANT_PREFIX)
    for (start, end), answer in zip(runs, answers):
        assert TOK.decode(tokens[start:end]) == answer + P.ROLE_END
        assert tokens[end - 1] == ROLE_END_ID
        assert list(tokens[start - len(prefix):start]) == prefix  # the role prefix itself is not learned
    _, all_mask = D.render(CONV, TOK, labels="all")
    assert all_mask.all()
    with pytest.raises(D.DataError, match="labels='none'"):
        D.render(CONV, TOK, labels="none")


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_render_is_the_chat_template(system, thinking):
    human_last = {"messages": CONV["messages"] + [{"role": "HUMAN", "content": "copy: xy"}]}
    if system is not None:
        human_last["system"] = system
    tokens, mask = D.render(human_last, TOK, labels="all", thinking=thinking)
    text = P.apply_chat_template(human_last["messages"], system=system, thinking=thinking)
    assert text.endswith(P.ASSISTANT_PREFIX)
    assert TOK.decode(tokens) == text[:-len(P.ASSISTANT_PREFIX)]
    assert list(tokens) == TOK.encode(text[:-len(P.ASSISTANT_PREFIX)])  # segment-wise == whole-text tokenising
    assert mask.all()
    # Ending with the answer: the template of the question, then the answer and its role end.
    tokens, _ = D.render({**human_last, "messages": human_last["messages"][:-1]}, TOK, thinking=thinking)
    text = P.apply_chat_template(human_last["messages"][:3], system=system, thinking=thinking)
    assert TOK.decode(tokens) == text + "5" + P.ROLE_END


def test_release_tokenizer_spec_renders_the_same(tmp_path):
    TOK.save(str(tmp_path))
    release = D.tokenizer_from_spec(str(tmp_path))
    assert np.array_equal(D.render(CONV, release)[0], D.render(CONV, TOK)[0])
    with pytest.raises(D.DataError, match="tokenizer_spec"):
        D.tokenizer_from_spec({"vocab": 3})


def test_example_is_the_next_token_shift():
    tokens, mask = D.render(CONV, TOK)
    ex = D.example(tokens, mask)
    assert np.array_equal(ex["inputs"], tokens[:-1]) and np.array_equal(ex["targets"], tokens[1:])
    assert np.array_equal(ex["loss_mask"], mask[1:])
    assert ex["targets"][ex["loss_mask"]][-1] == ROLE_END_ID  # the last learned target ends the answer


# --- errors -------------------------------------------------------------------------------------------------------

GOOD = json.dumps(CONV)


@pytest.mark.parametrize("line, fragment", [
    (json.dumps({"messages": [{"role": "HUMAN", "content": [{"type": "image", "image": "a.png"}]},
                              {"role": "ASSISTANT", "content": "x"}]}),
     "image file not found"),
    (json.dumps({"messages": [{"role": "HUMAN", "content": [{"type": "audio", "audio": "a.wav"}]}]}),
     "audio items in training data are not supported yet"),
    (json.dumps({"messages": [{"role": "USER", "content": "hi"}]}), "role 'USER'"),
    (json.dumps({"messages": [{"role": "SYSTEM", "content": "hi"}]}), "'system' key"),
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    (json.dumps({"system": "x"}), "'messages' must be a non-empty list"),
    (json.dumps({"messages": [{"role": "HUMAN", "content": "hi"}]}), "no ASSISTANT message"),
    (json.dumps({"messages": [{"role": "HUMAN", "content": "look <IMAGE>"}, {"role": "ASSISTANT", "content": "x"}]}),
     "reserved placeholder"),
    (json.dumps({"messages": [{"role": "HUMAN", "content": "a<|role_end|>"}, {"role": "ASSISTANT", "content": "x"}]}),
     "role marker"),
    (json.dumps({"messages": [{"role": "HUMAN", "content": 3}]}), "content must be a string"),
    (json.dumps({**CONV, "sytem": "typo"}), "unknown key"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(D.DataError) as e:
        D.read_conversations([str(path)])
    assert f"{path}:3" in str(e.value) and fragment in str(e.value), str(e.value)


def test_reading_skips_empty_lines_and_labels_all_allows_no_answer(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(f"\n{GOOD}\n   \n" + json.dumps({"messages": [{"role": "HUMAN", "content": "hi"}]}) + "\n")
    got = D.read_conversations([str(path)], labels="all")
    assert [w for w, _ in got] == [f"{path}:2", f"{path}:4"]
    assert got[0][1]["messages"][2]["content"] == "add 2 and 3"


def test_config_is_checked():
    with pytest.raises(D.DataError, match="overlong='cut'.*labels|labels=.*overlong='cut'"):
        D.TrainData(paths="a.jsonl", seq_len=8, batch_size=1, labels="x", overlong="cut")
    with pytest.raises(D.DataError, match="shard_index"):
        D.TrainData(paths="a.jsonl", seq_len=8, batch_size=1, shard_index=0)
    assert D.TrainData(paths="a.jsonl", seq_len=8, batch_size=1).paths == ("a.jsonl",)


# --- packing ------------------------------------------------------------------------------------------------------


def _check_rows(batches, cfg):
    for b in batches:
        assert set(b) == set(KEYS)
        assert all(b[k].shape == (cfg.batch_size, cfg.seq_len) for k in KEYS)
        assert b["loss_mask"].dtype == np.float32 and all(b[k].dtype == np.int32 for k in KEYS if k != "loss_mask")
        for r in range(cfg.batch_size):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            used = int(np.count_nonzero(seg))
            assert (seg[used:] == 0).all() and (seg[:used] > 0).all()  # padding trails the documents
            assert np.array_equal(np.unique(seg[:used]), np.arange(1, seg.max() + 1))
            assert (np.diff(seg[:used]) >= 0).all()
            for s in range(1, seg.max() + 1):
                assert np.array_equal(pos[seg == s], np.arange(np.count_nonzero(seg == s)))
            pad = seg == 0
            assert (b["loss_mask"][r][pad] == 0).all() and (b["input_ids"][r][pad] == 0).all()
            assert (b["targets"][r][pad] == 0).all() and (pos[pad] == 0).all()


def test_packing_one_epoch_every_document_once(sample):
    path, records = sample
    expected = collections.Counter(_expected_docs(records))
    assert D.dataset_stats(_cfg(path), SPEC).overlong == 0
    # One row per batch: nothing is dropped at the end, so each document comes exactly once.
    cfg = _cfg(path, batch_size=1, shuffle=False, num_epochs=1)
    batches = list(D.make_iterator(cfg, SPEC))
    _check_rows(batches, cfg)
    assert collections.Counter(_docs(batches)) == expected
    # Four rows: at most once each; only what the dropped final partial batch (< 4 rows) held is missing.
    cfg = _cfg(path, shuffle=False, num_epochs=1)
    batches = list(D.make_iterator(cfg, SPEC))
    _check_rows(batches, cfg)
    seen = collections.Counter(_docs(batches))
    assert max(seen.values()) == 1 and not seen - expected
    missing = expected - seen
    assert sum(len(d[0]) for d in missing.elements()) <= (cfg.batch_size - 1) * cfg.seq_len
    assert all((b["segment_ids"][:, 0] == 1).all() for b in batches)  # no empty rows


def test_shuffle_reshuffles_each_epoch_deterministically(sample):
    path, records = sample
    cfg = _cfg(path, batch_size=1, num_epochs=2, seed=5)
    docs = _docs(list(D.make_iterator(cfg, SPEC)))  # one bin: documents come in the shuffled source order
    first, second = docs[:len(records)], docs[len(records):]
    expected = collections.Counter(_expected_docs(records))
    assert collections.Counter(first) == expected == collections.Counter(second)
    assert first != second and first != _expected_docs(records)


def test_two_iterators_agree_and_the_seed_matters(sample):
    path, _ = sample
    a = _take(D.make_iterator(_cfg(path, seed=3), SPEC), 6)
    assert _equal(a, _take(D.make_iterator(_cfg(path, seed=3), SPEC), 6))
    assert not _equal(a, _take(D.make_iterator(_cfg(path, seed=4), SPEC), 6))
    _check_rows(a, _cfg(path))


def test_resume_in_process(sample):
    path, _ = sample
    cfg = _cfg(path, seq_len=200, seed=7)
    it = D.make_iterator(cfg, SPEC)
    _take(it, 3)
    blob = D.save_state(it)
    json.loads(blob)
    after = _take(it, 12)  # crosses the end of the first epoch (40 conversations, ~2 per row)
    fresh = D.make_iterator(cfg, SPEC)
    D.restore_state(fresh, blob)
    assert _equal(after, _take(fresh, 12))


def test_resume_with_worker_processes(sample):
    path, _ = sample
    cfg = _cfg(path, seed=7, worker_count=2)
    it = D.make_iterator(cfg, SPEC)
    fresh = D.make_iterator(cfg, SPEC)
    try:
        head = _take(it, 3)
        blob = D.save_state(it)
        after = _take(it, 6)
        assert _equal(head, _take(fresh, 3))  # two worker-process iterators agree
        D.restore_state(fresh, blob)
        assert _equal(after, _take(fresh, 6))
        assert all(type(b[k]) is np.ndarray for b in after for k in KEYS)  # copied out of shared memory
        _check_rows(after, cfg)
    finally:
        it.close()
        fresh.close()


# --- overlong -----------------------------------------------------------------------------------------------------


def test_overlong_truncate_or_drop(sample):
    path, records = sample
    seq_len = 100
    full = _expected_docs(records)
    stats = D.dataset_stats(_cfg(path, seq_len=seq_len), SPEC)
    overlong = sum(len(d[0]) > seq_len for d in full)
    assert stats.overlong == overlong and 0 < overlong < len(full) and stats.longest == max(len(d[0]) for d in full)
    kw = {"seq_len": seq_len, "batch_size": 1, "shuffle": False, "num_epochs": 1}
    truncated = _docs(list(D.make_iterator(_cfg(path, overlong="truncate", **kw), SPEC)))
    assert truncated == _expected_docs(records, seq_len)
    dropped = _docs(list(D.make_iterator(_cfg(path, overlong="drop", **kw), SPEC)))
    assert dropped == [d for d in full if len(d[0]) <= seq_len]
    with pytest.raises(D.DataError, match="every conversation seen"):
        next(D.make_iterator(_cfg(path, overlong="drop", seq_len=20), SPEC))


# --- the sample data ----------------------------------------------------------------------------------------------


def test_sample_is_deterministic_and_valid(tmp_path):
    records = D.sample_conversations(64, seed=2)
    assert records == D.sample_conversations(64, seed=2) != D.sample_conversations(64, seed=3)
    assert any("system" in r for r in records) and any(len(r["messages"]) > 2 for r in records)
    path = D.write_sample(tmp_path / "s.jsonl", n=64, seed=2)
    assert os.listdir(tmp_path) == ["s.jsonl"]  # no temporary file left
    assert [r for _, r in D.read_conversations([path])] == [D.normalize(r) for r in records]
    assert all(c.isascii() for _, r in D.read_conversations([path]) for m in r["messages"] for c in m["content"])
    with open(path) as f:
        assert f.readline().startswith('{"messages": ')

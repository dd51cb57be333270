"""The talker's text front end (processors/speech_text.py, speech_tn.py, speech_tn_zh.py) against the release.

Reference: `tests/data/speech_text_reference/reference.json`, made by `tools/make_speech_text_reference.py`, which
runs the release's own speech loop (omni_audio_generation / instruct_audio_generation, taken out of
modeling_bailing_talker.py), front/ and talker_tn/ (no pynini, plus the CJK branch with pynini) on fixed inputs.

With the built-in word tables the Chinese rule layer differs from the release on the cases of `BUILTIN_GAPS`
(words only the release's talker_re.json has); `MING_TALKER_TN_DIR=<the release's talker_tn/>` adds the checks
with the release's own tables (every case equal) and, where pynini is installed, of the FST normaliser.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

from ming_jax.processors import speech_text as st
from ming_jax.processors import speech_tn as tn
from ming_jax.processors.speech_tn_zh import ZhTables, zh_cardinal, zh_rules

REFERENCE = pathlib.Path(__file__).resolve().parent / "data" / "speech_text_reference" / "reference.json"
RELEASE_TN_DIR = os.environ.get("MING_TALKER_TN_DIR")

# Inputs where the built-in tables read differently from the release's talker_re.json (the words are not in
# ours); each must still differ, so this list stays true.
BUILTIN_GAPS = {
    "沪深300": "proper noun (stock index) 沪深300 -> 沪深三百",
    "上证50和上证500": "proper noun 上证50 -> 上证五十",
    "下载100APP": "serial word after a number (APP) -> digits with 幺",
    "沪深300指数今天上涨了2.5%，": "proper noun 沪深300",
}


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


def _fragments(case: dict) -> list[str]:
    return [f["fragment"] for f in case["fragments"]]


def _release_tables() -> ZhTables:
    path = pathlib.Path(RELEASE_TN_DIR or "") / "talker_re.json"
    if not RELEASE_TN_DIR or not path.is_file():
        pytest.skip("set MING_TALKER_TN_DIR to the release's talker_tn/ folder")
    return ZhTables.from_release_json(path)


# --- the reference itself ------------------------------------------------------------------------------------------


def test_reference_provenance(ref):
    assert ref["talker_tn_mode"].startswith("no-pynini")
    assert ref["max_length"] == st.MAX_LENGTH
    for rel in ("front/text_segment_cut.py", "front/number_en.py", "front/toolkit.py", "modeling_bailing_talker.py",
                "talker_tn/talker_re.py", "talker_tn/talker_re.json", "talker_tn/talker_pre_processor.py"):
        assert len(ref["official_files"][rel]) == 40
    assert ref["inflect_version"]
    assert all(case["instruct_same"] for case in ref["speech"])  # both speech loops cut the same way
    assert len(ref["speech"]) >= 60 and sum(len(c["fragments"]) for c in ref["speech"]) >= 100


# --- fragments ----------------------------------------------------------------------------------------------------


def test_speech_fragments_match_release(ref):
    for case in ref["speech"]:
        got = st.speech_fragments(case["input"])
        want = _fragments(case)
        if "error" in case:  # the release raised part-way; what it had synthesised by then is ours too
            assert got[:len(want)] == want, case["input"]
        else:
            assert got == want, case["input"]


def test_the_release_failure_is_skipped(ref):
    """A long punctuation-only sentence followed by more text: the release raises; we drop the sentence."""
    (case,) = [c for c in ref["speech"] if c["input"] == "!!!!!!!!!!!!!!!abc"]
    assert case["error"].startswith("AttributeError") and case["fragments"] == []
    assert st.speech_fragments(case["input"]) == ["!!abc"]


def test_chunked_text_matches_release(ref):
    for case in ref["speech_chunked"]:
        got = list(st.iter_speech_fragments(st.iter_mixed_pieces(case["chunks"])))
        assert "error" not in case and got == _fragments(case), case["chunks"]


def test_cut_and_tokenizer_match_release(ref):
    for case in ref["cut"]:
        assert st.cut_by_semantic_length(case["input"], case["max_length"]) == case["fragments"], case
    for case in ref["tokenize"]:
        assert st.tokenize_mixed_text(case["input"]) == case["pieces"], case["input"]
        assert list(st.iter_mixed_pieces([case["input"]])) == case["pieces"]
    assert list(st.iter_mixed_pieces("ab 1")) == ["a", "b", " ", "1"]  # a str: one-character chunks


def test_is_chinese_and_semantic_length(ref):
    for case in ref["speech"]:
        for frag in case["fragments"]:
            assert st.is_chinese(frag["fragment"]) == frag["is_chinese"]
    assert st.semantic_length("中文 English words, 3.14 和") == 5
    assert st.semantic_length("\u9fa6") == 0 and st.is_chinese("\u9fa6")  # the cut counts a narrower range


# --- normalisation --------------------------------------------------------------------------------------------------


def test_english_numbers_match_release(ref):
    cases = [(c["input"], c["output"]) for c in ref["numbers_en"]]
    cases += [(f["fragment"], f["numbers_en"]) for c in ref["speech"] for f in c["fragments"]]
    for text, want in cases:
        assert tn.english_numbers(text) == want, text


def test_cardinal_range():
    assert tn.cardinal(10**36 - 1).startswith("nine hundred ninety-nine decillion, ")
    with pytest.raises(ValueError):
        tn.cardinal(10**36)
    with pytest.raises(ValueError):
        tn.cardinal(-1)
    assert tn.cardinal(1001, "and") == "one thousand and one" and tn.ordinal_words("twenty") == "twentieth"


def test_preprocess_matches_release(ref):
    for case in ref["pre_processor"]:
        assert tn.preprocess(case["input"]) == case["output"], case["input"]


def test_fragment_chain_matches_release(ref):
    """prepare_fragment with the built-in normaliser is the release's no-pynini chain, outside BUILTIN_GAPS."""
    normaliser = tn.RuleNormaliser()
    checked = 0
    for case in ref["speech"] + ref["speech_chunked"]:
        for frag in case["fragments"]:
            got = st.prepare_fragment(frag["fragment"], normaliser)
            if frag["fragment"] in BUILTIN_GAPS:
                assert got != frag["final"]
                continue
            assert got == frag["final"], frag["fragment"]
            assert normaliser(frag["tn_input"]) == frag["tn"]
            checked += 1
    assert checked >= 150


def test_chinese_rules_match_release(ref):
    normaliser = tn.RuleNormaliser()
    for case in ref["tn_zh"]:
        got = normaliser(case["input"])
        if case["input"] in BUILTIN_GAPS:
            assert got != case["tn"], case["input"]
        else:
            assert got == case["tn"], case["input"]
        if "rule_error" in case:  # where the release's layer raises, the text comes back as it went in
            assert got == tn.preprocess(case["input"])


def test_release_tables_match_everything(ref):
    normaliser = tn.RuleNormaliser(_release_tables())
    for case in ref["tn_zh"]:
        assert normaliser(case["input"]) == case["tn"], case["input"]
    for case in ref["speech"]:
        for frag in case["fragments"]:
            assert st.prepare_fragment(frag["fragment"], normaliser) == frag["final"]


def test_fst_normaliser_matches_release(ref):
    pytest.importorskip("pynini")
    if not RELEASE_TN_DIR or not (pathlib.Path(RELEASE_TN_DIR) / "zh_tn_tagger.fst").is_file():
        pytest.skip("set MING_TALKER_TN_DIR to the release's talker_tn/ folder")
    normaliser = tn.FstNormaliser(RELEASE_TN_DIR, languages=("zh",))
    pairs = [(c["input"], c["fst_zh"]) for c in ref["tn_zh"] if "fst_zh" in c]
    pairs += [(f["tn_input"], f["fst_zh"]) for c in ref["speech"] for f in c["fragments"] if "fst_zh" in f]
    assert len(pairs) > 150
    for text, want in pairs:
        assert normaliser(text) == want, text


def test_token_reorder_matches_release(ref):
    for case in ref["reorder"]:
        orders = tn.ZH_FIELD_ORDERS if case["order"] == "tn" else tn.EN_FIELD_ORDERS
        assert tn.reorder_tagged(case["input"], orders) == case["output"], case["input"]
    with pytest.raises(tn.FstError):
        tn.reorder_tagged('char { value: "open', tn.ZH_FIELD_ORDERS)


def test_chinese_readings():
    assert [zh_cardinal(n) for n in ("0", "00", "10", "15", "20", "200", "2000", "1010", "10005", "100000000")] == [
        "零", "零", "十", "十五", "二十", "两百", "两千", "一千零一十", "一万五", "一亿"]
    assert zh_rules("现在2:00了") == "现在两点整了"
    assert zh_rules("价格٣元") == "价格٣元"  # a digit the release cannot read: the text comes back unchanged


# --- pluggable step and errors -------------------------------------------------------------------------------------


def test_normaliser_protocol():
    assert isinstance(tn.RuleNormaliser(), tn.Normaliser)
    assert isinstance(tn.make_normaliser(), tn.RuleNormaliser)
    assert st.prepare_fragment("，I have 3 cats", lambda s: s) == "I have three cats"
    assert st.prepare_fragment("I have 3 cats", lambda s: "，，" + s) == "，I have three cats"  # one "，" dropped
    assert st.prepare_fragment("我有3个", lambda s: s) == "我有3个"  # CJK: no English number step


def test_bad_input():
    for call in (st.speech_fragments, st.tokenize_mixed_text, st.cut_by_semantic_length, tn.english_numbers,
                 tn.RuleNormaliser(), lambda x: st.prepare_fragment(x, tn.RuleNormaliser())):
        with pytest.raises(TypeError, match="str"):
            call(b"bytes")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_length"):
            st.speech_fragments("hello", max_length=bad)
        with pytest.raises(ValueError, match="max_length"):
            st.cut_by_semantic_length("hello", bad)
    for bad in (1.5, True, "50"):
        with pytest.raises(TypeError, match="max_length"):
            st.speech_fragments("hello", max_length=bad)
    with pytest.raises(ValueError, match="max_length"):
        next(st.iter_speech_fragments(iter(["a"]), max_length=0))
    assert st.speech_fragments("", max_length=1) == [] and st.cut_by_semantic_length("", 1) == []


def test_tables_errors(tmp_path):
    bad = tmp_path / "talker_re.json"
    bad.write_text(json.dumps({"money": {}}), encoding="utf-8")
    with pytest.raises(ValueError, match="talker_re.json"):
        ZhTables.from_release_json(bad)
    with pytest.raises(ValueError, match="single characters"):
        ZhTables(money={}, measure_before={}, measure_after={}, serial_before={}, serial_after={},
                 char_map={"ab": "x"}, proper_nouns={})


def test_fst_normaliser_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="zh_tn_tagger.fst"):
        tn.make_normaliser(tmp_path)
    with pytest.raises(ValueError, match="languages"):
        tn.FstNormaliser(tmp_path, languages=("fr",))
    for lang in ("zh", "en"):
        for part in ("tagger", "verbalizer"):
            (tmp_path / f"{lang}_tn_{part}.fst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pynini", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install pynini"):
        tn.FstNormaliser(tmp_path)

"""Make the talker text front end reference: the official sentence grouping, semantic-length cut, English number
normaliser and TalkerTN (without pynini) run on a list of inputs.

    mkdir /tmp/ming2 && git -C /path/to/Ming2 archive HEAD front talker_tn modeling_bailing_talker.py \
        | tar -x -C /tmp/ming2        # or `git show HEAD:<path>` file by file where the archive has absent blobs
    python tools/make_speech_text_reference.py --official /tmp/ming2 --out tests/data/speech_text_reference

`--official` is a folder holding the release's `front/`, `talker_tn/` and `modeling_bailing_talker.py`, unmodified (a
scratch export of github Zihhan318/Ming2; the blob ids of the files it was run with are computed from their bytes,
as `git hash-object` does, and written to the output). Nothing of the official code or data is stored in this
project; this script imports it from that folder. It needs `inflect` (the release's number normaliser imports it);
install it into a scratch venv, not into the project's. Run it outside the test suite; `tests/test_speech_text.py`
reads only what it writes.

What it runs, and what it does around the official code at run time (files untouched):
1. `pynini` is made unimportable (a meta-path finder raising ModuleNotFoundError(name="pynini")), so the official
   TalkerTN takes its documented fallback: pre-processor, then for text with a CJK character the regex layer
   (talker_re.py + re_utils/, configured by talker_re.json), no FST grammars. The mode is written to the output.
2. `omni_audio_generation` and `instruct_audio_generation` (methods of the release's talker class) are taken out of
   modeling_bailing_talker.py with `ast` and run as plain functions on a stand-in `self`: no model, `tts_job`
   yields one silent chunk and records the text it was given; `is_chinese`, `normalize_numbers` and the
   normaliser are wrapped to record each fragment, its language test and the normalisation steps. The speech
   loop itself (sentence grouping, cutting, per-fragment chain) is the release's code, unchanged.
3. The official `normalize_numbers`, `TalkerPreProcessor` and `TalkerTN` are also run on their own on lists of
   short inputs (English numbers; pre-processor cases; Chinese numbers, dates, times, money, ranges), and the
   regex layer directly, to record when it raises (TalkerTN then returns its input unchanged).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.abc
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import re
import subprocess
import sys
import time
import types

OFFICIAL_FILES = (
    "modeling_bailing_talker.py",
    "front/toolkit.py", "front/text_segment_cut.py", "front/number_en.py",
    "talker_tn/talker_tn.py", "talker_tn/talker_pre_processor.py", "talker_tn/talker_re.py", "talker_tn/talker_re.json",
    "talker_tn/re_utils/re_base.py", "talker_tn/re_utils/re_char.py", "talker_tn/re_utils/re_date.py",
    "talker_tn/re_utils/re_decimal.py", "talker_tn/re_utils/re_digit.py", "talker_tn/re_utils/re_formula.py",
    "talker_tn/re_utils/re_frac.py", "talker_tn/re_utils/re_ip.py", "talker_tn/re_utils/re_measure.py",
    "talker_tn/re_utils/re_money.py", "talker_tn/re_utils/re_order.py", "talker_tn/re_utils/re_percent.py",
    "talker_tn/re_utils/re_phone_dash.py", "talker_tn/re_utils/re_punc.py", "talker_tn/re_utils/re_serial.py",
    "talker_tn/re_utils/re_sn.py", "talker_tn/re_utils/re_time.py", "talker_tn/re_utils/re_utils.py",
    "talker_tn/re_utils/re_version.py", "talker_tn/token_parser.py",
)

_LONG_EN = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch and "
            "the children laugh in the distance as the sun slowly sets behind the rolling green hills of the quiet "
            "countryside where nothing much ever happens except the changing of the seasons and the harvest that "
            "comes every autumn without fail")
_LONG_ZH = ("我们今天要讨论的问题是如何在有限的时间里完成尽可能多的工作同时保证质量不下降这需要合理的计划和高效的执行"
            "还需要团队成员之间的密切配合以及对各种突发情况的及时应对否则很容易出现进度拖延和返工的情况")

# Whole texts through the speech loop.
SPEECH_INPUTS = [
    "Hello world.",
    "The meeting is at 3:30 pm on March 5th, 2024, in room 101.",
    "It costs $12.99, or about £10.50; the deluxe version is $1,299.",
    "Revenue grew 25.5% to 1,234,567 dollars in 2023, and fell -3.2% in the fourth quarter.",
    "Mix 3/4 cup of flour with 1/2 cup of sugar and 2/3 of the butter, then bake for 25 minutes.",
    "GPT-4 and v2.1 are versions; the 21st century started in 2001, not 2000.",
    "The file is 512 MB and downloads at 20 Mbps; the CPU runs at 3.5 GHz and draws 65 W.",
    "Temperatures reached 40 °C in July and -5 °F in January, a swing of 45 degrees.",
    "Dr. Smith lives at 221B Baker St. He said it is 1.5 km away from the station.",
    "The U.S.A. and the U.K. signed the deal in 1999 after 12 years of talks.",
    ("Our company was founded in 1998. Since then we have grown to 2,500 employees across 14 countries.\n"
     "Last year revenue reached $3.2 billion, up 12% from the year before.\n"
     "We expect growth to continue, driven by new products and markets, and by the 3rd generation of our platform."),
    "Line one\nLine two\nthird line without a period",
    _LONG_EN,
    "Call 555-1234 now! Really? Yes, right now, before the offer ends tonight.",
    "Pi is roughly 3.14159 and e is roughly 2.71828. Both are irrational numbers.",
    "The number 123456789012345678901234567890123456789 is too big to read aloud easily.",
    "In 1984, 1,000,000 people watched 2 games and 0.5 of them left early.",
    "It was $1 then, £1 later, $0.99 on sale and $-5 after the refund was processed.",
    "Wait... what?! No way!!! That cannot be right, can it?",
    "Version 12.5 was released in 2020. The next one is due soon. Stay tuned.",
    "U.S. stocks rose 1.2% on Monday. The S&P 500 closed at 4,500.25 points.",
    ("First, we gather the data, clean it, and label it; then, we train the model, evaluate it, tune it, and "
     "finally, after many rounds of testing, reviewing, debugging, and documenting, we ship it to the customers, "
     "who use it, break it, and report the bugs back to us, so we can fix them, again and again, forever."),
    "Hello\n\nWorld\n",
    "今天是2024年5月1日，气温25℃，天气晴朗。",
    "价格是¥99.9元，打8折后是79.92元，非常划算。",
    "今年营收增长了25%，达到3.5亿元，创历史新高。",
    "会议在下午3:30开始，一直持续到17:45:30才结束。",
    "他的电话是010-12345678，手机号是13812345678，有事请联系。",
    "我们在2023-12-25见面，或者2024.1.1也行，你来定吧。",
    "第1名得了98.5分，第2名得了97分，第3名只得了80分。",
    "这件衣服原价300元，现价199元，一共便宜了101元。",
    "温度从-5℃到10℃不等，湿度大约在60%~70%之间。",
    "简单的算式：1+1=2，3x4=12，10/2=5，大家都会。",
    "新版本v1.2.3已经发布了，服务器的IP地址是192.168.1.1。",
    "他每天跑3-5公里，大约用1小时，坚持了两年。",
    "设备的序列号是AB12-CD34-EF56，请妥善记下。",
    "第一行内容\n第二行内容\n第三行的文字比较长一些，需要被切分成几段来读。",
    ("人工智能是计算机科学的一个分支。它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。"
     "该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。自诞生以来，理论和技术日益成熟，"
     "应用领域也不断扩大。可以设想，未来人工智能带来的科技产品，将会是人类智慧的容器。"),
    _LONG_ZH,
    "①首先准备材料，②其次认真检查，③最后提交报告。",
    "沪深300指数今天上涨了2.5%，学习C++其实很难。",
    "我有３个苹果和２０个橘子，还有１０５颗葡萄。",
    "我喜欢用Python写代码，现在用的版本是3.11，很好用。",
    "The price is 100元 for 3 people, which is cheap.",
    "OpenAI发布了GPT-4o模型，支持128k的上下文长度。",
    "今天天气很好！我们去公园散步吧？好的，马上出发。",
    "有1/3的人同意这个方案，有2/3的人反对这个方案。",
    "他出生于1990年，今年34岁，在北京工作了10年。",
    "5月20日是个特别的日子，12月31日是一年的最后一天。",
    "**重要通知**：请访问 https://example.com/page?id=3 查看详情。",
    "Use `pip install ming` and see ![img](a.png) for the $x^2$ details, then run the tests again.",
    "Emoji 😀 test ★ done ✔︎ and everything looks fine to me now.",
    ("Ming 是一个全模态模型，它可以理解文本、图像、音频和视频。It can also generate speech and images. "
     "我们在2025年发布了第2.0版，在多个基准测试上取得了领先的成绩，which is great news for everyone involved in "
     "the project, and we thank all 120 contributors."),
    "大约3.14年前，他的手机1.5号码换过一次，现在用的是新的。",
    "中文\n\nEnglish words here\n混合内容在这里结束",
    "Hi. " * 30,
    "短句。" * 20,
    "A" * 80 + " is a very long word that should stay whole.",
    "",
    "。。。",
    "!!!",
    "     ",
    "0",
    "0000",
    "a",
    "!!!!!!!!!!!!!!!abc",  # the release raises here (a punctuation-only sentence, then more text)
    "3.14. 2.71. 1.41. 1.73. 2.23. 2.44.",
    _LONG_EN + " in 2020. ",  # a long leftover ending after its last stop: the release cuts a lone "。" too
    "句子一。，句子二。，句子三结束了吗？是的，已经结束了。",
]

# Texts given to the speech loop as a list of chunks (the release's tokenizer then sees multi-character pieces,
# as with streamed text): (index into SPEECH_INPUTS, chunk size).
SPEECH_CHUNKED = [(1, 7), (2, 1000), (9, 5), (10, 16), (11, 4), (14, 9), (18, 3), (22, 6), (24, 8), (36, 5),
                  (52, 11), (55, 13)]

# Chinese (and a few mixed) strings through TalkerTN alone; most have a CJK character, else TalkerTN leaves them.
TN_ZH_INPUTS = [
    "今天是2024年5月1日", "2024年5月发布", "5月1号见", "5月1日见", "1990年", "日期2023-12-25见", "日期2024.1.1见",
    "日期2024/02/29见", "2023-13-45号", "编号3.5.6呢", "版本v1.2.3发布", "版本1.2.3发布", "地址192.168.1.1呢",
    "现在10:30了", "下午3:30开会", "到17:45:30结束", "中午12:00吃饭", "凌晨2:05醒来", "10:30am开始", "8点30pm到",
    "上午9:00:00开会", "从8:00-10:00上课", "从2024.1.1-2024.2.1放假", "价格99.9元", "价格¥99.9", "$5和$10",
    "支付USD100", "支付100USD", "港币HKD20", "只要£3", "只要€3.5", "花费3-5美元", "增长25%", "增长3.5%", "60%~70%之间",
    "降到-5%了", "零下-5℃", "10℃到-5℃", "3-5公里", "3~5个", "1.5-2.5米", "3个-5个", "5-10%左右", "1~2.5米",
    "约1/3的人", "2-3/4杯", "算式1+1=2", "3x4=12对吗", "10/2是多少", "5>3对吗", "2*3+4=10吗", "a≥b且5≥3",
    "电话010-12345678", "电话0571-8888888", "热线400-123-4567", "号码13812345678", "手机13812345678", "ID是12345",
    "学号2020001", "下载100APP", "1. 首先", "第1名", "我有3个苹果", "3次", "数字12345", "数字100010", "数字10005",
    "数字123456789", "一共1000000000000个", "数字0", "007号", "2000元", "2元", "20元", "22元", "200元", "1010元",
    "10010元", "3.14年", "手机1.5", "序列号AB12-CD34-EF56", "代码AB12-CD34-EF56-GH78", "型号A1B2C3", "型号A1B2C3D4",
    "沪深300", "上证50和上证500", "C++语言", "①②③", "Ⅻ月", "３个", "２０２４年", "共计1,234,567元", "3等于5",
    "温度-5度", "5 6 7个", "你好 世界", "增长0.5倍", "第10.5章", "约10-20人", "1:2的比例", "长度5cm", "5kg重",
    "5kgs重", "速度100km/h", "数字3.14", "数字1.2.3.4.5", "数字1-2-3-4", "数字1-2", "范围-3到5",
    "数字12345678901234567890123456789012345678901234567890123456", "٣个", "没有数字的句子。", "",
]

# The cut alone, at several max_length.
CUT_INPUTS = [
    ("短句。" * 8, 10), ("这是一个很长的句子，包含了很多个逗号分隔的部分，每个部分都不太长，但是加起来就超过了限制。", 10),
    ("First part, second part; third part! Fourth part? Fifth part.", 3),
    ("Numbers 3.14 and 2.71 and the U.S.A. are protected here, aren't they?", 4),
    ("A;;B,,C;D, E ; F", 1), ("abc", 1), ("，，，开头是逗号，然后是内容。", 3), ("中文English混合Text内容", 2),
    ("句子一。句子二。\n句子三。。，句子四", 2), ("   ", 5), (";;;", 5), ("一二三四五六七八九十" * 3, 7),
]

# The mixed-text tokenizer on whole strings.
TOKENIZE_INPUTS = ["U.S.A. and e.g. it's well-known", "3.14 and 1.2.3 and 42", "中文English混合  \n\t空白", "a--b 'x' ..."]

# Tagger outputs through the token parser's reorder (pure Python; the FST grammars are not needed).
REORDER_INPUTS = [
    ("tn", 'date { day: "一" month: "五" year: "二零二四" }'),
    ("tn", 'char { value: "今" } money { currency: "元" value: "五" } char { value: "天" }'),
    ("tn", 'time { minute: "三十" hour: "三" noon: "下午" } fraction { numerator: "一" denominator: "三" }'),
    ("tn", 'measure { value: "五" extra: "x" numerator: "a" denominator: "b" }'),
    ("tn", 'char { value: "\\"" } char { value: "\\\\" }'),
    ("tn", 'date{year: "一"}  cardinal { value: "三" integer: "四" }'),
    ("en_tn", 'date { preserve_order: "true" month: "may" day: "five" }'),
    ("en_tn", 'date { year: "twenty twenty" month: "may" day: "five" text: "on" }'),
    ("en_tn", 'money { currency_maj: "dollars" integer_part: "five" fractional_part: "ten" }'),
    ("en_tn", 'tokens { name: "hello" } tokens { name: "world" }'),
]

# English strings through normalize_numbers alone.
NUMBERS_EN_INPUTS = [
    "0", "7", "13", "21", "100", "101", "110", "999", "1000", "1001", "1010", "1100", "1234", "2020", "1999",
    "10000", "100001", "1000001", "1002003", "12345678", "1000000000", "10000000000000000000000000000000000",
    "999999999999999999999999999999999999", "1000000000000000000000000000000000000", "-5", "x-5", "a -5",
    "3.14", "0.5", "00.25", "1.2.3", "$12.99", "$1", "$1.00", "$-5", "$.5", "$1,2", "£10.50", "£1", "£-2",
    "25%", "-3.2%", "1..5%", "1,000,000", "3/4", "1/2", "1/4", "3/2", "5/4", "3/5", "1/21", "3/0", "0/2",
    "1st", "2nd", "3rd", "21st", "101st", "1,000th", "GPT-4", "v2.1", "mp3", "abc123", "covid-19", "win10",
    "10ms", "5 s", "3.5 GHz", "512 MB", "20 Mbps", "65 W", "40 °C", "-5 °F", "5 a day", "2kg", "1.5 km",
    "room 101", "at 3:30 pm", "4,500.25", "1/2/2020", "12:30:45", "007", "1e5", "١٢٣ kg", "５kg",
    "123456789012345678901234567890123456789", "9" * 37 + "%",
]

# Strings through the pre-processor alone.
PRE_INPUTS = [
    "**bold** and ***more*** and ### header --- rule",
    "visit https://example.com/a?b=1&c=2 now or www.test.org/x",
    "code `x = 1` and ```block``` here",
    "image ![alt text](http://a.b/c.png) end",
    "math $x^2$ and $$\\int f$$ done",
    "1,234,567 and 12,34 and 1,2345",
    "你好 世界 3 4 a b  c   d",
    "a . b , c",
    "tab\there\nnew\rline\fform",
    "emoji 😀😃🙏 ★☆●■ ✔︎✖︎ √×",
    "  leading and trailing  ",
    "$5 and $10",
]


class _NoPynini(importlib.abc.MetaPathFinder):
    """Make `import pynini` fail the way a missing package does, so the official TalkerTN takes its fallback."""

    def find_spec(self, name, path=None, target=None):
        if name == "pynini" or name.startswith("pynini."):
            raise ModuleNotFoundError(f"No module named {name!r}", name="pynini")


def _blob_id(path: pathlib.Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _loop_functions(official: pathlib.Path, namespace: dict) -> dict:
    """The release's two speech loops, compiled as plain functions of `self` in `namespace`."""
    tree = ast.parse((official / "modeling_bailing_talker.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BailingTalker2")
    wanted = {"omni_audio_generation", "instruct_audio_generation"}
    funcs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {f.name for f in funcs} == wanted, [f.name for f in funcs]
    module = ast.Module(body=funcs, type_ignores=[])
    exec(compile(module, str(official / "modeling_bailing_talker.py"), "exec"), namespace)  # noqa: S102 - the release's loop
    return {name: namespace[name] for name in wanted}


class _Chunk:
    shape = (1, 4410)  # a tenth of a second of "audio" per tts_job call


class _Recorder:
    """Stand-in `self` for the speech loops: records what the loop does per fragment."""

    def __init__(self, tn):
        self.voice_json_dict = {}
        self._tn = tn
        self.fragments = []
        self.normalizer = types.SimpleNamespace(normalize=self._normalize)

    def _device_stream_context(self):
        return contextlib.nullcontext()

    def initial_graph(self):
        pass

    def get_prompt_emb(self, *args, **kwargs):
        return None, None, None

    def _normalize(self, text):
        out = self._tn.normalize(text)
        self.fragments[-1]["tn_input"] = text
        self.fragments[-1]["tn"] = out
        return out

    def tts_job(self, text, **kwargs):
        self.fragments[-1]["final"] = text
        yield {"tts_speech": _Chunk()}


def _run_loop(call, ns: dict, tn) -> dict:
    """Run one speech loop to its end (`call(self, audio_detokenizer)` starts it); what it did per fragment."""
    rec = _Recorder(tn)
    ns["_recorder"] = rec
    result = {}
    try:
        for _ in call(rec, types.SimpleNamespace(config=types.SimpleNamespace(sample_rate=44100))):
            pass
    except Exception as e:  # noqa: BLE001 - the release's own failure is part of the reference
        result["error"] = f"{type(e).__name__}: {e}"
    result["fragments"] = rec.fragments
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=pathlib.Path,
                        help="folder with the release's front/, talker_tn/ and modeling_bailing_talker.py")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--git-dir", default=None,
                        help="optional: the release's git dir; blob ids are checked against its HEAD")
    parser.add_argument("--fst", action="store_true",
                        help="also record the CJK branch with pynini and talker_tn/zh_tn_*.fst (needs pynini)")
    args = parser.parse_args()
    official = args.official.resolve()

    blobs = {}

    def record(rel: str) -> None:
        blobs[rel] = _blob_id(official / rel)
        if args.git_dir:
            head = subprocess.run(["git", "-C", args.git_dir, "rev-parse", f"HEAD:{rel}"], check=True,
                                  capture_output=True, text=True).stdout.strip()
            if head != blobs[rel]:
                raise SystemExit(f"{rel}: the file differs from {args.git_dir} HEAD ({blobs[rel]} != {head})")

    for rel in OFFICIAL_FILES:
        record(rel)

    blocker = _NoPynini()
    sys.meta_path.insert(0, blocker)
    sys.path.insert(0, str(official))
    from front.number_en import normalize_numbers
    from front.text_segment_cut import cut_text_by_semantic_length, is_chinese
    from front.toolkit import tokenize_mixed_text, tokenize_mixed_text_iterator
    from talker_tn.talker_pre_processor import TalkerPreProcessor
    from talker_tn.talker_tn import TalkerTN
    from talker_tn.token_parser import TokenParser

    tn = TalkerTN()
    assert not tn.has_pynini, "pynini was imported; the reference is the release's no-pynini fallback"
    pre = TalkerPreProcessor()

    def recording_is_chinese(text):
        res = is_chinese(text)
        ns["_recorder"].fragments.append({"fragment": text, "is_chinese": res})
        return res

    def recording_normalize_numbers(text):
        out = normalize_numbers(text)
        ns["_recorder"].fragments[-1]["numbers_en_in_loop"] = out
        return out

    class _NoTorch(types.ModuleType):
        def __getattr__(self, name):
            raise AssertionError(f"the speech loop reached torch.{name}; the stand-in yields one chunk per job")

    ns = {"re": re, "math": math, "time": time, "logging": logging, "torch": _NoTorch("torch"),
          "cut_text_by_semantic_length": cut_text_by_semantic_length, "is_chinese": recording_is_chinese,
          "normalize_numbers": recording_normalize_numbers,
          "tokenize_mixed_text_iterator": tokenize_mixed_text_iterator}
    loops = _loop_functions(official, ns)

    speech = []
    for text in SPEECH_INPUTS:
        omni = _run_loop(lambda self, det, text=text: loops["omni_audio_generation"](
            self, tts_text=text, audio_detokenizer=det), ns, tn)
        instruct = _run_loop(lambda self, det, text=text: loops["instruct_audio_generation"](
            self, prompt="Please generate speech based on the following description.\n", text=text,
            taskname="TTS", audio_detokenizer=det), ns, tn)
        same = omni == instruct
        case = {"input": text, **omni, "instruct_same": same}
        for frag in case["fragments"]:
            frag["numbers_en"] = normalize_numbers(frag["fragment"])
        speech.append(case)

    chunked = []
    for index, size in SPEECH_CHUNKED:
        text = SPEECH_INPUTS[index]
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        run = _run_loop(lambda self, det, chunks=chunks: loops["omni_audio_generation"](
            self, tts_text=chunks, audio_detokenizer=det), ns, tn)
        chunked.append({"chunks": chunks, **run})

    from talker_tn.talker_re import TalkerRE
    rule_layer = tn.talker_re
    assert isinstance(rule_layer, TalkerRE)
    tn_zh = []
    for text in TN_ZH_INPUTS:
        case = {"input": text, "tn": tn.normalize(text)}
        try:
            rule_layer(pre(text))
        except Exception as e:  # noqa: BLE001
            case["rule_error"] = f"{type(e).__name__}: {e}"
        tn_zh.append(case)

    fst_mode = None
    if args.fst:  # TalkerTN's CJK branch as it runs with pynini: rule layer (its input if it raises), zh grammars
        sys.meta_path.remove(blocker)
        from talker_tn.normalizer import Normalizer  # imports pynini

        zh_grammar = Normalizer(str(official / "talker_tn" / "zh_tn"), ordertype="tn")
        for rel in ("talker_tn/normalizer.py", "talker_tn/zh_tn_tagger.fst", "talker_tn/zh_tn_verbalizer.fst"):
            record(rel)

        def with_fst(text):
            text = pre(text)
            if not re.search(r"[\u4e00-\u9fff]", text):
                return None
            try:
                text = rule_layer(text)
            except Exception:  # noqa: BLE001, S110 - TalkerTN's own fallback: the grammars get the input
                pass
            return zh_grammar.normalize(text)

        for case in tn_zh:
            if (fst := with_fst(case["input"])) is not None:
                case["fst_zh"] = fst
        for case in speech:
            for frag in case["fragments"]:
                if "tn_input" in frag and (fst := with_fst(frag["tn_input"])) is not None:
                    frag["fst_zh"] = fst
        fst_mode = {"pynini": importlib.metadata.version("pynini"),
                    "what": "fst_zh: pre-processor, regex layer, zh_tn tagger / token reorder / verbalizer"}

    out = {
        "source": "github Zihhan318/Ming2 (release files imported unmodified from --official)",
        "official_files": blobs,
        "inflect_version": importlib.metadata.version("inflect"),
        "python": sys.version.split()[0],
        "talker_tn_mode": "no-pynini: pre-processor, then the regex layer for text with a CJK character; no FST",
        "fst_zh_mode": fst_mode,
        "max_length": 50,
        "speech": speech,
        "speech_chunked": chunked,
        "tn_zh": tn_zh,
        "numbers_en": [{"input": t, "output": normalize_numbers(t)} for t in NUMBERS_EN_INPUTS],
        "pre_processor": [{"input": t, "output": pre(t)} for t in PRE_INPUTS],
        "cut": [{"input": t, "max_length": n, "fragments": cut_text_by_semantic_length(t, n)["fragments"]}
                for t, n in CUT_INPUTS],
        "tokenize": [{"input": t, "pieces": tokenize_mixed_text(t)} for t in TOKENIZE_INPUTS],
        "reorder": [{"order": o, "input": t, "output": TokenParser(o).reorder(t)} for o, t in REORDER_INPUTS],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "reference.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    n_frag = sum(len(c["fragments"]) for c in speech)
    rows = "\n".join(f"| {rel} | {blob} |" for rel, blob in blobs.items())
    (args.out / "README.md").write_text(
        "# speech_text_reference: the release's talker text front end on fixed inputs "
        "(made by tools/make_speech_text_reference.py)\n\n"
        f"python {out['python']}, inflect {out['inflect_version']}; TalkerTN mode: {out['talker_tn_mode']}; "
        f"fst_zh (the CJK branch with pynini): {fst_mode['pynini'] if fst_mode else 'not recorded'}.\n\n"
        "| official file | git blob id |\n|---|---|\n" + rows + "\n\n"
        "`reference.json`: `speech` (each input through omni_audio_generation: per fragment the text, is_chinese, "
        "normalize_numbers of it, what the loop gave TalkerTN and got back, the text given to tts_job, `fst_zh`; "
        "`error` where the release raised; `instruct_same`: instruct_audio_generation(taskname='TTS') did the "
        "same), `speech_chunked` (inputs given as lists of chunks), `tn_zh` (TalkerTN alone; `rule_error` where "
        "its regex layer raised and it returned its input), `numbers_en`, `pre_processor`, `cut` "
        "(cut_text_by_semantic_length), `tokenize` (tokenize_mixed_text), `reorder` (TokenParser.reorder).\n",
        encoding="utf-8")
    print(f"wrote {path} ({os.path.getsize(path)} bytes): {len(speech)} speech inputs ({n_frag} fragments), "
          f"{len(tn_zh)} TN cases, {len(out['numbers_en'])} number cases, {len(out['pre_processor'])} pre cases")


if __name__ == "__main__":
    main()

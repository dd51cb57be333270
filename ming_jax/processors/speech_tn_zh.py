"""The Chinese rule layer of the release's text normaliser (talker_tn/talker_re.py with re_utils/), re-implemented:
numbers in context -> Chinese readings, for text with a CJK character, after the pre-processor.

    text --character map, proper nouns--> --serial codes--> runs (digit / number punctuation / other)
         --groups between words: date, decimal, time, version, IP, fraction, phone, formula (or a range of two)-->
         --numbers tagged by their neighbours: money, date, measure, percent, serial number, list number-->
         --ranges and signs ("-", "~", "～" between two readings)--> text

What it reads (digits are ASCII; ０-９ and ①, Ⅻ, ❶ ... come in through the character map):
  * groups: runs of digits and number punctuation (- ~ ～ : ： . + x * / ÷ = ≥ ≤ > <) with at least three runs
    between two word runs (a leading punctuation run and a trailing one stay outside). The best-scoring reading
    wins: y.m.d / y-m-d / y/m/d with a valid month and day -> 二零二四年一月一号 (80); a.b -> 三点一四 (50); h:m /
    h:m:s (hours and minutes of 1-2 digits) -> 三点三十分, 两点整, 十二点零五分 (60-90), "am"/"pm"-style word
    after it -> 上午 / 下午 in front; a.b.c -> 一点二点三 (90 after v / V / 版本, else 50); a.b.c.d -> 幺九二点幺六八...
    (50); a/b and c-a/b -> 三分之一, 二至四分之三 (50); phone numbers (3 + 8 or 4 + 7 / 8 digits around a "-";
    400-xxx(x)-xxxx, 0xx(x)-xxx(x)-xxxx) -> digit by digit with 幺 (80 / 90); formulas with + - x * / ÷ = ≥ ≤ >= <= > < -> 一加一等于二 (85 with "=", else
    10). A group nothing reads is split at its middle-most - ~ ～ into two groups read the same way, joined by 至;
    otherwise it stays as it was;
  * a number (digits, or a decimal) next to table words: currency before or after -> 九十九点九元 / 五美元, 2024年5月1日
    and 2024年5月 and 5月1日 / 5月1号 and a 4-digit 2024年 (the year read digit by digit), a measure word before
    (价格是...) or after (个, 公里, ℃ ...) -> cardinal reading, "%" after -> 百分之二十五, a serial cue before
    (手机号, ID ...) -> digit by digit with 幺, a one-digit "1. " -> 一. ;
  * "-" / "~" / "～" between two readings of the same kind -> 至; before a money / measure / decimal / fraction /
    percent reading after a bare number -> a range (三至五公里); after a word -> 负 (for "-") or 大约;
  * serial codes (capitals, digits, "-", with at least one capital and one digit) after SN / sn / 序列 or with more
    than five letter / digit / dash alternations -> letters kept, digits with 幺, "-" -> 杠.
Cardinals are read in groups of four digits (万, 亿, 兆 ...), 两 for a leading 2 of 千 / 百, 十 for 10-19 in a group;
inner zero groups are skipped as the release skips them (10005 -> 一万五). Bare numbers stay digits.

Where the release's layer raises (a 4-character decimal before 年, a decimal after a serial cue, a digit outside
0-9 that gets read), TalkerTN returns the text unchanged; so does `zh_rules`.

Tables: `ZhTables.from_release_json(path)` takes them from the release's talker_re.json (money, measure_before,
measure_after, serial_before, serial_after, char_map0, proper_noun), which reproduces the release exactly.
`ZhTables.builtin()` is a small table of our own (13 currencies, ~115 units / classifiers / measure words, price
and serial cues, C++, the same character map): every entry reads as the release reads it, but most of the
release's 382 measure words, its proper nouns (stock indices), "APP" and some currencies are absent, so numbers
next to those words stay digits.
"""

from __future__ import annotations

import json
import os
import re
import string
import unicodedata
from collections.abc import Mapping

# --- digit readings ---------------------------------------------------------------------------------------------

_PLAIN = dict(zip("0123456789", "零一二三四五六七八九"))
_LIANG = {**_PLAIN, "2": "两"}  # before 千 / 百
_YAO = {**_PLAIN, "1": "幺"}  # digit by digit (phones, IPs, serials)
_MYRIADS = ("", "万", "亿", "兆", "京", "垓", "秭", "穰", "沟", "涧", "正", "载", "极")


class _Unreadable(Exception):
    """Where the release's rule layer raises; zh_rules then returns its input unchanged, as TalkerTN does."""


def _each(digits: str, table: Mapping[str, str]) -> str:
    try:
        return "".join(table[d] for d in digits)
    except KeyError as e:
        raise _Unreadable(f"digit {e.args[0]!r}") from None


def _four(digits: str) -> str:
    """One group of up to four digits: 两千零五, 十二 (a group 10-19 drops the 一), '' for zeros."""
    digits = digits.lstrip("0")
    if len(digits) == 2 and digits[0] == "1":
        return "十" + ("" if digits[1] == "0" else _each(digits[1], _PLAIN))
    out = ""
    while digits:
        if digits[0] == "0":
            digits = digits.lstrip("0")
            out += "零" if digits else ""
            continue
        place = len(digits)
        out += (_each(digits[0], _LIANG if place > 2 else _PLAIN)
                + {4: "千", 3: "百", 2: "十"}.get(place, ""))
        digits = digits[1:]
    return out


def zh_cardinal(digits: str) -> str:
    """The release's cardinal reading of a digit string (money, measures, times, fraction parts)."""
    if digits == "0":
        return "零"
    out = ""
    for myriad in _MYRIADS:
        if not digits:
            break
        group = _four(digits[-4:])
        if group:
            out = group + myriad + out
        digits = digits[:-4]
    if digits:  # past 10**52: the rest digit by digit
        out = _each(digits, _YAO) + out
    return out or "零"


def _year(digits: str) -> str:
    return _each(digits.lstrip("0"), _PLAIN)


# --- tables ---------------------------------------------------------------------------------------------------------


class _WordTable:
    """Words -> what they read as, looked up longest first at one end of a neighbouring run."""

    def __init__(self, words: Mapping[str, str]):
        self.words = {k: v for k, v in words.items() if k}
        self.lengths = sorted({len(k) for k in self.words}, reverse=True)

    def take_end(self, text: str) -> tuple[str, str] | None:
        """(reading, text without the word) for a word at the end of text (not cut out of a longer ASCII word)."""
        for n in self.lengths:
            word = text[-n:] if n <= len(text) else None
            if word in self.words and not (word[0] in string.ascii_letters and n < len(text)
                                           and text[-n - 1] in string.ascii_letters):
                return self.words[word], text[:-n]
        return None

    def take_start(self, text: str) -> tuple[str, str] | None:
        for n in self.lengths:
            word = text[:n] if n <= len(text) else None
            if word in self.words and not (word[-1] in string.ascii_letters and n < len(text)
                                           and text[n] in string.ascii_letters):
                return self.words[word], text[n:]
        return None


def _with_cues(cues, tails=("", "是", "为", "是:", "是：", "为:", "为：")) -> dict[str, str]:
    return {cue + tail: cue + tail for cue in cues for tail in tails}


_BUILTIN_MONEY = {"$": "美元", "USD": "美元", "¥": "元", "￥": "元", "RMB": "元", "CNY": "人民币", "€": "欧元",
                  "£": "英镑", "￡": "英镑", "GBP": "英镑", "HKD": "港元", "JPY": "日元", "KRW": "韩元"}
_BUILTIN_UNITS = {"km": "千米", "m": "米", "cm": "厘米", "mm": "毫米", "nm": "纳米", "kg": "千克", "g": "克",
                  "mg": "毫克", "t": "吨", "L": "升", "ml": "毫升", "mL": "毫升", "h": "小时", "min": "分钟", "s": "秒",
                  "ms": "毫秒", "Hz": "赫兹", "W": "瓦特", "kW": "千瓦", "V": "伏特", "A": "安培", "mAh": "毫安时",
                  "kWh": "千瓦时", "℃": "摄氏度", "°C": "摄氏度", "℉": "华氏度", "°F": "华氏度", "°": "度",
                  "m²": "平方米", "㎡": "平方米", "km²": "平方千米", "m³": "立方米"}
_BUILTIN_WORDS_AFTER = ("个", "位", "名", "人", "件", "条", "张", "只", "本", "家", "户", "层", "页", "篇", "首", "辆", "座", "棵",
                        "颗", "粒", "块", "片", "根", "支", "把", "套", "双", "对", "杯", "瓶", "碗", "盒", "箱", "袋", "场", "回",
                        "趟", "岁", "年", "月", "日", "天", "周", "小时", "分", "秒", "号", "元", "万元", "亿元", "千元", "百元", "万",
                        "亿", "千", "百", "千万", "百万", "米", "千米", "公里", "厘米", "毫米", "克", "吨", "升", "度", "摄氏度", "斤", "平方",
                        "平米", "立方", "字", "笔", "圈", "多", "余", "几", "到", "至", "的", "点", "等于")
_BUILTIN_PRICE_CUES = ("价格", "花费")
_BUILTIN_SERIAL_CUES = ("手机", "手机号", "电话", "尾号", "学号", "身份证", "ID", "id")
_BUILTIN_PROPER = {"C++": "C加加", "c++": "C加加"}


def _builtin_char_map() -> dict[str, str]:
    """Full-width digits -> ASCII; circled / negative circled / double circled numbers 0-50 and the capital Roman
    numerals Ⅰ-Ⅻ -> their Chinese reading."""
    out = {chr(0xFF10 + d): str(d) for d in range(10)}
    ranges = ((0x2160, 0x216B), (0x2460, 0x2473), (0x3251, 0x325F), (0x32B1, 0x32BF), (0x24F5, 0x24FE),
              (0x24EA, 0x24EA), (0x2776, 0x277F), (0x24EB, 0x24F4))
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            out[chr(cp)] = zh_cardinal(str(int(unicodedata.numeric(chr(cp)))))
    return out


class ZhTables:
    """The rule layer's word tables (the release keeps them in talker_re.json)."""

    def __init__(self, *, money: Mapping[str, str], measure_before: Mapping[str, str],
                 measure_after: Mapping[str, str], serial_before: Mapping[str, str], serial_after: Mapping[str, str],
                 char_map: Mapping[str, str], proper_nouns: Mapping[str, str]):
        self.money = _WordTable(money)
        self.measure_before = _WordTable(measure_before)
        self.measure_after = _WordTable(measure_after)
        self.serial_before = _WordTable(serial_before)
        self.serial_after = _WordTable(serial_after)
        bad = [k for k in char_map if len(k) != 1]
        if bad:
            raise ValueError(f"char_map keys must be single characters, got {bad[:5]}")
        self.char_map = {ord(k): v for k, v in char_map.items()}
        self.proper_nouns = dict(proper_nouns)
        keys = sorted(self.proper_nouns, key=len, reverse=True)
        self._proper = (re.compile(r"(?<!\d)(" + "|".join(map(re.escape, keys)) + r")(?!\d)") if keys else None)

    @classmethod
    def builtin(cls) -> ZhTables:
        """Our small tables (module docstring): common currencies, units, classifiers and serial cues."""
        return cls(money=_BUILTIN_MONEY, measure_before={**_with_cues(_BUILTIN_PRICE_CUES), "等于": "等于"},
                   measure_after={**_BUILTIN_UNITS, **{w: w for w in _BUILTIN_WORDS_AFTER}},
                   serial_before=_with_cues(_BUILTIN_SERIAL_CUES), serial_after={}, char_map=_builtin_char_map(),
                   proper_nouns=_BUILTIN_PROPER)

    @classmethod
    def from_release_json(cls, path: str | os.PathLike) -> ZhTables:
        """The release's talker_tn/talker_re.json (read from where the caller keeps the release)."""
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        try:
            return cls(money=cfg["money"], measure_before=cfg["measure_before"], measure_after=cfg["measure_after"],
                       serial_before=cfg["serial_before"], serial_after=cfg["serial_after"],
                       char_map=cfg["char_map0"], proper_nouns=cfg["proper_noun"])
        except KeyError as e:
            raise ValueError(f"{path}: not the release's talker_re.json (no {e.args[0]!r})") from None

    def apply_words(self, text: str) -> str:
        text = text.translate(self.char_map)
        if self._proper is not None:
            text = self._proper.sub(lambda m: self.proper_nouns[m.group(0)], text)
        return text


# --- serial codes -------------------------------------------------------------------------------------------------

_SERIAL = re.compile(r"(?=[A-Z0-9-]*[A-Z])(?=[A-Z0-9-]*[0-9])[A-Z0-9-]+")
_SERIAL_CUES = ("SN", "sn", "序列号", "序列")
_SERIAL_SAY = str.maketrans({**_YAO, "-": "杠"})


def _alternations(code: str) -> int:
    classes = ["0" if ch.isdecimal() else "A" if ch.isalpha() else "-" for ch in code]
    return sum(1 for i, c in enumerate(classes) if i == 0 or c != classes[i - 1])


def _serial_codes(text: str) -> str:
    out, last = [], 0
    for m in _SERIAL.finditer(text):
        before, code = text[last:m.start()], m.group(0)
        if any(cue in before for cue in _SERIAL_CUES) or _alternations(code) > 5:
            code = code.translate(_SERIAL_SAY)
        out += [before, code]
        last = m.end()
    return "".join(out) + text[last:]


# --- tokens -------------------------------------------------------------------------------------------------------

_NUMBER_PUNCT = frozenset("-~～:：.+x*/÷=≥≤><")
_DASHES = ("-", "~", "～")


class _Tok:
    """A run of the text ("char", "punc", "digit": `text` is what it says) or a reading (any other kind):
    head + [lead 至] + body + tail. A decimal keeps its digits in `text`; a measure its word in `tag`."""

    __slots__ = ("body", "head", "kind", "lead", "tag", "tail", "text")

    def __init__(self, kind: str, text: str = "", *, head: str = "", body: str = "", tail: str = "",
                 lead: str | None = None, tag: str = ""):
        self.kind, self.text, self.head, self.body, self.tail = kind, text, head, body, tail
        self.lead, self.tag = lead, tag

    def render(self) -> str:
        if self.kind in ("char", "punc", "digit"):
            return self.text
        return self.head + (self.lead + "至" if self.lead is not None else "") + self.body + self.tail


def _said(tok: _Tok) -> str:
    """What a number token reads as on its own: a digit run's cardinal, a decimal's reading."""
    return zh_cardinal(tok.text) if tok.kind == "digit" else tok.render()


def _runs(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    for ch in text:
        kind = "digit" if ch.isdecimal() else "punc" if ch in _NUMBER_PUNCT else "char"
        if toks and toks[-1].kind == kind:
            toks[-1].text += ch
        else:
            toks.append(_Tok(kind, ch))
    return toks + [_Tok("char", "")]


def _group(toks: list[_Tok]) -> list:
    """Between two word runs: three or more number runs become one group (a list), leaving out a leading and a
    trailing punctuation run; fewer stay single."""
    stack: list = []
    last_word = -1
    for i, tok in enumerate(toks):
        if tok.kind != "char":
            continue
        start = last_word + 1
        if toks[start].kind == "punc":
            stack.append(toks[start])
            start += 1
        between = toks[start:i]
        if len(between) >= 3:
            stack += [between[:-1], between[-1]] if between[-1].kind == "punc" else [between]
        else:
            stack += between
        stack.append(tok)
        last_word = i
    return stack


# --- groups ----------------------------------------------------------------------------------------------------------

_MONTHS = frozenset([f"{m:02d}" for m in range(1, 13)] + [str(m) for m in range(1, 10)])
_DAYS = frozenset([f"{d:02d}" for d in range(1, 32)] + [str(d) for d in range(1, 10)])
_COLONS = (":", "：")
_NOONS = {"a m": "上午", "a.m.": "上午", "am": "上午", "A M": "上午", "AM": "上午",
          "p m": "下午", "p.m.": "下午", "pm": "下午", "P M": "下午", "PM": "下午"}
_OPERATORS = {"+": "加", "-": "减", "x": "乘", "*": "乘", "/": "除", "÷": "除", "=": "等于", "≥": "大于等于",
              "≤": "小于等于", ">=": "大于等于", "<=": "小于等于", ">": "大于", "<": "小于"}


def _texts(group: list[_Tok]) -> list[str]:
    return [t.text for t in group]


def _score_date(stack, i, g) -> int:
    return 80 if len(g) == 5 and g[1] == g[3] and g[1] in (".", "-", "/") and g[2] in _MONTHS and g[4] in _DAYS else -1


def _score_decimal(stack, i, g) -> int:
    return 50 if len(g) == 3 and g[1] == "." else -1


def _score_time(stack, i, g) -> int:
    # The release adds a bonus after 上午 / 下午 ... or before "am" / "pm"; no other reading scores on colons, so
    # the winner never depends on it.
    if len(g) in (3, 5) and all(p in _COLONS for p in g[1::2]) and all(len(n) < 3 for n in g[0::2]):
        return 60 if len(g) == 3 else 80
    return -1


def _score_version(stack, i, g) -> int:
    if len(g) == 5 and g[1] == "." == g[3]:
        before = stack[i - 1].text if i >= 1 else ""
        return 90 if i >= 1 and (before[-1:] in ("v", "V") or "版本" in before) else 50
    return -1


def _score_ip(stack, i, g) -> int:
    return 50 if len(g) == 7 and g[1] == g[3] == g[5] == "." else -1


def _score_fraction(stack, i, g) -> int:
    return 50 if (len(g) == 3 and g[1] == "/") or (len(g) == 5 and g[1] in _DASHES and g[3] == "/") else -1


def _score_phone(stack, i, g) -> int:
    if len(g) == 3 and g[1] == "-" and ((len(g[0]), len(g[2])) in ((3, 8), (4, 7), (4, 8))):
        return 80
    if (len(g) == 5 and g[1] == g[3] == "-" and (g[0] == "400" or (len(g[0]) in (3, 4) and g[0][0] == "0"))
            and len(g[2]) in (3, 4) and len(g[4]) == 4):
        return 90
    return -1


def _score_formula(stack, i, g) -> int:
    if len(g) < 3 or (len(g) == 3 and g[1] == "-"):
        return -1
    ops = set(g[1::2])
    if all(op in _OPERATORS for op in ops):
        return 85 if "=" in ops else 10
    return -1


def _read_time(noon: str, h: str, m: str, s: str | None) -> str:
    zero = ("0", "00")
    out = noon + ("两" if h in ("2", "02") else zh_cardinal(h)) + "点"
    if m in zero and (s is None or s in zero):
        return out + "整"

    def part(n: str, unit: str) -> str:
        if n in zero:
            return "零" + unit
        return ("零" if len(n) == 1 or n[0] == "0" else "") + zh_cardinal(n) + unit

    return out + part(m, "分") + (part(s, "秒") if s is not None else "")


def _build(kind: str, stack: list, i: int) -> int:
    """Replace the group at stack[i] by its reading of `kind`; the index after it."""
    g: list[_Tok] = stack[i]
    n = _texts(g)
    if kind == "date":
        tok = _Tok("date", body=f"{_year(n[0])}年{zh_cardinal(n[2])}月{zh_cardinal(n[4])}号")
    elif kind == "decimal":
        tok = _decimal(g[0], g[2])
    elif kind == "time":
        noon = ""
        if i + 1 < len(stack):
            nxt = stack[i + 1]
            for width in (2, 3, 4):
                if nxt.text[:width] in _NOONS:
                    noon = _NOONS[nxt.text[:width]]
                    nxt.text = nxt.text[width:]
                    break
        tok = _Tok("time", body=_read_time(noon, n[0], n[2], n[4] if len(n) == 5 else None))
    elif kind == "version":
        tok = _Tok("version", body="点".join(zh_cardinal(x) for x in n[0::2]))
    elif kind == "ip":
        tok = _Tok("ip", body="点".join(_each(x, _YAO) for x in n[0::2]))
    elif kind == "fraction":
        num, den, lead = (n[0], n[2], None) if len(n) == 3 else (n[2], n[4], zh_cardinal(n[0]))
        tok = _Tok("fraction", body=f"{zh_cardinal(den)}分之{zh_cardinal(num)}", lead=lead)
    elif kind == "phone":
        tok = _Tok("phone", body="".join(_each(x, _YAO) for x in n[0::2]))
    else:
        tok = _Tok("formula", body="".join(_OPERATORS[x] if k % 2 else zh_cardinal(x) for k, x in enumerate(n)))
    stack[i] = tok
    return i + 1


def _decimal(whole: _Tok, frac: _Tok) -> _Tok:
    return _Tok("decimal", f"{whole.text}.{frac.text}", body=f"{zh_cardinal(whole.text)}点{_each(frac.text, _PLAIN)}")


_SCORERS = (("date", _score_date), ("decimal", _score_decimal), ("time", _score_time), ("version", _score_version),
            ("ip", _score_ip), ("fraction", _score_fraction), ("phone", _score_phone), ("formula", _score_formula))


def _best(stack: list, i: int) -> str | None:
    """The reading of the group at stack[i] with the highest score (the later one on a tie); None if none fits."""
    g = _texts(stack[i])
    best, best_score = None, -1
    for kind, score in _SCORERS:
        s = score(stack, i, g)
        if s >= best_score:
            best, best_score = kind, s
    return best if best_score >= 0 else None


def _split_range(stack: list, i: int) -> tuple[list, int] | None:
    """A group no reading fits, split at its middle-most dash into two groups that read the same way."""
    g: list[_Tok] = stack[i]
    dashes = [k for k, t in enumerate(g) if t.text in _DASHES]
    if not dashes:
        return None
    k = min(dashes, key=lambda k: abs(k - len(g) / 2))
    trial = stack[:i] + [g[:k], _Tok("char", "至"), g[k + 1:]] + stack[i + 1:]
    left, right = _best(trial, i), _best(trial, i + 2)
    if left is None or left != right:
        return None
    _build(left, trial, i)
    return trial, _build(right, trial, i + 2)


def _read_groups(stack: list) -> list:
    i = 0
    while i < len(stack):
        if not isinstance(stack[i], list):
            i += 1
            continue
        kind = _best(stack, i)
        if kind is not None:
            i = _build(kind, stack, i)
            continue
        split = _split_range(stack, i)
        if split is not None:
            stack, i = split
            continue
        group = stack[i]
        stack[i:i + 1] = group
        i += len(group)
    return stack


# --- numbers tagged by their neighbours ------------------------------------------------------------------------------


def _neighbour(stack: list, i: int) -> _Tok | None:
    return stack[i] if 0 <= i < len(stack) and stack[i].kind in ("char", "punc") else None


def _tag_before(stack, i, table: _WordTable) -> str | None:
    prev = _neighbour(stack, i - 1)
    hit = table.take_end(prev.text) if prev is not None else None
    if hit is None:
        return None
    prev.text = hit[1]
    return hit[0]


def _tag_after(stack, i, table: _WordTable) -> str | None:
    nxt = _neighbour(stack, i + 1)
    hit = table.take_start(nxt.text) if nxt is not None else None
    if hit is None:
        return None
    nxt.text = hit[1]
    return hit[0]


def _money(stack, i, tables, before: bool) -> bool:
    tag = (_tag_before if before else _tag_after)(stack, i, tables.money)
    if tag is None:
        return False
    stack[i] = _Tok("money", body=_said(stack[i]), tail=tag)
    return True


def _date(stack, i, tables) -> bool:
    def is_digit(k):
        return stack[i + k].kind == "digit"

    def text(k):
        return stack[i + k].text

    size = len(stack)
    if (i + 5 < size and is_digit(0) and is_digit(2) and is_digit(4) and text(1) == "年" and text(3) == "月"
            and text(5)[:1] in ("日", "号") and text(2) in _MONTHS and text(4) in _DAYS):
        day = stack[i + 5].text[0]
        stack[i + 5].text = stack[i + 5].text[1:]
        body = f"{_year(text(0))}年{zh_cardinal(text(2))}月{zh_cardinal(text(4))}{day}"
        stack[i:i + 5] = [_Tok("date", body=body)]
        return True
    if i + 3 < size and is_digit(0) and is_digit(2) and text(1) == "年" and text(3)[:1] == "月" and text(2) in _MONTHS:
        stack[i + 3].text = stack[i + 3].text[1:]
        stack[i:i + 3] = [_Tok("date", body=f"{_year(text(0))}年{zh_cardinal(text(2))}月")]
        return True
    if (i + 3 < size and is_digit(0) and is_digit(2) and text(1) == "月" and text(3)[:1] in ("日", "号")
            and text(0) in _MONTHS and text(2) in _DAYS):
        day = stack[i + 3].text[0]
        stack[i + 3].text = stack[i + 3].text[1:]
        stack[i:i + 3] = [_Tok("date", body=f"{zh_cardinal(text(0))}月{zh_cardinal(text(2))}{day}")]
        return True
    if i + 1 < size and text(1)[:1] == "年" and len(text(0)) == 4:
        if stack[i].kind == "decimal":
            raise _Unreadable("a decimal read as a year")
        stack[i + 1].text = stack[i + 1].text[1:]
        stack[i] = _Tok("date", body=f"{_year(text(0))}年")
        return True
    return False


def _measure(stack, i, tables, before: bool) -> bool:
    if before:
        tag = _tag_before(stack, i, tables.measure_before)
        if tag is None and i > 0 and stack[i - 1].kind == "measure_after" and stack[i - 1].tag == "等于":
            tag = ""
        if tag is None:
            return False
        stack[i] = _Tok("measure_before", head=tag, body=_said(stack[i]), tag=tag)
        return True
    tag = _tag_after(stack, i, tables.measure_after)
    if tag is None:
        return False
    stack[i] = _Tok("measure_after", body=_said(stack[i]), tail=tag, tag=tag)
    return True


def _percent(stack, i, tables) -> bool:
    if i + 1 < len(stack) and stack[i + 1].text.startswith("%"):
        stack[i + 1].text = stack[i + 1].text[1:]
        stack[i] = _Tok("percent", head="百分之", body=_said(stack[i]))
        return True
    return False


def _serial(stack, i, tables, before: bool) -> bool:
    table = tables.serial_before if before else tables.serial_after
    tag = (_tag_before if before else _tag_after)(stack, i, table)
    if tag is None:
        return False
    if stack[i].kind == "decimal":
        raise _Unreadable("a decimal read as a serial number")
    said = _each(stack[i].text, _YAO)
    stack[i] = _Tok("serial", head=tag if before else "", body=said, tail="" if before else tag)
    return True


def _list_number(stack, i, tables) -> bool:
    if len(stack[i].text) < 2 and i + 2 < len(stack) and stack[i + 1].text == "." and stack[i + 2].text.startswith(" "):
        stack[i] = _Tok("order", body=_said(stack[i]))
        return True
    return False


_TAGGERS = (
    lambda s, i, t: _money(s, i, t, before=True), _date, lambda s, i, t: _money(s, i, t, before=False),
    lambda s, i, t: _measure(s, i, t, before=True), lambda s, i, t: _measure(s, i, t, before=False), _percent,
    lambda s, i, t: _serial(s, i, t, before=True), lambda s, i, t: _serial(s, i, t, before=False), _list_number,
)


def _tag_numbers(stack: list, tables: ZhTables) -> None:
    i = 0
    while i < len(stack):
        tok = stack[i]
        if tok.kind == "char" and not tok.text:  # emptied runs ahead of the cursor go (those behind stay)
            del stack[i]
            continue
        if tok.kind not in ("digit", "decimal") or not any(tag(stack, i, tables) for tag in _TAGGERS):
            i += 1


# --- ranges and signs ------------------------------------------------------------------------------------------------

_RANGED = ("decimal", "fraction", "money", "measure_before", "measure_after", "percent")
_PAIRED = ("date", "time", "ip")


def _dash_before(stack, i) -> bool:
    return i >= 1 and stack[i - 1].kind == "punc" and stack[i - 1].text in _DASHES


def _join_ranges(stack: list) -> None:
    i = 0
    while i < len(stack):
        tok = stack[i]
        if tok.kind in _RANGED and _dash_before(stack, i):
            first = stack[i - 2] if i >= 2 else None
            if first is not None and (first.kind == tok.kind or (first.kind in ("measure_before", "money")
                                                                 and tok.kind in ("measure_after", "money"))):
                stack[i - 1] = _Tok("char", "至")
            elif first is not None and first.kind == "digit":
                tok.lead = zh_cardinal(first.text)
                del stack[i - 2:i]
                i -= 2
            elif first is None or first.kind == "char":
                stack[i - 1] = _Tok("char", "负" if stack[i - 1].text == "-" else "大约")
        elif tok.kind in _PAIRED and i >= 2 and _dash_before(stack, i) and stack[i - 2].kind == tok.kind:
            stack[i - 1] = _Tok("char", "至")
        i += 1


def zh_rules(text: str, tables: ZhTables | None = None) -> str:
    """The release's Chinese rule layer on one (pre-processed) text; the text unchanged where the release's layer
    raises. `tables` defaults to `ZhTables.builtin()`."""
    tables = tables if tables is not None else _default_tables()
    try:
        stack = _group(_runs(_serial_codes(tables.apply_words(text))))
        stack = _read_groups(stack)
        _tag_numbers(stack, tables)
        _join_ranges(stack)
    except _Unreadable:
        return text
    return "".join(tok.render() for tok in stack)


_DEFAULT: list[ZhTables] = []


def _default_tables() -> ZhTables:
    if not _DEFAULT:
        _DEFAULT.append(ZhTables.builtin())
    return _DEFAULT[0]

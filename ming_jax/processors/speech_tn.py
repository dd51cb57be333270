"""Text normalisation for the talker, as a pluggable step: what the release's TalkerTN does to each fragment.

    fragment --english_numbers (fragments without CJK only; speech_text.prepare_fragment)--> text
             --Normaliser: preprocess, then CJK text: the Chinese rule layer [, then FST grammars]--> spoken form

A `Normaliser` is any callable str -> str. Two are built in, both re-implementations (no release code is run):

* `RuleNormaliser` (the default; no dependencies): the release's TalkerTN as it runs when pynini is not
  installed: `preprocess` (below), then, for text with a CJK character, the Chinese rule layer of
  `speech_tn_zh` (numbers in context: dates, times, decimals, percentages, fractions, ranges, money, measures,
  phone numbers, versions, IPs, formulas, serial codes; bare integers stay digits, as in the release). English
  text is returned after `preprocess`: its numbers were spelled out by `english_numbers` before. Equal to the
  release on every reference case with the release's tables; the built-in tables miss some words (speech_tn_zh).
* `FstNormaliser(fst_dir)`: the release's full TalkerTN: the same steps, then the release's compiled pynini
  grammars, zh_tn_{tagger,verbalizer}.fst for CJK text and en_tn_{tagger,verbalizer}.fst otherwise, read from the
  release's `talker_tn/` folder that the caller points to (they are not part of this project). Needs `pynini`
  (`pip install pynini`; wheels exist for Linux / Python 3.11), which is not a dependency of ming_jax.

`make_normaliser(fst_dir=None)` picks one. The Chinese rule layer reads its word tables (currencies, units and
classifiers, serial-number cues, character map, proper nouns) from the release's talker_re.json when given one
(`ZhTables.from_release_json`, done by `make_normaliser` / `FstNormaliser` when the folder has it); otherwise a
small built-in subset is used (see speech_tn_zh), and numbers next to words outside it stay digits.

`english_numbers` is the release's front/number_en.py `normalize_numbers` (which uses inflect; this is our own
number-to-words, equal to inflect 7.6 for 0 <= n < 10**36, beyond which inflect fails and the digits are kept as the
release keeps them). In order: commas inside digit runs dropped; a number (sign and decimal point allowed) before
a unit (ms s Hz kHz MHz GHz kb mb gb tb bps kbps Mbps Gbps cm km kg V A W °C °F, any case) -> "<number> <unit
name>"; £ / $ amounts -> "<number> pound(s) / dollar(s)" (singular when the value is 1); a / b -> "one half",
"<n> quarters", "<n> <ordinal of b>" ("two third"); <number>% -> "<number> percent"; 21st -> "twenty-one" (a
cardinal, as the release reads ordinals); letters glued to a number ("v2", "GPT-4", "mp3") -> "<letters>
<number>"; any other number -> words. Decimals read their digits one by one ("three point one four"). A "-" is
"minus" inside $ / £ / % amounts and before a number directly after a letter or digit; after a space it stays
("-5 °F" -> "- five degrees fahrenheit"). "and" appears only where the release asks inflect for it (ordinals,
fractions, glued numbers: "one hundred and one"). Whitespace runs
become one space, the ends are stripped.

`preprocess` is the release's TalkerPreProcessor: LaTeX math ($...$, $$...$$), URLs (http(s)://..., www....),
inline code (`...`, ```...```) and markdown images removed; commas before three digits removed; spaces between
two characters that are neither ASCII letters nor "." removed, runs of spaces between letters made one; "***",
"**", "###", "---" removed; emoticons U+1F600-U+1F64F, ▼●★☆■□▲△◆◇○◎√×✔✖, U+FE0E and \\t \\n \\r \\f deleted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ming_jax.processors.speech_tn_zh import ZhTables, zh_rules


@runtime_checkable
class Normaliser(Protocol):
    """Text normalisation of one fragment: str -> str (the release's `TalkerTN.normalize`)."""

    def __call__(self, text: str) -> str: ...


# --- English numbers (front/number_en.py) ----------------------------------------------------------------------

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ("", " thousand", " million", " billion", " trillion", " quadrillion", " quintillion", " sextillion",
           " septillion", " octillion", " nonillion", " decillion")
_ORDINAL_ENDINGS = (("ty", "tieth"), ("one", "first"), ("two", "second"), ("three", "third"), ("five", "fifth"),
                    ("eight", "eighth"), ("nine", "ninth"), ("twelve", "twelfth"))


class _TooLarge(ValueError):
    """Past inflect's largest scale word (decillion): the release keeps such numbers as digits."""


def _below_hundred(n: int) -> str:
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


def cardinal(n: int, and_word: str = "") -> str:
    """n in words, as inflect's `number_to_words(n, andword=and_word)`: groups of three joined by ", ", the last one
    by " <and_word> " when it is below one hundred ("one million, two thousand three"); "<h> hundred <and_word>
    <rest>" inside a group. Raises ValueError for n < 0 or n >= 10**36."""
    if n < 0:
        raise ValueError(f"cardinal takes n >= 0, got {n}")
    if n == 0:
        return "zero"
    groups = []
    while n:
        n, g = divmod(n, 1000)
        groups.append(g)
    if len(groups) > len(_SCALES):
        raise _TooLarge(f"{len(groups) * 3} digits")
    parts = []
    for scale in reversed(range(len(groups))):
        hundreds, rest = divmod(groups[scale], 100)
        words = ([f"{_ONES[hundreds]} hundred"] if hundreds else []) + ([and_word] if hundreds and rest and and_word
                                                                        else []) + ([_below_hundred(rest)] if rest
                                                                                    else [])
        if words:
            parts.append(" ".join(words) + _SCALES[scale])
    if len(parts) > 1 and 0 < groups[0] < 100:
        return ", ".join(parts[:-1]) + (f" {and_word} " if and_word else " ") + parts[-1]
    return ", ".join(parts)


def ordinal_words(words: str) -> str:
    """The ordinal of a number in words, as inflect's `ordinal("twenty-one")`: "twenty-first", "zeroth"."""
    for ending, replacement in _ORDINAL_ENDINGS:
        if words.endswith(ending):
            return words[:-len(ending)] + replacement
    return words + "th"


def _amount(number: str, and_word: str = "") -> str | None:
    """'-12.05' -> 'minus twelve point zero five'; None when it is not digits around at most one point, or too large
    (the callers then keep the digits, as the release does)."""
    negative = number.startswith("-")
    number = number.lstrip("-") or "0"
    whole, point, decimals = number.partition(".")
    whole = whole or "0"
    if not whole.isdigit() or (point and not decimals.isdigit()):
        return None
    try:
        words = cardinal(int(whole), and_word)
        if point:
            words += " point " + " ".join(cardinal(int(d), and_word) for d in decimals)
    except ValueError:  # too large (or a digit int() cannot read): kept as digits, as the release does
        return None
    return f"minus {words}" if negative else words


_UNIT_NAMES = {
    "ms": "milliseconds", "s": "seconds", "hz": "hertz", "khz": "kilohertz", "mhz": "megahertz", "ghz": "gigahertz",
    "kb": "kilobytes", "mb": "megabytes", "gb": "gigabytes", "tb": "terabytes", "bps": "bits per second",
    "kbps": "kilobits per second", "mbps": "megabits per second", "gbps": "gigabits per second",
    "cm": "centimeters", "km": "kilometers", "kg": "kilograms", "v": "volts", "a": "amperes", "w": "watts",
    "°c": "degrees celsius", "°f": "degrees fahrenheit",
}
_EN_COMMAS = re.compile(r"[0-9][0-9,]+[0-9]")
_EN_UNIT = re.compile(r"\b(-?\d+(?:\.\d+)?)\s*(" + "|".join(sorted(_UNIT_NAMES, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)
_EN_POUNDS = re.compile(r"£(-?[0-9,]*[0-9]+(?:\.[0-9]+)?)")
_EN_DOLLARS = re.compile(r"\$(-?[0-9.,]*[0-9]+(?:\.[0-9]+)?)")
_EN_FRACTION = re.compile(r"([0-9]+)/([0-9]+)")
_EN_PERCENT = re.compile(r"(-?[0-9.,]*[0-9]+)%")
_EN_ORDINAL = re.compile(r"\b([0-9]+)(?:st|nd|rd|th)\b")
_EN_GLUED = re.compile(r"\b([a-zA-Z]+)-?([0-9]+(?:\.[0-9]+)?)\b")
_EN_NUMBER = re.compile(r"\b-?[0-9]+(?:\.[0-9]+)?\b")
_SPACES = re.compile(r"\s+")


def _unit(m: re.Match) -> str:
    words = _amount(m.group(1))
    unit = m.group(2).lower()
    return f" {words} {_UNIT_NAMES[unit]} " if words else f" {m.group(1)} {unit} "


def _currency(singular: str, plural: str):
    def expand(m: re.Match) -> str:
        number = m.group(1)
        words = _amount(number)
        if words is None:
            return f" {number.lstrip('-') or '0'} {plural} "
        return f" {words} {singular if abs(float(number.lstrip('-') or '0')) == 1.0 else plural} "
    return expand


def _fraction(m: re.Match) -> str:
    num, den = int(m.group(1)), int(m.group(2))
    try:
        if (num, den) == (1, 2):
            return " one half "
        if (num, den) == (1, 4):
            return " one quarter "
        if den == 2:
            return f" {cardinal(num, 'and')} {'half' if num == 1 else 'halves'} "
        if den == 4:
            return f" {cardinal(num, 'and')} {'quarter' if num == 1 else 'quarters'} "
        return f" {cardinal(num, 'and')} {ordinal_words(cardinal(den, 'and'))} "
    except _TooLarge:
        return f" {num} over {den} "


def _percent(m: re.Match) -> str:
    return f" {_amount(m.group(1)) or m.group(1)} percent "


def _ordinal(m: re.Match) -> str:
    try:
        return f" {cardinal(int(m.group(1)), 'and')} "
    except _TooLarge:
        return m.group(0)


def _glued(m: re.Match) -> str:
    words = _amount(m.group(2), "and")
    return f"{m.group(1)} {words}" if words else m.group(0)


def _number(m: re.Match) -> str:
    return f" {_amount(m.group(0)) or m.group(0)} "


def english_numbers(text: str) -> str:
    """The release's `normalize_numbers` for fragments without CJK characters (rules in the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = _EN_COMMAS.sub(lambda m: m.group(0).replace(",", ""), text)
    text = _EN_UNIT.sub(_unit, text)
    text = _EN_POUNDS.sub(_currency("pound", "pounds"), text)
    text = _EN_DOLLARS.sub(_currency("dollar", "dollars"), text)
    text = _EN_FRACTION.sub(_fraction, text)
    text = _EN_PERCENT.sub(_percent, text)
    text = _EN_ORDINAL.sub(_ordinal, text)
    text = _EN_GLUED.sub(_glued, text)
    text = _EN_NUMBER.sub(_number, text)
    return _SPACES.sub(" ", text).strip()


# --- the pre-processor (talker_tn/talker_pre_processor.py) -------------------------------------------------------

_PRE_RULES = (
    (re.compile(r"\$\$.*?\$\$|\$.*?\$", re.DOTALL), ""),  # LaTeX math
    (re.compile(r"https?://[a-zA-Z0-9./?=&_:-]+|www\.[a-zA-Z0-9./?=&_:-]+"), ""),  # URLs
    (re.compile(r"`.*?`", re.DOTALL), ""),  # inline code
    (re.compile(r"```.*?```", re.DOTALL), ""),  # code blocks (what the rule above left)
    (re.compile(r"!\[.*?\]\(.*?\)"), ""),  # markdown images
    (re.compile(r"(?<=\d),(?=\d{3})"), ""),  # thousands separators
    (re.compile(r"(?<=[^a-zA-Z.])[ ]+(?=[^a-zA-Z.])"), ""),  # spaces not next to a letter or "."
    (re.compile(r"(?<=[a-zA-Z])[ ]+(?=[a-zA-Z])"), " "),  # one space between words
    (re.compile(r"\*\*\*|\*\*|###|---"), ""),  # markdown emphasis, headers, rules
)
_SILENT = {cp: None for cp in range(0x1F600, 0x1F650)}
_SILENT.update({ord(ch): None for ch in "▼●★☆■□▲△◆◇○◎√×✔✖\ufe0e\t\n\r\f"})


def preprocess(text: str) -> str:
    """The release's TalkerPreProcessor (rules in the module docstring)."""
    for pattern, replacement in _PRE_RULES:
        text = pattern.sub(replacement, text)
    return text.translate(_SILENT)


_HAS_CJK = re.compile(r"[\u4e00-\u9fff]")


# --- the built-in normaliser ----------------------------------------------------------------------------------------


class RuleNormaliser:
    """The release's TalkerTN without pynini: `preprocess`, then for CJK text the Chinese rule layer (`zh_rules`,
    which returns its input unchanged where the release's layer raises)."""

    def __init__(self, zh_tables: ZhTables | None = None):
        self.zh_tables = zh_tables if zh_tables is not None else ZhTables.builtin()

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = preprocess(text)
        if text and _HAS_CJK.search(text):
            return zh_rules(text, self.zh_tables)
        return text


# --- the FST normaliser -------------------------------------------------------------------------------------------

# Field orders the verbalizers expect (tokens of other names keep the tagger's order; a token whose
# preserve_order is "true" too). Fields not listed for a reordered token are dropped, as the release does.
ZH_FIELD_ORDERS = {
    "date": ("year", "month", "day"), "fraction": ("denominator", "numerator"),
    "measure": ("denominator", "numerator", "value"), "money": ("value", "currency"),
    "time": ("noon", "hour", "minute", "second"),
}
EN_FIELD_ORDERS = {
    "date": ("preserve_order", "text", "day", "month", "year"),
    "money": ("integer_part", "fractional_part", "quantity", "currency_maj"),
}


class FstError(ValueError):
    """A tagger output that is not `name { key: "value" ... }` tokens."""


def _parse_tagged(tagged: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """`name { key: "value" ... } ...` -> [(name, [(key, value), ...]), ...]; values keep their backslash escapes."""
    tokens, i, n = [], 0, len(tagged)

    def word(i: int) -> tuple[str, int]:
        j = i
        while j < n and (tagged[j].isascii() and (tagged[j].isalpha() or tagged[j] == "_")):
            j += 1
        return tagged[i:j], j

    while True:
        while i < n and tagged[i] == " ":
            i += 1
        if i >= n:
            return tokens
        name, i = word(i)
        for ch in " { ":
            i += i < n and tagged[i] == ch
        fields = []
        while True:
            while i < n and tagged[i] == " ":
                i += 1
            if i >= n:
                break
            if tagged[i] == "}":
                i += 1
                break
            key, i = word(i)
            for ch in ': "':
                i += i < n and tagged[i] == ch
            start = i
            while i < n and tagged[i] != '"':
                i += 2 if tagged[i] == "\\" else 1
            if i >= n:
                raise FstError(f"unterminated value in tagger output {tagged!r}")
            fields.append((key, tagged[start:i]))
            i += 1
        tokens.append((name, fields))


def reorder_tagged(tagged: str, orders: dict[str, Sequence[str]]) -> str:
    """The release's TokenParser.reorder: each token rewritten with its fields in the verbalizer's order."""
    out = []
    for name, fields in _parse_tagged(tagged):
        values = dict(fields)
        keys = [k for k, _ in fields]
        if name in orders and values.get("preserve_order") != "true":
            keys = [k for k in orders[name] if k in values]
        out.append(name + " {" + "".join(f' {k}: "{values[k]}"' for k in keys) + " }")
    return " ".join(out)


def _import_pynini():
    try:
        import pynini
    except ImportError as e:
        raise ImportError("FstNormaliser needs pynini, which ming_jax does not install: `pip install pynini` "
                          "(wheels for Linux x86_64 / Python 3.11; or conda-forge), or use RuleNormaliser / "
                          "make_normaliser(fst_dir=None)") from e
    return pynini


class FstNormaliser:
    """The release's TalkerTN with its pynini grammars: `preprocess`, then CJK text through the Chinese rule layer
    and zh_tn_{tagger,verbalizer}.fst, other text through en_tn_{tagger,verbalizer}.fst. `fst_dir` is the release's
    `talker_tn/` folder (or any folder with those files); its talker_re.json, when present, supplies the rule
    layer's tables unless `zh_tables` is given. `languages` picks the grammars to load (both by default); text of
    a language left out gets the RuleNormaliser treatment, as the release gives everything without pynini."""

    def __init__(self, fst_dir: str | os.PathLike, zh_tables: ZhTables | None = None,
                 languages: Sequence[str] = ("zh", "en")):
        fst_dir = os.fspath(fst_dir)
        unknown = set(languages) - {"zh", "en"}
        if unknown or not languages:
            raise ValueError(f"languages must be a non-empty subset of ('zh', 'en'), got {tuple(languages)}")
        names = [f"{lang}_tn_{part}.fst" for lang in languages for part in ("tagger", "verbalizer")]
        missing = [f for f in names if not os.path.isfile(os.path.join(fst_dir, f))]
        if missing:
            raise FileNotFoundError(f"{fst_dir}: missing {', '.join(missing)} (point fst_dir at the release's "
                                    "talker_tn/ folder)")
        self._pynini = _import_pynini()

        def load(lang: str):
            if lang not in languages:
                return None
            return tuple(self._pynini.Fst.read(os.path.join(fst_dir, f"{lang}_tn_{part}.fst")).optimize()
                         for part in ("tagger", "verbalizer"))

        self._zh, self._en = load("zh"), load("en")
        if zh_tables is None:
            json_path = os.path.join(fst_dir, "talker_re.json")
            zh_tables = ZhTables.from_release_json(json_path) if os.path.isfile(json_path) else ZhTables.builtin()
        self.zh_tables = zh_tables

    def _best(self, text: str, fst) -> str:
        pynini = self._pynini
        return pynini.shortestpath(pynini.escape(text) @ fst, nshortest=1, unique=True).string()

    def _grammar(self, text: str, grammars, orders) -> str:
        if not text:
            return ""
        tagged = self._best(text, grammars[0])
        if not tagged:
            return ""
        return self._best(reorder_tagged(tagged, orders), grammars[1])

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = preprocess(text)
        if not text:
            return text
        if _HAS_CJK.search(text):
            text = zh_rules(text, self.zh_tables)
            return self._grammar(text, self._zh, ZH_FIELD_ORDERS) if self._zh is not None else text
        return self._grammar(text, self._en, EN_FIELD_ORDERS) if self._en is not None else text


def make_normaliser(fst_dir: str | os.PathLike | None = None) -> Normaliser:
    """`RuleNormaliser()` when fst_dir is None; else `FstNormaliser(fst_dir)` (needs pynini and the release's
    grammars there; errors say which is missing)."""
    if fst_dir is None:
        return RuleNormaliser()
    return FstNormaliser(fst_dir)

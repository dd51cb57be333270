"""The talker's text front end: the user's text -> the fragments the release synthesises one by one.

    text --pieces--> sentences (grouping rules below) --cut_by_semantic_length(s, 50)--> fragments
         --prepare_fragment(fragment, normaliser)--> the text each talker run is given

The release (modeling_bailing_talker.py, `omni_audio_generation` and the TTS-like tasks of
`instruct_audio_generation`, with front/toolkit.py and front/text_segment_cut.py) does this inside its speech loop;
here the same steps are plain functions, equal to the release on every case of `tests/data/speech_text_reference`.

Pieces. The release runs its mixed-text tokenizer (`tokenize_mixed_text`: abbreviations like "U.S.", words with
inner ' or -, numbers with one decimal point, single CJK characters, whitespace runs, any other character) over
each chunk of an iterable; it is handed the text itself, so every chunk, and every piece, is one character.
`speech_fragments` does the same; `iter_speech_fragments` takes any iterable of pieces.

Sentences. Pieces accumulate until one ends a sentence, "long enough" meaning >= 12 pieces so far, or >= 8 once a
fragment has been produced:
  * a piece ending in ！？。，!? ends a long-enough sentence (it is kept);
  * a piece ending in "." does too, unless the piece before it ends in an ASCII digit ("3.14", "in 2020.");
  * a piece ending in "\\n" is not kept; when the sentence so far has a CJK character, a "，" stands in for it if
    the last piece ends in one (else nothing); otherwise the newline is dropped (a "." replaces it when the piece
    is longer than one character and its second-to-last character is an ASCII letter). Then the sentence ends if
    long enough;
  * at the end, what is left is a sentence if it has an ASCII letter, a CJK character or a digit 1-9.
Each sentence is cut by `cut_by_semantic_length` (the number of fragments produced so far feeds the rule above).

One divergence, where the release fails: a long-enough sentence that cuts into no fragments (only ASCII
punctuation and spaces, e.g. "!!!!!!!!!!!!!") makes the release's loop raise AttributeError on the next piece
(it keeps the joined string where it expects a list); here the sentence is dropped and the loop goes on.

Semantic length: CJK characters (U+4E00-U+9FA5) plus runs of ASCII letters. Cut (`cut_by_semantic_length`):
  * texts with only ASCII punctuation / whitespace have no fragments; dots between digits and between capitals
    are protected (the release's marker "##DOT##" is kept, with its letters counted as one word, since that is
    what the release measures); newlines become spaces and "。，" becomes "。";
  * a text of semantic length <= max_length is one fragment, as is;
  * longer texts have . ! ? , turned into 。！？， and are split into sentences after 。！？ (a tail without one
    gets a "。"), sentences into clauses after ，;；, clauses of semantic length < 5 joined with the next one when
    the pair fits, clauses over max_length split into CJK characters / letter runs / other runs packed greedily;
    each piece then joins the previous fragment if both fit in max_length (with a space when the new piece starts
    with an ASCII letter or digit and the fragment does not end in one), except a short piece (< 5) after a
    fragment ending in 。！？, which starts a new fragment. Leading "，,:;" and ASCII whitespace are stripped from
    each piece.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator

from ming_jax.processors.speech_tn import Normaliser, english_numbers

MAX_LENGTH = 50  # the release's default max_length (semantic length of one fragment)
MIN_TAIL = 5  # a clause / piece shorter than this is joined to a neighbour

# --- pieces -----------------------------------------------------------------------------------------------------

_PIECE = re.compile(
    r"(?:[a-zA-Z]\.)+"  # abbreviations: "U.S.", "e.g."
    r"|[a-zA-Z]+(?:['\-][a-zA-Z]+)*"  # words, with inner apostrophes / hyphens
    r"|\d+(?:\.\d+)?"  # numbers, one decimal point
    r"|[\u4e00-\u9fff]"  # one CJK character
    r"|\s+"  # a whitespace run
    r"|\S"  # anything else, one character
)


def tokenize_mixed_text(text: str) -> list[str]:
    """The release's mixed-text tokenizer on one string: pieces that concatenate back to `text`."""
    _check_text(text)
    return _PIECE.findall(text)


def iter_mixed_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """The tokenizer over each chunk in turn (a str is an iterable of one-character chunks, as the release has it)."""
    for chunk in chunks:
        yield from (m.group(0) for m in _PIECE.finditer(chunk))


# --- language and length --------------------------------------------------------------------------------------

_CJK = re.compile(r"[\u4e00-\u9fff]")
_CJK_COUNTED = re.compile(r"[\u4e00-\u9fa5]")  # the cut counts this narrower range
_LETTER_RUN = re.compile(r"[a-zA-Z]+")
_NO_CONTENT = frozenset(string.punctuation + string.whitespace)


def is_chinese(text: str) -> bool:
    """True when the text has a CJK character (U+4E00-U+9FFF); such fragments skip the English number step."""
    return _CJK.search(text) is not None


def semantic_length(text: str) -> int:
    """CJK characters (U+4E00-U+9FA5) plus runs of ASCII letters."""
    return len(_CJK_COUNTED.findall(text)) + len(_LETTER_RUN.findall(text))


def _has_content(text: str) -> bool:
    return any(ch not in _NO_CONTENT for ch in text)


# --- the semantic-length cut ------------------------------------------------------------------------------------

_DOT_MARK = "##DOT##"  # the release's marker; its letters count as one word of semantic length, as there
_DECIMAL_DOT = re.compile(r"(\d)\.(\d)")
_CAPITALS_DOT = re.compile(r"([A-Z])\.([A-Z])")
_TO_CJK_PUNCT = str.maketrans({".": "。", "!": "！", "?": "？", ",": "，"})
_SENTENCE_ENDS = "。！？"
_CLAUSE_ENDS = "，;；"
_STRIP_LEAD = "，,:;" + string.whitespace
_UNITS = re.compile(r"[\u4e00-\u9fa5]|[a-zA-Z]+|[^a-zA-Z\u4e00-\u9fa5]+")


def _protect_dots(text: str) -> str:
    text = _DECIMAL_DOT.sub(rf"\g<1>{_DOT_MARK}\g<2>", text)
    for _ in range(3):  # "U.S.A." needs two passes (matches do not overlap); the release does three
        text = _CAPITALS_DOT.sub(rf"\g<1>{_DOT_MARK}\g<2>", text)
    return text


def _split_after(text: str, ends: str) -> tuple[list[str], str]:
    """Pieces of `text` each ending in one of `ends`, and the rest after the last one."""
    pieces, start = [], 0
    for i, ch in enumerate(text):
        if ch in ends:
            pieces.append(text[start:i + 1])
            start = i + 1
    return pieces, text[start:]


def _sentences(text: str) -> list[str]:
    done, rest = _split_after(text, _SENTENCE_ENDS)
    out = [s.strip() for s in done if s.strip()]
    if rest:  # even a whitespace-only tail becomes a sentence ("。"), as in the release
        tail = rest.strip()
        out.append(tail if tail.endswith(tuple(_SENTENCE_ENDS)) else tail + "。")
    return out


def _clauses(sentence: str) -> list[str]:
    done, rest = _split_after(sentence, _CLAUSE_ENDS)
    out: list[str] = []
    for piece in done + ([rest] if rest else []):
        piece = piece.strip()
        if not piece:
            continue
        if _has_content(piece):
            out.append(piece)
        elif out:  # punctuation-only clause: glued to the previous one, dropped when there is none
            out[-1] += piece
    return out


def _split_long(clause: str, max_length: int) -> list[str]:
    """A clause over max_length packed greedily from CJK characters, letter runs and other runs."""
    if semantic_length(clause) <= max_length:
        return [clause]
    parts, current = [], ""
    for unit in _UNITS.findall(clause):
        if semantic_length(current) + semantic_length(unit) <= max_length:
            current += unit
            continue
        if current:
            parts.append(current)
        current = unit
    if current:
        parts.append(current)
    return parts


def _append(fragments: list[str], piece: str, max_length: int) -> None:
    piece = piece.lstrip(_STRIP_LEAD)
    if not _has_content(piece):
        return
    if not fragments:
        fragments.append(piece)
        return
    last = fragments[-1]
    n_piece = semantic_length(piece)
    if semantic_length(last) + n_piece > max_length or (last.endswith(tuple(_SENTENCE_ENDS)) and n_piece < MIN_TAIL):
        fragments.append(piece)
        return
    glue = " " if not last.endswith(" ") and re.match(r"[a-zA-Z0-9]", piece) else ""
    fragments[-1] = last + glue + piece


def cut_by_semantic_length(text: str, max_length: int = MAX_LENGTH) -> list[str]:
    """The release's `cut_text_by_semantic_length(text, max_length)["fragments"]` (rules in the module docstring)."""
    _check_text(text)
    _check_max_length(max_length)
    if not _has_content(text):
        return []
    text = _protect_dots(text).replace("\n", " ").replace("。，", "。")
    if semantic_length(text) <= max_length:
        return [text.replace(_DOT_MARK, ".")]
    fragments: list[str] = []
    for sentence in _sentences(text.translate(_TO_CJK_PUNCT)):
        clauses = _clauses(sentence)
        i = 0
        while i < len(clauses):
            clause = clauses[i]
            n = semantic_length(clause)
            if n < MIN_TAIL and i + 1 < len(clauses) and semantic_length(clause + clauses[i + 1]) <= max_length:
                _append(fragments, clause + clauses[i + 1], max_length)
                i += 2
                continue
            for part in _split_long(clause, max_length) if n > max_length else [clause]:
                _append(fragments, part, max_length)
            i += 1
    return [f.replace(_DOT_MARK, ".") for f in fragments]


# --- sentences: the speech loop's grouping ------------------------------------------------------------------------

_ENDS_SENTENCE = "！？。，!?"
_LEFTOVER_SPEAKS = re.compile(r"[a-zA-Z\u4e00-\u9fff1-9]")
_ASCII_DIGIT = re.compile(r"[0-9]")
_ASCII_LETTER = re.compile(r"[a-zA-Z]")


def iter_speech_fragments(pieces: Iterable[str], max_length: int = MAX_LENGTH) -> Iterator[str]:
    """The fragments, in order, that the release's speech loop synthesises for these pieces (module docstring)."""
    _check_max_length(max_length)
    sentence: list[str] = []
    produced = 0

    def long_enough() -> bool:
        return len(sentence) >= 12 or (produced > 0 and len(sentence) >= 8)

    for piece in pieces:
        if not piece:
            continue
        end = piece[-1]
        stop = end in _ENDS_SENTENCE or (end == "." and not (sentence and _ASCII_DIGIT.match(sentence[-1][-1:])))
        if stop and long_enough():
            sentence.append(piece)
        elif end == "\n":
            if sentence:
                if is_chinese("".join(sentence)):
                    if _CJK.match(sentence[-1][-1:]):
                        sentence.append("，")
                elif len(piece) > 1 and _ASCII_LETTER.match(piece[-2]):
                    sentence.append(piece[:-1] + ".")
                else:
                    sentence.append(piece[:-1])  # may be "": it still counts as a piece
            if not long_enough():
                continue
        else:
            sentence.append(piece)
            continue
        fragments = cut_by_semantic_length("".join(sentence), max_length)
        sentence = []
        for fragment in fragments:
            yield fragment
            produced += 1
    rest = "".join(sentence)
    if sentence and _LEFTOVER_SPEAKS.search(rest):
        yield from cut_by_semantic_length(rest, max_length)


def speech_fragments(text: str, max_length: int = MAX_LENGTH) -> list[str]:
    """The fragments, in order, that the release synthesises for `text` (before normalisation)."""
    _check_text(text)
    return list(iter_speech_fragments(iter_mixed_pieces(text), max_length))


def prepare_fragment(fragment: str, normaliser: Normaliser) -> str:
    """The release's per-fragment chain: English numbers (`english_numbers`) when the fragment has no CJK
    character, then the normaliser (the release's TalkerTN; see speech_tn), then one leading "，" dropped."""
    _check_text(fragment)
    text = fragment if is_chinese(fragment) else english_numbers(fragment)
    text = normaliser(text)
    return text.removeprefix("，")


# --- input checks ---------------------------------------------------------------------------------------------------


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def _check_max_length(max_length: object) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
    if max_length <= 0:
        raise ValueError(f"max_length must be > 0, got {max_length}")

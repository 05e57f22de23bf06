"""Heuristic quality rules for one document (after Gopher, Rae et al. 2021, appendix A):
length, mean word length, symbol and non-alphabetic fractions, bullet/ellipsis lines,
repeated lines and n-grams, and a stopword floor for languages with a list here.

Pure: ``reason(text, language) -> str`` names the first rule a document breaks ("" when it
passes), so drops are counted per rule. Word rules are skipped for scripts written without
spaces between words (Chinese, Japanese, Thai, ...), where "words" are not whitespace runs.
"""
from __future__ import annotations

import re
from collections import Counter

MIN_WORDS, MAX_WORDS = 50, 100_000
MEAN_WORD_CHARS = (3.0, 10.0)
MAX_SYMBOL_PER_WORD = 0.1  # "#" and "..." per word
MAX_BULLET_LINES, MAX_ELLIPSIS_LINES = 0.9, 0.3
MIN_ALPHA_WORDS = 0.8  # words with at least one letter
MAX_DUPLICATE_LINE_CHARS = 0.3
MAX_TOP_BIGRAM_CHARS = 0.2
MIN_STOPWORDS = 2
NO_SPACES = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo"})

STOPWORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split()) for lang, words in {
        "en": "the be to of and that have with this from they will would there their",
        "de": "der die und das ist nicht ein eine mit sich auf dem den für von zu",
        "fr": "le la les et des est une dans que pour pas sur qui avec",
        "es": "el la los las de que y en un una por con para es",
        "it": "il la di che e un una per non con sono del della",
        "nl": "de het een en van dat niet met voor zijn op te",
        "pt": "o a os as de que e do da em um uma para com não",
        "pl": "i w nie na się z do to że jest jak po",
    }.items()}
_WORD = re.compile(r"\S+")
_BULLET = re.compile(r"^\s*[-*•‣◦▪]")


def _line_rules(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "empty"
    if sum(bool(_BULLET.match(ln)) for ln in lines) / len(lines) > MAX_BULLET_LINES:
        return "bullet lines"
    ends = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
    if ends / len(lines) > MAX_ELLIPSIS_LINES:
        return "ellipsis lines"
    counts = Counter(ln.strip() for ln in lines)
    repeated = sum(len(ln) * (n - 1) for ln, n in counts.items() if n > 1)
    if repeated / max(len(text), 1) > MAX_DUPLICATE_LINE_CHARS:
        return "repeated lines"
    return ""


def _word_rules(words: list[str], language: str) -> str:
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return "word count"
    mean = sum(map(len, words)) / len(words)
    if not MEAN_WORD_CHARS[0] <= mean <= MEAN_WORD_CHARS[1]:
        return "mean word length"
    symbols = sum(w.count("#") + w.count("...") + w.count("…") for w in words)
    if symbols / len(words) > MAX_SYMBOL_PER_WORD:
        return "symbol ratio"
    if sum(any(ch.isalpha() for ch in w) for w in words) / len(words) < MIN_ALPHA_WORDS:
        return "non-alphabetic words"
    bigrams = Counter(zip(words, words[1:]))
    if bigrams:
        (a, b), n = bigrams.most_common(1)[0]
        if n > 1 and n * (len(a) + len(b)) / sum(map(len, words)) > MAX_TOP_BIGRAM_CHARS:
            return "repeated n-grams"
    stop = STOPWORDS.get(language)
    if stop and sum(w.lower() in stop for w in words) < MIN_STOPWORDS:
        return "stopwords"
    return ""


def reason(text: str, language: str = "") -> str:
    """The first quality rule ``text`` breaks, or "" when it passes them all."""
    broken = _line_rules(text)
    if broken or language in NO_SPACES:
        return broken
    return _word_rules(_WORD.findall(text), language)

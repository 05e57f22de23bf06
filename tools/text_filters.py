"""Document filters for data preparation: pure functions of one text, no I/O.

Kept separate from the pipeline so each rule is testable in microseconds and the
worker processes import nothing heavy.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Digit groups joined by spaces, dots or dashes, an optional +country code and (area code),
# not glued to other digits, words, times (":") or dotted/dashed runs (UUIDs, versions).
# A match is a phone number only with 9-15 digits (E.164's maximum) and not an IPv4 address,
# so dates, times, years and version numbers survive.
PHONE = re.compile(r"(?<![\w+.:-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}"
                   r"(?:[ .-]\d{2,5}){1,4}(?![\w:]|[.-]\w)")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
EMAIL_MASK, PHONE_MASK = "[EMAIL]", "[PHONE]"
_SPACES = re.compile(r"\s+")


@dataclass
class Options:
    """What prepare_data does to each document, in this order."""

    nfkc: bool = False
    """Unicode NFKC normalisation (full-width forms, ligatures, compatibility characters)."""
    min_chars: int = 0
    """Drop documents shorter than this (after normalisation)."""
    dedup: bool = False
    """Drop documents whose normalised text was seen before (first occurrence wins)."""
    redact_pii: bool = False
    """Replace e-mail addresses and phone numbers by placeholders."""
    text_key: str = "text"


@dataclass
class Filtered:
    """One document after the filters; ``text`` is None when it was dropped as too short."""

    text: str | None
    dedup_key: bytes = b""
    pii: dict[str, int] = field(default_factory=dict)


def dedup_key(text: str) -> bytes:
    """A 16-byte digest of the text up to Unicode form, case and whitespace."""
    normal = _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.blake2b(normal.encode(), digest_size=16).digest()


def _is_phone(match: re.Match[str]) -> bool:
    digits = sum(ch.isdigit() for ch in match.group())
    return 9 <= digits <= 15 and not _IPV4.fullmatch(match.group())


def redact(text: str) -> tuple[str, dict[str, int]]:
    """Text with e-mails and phone numbers masked, and how many of each were found."""
    text, emails = EMAIL.subn(EMAIL_MASK, text)
    phones = 0

    def mask(match: re.Match[str]) -> str:
        nonlocal phones
        if not _is_phone(match):
            return match.group()
        phones += 1
        return PHONE_MASK

    text = PHONE.sub(mask, text)
    return text, {"email": emails, "phone": phones}


def apply(text: str, options: Options) -> Filtered:
    """Normalise, length-check, key and redact one document."""
    if options.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if len(text) < options.min_chars or not text.strip():
        return Filtered(None)
    key = dedup_key(text) if options.dedup else b""
    if not options.redact_pii:
        return Filtered(text, key)
    text, counts = redact(text)
    return Filtered(text, key, counts)

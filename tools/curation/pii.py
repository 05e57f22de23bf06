"""PII detectors, one per data class, and what to do with a hit: redact, drop the document, or
only count it. Pure functions of one text; the pipeline decides which sources are exempt (code).

Phone numbers are found by Google's libphonenumber (the ``phonenumbers`` port) for the regions
of a locale profile, with STRICT_GROUPING: a number must be valid for the region and its digit
groups must be grouped as that region writes them, so ZIP+4 codes, clause numbers, number runs
and dates are not phone numbers, while ``+49 30 1234567``, ``030/1234567`` (de) and an
unseparated ``4155550100`` (us) are. An e-mail's domain must end in a real public suffix (the
Public Suffix List snapshot that ``tldextract`` ships; nothing is downloaded) and must not run
on into a path, an attribute or ``host:path`` (``git@github.com:``, ``x@self.weight.T``).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

CLASSES = ("email", "phone", "credit_card", "iban")
POLICIES = ("redact", "drop", "count")
MASKS = {"email": "[EMAIL]", "phone": "[PHONE]", "credit_card": "[CARD]", "iban": "[IBAN]"}
DEFAULT_POLICY = {"email": "redact", "phone": "redact"}
"""What ``--redact-pii`` does unless ``--pii`` names more: cards and IBANs are opt-in."""

LOCALES: dict[str, tuple[str, ...]] = {
    "us": ("US", "CA"), "uk": ("GB",), "de": ("DE", "AT", "CH"), "fr": ("FR", "BE", "CH"),
    "es": ("ES",), "it": ("IT",), "nl": ("NL", "BE"), "pl": ("PL",), "in": ("IN",),
    "jp": ("JP",), "kr": ("KR",), "br": ("BR",), "intl": (),
}
"""Locale profile -> libphonenumber regions whose national formats are recognised; numbers
written with a +country code are recognised under every profile."""

_EMAIL = re.compile(r"(?<![\w.+%-])[\w.+%-]+@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"(?<![\d-])[3-6]\d{3}(?:[ -]?\d{4}){2}[ -]?\d{1,7}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")


@dataclass(frozen=True)
class Hit:
    kind: str
    start: int
    end: int


@dataclass(frozen=True)
class Policy:
    """Per data class what happens on a hit; classes absent are not looked for."""

    actions: tuple[tuple[str, str], ...] = tuple(DEFAULT_POLICY.items())
    regions: tuple[str, ...] = LOCALES["us"]

    @classmethod
    def parse(cls, spec: str, locales: str) -> "Policy":
        """``"email=redact,phone=drop"`` (or ``"default"``) and ``"us,de"``; ValueError names the
        bad part and the allowed values."""
        actions = dict(DEFAULT_POLICY) if spec in ("", "default") else {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if part == "default":
                continue
            kind, _, action = part.partition("=")
            if kind not in CLASSES or action not in POLICIES:
                raise ValueError(f"--pii {part!r}: expected CLASS=POLICY with CLASS one of "
                                 f"{', '.join(CLASSES)} and POLICY one of {', '.join(POLICIES)}")
            actions[kind] = action
        regions: list[str] = []
        for name in filter(None, (n.strip().lower() for n in locales.split(","))):
            if name not in LOCALES:
                raise ValueError(f"--pii-locale {name!r}: expected one of {', '.join(LOCALES)}")
            regions += [r for r in LOCALES[name] if r not in regions]
        return cls(tuple(actions.items()), tuple(regions))


@functools.cache
def _suffixes():  # noqa: ANN202 - tldextract's extractor; built once per process
    import tldextract

    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def _is_email(text: str, match: re.Match[str]) -> bool:
    after = text[match.end():match.end() + 2]
    if after[:1] in (":", "/", "(") or (after[:1] == "." and after[1:2].isalnum()):
        return False  # host:path, a URL path, a call, or a domain that did not end here
    domain = match.group().rsplit("@", 1)[1]
    return bool(_suffixes()(domain).suffix) and not domain.split(".")[-1].isdigit()


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _is_iban(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    moved = s[4:] + s[:4]
    return 15 <= len(s) <= 34 and int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _phones(text: str, regions: tuple[str, ...]) -> list[Hit]:
    import phonenumbers

    strict = phonenumbers.Leniency.STRICT_GROUPING
    hits: list[Hit] = []
    for region in regions or ("ZZ",):  # ZZ: no national format, only +country numbers
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=strict):
            if not any(h.start < m.end and m.start < h.end for h in hits):
                hits.append(Hit("phone", m.start, m.end))
    return hits


def detect(text: str, policy: Policy) -> list[Hit]:
    """Every hit of the classes the policy names, not overlapping, in text order."""
    kinds = {kind for kind, _ in policy.actions}
    hits: list[Hit] = []
    if "email" in kinds and "@" in text:
        hits += [Hit("email", m.start(), m.end()) for m in _EMAIL.finditer(text)
                 if _is_email(text, m)]
    if "iban" in kinds:
        hits += [Hit("iban", m.start(), m.end()) for m in _IBAN.finditer(text)
                 if _is_iban(m.group())]
    if "credit_card" in kinds:
        hits += [Hit("credit_card", m.start(), m.end()) for m in _CARD.finditer(text)
                 if 13 <= len(d := re.sub(r"\D", "", m.group())) <= 19 and _luhn(d)]
    if "phone" in kinds and any(ch.isdigit() for ch in text):
        hits += [h for h in _phones(text, policy.regions)
                 if not any(o.start < h.end and h.start < o.end for o in hits)]
    return sorted(hits, key=lambda h: h.start)


def apply_policy(text: str, hits: list[Hit], policy: Policy) -> str | None:
    """The text with redacted classes masked; None when a class the policy drops was hit."""
    actions = dict(policy.actions)
    if any(actions[h.kind] == "drop" for h in hits):
        return None
    out, last = [], 0
    for h in hits:
        if actions[h.kind] == "redact":
            out += [text[last:h.start], MASKS[h.kind]]
            last = h.end
    return "".join(out) + text[last:]

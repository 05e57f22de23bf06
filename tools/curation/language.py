"""Language identification with py3langid, whose model ships inside the wheel (no download).

The first ``SAMPLE_CHARS`` characters decide: enough for a stable answer, and the cost of a
document stays bounded however long it is.
"""
from __future__ import annotations

import functools

SAMPLE_CHARS = 2000
UNKNOWN = "und"
"""ISO 639-2's code for an undetermined language: a text with no letters."""


@functools.cache
def _identifier():  # noqa: ANN202 - py3langid's LanguageIdentifier; loading it takes seconds
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)


def identify(text: str) -> str:
    """The ISO 639-1 code of the text's language (``und`` when it has no letters)."""
    sample = text[:SAMPLE_CHARS]
    if not any(ch.isalpha() for ch in sample):
        return UNKNOWN
    return _identifier().classify(sample)[0]


def parse_languages(spec: str) -> tuple[str, ...]:
    """``"de,en"`` -> ("de", "en"); ValueError naming a code py3langid does not know."""
    codes = tuple(filter(None, (c.strip().lower() for c in spec.split(","))))
    known = set(_identifier().labels)
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise ValueError(f"--languages {unknown[0]!r}: not an ISO 639-1 code py3langid knows "
                         f"(one of {', '.join(sorted(known))})")
    return codes

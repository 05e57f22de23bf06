"""The per-document stages of data preparation: pure functions of one text, no I/O.

Kept separate from the pipeline so each rule is testable in microseconds; they run in the
tokenizing workers. Corpus-wide stages (exact and near-duplicate selection) are not here:
they run over the keys and signatures these stages compute (tools/curation/selection.py).
"""
from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from tools.curation import language, minhash, perplexity, pii, quality

_SPACES = re.compile(r"\s+")
AUDIT_CONTEXT = 40
"""Characters kept either side of a PII hit in the audit sample."""


@dataclass
class Options:
    """What prepare_data does to each document, in this order."""

    nfkc: bool = False
    """Unicode NFKC normalisation (full-width forms, ligatures, compatibility characters)."""
    min_chars: int = 0
    """Drop documents shorter than this (after normalisation)."""
    dedup: bool = False
    """Drop documents whose normalised text was seen before, anywhere in the corpus (the first
    occurrence in input order wins)."""
    redact_pii: bool = False
    """Look for PII with ``pii``'s policy (the default one: e-mails and phones redacted)."""
    text_key: str = "text"
    pii: str = "default"
    """Per data class: ``email=redact,phone=drop,credit_card=count,iban=redact``."""
    pii_locale: str = "us"
    """Locale profiles whose national phone formats are recognised (tools/curation/pii.py)."""
    quality: bool = False
    """Drop documents that break a heuristic quality rule (tools/curation/quality.py)."""
    languages: str = ""
    """Keep only these languages (ISO 639-1, comma-separated); "" keeps all."""
    langid: bool = False
    """Identify each document's language (implied by ``languages``)."""
    near_dup: float = 0.0
    """Drop near-duplicates at or above this estimated Jaccard similarity (0: off)."""
    perplexity_reference: str = ""
    """A reference text whose character model scores each document ("": off); the model is
    trained in each worker (tools/curation/perplexity.py)."""
    max_perplexity: float = 0.0
    """Drop documents whose per-character perplexity under that model is above this."""
    paragraph_dup: float = 0.0
    """Remove paragraphs repeating an earlier one at or above this similarity (0: off); runs
    before every other stage (tools/curation/paragraphs.py)."""
    dedup_against: tuple[str, ...] = ()
    """``<prefix>.dedup.npz`` files of earlier corpora whose documents are excluded."""

    @property
    def identifies_language(self) -> bool:
        return self.langid or bool(self.languages) or self.quality


CORPUS_WIDE = ("dedup", "near_dup", "paragraph_dup", "dedup_against")
"""Options acting over all shards: the paragraphs removed from a shard's documents enter its
source as a digest of what was removed, the rest act at the merge."""


def shard_options(options: Options) -> dict[str, object]:
    """The options a shard's contents depend on: dedup and the near-dup threshold act later,
    corpus-wide, on the keys and signatures a shard stores, so only whether it stores them
    counts (keys cost ~5% of tokenizing, so a run without --dedup skips them)."""
    out = {k: v for k, v in vars(options).items() if k not in CORPUS_WIDE}
    if options.perplexity_reference:  # its contents, not its path, decide the scores
        out["perplexity_reference"] = perplexity.digest(Path(options.perplexity_reference))
    out["keys"], out["signatures"] = options.dedup, options.near_dup > 0
    return out


@dataclass
class Filtered:
    """One document after the filters; ``text`` is None when it was dropped (``drop`` says why)."""

    text: str | None
    dedup_key: bytes = b""
    pii: dict[str, int] = field(default_factory=dict)
    drop: str = ""
    language: str = ""
    signature: numpy.ndarray | None = None
    audit: list[tuple[str, str]] = field(default_factory=list)
    """PII hits as (class, the hit with its context), for the audit sample."""


def dedup_key(text: str) -> bytes:
    """A 16-byte digest of the text up to Unicode form, case and whitespace."""
    normal = _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.blake2b(normal.encode(), digest_size=16).digest()


@functools.cache
def _policy(spec: str, locales: str) -> pii.Policy:
    return pii.Policy.parse(spec, locales)


def redact(text: str, policy: pii.Policy | None = None) -> tuple[str, dict[str, int]]:
    """Text with the policy's redacted classes masked, and the hits per class."""
    policy = policy or _policy("default", "us")
    hits = pii.detect(text, policy)
    counts = {kind: sum(h.kind == kind for h in hits) for kind, _ in policy.actions}
    return pii.apply_policy(text, hits, policy) or "", counts


def _pii(doc: Filtered, options: Options) -> Filtered:
    policy = _policy(options.pii, options.pii_locale)
    hits = pii.detect(doc.text or "", policy)
    doc.pii = {kind: sum(h.kind == kind for h in hits) for kind, _ in policy.actions}
    text = doc.text or ""
    doc.audit = [(h.kind, text[max(h.start - AUDIT_CONTEXT, 0):h.end + AUDIT_CONTEXT])
                 for h in hits]
    doc.text = pii.apply_policy(text, hits, policy)
    if doc.text is None:
        dropped = next(h.kind for h in hits if dict(policy.actions)[h.kind] == "drop")
        doc.drop = f"pii: {dropped}"
    return doc


def apply(text: str, options: Options, exempt_pii: bool = False) -> Filtered:
    """Normalise, length-check, identify the language, quality- and perplexity-check, key, sign
    and redact one document. ``exempt_pii``: a code source, whose ``x@self.weight`` is no e-mail."""
    if options.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if len(text) < options.min_chars or not text.strip():
        return Filtered(None, drop="too short")
    lang = language.identify(text) if options.identifies_language else ""
    if options.languages and lang not in options.languages.split(","):
        return Filtered(None, drop="language", language=lang)
    if options.quality and (rule := quality.reason(text, lang)):
        return Filtered(None, drop=f"quality: {rule}", language=lang)
    if options.perplexity_reference and (perplexity.model(options.perplexity_reference)
                                         .perplexity(text) > options.max_perplexity):
        return Filtered(None, drop="perplexity", language=lang)
    doc = Filtered(text, dedup_key(text) if options.dedup else bytes(16), language=lang)
    if options.near_dup > 0:
        doc.signature = minhash.signature(text)
    if options.redact_pii and not exempt_pii:
        doc = _pii(doc, options)
    return doc

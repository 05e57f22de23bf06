"""Corpus curation stages for tools.prepare_data: reading, quality, language, PII, dedup.

Each module is one stage; per-document stages are pure functions of one text (run in the
tokenizing workers), corpus-wide stages (exact and near-duplicate selection) run once over
the per-document keys every shard stores, so their decisions never depend on which shards
a rerun reused. Paragraph dedup is planned over all files before any shard is written, and a
shard's source names what it removed.
"""

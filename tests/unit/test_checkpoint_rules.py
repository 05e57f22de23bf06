"""The commit protocol's rules: which folders count, which are loaded, which are deleted."""
from __future__ import annotations

from launch import ckpt_commit as commit

LISTING = {  # folder name -> holds the commit marker
    "step_000010": True,
    "step_000020": True,
    "step_000030": True,
    "step_000040.tmp": False,  # a save in flight, or killed
    "step_000025.tmp": False,  # debris of a killed save
    "step_000035": False,  # renamed by hand, or its marker was lost: not committed
    "logs": False,  # not ours
}


def test_names_round_trip_and_tmp_is_never_a_step() -> None:
    assert commit.step_dir(123) == "step_000123"
    assert commit.parse_step("step_000123") == 123
    assert commit.parse_step(commit.tmp_dir(123)) is None
    assert commit.parse_step("step_12x") is None
    assert commit.parse_step(commit.step_dir(12_345_678)) == 12_345_678  # past six digits


def test_only_marked_step_folders_are_committed_and_loaded_newest_first() -> None:
    assert commit.committed_steps(LISTING) == [10, 20, 30]
    assert commit.load_order(LISTING) == [30, 20, 10]
    assert commit.load_order({}) == []


def test_tmp_and_unmarked_step_folders_are_incomplete() -> None:
    assert commit.incomplete(LISTING) == ["step_000025.tmp", "step_000035", "step_000040.tmp"]


def test_retention_keeps_the_last_k() -> None:
    assert commit.to_delete(LISTING, keep_last=2, keep_every=0) == [
        "step_000010", "step_000025.tmp"]  # 40.tmp is newer than the newest commit: in flight


def test_retention_keeps_every_mth_besides_the_last_k() -> None:
    listing = {commit.step_dir(s): True for s in range(100, 1100, 100)}
    doomed = commit.to_delete(listing, keep_last=2, keep_every=500)
    kept = sorted(set(commit.committed_steps(listing)) - {commit.parse_step(n) for n in doomed})
    assert kept == [500, 900, 1000]


def test_retention_with_nothing_committed_deletes_nothing() -> None:
    assert commit.to_delete({"step_000005.tmp": False}, keep_last=1, keep_every=0) == []


def test_manifest_catches_missing_and_truncated_shards_and_changed_metadata() -> None:
    files = {"__0_0.distcp": 100, "__1_0.distcp": 120, "common.pt": 7}
    recorded = commit.manifest(30, files, digest="abc", checksums={})
    assert commit.manifest_problems(recorded, files, "abc") == []
    damaged = {"__0_0.distcp": 60, "common.pt": 7}
    assert commit.manifest_problems(recorded, damaged, "xyz") == [
        "__0_0.distcp has 60 bytes, the manifest says 100",
        "__1_0.distcp is missing",
        "metadata digest differs from the manifest",
    ]


def test_digest_covers_only_the_small_metadata_files() -> None:
    names = ["__0_0.distcp", "common.pt", ".metadata", "config.yaml", "metadata.json"]
    assert commit.digested(names) == [".metadata", "common.pt", "config.yaml", "metadata.json"]


def test_checksum_verification_is_split_so_every_shard_is_rehashed_exactly_once() -> None:
    names = [f"__{r}_{i}.distcp" for r in range(3) for i in range(2)]
    recorded = commit.manifest(1, {n: 1 for n in names}, "d", {n: "h" for n in names})
    parts = [commit.shards_of_part(recorded, part, 4) for part in range(4)]
    assert sorted(n for part in parts for n in part) == sorted(names)
    assert all(parts)  # 6 shards over 4 verifiers: nobody idle


def test_checksum_problems_name_the_changed_shard_and_only_it() -> None:
    recorded = commit.manifest(1, {"__0_0.distcp": 9, "__1_0.distcp": 9}, "d",
                               {"__0_0.distcp": "aa", "__1_0.distcp": "bb"})
    assert commit.checksum_problems(recorded, {"__0_0.distcp": "aa", "__1_0.distcp": "bc"}) == [
        "__1_0.distcp does not match its SHA-256 in the manifest (its bytes changed after the "
        "save)"]


def test_shards_without_a_checksum_are_named_metadata_files_need_none() -> None:
    files = ["__0_0.distcp", "__1_0.distcp", ".metadata", "common.pt"]
    assert commit.without_checksum(files, {"__0_0.distcp": "aa"}) == ["__1_0.distcp"]


def test_retention_after_a_fallback_keeps_the_new_commit_and_drops_the_abandoned_newer_one(
) -> None:
    """Step 8 failed to load, the run went back to 4 and committed 6: 8 is not the newest of
    this run's history, so it neither counts among the last kept nor survives."""
    listing = {commit.step_dir(s): True for s in (4, 6, 8)}
    assert commit.to_delete(listing, keep_last=1, keep_every=4, newest=6) == ["step_000008"]
    assert commit.to_delete(listing, keep_last=1, keep_every=0, newest=6) == [
        "step_000004", "step_000008"]


def test_retention_of_a_listing_without_the_new_commit_keeps_its_last_good_ones() -> None:
    """An S3 prefix whose copies of steps 6 and 8 were refused still holds 2 and 4: those are
    the last good copies and stay; with nothing at or below the commit, nothing goes."""
    copies = {"step_000002": True, "step_000004": True, "step_000006": False}
    assert commit.to_delete(copies, keep_last=2, keep_every=0, newest=8) == []
    assert commit.to_delete(copies, keep_last=1, keep_every=0, newest=8) == ["step_000002"]
    assert commit.to_delete({"step_000012": True}, keep_last=1, keep_every=0, newest=6) == []

"""A dataset version's content fingerprint: what a model trained on it learnt from, not when or as which version
number it was published."""

from __future__ import annotations

import dataclasses

from pipeline.dataset.parts import ShardEntry
from pipeline.manifest import Manifest, SamplingParams, content_fingerprint


def version(number: int, **changes) -> Manifest:
    values = dict(
        version=number,
        source="/videos",
        sampling=SamplingParams(frames=4, short_side=32, size=28),
        labels="dirs",
        class_map={"left": 0, "right": 1},
        shards=[ShardEntry("shards/part-a.parquet", 3, "ab" * 32, 1234),
                ShardEntry("shards/part-b.parquet", 2, "cd" * 32, 999)],
        source_tables=[{"path": f"sources/v{number:06d}.parquet", "rows": 5}],
        num_sources=5,
        counts={"listed": 5 + number},
        errors=f"errors/v{number:06d}.parquet",
        previous_version=number - 1 or None,
        created_at=f"2026-12-0{number}T00:00:00+00:00",
    )
    values.update(changes)
    return Manifest(**values)


def test_a_new_version_number_with_the_same_content_has_the_same_fingerprint():
    first = version(1)
    assert content_fingerprint(version(2)) == content_fingerprint(first)
    reordered = version(3, shards=list(reversed(first.shards)), source="s3://moved/videos")
    assert content_fingerprint(reordered) == content_fingerprint(first)


def test_shard_content_classes_and_sampling_each_change_the_fingerprint():
    first = version(1)
    changed = [
        version(2, shards=[first.shards[0], dataclasses.replace(first.shards[1], sha256="ef" * 32)]),
        version(2, shards=first.shards[:1]),
        version(2, class_map={"left": 1, "right": 0}),
        version(2, sampling=SamplingParams(frames=4, short_side=32, size=24)),
    ]
    fingerprints = {content_fingerprint(manifest) for manifest in changed}
    assert len(fingerprints) == len(changed) and content_fingerprint(first) not in fingerprints

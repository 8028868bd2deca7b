"""Ingest spreads its work over the nodes of a multi-node Ray cluster (two nodes on this machine)."""

import pytest

from jobs.config import build
from jobs.ingest import run_ingest
from jobs.options import IngestConfig
from pipeline import iter_clips
from tests.conftest import two_node_ray

pytestmark = pytest.mark.integration


@pytest.fixture
def two_node_cluster(_ray_session_teardown):
    with two_node_ray(head_cpus=1, worker_cpus=1) as (cluster, _):
        yield cluster


def test_ingest_uses_both_nodes_of_a_two_node_cluster(tmp_path, make_videos, two_node_cluster):
    import ray

    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    make_videos(tmp_path / "videos", num_per_class=3)
    summary = run_ingest(
        build(
            IngestConfig,
            dict(
                src=str(tmp_path / "videos"),
                out=str(tmp_path / "clips"),
                labels_from_dirs=True,
                frames=4,
                size=28,
                short_side=32,
            ),
        )
    )
    assert (summary.listed, summary.ingested, summary.errored) == (12, 12, 0)
    assert summary.nodes_used == 2
    rows = list(iter_clips(str(tmp_path / "clips"), columns=["video_id"]))
    assert len({row["video_id"] for row in rows}) == 12

"""Readers of files anyone may have written (manifests, job configs, labels CSVs) end in the project's own error type, naming the
file, whatever the file holds: property-based, from valid files mutated at random."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.config import ConfigError, build, read_file
from jobs.options import RetrainConfig
from jobs.training.config import TrainConfig
from pipeline.dataset.parts import ShardEntry
from pipeline.dataset.versions import ManifestError
from pipeline.listing import LabelsError, parse_labels_csv, split_segment
from pipeline.manifest import Manifest, SamplingParams
from pipeline.predictions import ScoreConfigError, ScoreManifest

VALID = Manifest(2, "/videos", SamplingParams(frames=4, short_side=32, size=28), "dirs", {"a": 0, "b": 1},
                 [ShardEntry("shards/part-1.parquet", 3, "00" * 32, 100)],
                 [{"path": "sources/v000002-run.parquet", "rows": 3}], 3, {"ingested": 3}, errors=None,
                 previous_version=1)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutated(body, data) -> object:
    """`body` with a few keys, at any depth, removed or replaced by any JSON value."""
    for _ in range(data.draw(st.integers(1, 3))):
        node, path = body, []
        while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            path.append((node, key))
            node = node[key]
        if not path:
            return data.draw(JSON_VALUES)
        parent, key = path[-1]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = data.draw(JSON_VALUES)
    return body


@SETTINGS
@given(data=st.data())
def test_a_mutated_clip_manifest_is_read_or_refused_as_a_manifest_error(data):
    text = json.dumps(mutated(json.loads(VALID.to_json()), data))
    try:
        Manifest.from_json(text, "clips/manifests/v000002.json")
    except ManifestError as error:
        assert "\n" not in str(error)


@SETTINGS
@given(data=st.data())
def test_a_mutated_predictions_manifest_is_read_or_refused_as_the_projects_error(data):
    body = {**json.loads(VALID.to_json()), "kind": "uniformer-predictions", "model": {}, "params": {},
            "class_names": ["a", "b"], "throughput": {}}
    body.pop("sampling"), body.pop("labels"), body.pop("class_map")
    body["schema_version"] = 2
    try:
        ScoreManifest.from_json(json.dumps(mutated(body, data)), "scores/manifests/v000002.json")
    except (ManifestError, ScoreConfigError):
        pass


@SETTINGS
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_as_a_manifest_are_refused_as_a_manifest_error(raw):
    try:
        Manifest.from_json(raw, "clips/manifests/v000002.json")
    except ManifestError:
        pass


@SETTINGS
@given(data=st.data())
def test_a_mutated_job_config_builds_or_is_refused_as_a_config_error(tmp_path, data):
    values = {"source": "./raw", "dataset": "./clips", "model_name": "m", "val": "./val@1",
              "train": {"epochs": 2, "batch_size": 4, "model_overrides": {}}, "ingest": {"frames": 8}}
    try:
        build(RetrainConfig, mutated(values, data))
    except ConfigError:
        pass
    path = tmp_path / "config.yaml"
    path.write_bytes(data.draw(st.binary(max_size=64)))
    try:
        build(TrainConfig, read_file(str(path)))
    except ConfigError:
        pass


CSV_CELLS = st.sampled_from(["a.mp4", "x/../../etc/passwd", "/abs.mp4", "s3://b/k.mp4", "1", "-1", "2.5", "nan",
                             "1e400", "", " ", "jump", '"q,uo"', "a.mp4#t=1,2"]) | st.text(max_size=6)


@SETTINGS
@given(header=st.sampled_from(["path,label", "path,start,end,label", "PATH, Label", "label,path", ""]),
       rows=st.lists(st.lists(CSV_CELLS, max_size=5), max_size=5))
def test_any_labels_csv_is_read_into_safe_keys_or_refused_as_a_labels_error(header, rows):
    text = "\n".join([header] + [",".join(row) for row in rows])
    try:
        labels = parse_labels_csv(text)
    except LabelsError as error:
        assert str(error).startswith("labels CSV")
        return
    for key, label in labels.items():
        path, segment = split_segment(key)
        assert label.strip() == label and label
        assert ".." not in path.split("/") and not path.startswith("/") and "://" not in path
        assert segment is None or 0 <= segment[0] < segment[1] < float("inf")

"""A pretrained head follows the dataset's classes: K710 -> K400 by a class map (rows kept bit-exact, the others
initialised as the model would be), or by name from a registered model's card; the load report says which."""

from __future__ import annotations

import json

import pytest
import torch

import model
from jobs.training.network import head_rows, load_initial_weights, read_class_map
from tests.model.test_weights import official_checkpoint, source  # noqa: F401 (a fixture)


def test_a_class_map_keeps_the_mapped_rows_bit_exact_and_initialises_the_rest(source, tmp_path):  # noqa: F811
    # the file's head has 5 classes (the "K710" side); the dataset has 3, two of them known to the file
    torch.manual_seed(7)
    net = model.create_model("uniformerv2_tiny", num_classes=3)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "k710.pth"
    torch.save(official_checkpoint(source), path)
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"walking": 4, "running": 1}))
    load_initial_weights(net, str(path), tracking_uri=None, class_names=["running", "swimming", "walking"],
                         class_map=read_class_map(str(class_map)))
    weight, bias = net.head.fc.weight.detach(), net.head.fc.bias.detach()
    assert torch.equal(weight[0], source.head.fc.weight[1]) and torch.equal(bias[0], source.head.fc.bias[1])
    assert torch.equal(weight[2], source.head.fc.weight[4]) and torch.equal(bias[2], source.head.fc.bias[4])
    assert torch.equal(weight[1], initial["head.fc.weight"][1]) and torch.equal(bias[1], initial["head.fc.bias"][1])
    # and the backbone came from the file
    assert torch.equal(net.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])

    report = model.check_pretrained(net, path, head_rows=[1, None, 4])
    assert (report.head_mapped, report.head_fresh, report.skipped_head) == ([0, 2], [1], False)
    assert "2 of 3 classes from the file's head by the class map, 1 initialised" in report.summary()


def test_class_maps_read_from_json_or_csv_and_refuse_what_is_no_map(tmp_path):
    (tmp_path / "map.csv").write_text("# target,source\nrunning,1\nwalking,walk\n")
    assert read_class_map(str(tmp_path / "map.csv")) == {"running": 1, "walking": "walk"}
    for name, content, message in [("bad.json", "[1]", "must be a JSON object"), ("bad.csv", "a,b,c\n", "line 1"),
                                   ("neg.json", '{"a": -1}', "not a row index"), ("x.json", "{", "not valid JSON")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            read_class_map(str(tmp_path / name))


def test_rows_come_by_name_from_a_known_head_and_a_map_may_name_them():
    assert head_rows(["b", "z", "a"], None, ["a", "b", "c"]) == [1, None, 0]  # a registered model's card names
    assert head_rows(["b", "a"], {"b": "c", "a": 0}, ["a", "b", "c"]) == [2, 0]
    assert head_rows(["b", "a"], None, None) is None  # nothing says: the head of another count is skipped
    with pytest.raises(ValueError, match="which the pretrained head does not name"):
        head_rows(["b"], {"b": "nope"}, ["a"])


def test_a_map_that_does_not_fit_the_heads_is_refused_before_the_model_is_touched(source):  # noqa: F811
    net = model.create_model("uniformerv2_tiny", num_classes=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for rows, message in [([0, 1], "gives 2 rows for a head of 3"), ([0, 1, 9], "takes row 9 of a head of 5")]:
        with pytest.raises(ValueError, match=message):
            model.load_pretrained(net, official_checkpoint(source), head_rows=rows)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_the_driver_refuses_a_class_map_it_cannot_use_in_seconds(tmp_path):
    from jobs.exitcodes import OptionError
    from jobs.train import check_class_map
    from jobs.training.config import TrainConfig

    (tmp_path / "map.json").write_text(json.dumps({"running": 1, "flying": 2}))
    without_weights = TrainConfig(data="clips", pretrained_class_map=str(tmp_path / "map.json"))
    with pytest.raises(OptionError, match="give --pretrained too"):
        check_class_map(without_weights, ["running"])
    with_weights = TrainConfig(data="clips", pretrained="w.pt", pretrained_class_map=str(tmp_path / "map.json"))
    with pytest.raises(OptionError, match="names classes the dataset does not have: flying"):
        check_class_map(with_weights, ["running", "walking"])
    check_class_map(with_weights, ["running", "flying"])

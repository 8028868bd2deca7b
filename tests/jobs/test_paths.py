"""Every path a user gives is made absolute where the command parses it, before anything reaches Ray, whose workers
run in folders of their own; `--print-config` still prints what was given."""

import os

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.config import absolute_location, absolute_paths
from jobs.options import RetrainConfig, ScoreConfig
from jobs.training.config import TrainConfig


@pytest.mark.parametrize(("given", "expected"), [
    ("./clips", "{cwd}/clips"),
    ("clips@3", "{cwd}/clips@3"),
    ("clips@v3", "{cwd}/clips@v3"),
    ("clips@latest", "{cwd}/clips@latest"),
    ("file://runs", "{cwd}/runs"),
    ("~/weights.pt", "{home}/weights.pt"),
    ("/abs/clips", "/abs/clips"),
    ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
    ("sqlite:////var/mlflow.db", "sqlite:////var/mlflow.db"),
    ("s3://bucket/clips@2", "s3://bucket/clips@2"),
    ("models:/actions@champion", "models:/actions@champion"),
    ("runs:/0123/model", "runs:/0123/model"),
    ("http://user:pw@mlflow:5000", "http://user:pw@mlflow:5000"),
])
def test_a_local_path_is_made_absolute_and_a_uri_is_left_alone(tmp_path, monkeypatch, given, expected):
    monkeypatch.chdir(tmp_path)
    assert absolute_location(given) == expected.format(cwd=os.getcwd(), home=os.path.expanduser("~"))


def test_the_options_that_name_places_are_made_absolute_sections_included(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = absolute_paths(TrainConfig(data="./clips@2", val_data="val", pretrained="w.pt", storage="./runs",
                                       tracking_uri="sqlite:///mlflow.db", run_name="kept", experiment="kept"))
    assert (train.data, train.val_data, train.pretrained, train.storage, train.tracking_uri) == (
        f"{tmp_path}/clips@2", f"{tmp_path}/val", f"{tmp_path}/w.pt", f"{tmp_path}/runs",
        f"sqlite:///{tmp_path}/mlflow.db")
    assert (train.run_name, train.experiment) == ("kept", "kept")  # names, not places
    score = absolute_paths(ScoreConfig(src="raw", out="scores", model="models:/m@champion"))
    assert (score.src, score.out, score.model) == (f"{tmp_path}/raw", f"{tmp_path}/scores", "models:/m@champion")
    retrain = RetrainConfig(source="raw", dataset="clips", model_name="m", val="val@1",
                            train=TrainConfig(data="clips", storage="runs"), ingest=None)
    absolute_paths(retrain)
    assert (retrain.source, retrain.dataset, retrain.val) == (f"{tmp_path}/raw", f"{tmp_path}/clips", f"{tmp_path}/val@1")
    assert retrain.train.storage == f"{tmp_path}/runs"


def test_print_config_shows_the_paths_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--data", "./clips", "--storage", "runs", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "data: ./clips\n" in result.output and "storage: runs\n" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "nosuch_model"], "unknown model 'nosuch_model'"),
    (["--set", "bogus=1"], "unknown UniFormerV2 option(s): ['bogus']"),
    ([], "--data: no clip dataset at {cwd}/clips (no manifest under it)"),
    (["--pretrained", "./nothing.pt"], "--pretrained: no file {cwd}/nothing.pt"),
])
def test_train_refuses_what_the_driver_can_check_in_seconds_with_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--data", "./clips", *args])
    assert result.exit_code == 2, result.output
    assert message.format(cwd=tmp_path) in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not os.listdir(tmp_path)  # nothing started, nothing written

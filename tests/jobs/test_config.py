"""Config files: `--print-config` output reads back through `--config` to the same configuration, flags given on the
command line override the file (flags left out do not), and unknown keys or bad values are usage errors that name
the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.config import ConfigError, build, read_file, to_dict, to_yaml
from jobs.options import (
    RETRAIN_EXPERIMENT,
    DemoConfig,
    EvaluateConfig,
    IngestConfig,
    RegisterConfig,
    RetrainConfig,
    ScoreConfig,
)
from jobs.training.config import TrainConfig

runner = CliRunner()

# one command line per job, with flags of every kind: renamed fields, lists, on/off flags, sections
COMMANDS = {
    "train": (TrainConfig, ["--data", "clips@3", "--model", "uniformerv2_tiny", "--set", "no_lmhra=True", "--gpu",
                            "--no-hflip", "--compile", "off", "--lr", "1e-3", "--val", "val@1", "--max-steps", "7"]),
    "ingest": (IngestConfig, ["videos", "--out", "clips", "--labels-from-dirs", "--frames", "4", "--sampling", "dense",
                              "--decode-timeout", "30"]),
    "score": (ScoreConfig, ["archive", "--model", "models:/m@champion", "--out", "scores", "--views", "2x1",
                            "--gpu", "--actors", "3"]),
    "evaluate": (EvaluateConfig, ["--data", "val@1", "--model", "models:/m/2", "--precision", "fp32"]),
    "register": (RegisterConfig, ["--run", "uniformerv2-0a1b2c3d4e", "--storage", "s3://runs/", "--register-as", "m"]),
    "demo": (DemoConfig, ["--size", "small", "--workers", "1"]),
    "retrain": (RetrainConfig, ["--source", "raw", "--dataset", "clips", "--model-name", "m", "--val", "val@1",
                                "--min-gain", "0.01", "--workers", "2", "--set", "no_lmhra=True", "--frames", "4",
                                "--labels-from-dirs", "--experiment", "weekly"]),
}


def print_config(job: str, arguments: list[str]) -> str:
    result = runner.invoke(app, [job, *arguments, "--print-config"])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("job", sorted(COMMANDS))
def test_printed_configuration_reads_back_to_the_same_one(job, tmp_path):
    config_class, arguments = COMMANDS[job]
    printed = print_config(job, arguments)
    (tmp_path / "job.yaml").write_text(printed)
    assert print_config(job, ["--config", str(tmp_path / "job.yaml")]) == printed
    assert build(config_class, read_file(str(tmp_path / "job.yaml"))) == build(config_class, yaml.safe_load(printed))


def test_keep_aspect_is_printed_only_when_given_and_reads_back():
    assert "keep" not in yaml.safe_load(print_config("ingest", ["videos", "--out", "clips"]))  # as before it existed
    printed = yaml.safe_load(print_config("ingest", ["videos", "--out", "clips", "--keep", "aspect",
                                                     "--max-aspect", "21:9"]))
    assert (printed["keep"], printed["max_aspect"]) == ("aspect", "21:9")
    clip = build(IngestConfig, printed).clip
    assert clip.given() == {"keep": "aspect", "max_aspect": "21:9"}
    # a square run does not inherit the ratio a dataset recorded: it differs from an aspect dataset by `keep`
    assert build(IngestConfig, {"src": "a", "out": "b", "keep": "square"}).clip.given() == {
        "keep": "square", "max_aspect": None}


def test_flags_are_turned_into_the_config_class_fields():
    train = build(TrainConfig, yaml.safe_load(print_config("train", COMMANDS["train"][1])))
    assert (train.model_overrides, train.use_gpu, train.hflip, train.compile, train.lr, train.val_data,
            train.max_steps) == ({"no_lmhra": True}, True, False, "off", 1e-3, "val@1", 7)
    retrain = build(RetrainConfig, yaml.safe_load(print_config("retrain", COMMANDS["retrain"][1])))
    assert retrain.train.workers == 2 and retrain.train.model_overrides == {"no_lmhra": True}
    assert retrain.train.experiment == "weekly" and retrain.ingest.clip.frames == 4 and retrain.ingest.labels_from_dirs
    # what retrain supplies to its sections
    assert (retrain.train.data, retrain.train.val_data, retrain.train.register_as) == ("clips", "val@1", "m")
    assert (retrain.ingest.src, retrain.ingest.out) == ("raw", "clips")


def test_defaults_come_from_the_config_classes():
    printed = yaml.safe_load(print_config("train", ["--data", "clips"]))
    assert printed == dataclasses.asdict(TrainConfig(data="clips"))
    printed = yaml.safe_load(print_config("score", ["a", "--out", "b", "--model", "m"]))
    assert printed == to_dict(ScoreConfig("a", "b", "m"))
    retrain = build(RetrainConfig, yaml.safe_load(print_config("retrain", COMMANDS["retrain"][1][:8])))
    assert retrain.train.experiment == RETRAIN_EXPERIMENT and retrain.train.epochs == TrainConfig.epochs


def test_flags_given_override_the_file_and_flags_left_out_do_not(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("data: clips@2\nepochs: 3\nbatch_size: 4\nhflip: false\nuse_gpu: true\n"
                    "model_overrides: {no_lmhra: true}\n")
    printed = yaml.safe_load(print_config("train", ["--config", str(path), "--epochs", "5", "--set", "t_size=4"]))
    assert printed["epochs"] == 5 and printed["batch_size"] == 4
    assert printed["hflip"] is False and printed["use_gpu"] is True  # flags at their defaults do not override
    assert printed["model_overrides"] == {"no_lmhra": True, "t_size": 4}  # --set merges into the file's
    printed = yaml.safe_load(print_config("train", ["--config", str(path), "--hflip", "--data", "other"]))
    assert printed["hflip"] is True and printed["data"] == "other"

    path = tmp_path / "retrain.yaml"
    path.write_text(to_yaml(build(RetrainConfig, {"source": "raw", "dataset": "d", "model_name": "m", "val": "v",
                                                  "train": {"epochs": 3, "lr": 0.01}})))
    printed = yaml.safe_load(print_config("retrain", ["--config", str(path), "--epochs", "9"]))
    assert printed["train"]["epochs"] == 9 and printed["train"]["lr"] == 0.01


@pytest.mark.parametrize(
    ("job", "text", "message"),
    [
        ("train", "data: c\nbatchsize: 4\n", "unknown key batchsize; valid keys: data, model, model_overrides"),
        ("train", "data: c\nbatch_size: eight\n", "batch_size: expected an integer, got 'eight'"),
        ("train", "data: c\nworkers: 0\n", "workers must be >= 1"),
        ("train", "data: c\nuse_gpu: 1\n", "use_gpu: expected true or false, got 1"),
        ("train", "data: c\ncompile: off\n", "compile: expected a string, got False (YAML reads on/off"),
        ("train", "data: c\nmodel_overrides: [no_lmhra]\n", "model_overrides: expected a mapping"),
        ("train", "epochs: 3\n", "missing data"),
        ("train", "- data\n", "must hold a mapping"),
        ("train", "data: [c\n", "is not valid YAML"),
        ("train", "data: c\ntracking_uri: http://user:***@mlflow:5000\n", "tracking_uri holds a masked credential"),
        ("ingest", "src: a\nout: b\nsampling: random\n", "sampling must be 'uniform' or 'dense'"),
        ("ingest", "src: a\nout: b\nmax_seconds: 0\n", "max_seconds must be > 0"),
        ("ingest", "src: a\nout: b\nkeep: wide\n", "keep must be one of square, aspect"),
        ("ingest", "src: a\nout: b\nkeep: aspect\nmax_aspect: '9:16'\n", "max_aspect must be WIDTH:HEIGHT"),
        ("score", "src: a\nout: b\nmodel: m\nviews: '4'\n", "views must be TEMPORALxSPATIAL"),
        ("evaluate", "data: a\nmodel: m\nprecision: fp8\n", "precision must be one of"),
        ("demo", "size: huge\n", "unknown demo size 'huge'"),
        ("register", "storage: s3://runs/\n", "missing run"),
        ("retrain", "source: a\ndataset: b\nmodel_name: m\nval: v\ntrain: {batchsize: 2}\n",
         "unknown key train.batchsize; valid keys: model, model_overrides"),
        ("retrain", "source: a\ndataset: b\nmodel_name: m\nval: v\ntrain: {data: other}\n",
         "train.data is not set here: it comes from dataset"),
        ("retrain", "source: a\ndataset: b\nmodel_name: m\nval: v\ningest: {out: other}\n",
         "ingest.out is not set here: it comes from dataset"),
        ("retrain", "source: a\ndataset: b\nmodel_name: m\nval: v\ntrain: {workers: 0}\n",
         "train: workers must be >= 1"),
        ("retrain", "source: a\ndataset: b\nmodel_name: m\nval: v\ntrain: 3\n", "train must be a mapping"),
        ("retrain", "source: a\ndataset: b\nmodel_name: m\nval: v\ngate_metric: f1\n", "gate_metric must be one of"),
    ],
)
def test_a_bad_file_is_a_usage_error_naming_the_key(job, text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, [job, "--config", str(path), "--print-config"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.replace("│", " ").split()), result.stderr
    assert result.stdout == ""  # no configuration printed


def test_a_missing_config_file_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "cannot read config file" in result.stderr


def test_floats_written_as_yaml_writes_them_read_back_exactly():
    values = {"data": "c", "lr": 4e-4, "min_lr": 1e-6, "weight_decay": 0.05, "warmup_epochs": 0.3}
    config = build(TrainConfig, values)
    assert build(TrainConfig, yaml.safe_load(to_yaml(config))) == config
    assert build(TrainConfig, {"data": "c", "lr": "1e-3"}).lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


def test_build_refuses_a_key_supplied_by_the_enclosing_configuration():
    with pytest.raises(ConfigError, match="not set here"):
        build(IngestConfig, {"src": "x"}, supplied={"src": "y", "out": "z"})

"""Training options: bad values are refused with the option's name, and the run identity decides resumption."""

import re

import pytest

from jobs.training.config import TrainConfig


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(workers=0), "workers must be >= 1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(grad_accum=0), "grad_accum must be >= 1"),
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(val_fraction=1.0), "val_fraction must be in [0, 1)"),
        (dict(lr=0.0), "lr > 0"),
        (dict(lr=1e-4, min_lr=1e-3), "min_lr <= lr"),
        (dict(precision="fp8"), "precision must be bf16, fp16 or fp32"),
        (dict(placement_strategy="ANYWHERE"), "placement_strategy must be PACK, SPREAD"),
        (dict(max_failures=-2), "max_failures must be >= -1"),
        (dict(compile="always"), "compile must be auto, on or off"),
        (dict(log_every=0), "log_every must be >= 1"),
        (dict(augment="mixup"), "augment must be one of recipe, crop"),
        (dict(select="first"), "select must be best or last"),
        (dict(model="nosuch_model"), "unknown model 'nosuch_model'; known: uniformerv2_b16"),
        (dict(model_overrides={"bogus": 1}), "model uniformerv2_b16: unknown UniFormerV2 option(s): ['bogus']"),
    ],
)
def test_bad_options_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(data="clips", **overrides)


def test_the_same_command_names_the_same_run_wherever_it_runs_or_logs():
    base = TrainConfig(data="clips@3", epochs=2)
    moved = TrainConfig(data="clips@3", epochs=2, placement_strategy="SPREAD", max_failures=9, storage="s3://b/runs",
                        tracking_uri="http://mlflow:5000", register_as="m", compile="on", log_every=50)
    assert moved.name == base.name
    assert TrainConfig(data="clips@4", epochs=2).name != base.name  # another dataset version is another run
    assert TrainConfig(data="clips@3", epochs=3).name != base.name
    assert TrainConfig.from_dict(moved.to_dict()) == moved

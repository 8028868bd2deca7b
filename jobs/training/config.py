"""Everything a training run is made of, in one serialisable record (logged to MLflow, stored in checkpoints)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from jobs.config import option
from jobs.credentials import redact

DEFAULT_EXPERIMENT = "uniformerv2"

# The resolved configuration in the run's MLflow artifacts, in the format `uniformer train --config` reads.
CONFIG_ARTIFACT = "config/train.yaml"

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class TrainConfig:
    """The options of `uniformer train` (and of retrain's `train:` section)."""

    data: str = option(help="Clip dataset: DST or DST@VERSION (s3://... or a local folder).", local_path=True)
    model: str = option("uniformerv2_b16", help="Named configuration (see `uniformer models`).")
    model_overrides: dict = option(
        default_factory=dict, flag="--set",
        help="Model option override KEY=VALUE, e.g. --set no_lmhra=True (merged into the file's).",
    )
    recipe: str | None = option(
        None, help="A published recipe under the other options: k400_b16_clip, k700_b16_clip, k710_to_k400_b16, "
        "k710_to_k400_l14, ssv2_b16_f16 (jobs/recipes/, each value's source beside it); its lr scales with the total "
        "batch.",
    )
    pretrained: str | None = option(
        None, local_path=True, help="Initial weights: CLIP / timm / official / MMAction2 checkpoint file."
    )
    pretrained_class_map: str | None = option(
        None, local_path=True,
        help="JSON or CSV: dataset class -> the pretrained head's row or class name (e.g. K710 -> K400); mapped rows "
        "are kept, the others start fresh. Without it a registered model's head is matched by class name.",
    )
    val_data: str | None = option(
        None, flag="--val", local_path=True, help="Validation dataset DST[@VERSION]; default: a held-out split."
    )
    val_fraction: float = option(0.2, help="Share of videos held out for validation when --val is not given.")
    workers: int = option(1, help="Ray Train workers (one per GPU with --gpu).")
    use_gpu: bool = option(False, flag="--gpu", help="One GPU per worker, NCCL; otherwise CPU workers with gloo.")
    cpus_per_worker: float = option(1.0, help="CPUs reserved per training worker.")
    placement_strategy: str = option(
        "PACK", help="Where workers go: PACK fills nodes, SPREAD puts them on different nodes when it can."
    )
    epochs: int = option(10, help="Passes over the training set.")
    batch_size: int = option(8, help="Clips per worker per micro-step.")
    grad_accum: int = option(1, help="Micro-steps per optimizer step.")
    lr: float = option(4e-4, help="Peak learning rate.")
    min_lr: float = option(1e-6, help="Learning rate at the end of the cosine.")
    weight_decay: float = option(0.05, help="AdamW weight decay (not on 1-D parameters).")
    warmup_epochs: float = option(1.0, help="Linear warmup length.")
    label_smoothing: float = option(0.0, help="Label smoothing.")
    hflip: bool = option(True, flag="--hflip/--no-hflip",
                         help="Random horizontal flips (off for left/right classes, or give --flip-pairs).")
    flip_pairs: str | None = option(
        None, local_path=True, help="CSV of class-name pairs a flip turns into each other (Something-Something's "
        "left/right classes): flipped clips get the mirror label.",
    )
    augment: str = option(
        "recipe", help="recipe: RandAugment m7 n4 + RandomResizedCrop + flip (the paper's); crop: random crop + flip."
    )
    # the official code normalises with slowfast's mean 0.45 / std 0.225 for every released checkpoint, CLIP-initialised
    # ones included; the model keeps it in its package
    input_normalization: str = option(
        "slowfast",
        help="Pixel normalisation, kept in the model: slowfast (0.45/0.225, the official code's) | clip (CLIP's).",
    )
    grad_clip: float = option(1.0, help="Max gradient norm; 0 disables clipping.")
    activation_checkpointing: bool = option(False, help="Recompute block activations in the backward pass.")
    precision: str = option("bf16", help="bf16 | fp16 | fp32 (autocast on CUDA).")
    compile: str = option("auto", help="torch.compile each block: on | off | auto (on with CUDA).")
    seed: int = option(0, help="Seed of weights, data order and augmentation.")
    checkpoint_every: int = option(0, help="Optimizer steps between checkpoints; 0 = each epoch end.")
    keep_checkpoints: int = option(2, help="Checkpoints kept (the best ones with --select best, and the latest).")
    max_failures: int = option(3, help="Automatic restarts after worker or node loss (-1: forever).")
    storage: str = option("./runs", local_path=True, help="Checkpoint storage: local folder or s3://bucket/prefix.")
    run_name: str | None = option(
        None, help="Ray Train run name; default derived from the options (same command = same run)."
    )
    experiment: str | None = option(
        None, help=f"MLflow experiment; default: MLFLOW_EXPERIMENT_NAME, else {DEFAULT_EXPERIMENT}."
    )
    tracking_uri: str | None = option(
        None, local_path=True, help="MLflow tracking URI; default: MLFLOW_TRACKING_URI."
    )
    register_as: str | None = option(None, help="Register the final model under this MLflow model name.")
    endpoint_url: str | None = option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL).")
    select: str = option("best", help="Checkpoint to register: best (validation top-1 at an epoch end) | last.")
    max_steps: int | None = option(None, help="Stop after this many optimizer steps.")
    log_every: int = option(10, help="Optimizer steps between reading step metrics back from the device.")

    @classmethod
    def layered(cls, values: dict) -> dict:
        """The values a configuration is built from: those given, over the recipe they name (jobs.config.build)."""
        from jobs.training.recipes import with_recipe

        defaults = {item.name: item.default for item in dataclasses.fields(cls)}
        return with_recipe(dict(values), defaults)

    def __post_init__(self) -> None:
        if not self.experiment:
            self.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        positive = dict(workers=self.workers, epochs=self.epochs, batch_size=self.batch_size,
                        grad_accum=self.grad_accum, keep_checkpoints=self.keep_checkpoints)
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.select not in ("best", "last"):
            raise ValueError(f"select must be best or last, not {self.select!r}")
        # the model's names are checked here, in the driver, before any worker starts; imported here, where a
        # configuration is built, so that the CLI's --help does not load torch
        from model.configs import get_config
        from model.transforms import AUGMENTATIONS
        from model.uniformerv2 import NORMALIZATIONS

        if self.input_normalization not in NORMALIZATIONS:
            raise ValueError(f"input_normalization must be one of {', '.join(NORMALIZATIONS)}, not "
                             f"{self.input_normalization!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, not {self.augment!r}")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, not {self.compile!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, not {self.precision!r}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be {', '.join(PLACEMENT_STRATEGIES)}, not "
                             f"{self.placement_strategy!r}")
        if self.max_failures < -1:
            raise ValueError("max_failures must be >= -1 (-1 retries forever)")
        try:
            get_config(self.model, **self.model_overrides)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"model {self.model}: {error}") from None

    @property
    def name(self) -> str:
        """The Ray Train run name: the same command against the same storage resumes the same run."""
        if self.run_name:
            return self.run_name
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.experiment}-{digest}"

    def identity(self) -> dict:
        """The fields that make two invocations the same run (not where they log or how often they retry)."""
        ignored = {
            "max_failures", "tracking_uri", "register_as", "run_name", "storage", "log_every", "endpoint_url",
            "placement_strategy", "compile", "select",
        }
        return {k: v for k, v in self.to_dict().items() if k not in ignored}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def redacted(self) -> dict:
        """`to_dict` with the credentials in its addresses masked: the record that is logged, checkpointed and sent to
        workers, while the real addresses stay in the driver's memory."""
        return {k: redact(v) if isinstance(v, str) else v for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**values)

"""Everything a training run is made of, in one serialisable record (logged to MLflow, stored in checkpoints)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from model.configs import get_config
from model.transforms import AUGMENTATIONS
from model.uniformerv2 import NORMALIZATIONS

from jobs.config import LOCAL_PATH
from jobs.credentials import redact

DEFAULT_EXPERIMENT = "uniformerv2"

# The resolved configuration in the run's MLflow artifacts, in the format `uniformer train --config` reads.
CONFIG_ARTIFACT = "config/train.yaml"

@dataclass
class TrainConfig:
    data: str = field(metadata=LOCAL_PATH)  # DST or DST@version
    model: str = "uniformerv2_b16"
    model_overrides: dict = field(default_factory=dict)
    # a named recipe (jobs/recipes/NAME.yaml) under the other options; its learning rates scale with the total batch
    recipe: str | None = None
    pretrained: str | None = field(default=None, metadata=LOCAL_PATH)
    # which of the pretrained head's rows each of the dataset's classes starts from (jobs.training.loop.read_class_map)
    pretrained_class_map: str | None = field(default=None, metadata=LOCAL_PATH)
    val_data: str | None = field(default=None, metadata=LOCAL_PATH)  # a second manifest; otherwise a held-out split of `data`
    val_fraction: float = 0.2
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # Ray placement group strategy of the workers (SPREAD: across nodes)
    epochs: int = 10
    batch_size: int = 8  # per worker, per micro-step
    grad_accum: int = 1
    lr: float = 4e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    hflip: bool = True  # off for classes that depend on left/right, or keep it with flip_pairs
    # a CSV of class-name pairs a horizontal flip turns into each other: flipped clips get the mirror label
    flip_pairs: str | None = field(default=None, metadata=LOCAL_PATH)
    augment: str = "recipe"  # recipe: RandAugment m7 n4 + RandomResizedCrop + flip (official); crop: random crop + flip
    # the pixels' normalisation the model trains with and keeps in its package: slowfast (mean 0.45, std 0.225), the
    # official code's for every released checkpoint, CLIP-initialised ones included; or clip (OpenAI CLIP's)
    input_normalization: str = "slowfast"
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    precision: str = "bf16"  # bf16 | fp16 | fp32; autocast applies on CUDA only
    compile: str = "auto"  # torch.compile each block: on | off | auto (on for CUDA)
    seed: int = 0
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of each epoch only
    keep_checkpoints: int = 2
    max_failures: int = 3
    storage: str = field(default="./runs", metadata=LOCAL_PATH)
    run_name: str | None = None
    experiment: str | None = None  # MLflow experiment; default: MLFLOW_EXPERIMENT_NAME, else DEFAULT_EXPERIMENT
    tracking_uri: str | None = field(default=None, metadata=LOCAL_PATH)
    register_as: str | None = None
    endpoint_url: str | None = None
    select: str = "best"  # the checkpoint registered: best (validation top-1 over epoch ends) | last
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs, tests)
    log_every: int = 10  # optimizer steps between reading step metrics back from the device (one host sync)

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
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        if self.placement_strategy not in strategies:
            raise ValueError(f"placement_strategy must be {', '.join(strategies)}, not {self.placement_strategy!r}")
        if self.max_failures < -1:
            raise ValueError("max_failures must be >= -1 (-1 retries forever)")
        try:  # the model's name and options are known here, in the driver, before any worker starts
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

"""UniFormerV2 in pure PyTorch: blocks, named configurations and checkpoint loading."""

from model.package import ModelCard, load_package, save_package
from model.configs import count_parameters, create_model, get_config, list_models
from model.uniformerv2 import CLIP_MEAN, CLIP_STD, UniFormerV2, UniFormerV2Config
from model.weights import (
    LAYOUTS,
    Checkpoint,
    LoadReport,
    check_pretrained,
    convert_checkpoint,
    load_pretrained,
    load_state_dict_file,
    read_checkpoint,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Checkpoint",
    "LAYOUTS",
    "LoadReport",
    "ModelCard",
    "UniFormerV2",
    "UniFormerV2Config",
    "check_pretrained",
    "convert_checkpoint",
    "count_parameters",
    "create_model",
    "get_config",
    "list_models",
    "load_package",
    "load_pretrained",
    "load_state_dict_file",
    "read_checkpoint",
    "save_package",
]

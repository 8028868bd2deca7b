"""UniFormerV2 in pure PyTorch: blocks, named configurations and checkpoint loading."""

from model.package import ModelCard, load_package, save_package
from model.configs import count_parameters, create_model, get_config, list_models
from model.uniformerv2 import CLIP_MEAN, CLIP_STD, UniFormerV2, UniFormerV2Config
from model.weights import LoadReport, load_pretrained, load_state_dict_file

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "LoadReport",
    "ModelCard",
    "UniFormerV2",
    "UniFormerV2Config",
    "count_parameters",
    "create_model",
    "get_config",
    "list_models",
    "load_package",
    "load_pretrained",
    "load_state_dict_file",
    "save_package",
]

"""MLflow "models from code" definition of a UniFormerV2 classifier.

MLflow logs this file as source, not a pickled object: loading it rebuilds the network from `model_config.json`
and `model.safetensors` (the artifacts logged beside it). Input: uint8 clips `[N, T, H, W, 3]` in the stored clip
format (centre-cropped to the model's input size here); output: class probabilities `[N, num_classes]`.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class UniFormerV2Classifier(PythonModel):
    def load_context(self, context) -> None:
        import torch

        from model.package import load_package

        self.torch = torch
        self.net, self.card = load_package(context.artifacts["weights"], context.artifacts["config"])

    # typed as MLflow reads it: an ndarray input is checked against the logged signature, and no "add type hints"
    # warning is printed at every log and load
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        from model.inference import predict_views

        clips = self.torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.uint8)))
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"expected uint8 clips [N, T, H, W, 3], got shape {tuple(clips.shape)}")
        return predict_views(self.net, clips[:, None], self.card.crop_size).numpy()  # each clip one view


mlflow.models.set_model(UniFormerV2Classifier())

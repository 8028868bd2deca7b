"""The one inference path: stored uint8 clips or views -> class probabilities. Training's validation, `evaluate`, the
retrain gate, batch scoring and the MLflow pyfunc all call `predict_views`, so the gate judges exactly what
production scores.

Views are combined by averaging their softmax probabilities, as the official multi-view test does (SlowFast's
`ensemble_method: sum` over softmax outputs; a sum and a mean rank classes alike, and a mean stays a probability
vector). A logit average would weigh confident views more; we follow the paper's protocol.
"""

from __future__ import annotations

import torch

from model.transforms import eval_transform, input_normalization

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *_AUTOCAST_DTYPES)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 on CUDA (the tensor cores' bf16 rate; softmax and the view average stay fp32) and fp32
    elsewhere (on a CPU without bf16 matrix units bf16 is slower than fp32); an explicit precision applies on any
    device, CPU autocast included."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def predict_views(
    net: torch.nn.Module, views: torch.Tensor, crop: int, precision: str = "fp32", max_clips: int | None = None,
    return_features: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """uint8 `[B, V, T, H, W, 3]` (on the net's device) -> float32 probabilities `[B, num_classes]`, the mean of the
    V views' softmax of the centre `crop` of each view, the forward passes autocast to `precision` (see
    `resolve_precision`). Forward passes take at most `max_clips` clips each (all B*V at once when None). A single
    stored clip is a batch of one view: `views = clips[:, None]`. With `return_features`, also the mean over the views
    of the pre-classifier feature (`net.forward_features`, float32 `[B, D]`), from the same forward passes."""
    batch, num_views = views.shape[:2]
    normalization = input_normalization(net)  # the model's own, never a constant
    clips = views.reshape(batch * num_views, *views.shape[2:])  # [B*V, T, H, W, 3]
    dtype = _AUTOCAST_DTYPES[resolve_precision(precision, clips.device)]
    step = max_clips or max(1, clips.shape[0])
    outputs, features = [], []
    with torch.inference_mode(), torch.autocast(clips.device.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, clips.shape[0], step):
            inputs = eval_transform(clips[start : start + step], crop, normalization)
            if return_features:
                feature = net.forward_features(inputs)
                features.append(feature.float())
                logits = net.forward_head(feature)
            else:
                logits = net(inputs)
            outputs.append(torch.softmax(logits.float(), dim=-1))
    probs = torch.cat(outputs).reshape(batch, num_views, -1).mean(dim=1)  # [B, C]
    if return_features:
        return probs, torch.cat(features).reshape(batch, num_views, -1).mean(dim=1)
    return probs

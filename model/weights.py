"""Loading foreign checkpoints into UniFormerV2.

A file is read as tensors only: safetensors, `torch.load(weights_only=True)`, or a TorchScript archive (OpenAI's
`ViT-B-16.pt`) whose pickle is replayed without running anything that came with it. Its layout (`LAYOUTS`) is
detected from the keys and a filter per layout renames them: image checkpoints into OpenAI CLIP's visual-tower names
(the one image layout, and what `convert_checkpoint` writes), video checkpoints into ours. Shape adapters then
inflate 2D patch weights and interpolate positional embeddings; `check_pretrained` says what would be loaded,
inflated, interpolated, kept or ignored, and refuses what is missing, unexpected or misshapen before the model is
touched.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F

from model.uniformerv2 import UniFormerV2

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

LAYOUTS = {
    "clip": "OpenAI CLIP or open_clip ViT visual tower (conv1, transformer.resblocks.N), bare or under visual.",
    "hf": "Hugging Face transformers CLIPModel / CLIPVisionModel (vision_model.encoder.layers.N)",
    "timm": "timm CLIP ViT (patch_embed.proj, blocks.N.attn.qkv)",
    "official": "official UniFormerV2 release (model_state, keys optionally under backbone.)",
    "mmaction": "MMAction2 UniFormerV2 (backbone.transformer.norm, cls_head.fc_cls)",
    "native": "this package's own state_dict()",
}
IMAGE_LAYOUTS = frozenset({"clip", "hf", "timm"})
# The input normalisation video checkpoints of a layout were trained with (model.uniformerv2.NORMALIZATIONS): the
# official release and MMAction2 both use PySlowFast's. Image towers are fine-tuned with the recipe's choice.
TRAINED_NORMALIZATION = {"official": "slowfast", "mmaction": "slowfast"}
# Where a whole image-text model keeps its image tower; the rest of the file (the text tower) is ignored.
_IMAGE_TOWERS = {"clip": "visual.", "hf": "vision_model."}
# CLIP-named image keys UniFormerV2 has no use for: the image-text projection and what feeds it, HF's position ids.
_UNUSED_IMAGE_KEYS = re.compile(r"^(ln_post\.|proj$|norm\.|fc_norm\.|head\.|embeddings\.position_ids$)")


@dataclass
class LoadReport:
    layout: str
    loaded: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    kept_initialisation: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # tensors of the file with no place in UniFormerV2
    skipped_head: bool = False
    # with a head map (`load_pretrained(head_rows=...)`): the model's classes whose row came from the file's head, and
    # those that start from the model's initialisation
    head_mapped: list[int] = field(default_factory=list)
    head_fresh: list[int] = field(default_factory=list)
    # the normalisation the file's weights were trained with, when the layout says, and the model's own
    trained_normalization: str | None = None
    model_normalization: str = "clip"

    def summary(self) -> str:
        """A few lines for a console, after the caller's own line naming the file and layout: what came from the
        file and what the model keeps of its own."""
        lines = [
            f"loaded        {len(self.loaded)} tensors",
            f"inflated      {', '.join(self.inflated) or '-'}",
            f"interpolated  {', '.join(self.interpolated) or '-'}",
            f"initialised   {len(self.kept_initialisation)} tensors the file does not hold: "
            f"{group_keys(self.kept_initialisation) or '-'}",
            f"ignored       {len(self.ignored)} tensors of the file: {group_keys(self.ignored) or '-'}",
        ]
        if self.skipped_head:
            lines.append("head          skipped: the file's classifier has another class count")
        if self.head_mapped or self.head_fresh:
            lines.append(f"head          {len(self.head_mapped)} of {len(self.head_mapped) + len(self.head_fresh)} "
                         f"classes from the file's head by the class map, {len(self.head_fresh)} initialised")
        if self.trained_normalization not in (None, self.model_normalization):
            lines.append(f"normalisation the file was trained on {self.trained_normalization} pixels, the model "
                         f"normalises {self.model_normalization}: build it with "
                         f"input_normalization={self.trained_normalization} to score it as it was trained")
        return "\n".join(lines)


def group_keys(keys: Iterable[str], limit: int = 8) -> str:
    """`blocks.*.lmhra1 (8), dec.*.attn (8), ...`: key families with layer indices folded, most numerous first."""
    counts = collections.Counter()
    for key in keys:
        parts = re.sub(r"\.\d+(?=\.|$)", ".*", key).split(".")
        counts[".".join(parts[:-1][:3] or parts)] += 1
    shown = ", ".join(f"{name} ({n})" for name, n in counts.most_common(limit))
    return shown + (f", +{len(counts) - limit} more families" if len(counts) > limit else "")


# TorchScript archives: a zip of `NAME/data.pkl` (the module tree, pickled), `NAME/data/K` (raw tensor storages),
# `NAME/code/` (TorchScript source) and `NAME/constants.pkl`. torch.jit.load would compile and run the code; the
# weights need only the pickle, whose module objects are plain attribute dicts.
_STORAGE_DTYPES = {
    f"{name}Storage": dtype
    for name, dtype in [
        ("Float", torch.float32), ("Half", torch.float16), ("BFloat16", torch.bfloat16), ("Double", torch.float64),
        ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
        ("Byte", torch.uint8), ("Bool", torch.bool),
    ]
}


# The storages' bytes an archive may declare, as a multiple of the archive file's size: torch writes storages
# uncompressed, so a real archive declares about its own size; more is a zip bomb (or a file lying about its entries).
_MAX_INFLATION = 4


class _ScriptObject:
    """What a class named by the archive (`__torch__.model.VisualTransformer`, ...) becomes: the state it is given."""

    state: Mapping = MappingProxyType({})  # until the pickle builds it

    def __init__(self, *args) -> None:
        """A call of the class in the pickle (REDUCE) builds an empty record, whatever the arguments."""

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset, size, stride, *_flags) -> torch.Tensor:
    """The tensor a state dict holds: a dense view inside its storage, no larger than the storage."""
    if not (isinstance(storage, torch.Tensor) and _ints(size) and _ints(stride) and _ints((offset,))
            and len(size) == len(stride)):
        raise pickle.UnpicklingError("a tensor whose storage, offset, size or stride is not what torch writes")
    numel = math.prod(size)
    if offset < 0 or any(n < 0 for n in size) or any(step < 1 for n, step in zip(size, stride) if n > 1):
        raise pickle.UnpicklingError(f"a tensor of size {tuple(size)}, stride {tuple(stride)} at offset {offset}: "
                                     "negative, or a zero stride that repeats elements")
    if numel > storage.numel():
        raise pickle.UnpicklingError(f"a tensor of {numel} elements over a storage of {storage.numel()}")
    return storage.as_strided(size, stride, offset)  # as_strided checks the view against the storage's bounds


def _ints(values) -> bool:
    return isinstance(values, tuple) and all(type(value) is int for value in values)


class _ArchiveUnpickler(pickle._Unpickler):
    """Builds tensors from the archive's storages; every other class is an inert `_ScriptObject`, so nothing the
    file names is imported or called. The pure-Python unpickler, for its opcode table: BUILD gives state to the
    archive's module objects only (on a tensor it would reach `Tensor.set_`, on a function its `__dict__`)."""

    def __init__(self, pickled, archive: zipfile.ZipFile, root: str, budget: int) -> None:
        super().__init__(pickled)
        self._archive, self._root, self._budget = archive, root, budget
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):  # the (empty) backward hooks of each tensor
            return collections.OrderedDict
        if module.startswith("torch._utils"):
            raise pickle.UnpicklingError(f"tensor kind {module}.{name} is not supported (quantized or sparse?)")
        return type(name, (_ScriptObject,), {})

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, _ScriptObject):
            raise pickle.UnpicklingError(f"the pickle sets the state of a {type(target).__name__}: only the "
                                         "archive's module objects take state")
        target.__setstate__(state)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError("unexpected persistent id")
        kind, dtype, key, _location, numel = pid
        if (kind != "storage" or not isinstance(dtype, torch.dtype) or not isinstance(key, str)
                or type(numel) is not int):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.200}")
        if key in self._storages:
            if self._storages[key].numel() != numel:
                raise pickle.UnpicklingError(f"storage {key} declared with {self._storages[key].numel()} and {numel} "
                                             "elements")
            return self._storages[key]
        expected = numel * dtype.itemsize
        name = f"{self._root}/data/{key}"
        try:
            declared = self._archive.getinfo(name).file_size
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key} is not in the archive") from None
        if numel < 0 or declared != expected:
            raise pickle.UnpicklingError(f"storage {key}: {declared} bytes for {numel} x {dtype}")
        self._budget -= expected
        if self._budget < 0:  # before anything is inflated
            raise pickle.UnpicklingError(f"the storages declare more than {_MAX_INFLATION} times the archive's size")
        with self._archive.open(name) as entry:
            data = bytearray(entry.read(expected + 1))  # no more than declared, whatever the entry holds
        if len(data) != expected:
            raise pickle.UnpicklingError(f"storage {key}: {len(data)} bytes for {numel} x {dtype}")
        # a view of the bytes read, which cannot grow: nothing the pickle does reaches other memory
        self._storages[key] = torch.frombuffer(data, dtype=dtype) if numel else torch.zeros(0, dtype=dtype)
        return self._storages[key]


def _torchscript_root(archive: zipfile.ZipFile) -> str | None:
    """The archive folder when the zip is a TorchScript archive (a torch.save zip has no code/ nor constants.pkl)."""
    names = archive.namelist()
    for name in names:
        root, _, leaf = name.rpartition("/")
        if leaf == "data.pkl" and "/" not in root:
            if f"{root}/constants.pkl" in names or any(n.startswith(f"{root}/code/") for n in names):
                return root
    return None


def _read_torchscript(archive: zipfile.ZipFile, root: str, budget: int) -> StateDict:
    """Every tensor attribute of the pickled module tree, by attribute path (`visual.conv1.weight`, ...); the storages
    may declare `budget` bytes in all."""
    if f"{root}/byteorder" in archive.namelist():
        with archive.open(f"{root}/byteorder") as order:
            if order.read(16).strip() != b"little":
                raise ValueError("written on a big-endian machine; its storages cannot be read here")
    pickle_size = archive.getinfo(f"{root}/data.pkl").file_size
    if pickle_size > budget:
        raise ValueError(f"its pickle declares {pickle_size} bytes, more than {_MAX_INFLATION} times the archive's "
                         "size")
    with archive.open(f"{root}/data.pkl") as pickled:
        tree = _ArchiveUnpickler(io.BytesIO(pickled.read(pickle_size + 1)), archive, root, budget).load()
    tensors: StateDict = {}
    seen: set[int] = set()
    stack = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        if not isinstance(node, _ScriptObject) or id(node) in seen:  # a crafted pickle may nest an object in itself
            continue
        seen.add(id(node))
        for name, value in node.state.items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + str(name)] = value
            else:
                stack.append((f"{prefix}{name}.", value))
    return tensors


def load_state_dict_file(path: str | os.PathLike) -> Mapping:
    """Reads a checkpoint without running code from it: safetensors, TorchScript archives (tensors only), or torch
    files restricted to tensors and containers."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            root = _torchscript_root(archive)
            if root is not None:
                try:
                    return _read_torchscript(archive, root, _MAX_INFLATION * os.path.getsize(path))
                except Exception as exc:  # a damaged or crafted archive fails in many ways
                    raise ValueError(f"{path}: TorchScript archive whose tensors cannot be read: "
                                     f"{_first_line(exc)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError depending on the content
        raise ValueError(
            f"{path}: cannot be read as tensors only ({type(exc).__name__}: {_first_line(exc)}). "
            "Checkpoints holding pickled Python objects are refused; re-save the state dict alone "
            "(torch.save(ckpt['state_dict'], ...)) or as safetensors."
        ) from exc


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _unwrap(checkpoint: Mapping) -> StateDict:
    """Finds the tensor dict inside training checkpoints ({'model_state': ...}, {'state_dict': ...}, ...), without
    the `module.` that DistributedDataParallel puts before every key (open_clip's training checkpoints)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"the file holds a {type(checkpoint).__name__}, not a state dict (a mapping of names to "
                         "tensors)")
    for wrapper in ("model_state", "state_dict", "model", "module"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            return _unwrap(inner)
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found in checkpoint; top-level keys: {sorted(map(str, checkpoint))[:20]}")
    return _strip_prefix(tensors, "module.")


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _rename(state: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


_BACKBONE_RULES = [(r"^transformer\.resblocks\.", "blocks.")]
_GLOBAL_RULES = [
    (r"^transformer\.temporal_cls_token$", "temporal_cls_token"),
    (r"^transformer\.(dpe|dec)\.", r"\1."),
    (r"^transformer\.balance$", "balance"),
]


def _from_timm(state: StateDict) -> StateDict:
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = value.reshape(-1, value.shape[-1])
        elif key == "patch_embed.proj.bias":
            if value.abs().max() > 0:
                raise ValueError("timm checkpoint has a patch-embedding bias; CLIP ViTs (and UniFormerV2) have none")
        else:
            out[key] = value
    return _rename(
        out,
        [
            (r"^patch_embed\.proj\.", "conv1."),
            (r"^norm_pre\.", "ln_pre."),
            (r"^blocks\.", "transformer.resblocks."),
            (r"\.norm1\.", ".ln_1."),
            (r"\.norm2\.", ".ln_2."),
            (r"\.attn\.qkv\.(weight|bias)$", r".attn.in_proj_\1"),
            (r"\.attn\.proj\.", ".attn.out_proj."),
            (r"\.mlp\.fc1\.", ".mlp.c_fc."),
            (r"\.mlp\.fc2\.", ".mlp.c_proj."),
        ],
    )


def _from_hf(state: StateDict) -> StateDict:
    """transformers' CLIP vision tower: the same network as OpenAI's (the HF checkpoints were converted from it), with
    q, k and v as three Linear layers where CLIP packs them, in that order, into one in-projection."""
    out = _rename(
        state,
        [
            (r"^embeddings\.patch_embedding\.", "conv1."),
            (r"^embeddings\.class_embedding$", "class_embedding"),
            (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
            (r"^pre_layrnorm\.", "ln_pre."),  # sic: transformers' spelling
            (r"^post_layernorm\.", "ln_post."),
            (r"^encoder\.layers\.", "transformer.resblocks."),
            (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
            (r"\.layer_norm1\.", ".ln_1."),
            (r"\.layer_norm2\.", ".ln_2."),
            (r"\.mlp\.fc1\.", ".mlp.c_fc."),
            (r"\.mlp\.fc2\.", ".mlp.c_proj."),
        ],
    )
    for key in [k for k in out if ".self_attn.q_proj." in k]:
        block, kind = key.split(".self_attn.q_proj.")
        parts = [out.pop(f"{block}.self_attn.{p}_proj.{kind}", None) for p in "qkv"]
        if any(part is None for part in parts):
            raise ValueError(f"Hugging Face checkpoint: {block} lacks one of self_attn.q/k/v_proj.{kind}")
        out[f"{block}.attn.in_proj_{kind}"] = torch.cat(parts)
    return out


def _from_official(state: StateDict) -> StateDict:
    state = _strip_prefix(state, "backbone.")
    return _rename(
        state,
        _BACKBONE_RULES
        + _GLOBAL_RULES
        + [(r"^transformer\.proj\.0\.", "head.norm."), (r"^transformer\.proj\.2\.", "head.fc.")],
    )


def _from_mmaction(state: StateDict) -> StateDict:
    state = _strip_prefix(state, "backbone.")
    return _rename(
        state,
        _BACKBONE_RULES
        + _GLOBAL_RULES
        + [(r"^transformer\.norm\.", "head.norm."), (r"^cls_head\.fc_cls\.", "head.fc.")],
    )


_CONVERTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "native": lambda state: state,
    "official": _from_official,
    "mmaction": _from_mmaction,
    "clip": lambda state: state,
    "hf": _from_hf,
    "timm": _from_timm,
}


def detect_layout(state: StateDict) -> str:
    keys = set(state)
    bare = {k.removeprefix("backbone.") for k in keys}
    if "conv1.weight" in keys and any(k.startswith("blocks.0.attn.in_proj_weight") for k in keys):
        return "native"
    if "cls_head.fc_cls.weight" in bare or "transformer.norm.weight" in bare:
        return "mmaction"
    video_keys = ("transformer.temporal_cls_token", "transformer.dec.0.ln_1.weight", "transformer.proj.2.weight")
    if any(k in bare for k in video_keys):
        return "official"
    if "conv1.weight" in keys or "visual.conv1.weight" in keys:
        return "clip"
    if {"vision_model.embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight"} & keys:
        return "hf"
    if "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys:
        return "timm"
    if any(k.startswith("visual.trunk.") for k in keys):
        raise ValueError(
            "an open_clip model with a timm trunk (visual.trunk.*) is not supported: only open_clip's own ViT "
            "(visual.conv1, visual.transformer.resblocks.N) has UniFormerV2's structure"
        )
    raise ValueError(
        f"checkpoint fits no known layout ({', '.join(LAYOUTS)}); it holds {len(keys)} tensors, first keys: "
        f"{', '.join(sorted(keys)[:8])}; key families: {group_keys(keys)}"
    )


@dataclass
class Checkpoint:
    """A checkpoint's tensors under canonical names: CLIP's visual-tower names for image layouts, ours for video."""

    layout: str
    state: StateDict
    ignored: list[str]  # tensors of the file with no place in UniFormerV2 (a text tower, CLIP's projection, ...)

    def architecture(self) -> dict[str, int | bool]:
        """What the tensors imply, under UniFormerV2Config's names (the ones `--set` takes)."""
        state, implied = self.state, {}
        conv, pos = state.get("conv1.weight"), state.get("positional_embedding")
        if conv is not None:
            implied["width"] = conv.shape[0]
        blocks = {int(m[1]) for k in state if (m := re.match(r"^(?:transformer\.resblocks|blocks)\.(\d+)\.", k))}
        implied["layers"] = len(blocks)
        if conv is not None:
            implied["patch_size"] = conv.shape[-1]
            if pos is not None:
                implied["input_resolution"] = math.isqrt(pos.shape[0] - 1) * conv.shape[-1]
            if conv.ndim == 5:  # a video checkpoint's 3D patch embedding: a temporal kernel of 3 downsamples time
                implied["temporal_downsample"] = conv.shape[2] > 1
        if self.layout not in IMAGE_LAYOUTS:
            implied["no_lmhra"] = not any(".lmhra1." in k for k in state)
        if "head.fc.weight" in state:
            implied["num_classes"] = state["head.fc.weight"].shape[0]
        return implied


def read_checkpoint(source: str | os.PathLike | Mapping) -> Checkpoint:
    """Reads `source` (a path or a loaded checkpoint), detects its layout and renames it to canonical names."""
    raw = load_state_dict_file(source) if isinstance(source, (str, os.PathLike)) else source
    state = _unwrap(raw)
    layout = detect_layout(state)
    ignored: list[str] = []
    tower = _IMAGE_TOWERS.get(layout)
    if tower and any(k.startswith(tower) for k in state):
        ignored = [k for k in state if not k.startswith(tower)]
        state = {k[len(tower) :]: v for k, v in state.items() if k.startswith(tower)}
    state = _CONVERTERS[layout](state)
    if layout in IMAGE_LAYOUTS:
        ignored += [k for k in state if _UNUSED_IMAGE_KEYS.match(k)]
        state = {k: v for k, v in state.items() if not _UNUSED_IMAGE_KEYS.match(k)}
    return Checkpoint(layout, state, sorted(ignored))


def convert_checkpoint(source: str | os.PathLike | Mapping, out: str | os.PathLike) -> Checkpoint:
    """Writes `source`'s usable tensors to `out` as safetensors, in their stored dtype: an image checkpoint as a bare
    CLIP visual tower, a video checkpoint under our names. Either loads back as `clip` or `native`."""
    from safetensors.torch import save_file

    checkpoint = read_checkpoint(source)
    # safetensors refuses tensors that share memory; archive views and timm reshapes may
    save_file({k: v.clone(memory_format=torch.contiguous_format) for k, v in checkpoint.state.items()}, os.fspath(out))
    return checkpoint


def inflate_patch_weight(weight_2d: torch.Tensor, time_kernel: int) -> torch.Tensor:
    """[C, 3, p, p] -> [C, 3, k, p, p] with the 2D kernel at the centre time index and zeros elsewhere, so that a
    clip of identical frames embeds exactly like the image."""
    weight_3d = weight_2d.new_zeros(weight_2d.shape[:2] + (time_kernel,) + weight_2d.shape[2:])
    weight_3d[:, :, time_kernel // 2] = weight_2d
    return weight_3d


def interpolate_positional_embedding(pos: torch.Tensor, rows: int) -> torch.Tensor:
    """Resizes a `[1 + g*g, C]` ViT positional embedding to `rows = 1 + G*G` (bicubic on the grid, class row kept)."""
    src, dst = math.isqrt(pos.shape[0] - 1), math.isqrt(rows - 1)
    if src * src + 1 != pos.shape[0] or dst * dst + 1 != rows:
        raise ValueError(f"positional embedding rows {pos.shape[0]} -> {rows} are not 1 + square grids")
    grid = pos[1:].reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(dst * dst, -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


def _adapt_shapes(state: StateDict, target: StateDict, report: LoadReport) -> StateDict:
    out = dict(state)
    conv = out.get("conv1.weight")
    want = target["conv1.weight"].shape
    if conv is not None and conv.ndim == 4 and conv.shape[-2:] == want[-2:]:
        out["conv1.weight"] = inflate_patch_weight(conv, want[2])
        report.inflated.append("conv1.weight")
    pos = out.get("positional_embedding")
    rows = target["positional_embedding"].shape[0]
    if pos is not None and pos.ndim == 2 and pos.shape[0] != rows:
        out["positional_embedding"] = interpolate_positional_embedding(pos, rows)
        report.interpolated.append("positional_embedding")
    return out


def _backbone_keys(target: StateDict) -> set[str]:
    image_vit = re.compile(r"^(conv1\.|class_embedding$|positional_embedding$|ln_pre\.|blocks\.\d+\.(attn|ln_1|mlp|ln_2)\.)")
    return {k for k in target if image_vit.match(k)}


def _describe(keys: set[str], limit: int = 15) -> str:
    listed = sorted(keys)
    more = f" (+{len(listed) - limit} more)" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


def _mapped_head(state: StateDict, target: StateDict, head_rows: Sequence[int | None],
                 report: LoadReport) -> StateDict:
    """The model's head with row i taken from the file's row `head_rows[i]`, and the model's own initial row where it
    is None (a class the file's head does not know)."""
    source_weight, source_bias = state["head.fc.weight"], state["head.fc.bias"]
    weight, bias = target["head.fc.weight"].clone(), target["head.fc.bias"].clone()
    if len(head_rows) != weight.shape[0]:
        raise ValueError(f"the class map gives {len(head_rows)} rows for a head of {weight.shape[0]} classes")
    if source_weight.shape[1:] != weight.shape[1:]:
        raise ValueError(f"the file's head takes {source_weight.shape[1]} features, the model's {weight.shape[1]}")
    for row, source_row in enumerate(head_rows):
        if source_row is None:
            report.head_fresh.append(row)
            continue
        if not 0 <= source_row < source_weight.shape[0]:
            raise ValueError(f"the class map takes row {source_row} of a head of {source_weight.shape[0]} classes")
        weight[row], bias[row] = source_weight[source_row], source_bias[source_row]
        report.head_mapped.append(row)
    return {"head.fc.weight": weight, "head.fc.bias": bias}


def _plan(model: UniFormerV2, source: str | os.PathLike | Mapping | Checkpoint,
          head_rows: Sequence[int | None] | None = None) -> tuple[StateDict, LoadReport]:
    """The tensors `load_pretrained` would load into `model` and its report; reads only the model's shapes, so a
    model on the meta device serves."""
    checkpoint = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    layout = checkpoint.layout
    report = LoadReport(layout=layout, ignored=checkpoint.ignored,
                        trained_normalization=TRAINED_NORMALIZATION.get(layout),
                        model_normalization=model.config.input_normalization)
    target = model.state_dict()
    state = checkpoint.state
    if layout in IMAGE_LAYOUTS:
        state = _rename(state, _BACKBONE_RULES)
        required = _backbone_keys(target)
    else:
        required = set(target)
    state = _adapt_shapes(state, target, report)
    # BatchNorm's step counter is bookkeeping, absent from some exports.
    required = {k for k in required if not k.endswith("num_batches_tracked")}

    head = {"head.fc.weight", "head.fc.bias"}
    if head_rows is not None:
        if layout in IMAGE_LAYOUTS or not head <= set(state):
            raise ValueError(f"a class map needs a classifier head in the file; this '{layout}' checkpoint has none")
        state = {**state, **_mapped_head(state, target, head_rows, report)}
    elif layout not in IMAGE_LAYOUTS and head <= set(state) and state["head.fc.weight"].shape != target["head.fc.weight"].shape:
        log.info("skipping classifier head: checkpoint has %d classes, model %d",
                 state["head.fc.weight"].shape[0], target["head.fc.weight"].shape[0])
        state = {k: v for k, v in state.items() if k not in head}
        required -= head
        report.skipped_head = True

    missing = required - set(state)
    unexpected = set(state) - set(target)
    wrong_shape = {
        f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(state) & set(target)
        if state[k].shape != target[k].shape
    }
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_describe(wrong_shape)}")
    if problems:
        raise ValueError(f"checkpoint detected as '{layout}' layout does not fit the model: " + "; ".join(problems))

    report.loaded = sorted(state)
    report.kept_initialisation = sorted(set(target) - set(state))
    return state, report


def check_pretrained(model: UniFormerV2, source: str | os.PathLike | Mapping | Checkpoint,
                     head_rows: Sequence[int | None] | None = None) -> LoadReport:
    """A dry run of `load_pretrained`: the same checks and report, the model untouched (it may live on `meta`)."""
    return _plan(model, source, head_rows)[1]


def load_pretrained(model: UniFormerV2, source: str | os.PathLike | Mapping | Checkpoint,
                    head_rows: Sequence[int | None] | None = None) -> LoadReport:
    """Loads `source` (a path, a state dict in any supported layout, or a `Checkpoint`) into `model`, in place.

    Image-ViT layouts fill the ViT and leave the video parts at their identity-preserving initialisation; video
    layouts must cover the whole model. A classifier head of another class count is skipped (fine-tuning to new
    classes), and reported, unless `head_rows` maps the model's classes to the file's rows (row i from the file's row
    `head_rows[i]`, None: the model's initialisation), as the official code keeps a K710 head's rows for K400.
    Anything missing, unexpected or of the wrong shape raises before the model is touched.
    """
    state, report = _plan(model, source, head_rows)
    model.load_state_dict(state, strict=False)
    return report

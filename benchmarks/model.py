#!/usr/bin/env python
"""Throughput, FLOPs, memory and attention kernel of a named UniFormerV2 config; prints one JSON object.

    python benchmarks/model.py --model uniformerv2_b16 --batch 1 --frames 8 --device cpu --threads 2 \
        --set no_lmhra=True --set temporal_downsample=False --warmup 1 --iters 3 \
        --official /path/to/uniformerv2_model.py

Measures, for our model (and, with `--official`, for OpenGVLab's `slowfast/models/uniformerv2_model.py` built with
the same options and fed the same clip):
- inference clips/s (eval mode, `torch.inference_mode`) and train-step clips/s (train mode, forward + cross-entropy
  + backward + AdamW step), after `--warmup` untimed iterations, over `--iters` timed ones;
- forward FLOPs per clip with `torch.utils.flop_counter.FlopCounterMode` (a multiply-add = 2 FLOPs; counted on the
  meta device, where SDPA runs its math path as two batched matmuls, so attention is included) and, on CUDA or with
  `--peak-tflops`, model FLOPs utilisation = FLOP/s / peak, with a train step counted as 3x the forward;
- peak memory: CUDA `torch.cuda.max_memory_allocated`; CPU the process peak RSS (VmHWM / `ru_maxrss`), reset per
  phase through /proc/self/clear_refs where the kernel allows it;
- which attention kernels ran, read from a `torch.profiler` trace of one train step (aten SDPA op names such as
  `aten::_scaled_dot_product_flash_attention_for_cpu`, and on CUDA the device kernel names).
CUDA runs under bf16 autocast (`--dtype`), CPU in fp32. Timing on CPU interleaves the models iteration by iteration
(alternating which goes first) and reports the median, the best iteration and the median process CPU time, so that
both see the same machine load; on CUDA each model runs its iterations back to back between two synchronisations. The official file is loaded from the given path
with importlib; it is not part of this repository (its slowfast logging import must be swapped for stdlib logging).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import ctypes
import gc
import importlib.util
import logging
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

REPO = Path(__file__).resolve().parents[1]
# This file is named model.py: drop its own folder from the path so that `import model` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import model as M  # noqa: E402
from benchmarks.bench_output import emit, status_mb  # noqa: E402

H100_SXM_BF16_DENSE_TFLOPS = 989.0
TRAIN_SPEEDUP_GOAL = 1.3

# FlopCounterMode has no formula for the CPU flash kernel; without this a CPU count silently drops attention.
_EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop


# ------------------------------------------------------------------------------------------------ arguments
def parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value
    return overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="uniformerv2_b16", choices=M.list_models())
    p.add_argument("--num-classes", type=int, default=400)
    p.add_argument("--batch", type=int, default=1, help="clips per step")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (also sets t_size)")
    p.add_argument("--resolution", type=int, default=None, help="override input_resolution (square clips)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per phase before timing (>= 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="compile our model's blocks as training does (compile_blocks; the official one stays eager)")
    p.add_argument("--activation-checkpointing", action="store_true", help="use_checkpoint=True on both models")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model option override, value parsed with ast.literal_eval (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--official", type=Path, default=None, metavar="PATH",
                   help="path to the official uniformerv2_model.py to benchmark against")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak TFLOP/s for MFU (default on CUDA: {H100_SXM_BF16_DENSE_TFLOPS}, H100 SXM bf16 dense)")
    p.add_argument("--mode", choices=("both", "train", "inference"), default="both")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="add the top N ops (self time) of one profiled train step per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup and --iters must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = H100_SXM_BF16_DENSE_TFLOPS
    return args


def model_overrides(args: argparse.Namespace) -> dict:
    overrides = parse_set(args.overrides)
    if "t_size" in overrides and overrides["t_size"] != args.frames:
        raise SystemExit(f"--set t_size={overrides['t_size']} disagrees with --frames {args.frames}")
    overrides["t_size"] = args.frames
    if args.resolution is not None:
        overrides["input_resolution"] = args.resolution
    if args.activation_checkpointing:
        overrides["use_checkpoint"] = True
    return overrides


# ------------------------------------------------------------------------------------------------ models
def load_official_module(path: Path):
    spec = importlib.util.spec_from_file_location("official_uniformerv2_model", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm.models.layers deprecation
        spec.loader.exec_module(module)
    return module


def build_official(module, name: str, config: M.UniFormerV2Config, num_classes: int) -> tuple[nn.Module, str]:
    """The official model with our config's options, through its factory when the ViT geometry is the factory's."""
    options = dict(
        use_checkpoint=config.use_checkpoint,
        checkpoint_num=[config.layers if config.checkpoint_num is None else config.checkpoint_num],
        t_size=config.t_size,
        dw_reduction=config.dw_reduction,
        backbone_drop_path_rate=config.backbone_drop_path_rate,
        temporal_downsample=config.temporal_downsample,
        no_lmhra=config.no_lmhra,
        double_lmhra=config.double_lmhra,
        return_list=list(config.return_list),
        n_layers=config.n_layers,
        n_dim=config.n_dim,
        n_head=config.n_head,
        mlp_factor=config.mlp_factor,
        drop_path_rate=config.drop_path_rate,
        mlp_dropout=list(config.mlp_dropout),
        cls_dropout=config.cls_dropout,
        num_classes=num_classes,
        frozen=config.frozen,
    )
    geometry_keys = ("input_resolution", "patch_size", "width", "layers", "heads")
    geometry = {k: getattr(config, k) for k in geometry_keys}
    factory = getattr(module, name, None)
    default_geometry = {k: getattr(M.get_config(name), k) for k in geometry_keys}
    logging.getLogger(module.__name__).setLevel(logging.WARNING)
    if callable(factory) and geometry == default_geometry:
        return factory(pretrained=False, **options), f"{name}(pretrained=False, ...)"
    return module.VisionTransformer(**geometry, output_dim=512, **options), "VisionTransformer(...)"


def official_forward_flops(ours_flops: int, config, frames: int) -> int:
    """The official implementation's forward FLOPs for the same output, from ours: its global blocks project the keys
    and values of every token of the clip (2 x 2 x tokens x C^2 FLOPs per block), where ours folds the key projection
    into the query and projects the pooled value once (2 x 2 x C^2)."""
    time_steps = frames // 2 if config.temporal_downsample else frames
    tokens = time_steps * ((config.input_resolution // config.patch_size) ** 2 + 1)
    return ours_flops + config.n_layers * 4 * (tokens - 1) * config.width**2


def forward_flops_per_clip(model: nn.Module, clip_shape: tuple[int, ...], device: torch.device) -> dict:
    """FlopCounterMode over one clip's forward: on a meta copy (no compute), else on the real device."""
    try:
        meta = copy.deepcopy(model).to("meta").eval()
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
        with counter:
            meta(torch.empty((1, *clip_shape), device="meta"))
        where = "meta"
    except Exception:  # an op without a meta kernel: count a real forward instead
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
        model.eval()
        with counter:
            model(torch.randn((1, *clip_shape), device=device))
        where = str(device)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"forward_per_clip": int(counter.get_total_flops()), "by_op": by_op, "counted_on": where}


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of one phase: CUDA allocator peak, or the process RSS high-water mark on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.reset_ok = False
        self.process_peak = 0  # max over phases (the per-phase reset also resets what getrusage reports)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        _malloc_trim()
        self.base = _rss_bytes("VmRSS")
        try:  # "5" resets the peak RSS (VmHWM, and what getrusage reports) of this process
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {"peak_bytes": peak, "peak_increase_bytes": peak - self.base,
                    "source": "torch.cuda.max_memory_allocated"}
        peak = _rss_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.process_peak = max(self.process_peak, peak)
        source = "peak RSS (VmHWM) since phase start" if self.reset_ok else "peak RSS of the process lifetime"
        return {"peak_bytes": peak, "peak_increase_bytes": peak - self.base, "source": source}


def _rss_bytes(field: str) -> int:
    """0 where there is no /proc (not Linux), so that the caller falls back to getrusage."""
    try:
        return int(status_mb(field) * 1024 * 1024)
    except (OSError, KeyError):
        return 0


def _malloc_trim() -> None:
    # Return freed heap pages to the OS so that a phase's RSS baseline is its live memory.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.backends.cpu.get_cpu_capability()})"
    return platform.processor() or platform.machine()


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ------------------------------------------------------------------------------------------------ steps
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def inference_step(model: nn.Module, video: torch.Tensor, dtype: str) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.inference_mode(), autocast(video.device, dtype):
            model(video)

    return step


def train_step(model: nn.Module, video: torch.Tensor, labels: torch.Tensor, dtype: str, lr: float):
    """One optimisation step; `step.state["grad_context"]` wraps its forward + backward (see below)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW on CUDA (what a throughput-minded training loop uses); the default for-each/loop form on CPU
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, fused=video.device.type == "cuda")
    state = {"grad_context": contextlib.nullcontext}

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with state["grad_context"]():
            with autocast(video.device, dtype):
                logits = model(video)
            F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    step.state = state
    return step


# The official global block writes the DPE output into `tmp_x[1:]` in place while the depthwise conv still holds a
# view of `tmp_x` for its weight gradient (`reshape` of the permuted patch tokens is a view), so its backward fails
# on current PyTorch ("modified by an inplace operation"). The benchmark then runs its forward + backward under
# `torch.autograd.graph.allow_mutation_on_saved_tensors`, which clones the saved tensor before the write (the copy an
# out-of-place fix makes) but also adds a Python dispatch mode's per-op overhead: small next to B/16's matmuls,
# noticeable on tiny models. For the fairest figures pass a copy with the one-line fix
# `tmp_feats = ....reshape(N, C, T_down, H, W).contiguous()`.
SAVED_TENSOR_MUTATION_NOTE = (
    "official backward fails on the in-place DPE write into a tensor its DPE conv saved; forward + backward timed "
    "under torch.autograd.graph.allow_mutation_on_saved_tensors (adds per-op Python overhead; a copy with "
    "`.reshape(N, C, T_down, H, W).contiguous()` avoids it)"
)


def _is_saved_tensor_mutation(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "modified by an inplace operation" in str(exc)


def time_steps(
    steps: dict[str, Callable[[], None]], iters: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds per iteration for each step, and (CPU) process CPU seconds. CPU: interleaved, alternating the
    order each round; CUDA: a block of `iters` back-to-back iterations per model (their mean is reported)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    if device.type == "cuda":
        for name in names:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                steps[name]()
            synchronize(device)
            times[name] = [(time.perf_counter() - start) / iters] * iters
        return times, {}
    for i in range(iters):
        for name in names if i % 2 == 0 else names[::-1]:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times


# ------------------------------------------------------------------------------------------------ profiling
_ATTENTION_RE = re.compile(r"scaled_dot_product|attention|flash|fmha|mem_eff|efficient|cudnn.*attn", re.I)
_BACKENDS = (  # (substring of an aten op / kernel name, backend label), most specific first
    ("flash_attention_for_cpu", "cpu_flash"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("flash", "flash"),
    ("efficient_attention", "mem_efficient"),
    ("fmha", "mem_efficient"),
    ("cudnn", "cudnn"),
    ("_scaled_dot_product_attention_math", "math"),
    ("native_multi_head_attention", "native_mha"),
)


def profile_step(step: Callable[[], None], device: torch.device, top: int) -> dict:
    """Profiles one call: the attention ops/kernels it ran and, when top > 0, the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    averages = prof.key_averages()
    names = Counter()
    for avg in averages:
        if _ATTENTION_RE.search(avg.key):
            names[avg.key] += avg.count
    backends = []
    for name in names:
        if name == "aten::scaled_dot_product_attention":
            continue  # the dispatcher, not a kernel
        for needle, label in _BACKENDS:
            if needle in name:
                if label not in backends:
                    backends.append(label)
                break
    result: dict = {"attention_backends": backends, "attention_ops": dict(sorted(names.items()))}
    if top > 0:
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        rows = sorted(averages, key=lambda a: getattr(a, key, 0) or 0, reverse=True)[:top]
        total = sum((getattr(a, key, 0) or 0) for a in averages) or 1
        result["top_ops"] = [
            {"name": a.key, "calls": a.count, "self_ms": round((getattr(a, key, 0) or 0) / 1e3, 2),
             "self_pct": round(100 * (getattr(a, key, 0) or 0) / total, 1)}
            for a in rows
        ]
        result["profiled_self_ms_total"] = round(total / 1e3, 1)
    return result


# ------------------------------------------------------------------------------------------------ main
def summarize(times: list[float], batch: int, cuda: bool, cpu_times: list[float] | None = None) -> dict:
    per_iter = statistics.fmean(times) if cuda else statistics.median(times)
    summary = {
        "clips_per_s": round(batch / per_iter, 3),
        "s_per_iter": round(per_iter, 4),
        "statistic": "mean of a synchronised block" if cuda else "median of interleaved iterations",
    }
    if not cuda:  # the fastest iteration: the least disturbed by other load on a shared machine
        summary.update({"clips_per_s_best": round(batch / min(times), 3), "iter_s": [round(t, 4) for t in times]})
    if cpu_times:  # process CPU seconds (all threads): robust to preemption, though it counts OpenMP spin-waits
        summary["cpu_s_per_iter"] = round(statistics.median(cpu_times), 4)
    return summary


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in fp32
    overrides = model_overrides(args)
    config = M.get_config(args.model, **overrides)
    res = config.input_resolution
    clip_shape = (3, args.frames, res, res)

    ours = M.create_model(args.model, args.num_classes, **overrides)
    models: dict[str, nn.Module] = {"ours": ours}
    official_builder = None
    if args.official is not None:
        module = load_official_module(args.official)
        models["official"], official_builder = build_official(module, args.model, config, args.num_classes)

    report: dict = {
        "benchmark": "benchmarks/model.py",
        "model": args.model,
        "options": overrides,
        "config": config.to_dict(),
        "params": sum(p.numel() for p in ours.parameters()),
        "batch": args.batch,
        "frames": args.frames,
        "resolution": res,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": "bf16 autocast" if args.dtype == "bf16" else "fp32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "compile": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "warmup": args.warmup,
        "iters": args.iters,
    }
    flops = {name: forward_flops_per_clip(m, clip_shape, torch.device("cpu")) for name, m in models.items()}

    torch.manual_seed(args.seed)
    video = torch.randn((args.batch, *clip_shape), device=device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
    results: dict[str, dict] = {name: {} for name in models}
    infer_steps: dict[str, Callable[[], None]] = {}
    train_steps: dict[str, Callable[[], None]] = {}
    memory = PeakMemory(device)
    # Models are moved to the device and warmed up one after the other, so that our peak memory is measured
    # before the official model exists; the official figures carry ours' state in `peak_bytes` (compare
    # `peak_increase_bytes`, the rise over the phase's starting level).
    for name, m in models.items():
        m.to(device)
        results[name]["state_bytes"] = state_bytes(m)
        if args.compile and name == "ours":
            m.compile_blocks()  # what `uniformer train --compile` runs
        runnable = m
        phases = []
        if args.mode in ("both", "inference"):
            phases.append(("inference", infer_steps, inference_step(runnable, video, args.dtype)))
        if args.mode in ("both", "train"):
            phases.append(("train", train_steps, train_step(runnable, video, labels, args.dtype, args.lr)))
        for phase, registry, step in phases:
            memory.start()
            notes = []
            try:
                try:
                    step()
                except RuntimeError as exc:
                    if not (phase == "train" and name == "official" and _is_saved_tensor_mutation(exc)):
                        raise
                    step.state["grad_context"] = torch.autograd.graph.allow_mutation_on_saved_tensors
                    notes.append(SAVED_TENSOR_MUTATION_NOTE)
                    step()
                for _ in range(args.warmup - 1):
                    step()
                synchronize(device)
            except Exception as exc:  # an option the official code cannot run with this torch, out of memory, ...
                results[name][phase] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            results[name][phase] = {"peak_memory": memory.stop(), **({"note": "; ".join(notes)} if notes else {})}
            registry[name] = step
        # Kernel detection (and top ops) from one profiled train step, else one forward.
        probe = train_steps.get(name) or infer_steps.get(name)
        if probe is not None:
            results[name]["profile"] = profile_step(probe, device, args.profile)
            if getattr(probe, "state", {}).get("grad_context", contextlib.nullcontext) is not contextlib.nullcontext:
                results[name]["profile"]["note"] = "profiled under allow_mutation_on_saved_tensors: its Python " \
                    "dispatch mode re-dispatches ops, so some ops appear twice"

    for phase, steps in (("inference", infer_steps), ("train", train_steps)):
        if steps:
            wall, cpu = time_steps(steps, args.iters, device)
            for name, times in wall.items():
                results[name][phase].update(summarize(times, args.batch, device.type == "cuda", cpu.get(name)))

    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    # MFU counts the official model's FLOPs for the same output (measured when --official is given), so that a
    # cheaper exact computation shows as a gain rather than as lower utilisation
    official_fwd = flops["official"]["forward_per_clip"] if "official" in flops else official_forward_flops(
        flops["ours"]["forward_per_clip"], config, args.frames)
    report["official_forward_gflop_per_clip"] = round(official_fwd / 1e9, 2)
    for name, r in results.items():
        fwd = flops[name]["forward_per_clip"]
        r["forward_flops_per_clip"] = fwd
        r["forward_gflop_per_clip"] = round(fwd / 1e9, 2)
        for phase, factor in (("inference", 1), ("train", 3)):
            if "clips_per_s" in r.get(phase, {}):
                achieved = factor * official_fwd * r[phase]["clips_per_s"]
                r[phase]["achieved_tflops"] = round(achieved / 1e12, 4)
                r[phase]["mfu"] = round(achieved / peak, 4) if peak else None

    ours_r = results["ours"]
    report.update(
        {
            "inference_clips_per_s": ours_r.get("inference", {}).get("clips_per_s"),
            "train_clips_per_s": ours_r.get("train", {}).get("clips_per_s"),
            "forward_gflop_per_clip": ours_r["forward_gflop_per_clip"],
            "flops_method": "torch.utils.flop_counter.FlopCounterMode, multiply-add = 2 FLOPs, train step = 3x forward; "
            "MFU and achieved TFLOP/s with the official model's forward FLOPs",
            "flops_by_op": flops["ours"]["by_op"],
            "peak_tflops": args.peak_tflops,
            "mfu_train": ours_r.get("train", {}).get("mfu"),
            "peak_memory_bytes": {
                phase: ours_r[phase]["peak_memory"]["peak_bytes"]
                for phase in ("inference", "train")
                if "peak_memory" in ours_r.get(phase, {})
            },
            "attention_kernel": ours_r.get("profile", {}).get("attention_backends"),
            "ours": ours_r,
        }
    )
    if "official" in results:
        off = results["official"]
        off["path"] = str(args.official)
        off["builder"] = official_builder
        off["compiled"] = False
        speedup = {}
        for phase in ("inference", "train"):
            for stat in ("clips_per_s", "clips_per_s_best"):
                a, b = ours_r.get(phase, {}).get(stat), off.get(phase, {}).get(stat)
                if stat == "clips_per_s" or (a and b):
                    speedup[phase + ("" if stat == "clips_per_s" else "_best")] = round(a / b, 3) if a and b else None
            a, b = ours_r.get(phase, {}).get("cpu_s_per_iter"), off.get(phase, {}).get("cpu_s_per_iter")
            if a and b:
                speedup[phase + "_cpu_time"] = round(b / a, 3)
        report["official"] = off
        report["speedup_vs_official"] = speedup
        report["train_speedup_goal"] = TRAIN_SPEEDUP_GOAL
        report["train_speedup_goal_met"] = bool(speedup["train"] and speedup["train"] >= TRAIN_SPEEDUP_GOAL)
    if device.type == "cpu":
        rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report["process_max_rss_bytes"] = max(rusage, memory.process_peak)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    emit(report, args.output)


if __name__ == "__main__":
    main()

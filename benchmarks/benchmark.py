"""Throughput, latency and memory of MambaVision, per variant, batch size, dtype, scan backend and mode.

GPU: img/s from CUDA events (median of the timed batches after warm-up), peak memory from the caching
allocator; modes ``infer`` (no_grad), ``train`` (forward + backward + SGD step) and ``latency`` (batch 1).
The compiler's caches are reset between cases (``torch._dynamo.reset()``). ``--targets`` runs the cases of
the speed targets and prints them against the targets and the original's figures; ``--ablate`` also runs
each of them with each of our speedups that applies (or only the named ones) switched off and prints
the ratio.
``--segmentation`` runs NVIDIA's ADE20K architectures instead (backbone alone, and with the UPerNet heads), on the GPU
against the original's backbone at the same sizes (ARCHITECTURE.md), on the CPU T at 512, batch 1.
``--detection`` runs NVIDIA's COCO backbones instead (T and B, windows (8, 8, 112, 56)): the backbone alone at
800x1344 batch 8 against the original's figures there, and the Deformable DETR detector's forward at 640x640 batch
16 (bf16 autocast, channels_last, Triton scan, each ``--compile-modes``).
CPU (``--device cpu``, float32, eager): latency beside timm's convnext_tiny at the same batch and resolution,
run pair by pair, the ratio ``vs`` the median of the pairs' ratios (T at batch 1 and 8, L2-512 at 512);
``--onnx`` adds exporting T and onnxruntime against eager, ``--second-size`` compiling at a second size.

    python benchmarks/benchmark.py --targets --ablate --profile
    python benchmarks/benchmark.py --variants T S B --modes infer train latency --compile-modes default
    python benchmarks/benchmark.py --device cpu --onnx
    python benchmarks/benchmark.py --segmentation --compile-modes eager default
    python benchmarks/benchmark.py --detection --compile-modes eager default
"""

import argparse
import contextlib
import json
import linecache
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambavision_tools import model_code  # noqa: E402
from mambavision_tools.variants import DETECTION_VARIANTS, SEGMENTATION_VARIANTS, VARIANTS  # noqa: E402

modeling = model_code.load("modeling_mambavision")
configuration = model_code.load("configuration_mambavision")
scan = model_code.load("selective_scan")

SHORT_NAMES = {"T": "MambaVision-T-1K", "T2": "MambaVision-T2-1K", "S": "MambaVision-S-1K", "B": "MambaVision-B-1K",
               "L": "MambaVision-L-1K", "L2": "MambaVision-L2-1K", "L2-512": "MambaVision-L2-512-21K",
               "L3-512": "MambaVision-L3-512-21K"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Target:
    """A case of the speed targets (issue 17), with the original's best figure from ARCHITECTURE.md's side-by-side
    run on an H200 (2026-12-03, torch 2.11, bf16 autocast, channels_last, mamba-ssm's CUDA scan)."""

    variant: str
    mode: str  # infer / train: img/s, higher is better; latency: ms at batch 1, lower is better
    batch: int
    compile_mode: str
    goal: Optional[float]  # None: measured only
    original: Optional[float]  # the original's best run (img/s, or ms for latency)
    original_run: str  # which of its runs that is
    peak_limit_gib: Optional[float] = None  # the original's peak our run must not exceed, where the issue sets one
    peak_limit_run: str = ""  # the original's run that peak comes from
    ablations: tuple = ()  # our speedups that apply to this case, each measured as a ratio with --ablate
    freezing: bool = False  # inductor's freezing (weights as constants): no per-call weight casts
    discard_parameters: bool = False  # with freezing: the float32 parameters are dropped once frozen (memory)

    @property
    def name(self):
        return f"{self.variant} {self.mode} b{self.batch}"


INFER = dict(freezing=True, discard_parameters=True)  # the inference recipe of the README's Speed section
TARGETS = [
    Target("T", "infer", 256, "reduce-overhead", 28_700, 14_333, "eager", **INFER,
           ablations=("cuda_graphs", "freezing", "scan_config")),
    Target("S", "infer", 256, "reduce-overhead", 23_100, 11_539, "compiled", **INFER, ablations=("freezing",)),
    Target("B", "infer", 256, "reduce-overhead", 14_100, 9_414, "compiled", **INFER, ablations=("freezing",)),
    Target("L2-512", "infer", 32, "reduce-overhead", 1_045, 697, "compiled", 2.53, "compiled", **INFER,
           ablations=("discard_parameters", "head_padding", "channel_padding")),
    Target("L3-512", "infer", 32, "reduce-overhead", 642, 428, "compiled", 3.88, "compiled", **INFER,
           ablations=("discard_parameters", "freezing")),
    Target("T", "train", 128, "reduce-overhead", 4_362, 2_181, "eager", 5.94, "eager"),
    Target("S", "train", 128, "reduce-overhead", 4_312, 2_156, "eager", 7.58, "eager"),
    Target("B", "train", 128, "reduce-overhead", 3_200, 1_599, "compiled", 11.63, "eager"),
    Target("T", "latency", 1, "reduce-overhead", 1.0, 14.8, "eager", **INFER, ablations=("freezing", "scan_config")),
]


# Our speedups that a run can switch off for the ratio: what the baseline sets instead (module, name, value).
ABLATIONS = {
    "scan_config": ("selective_scan_triton", "INFER_CONFIG", (16, 8, 1)),  # the scan's launch config before
    "head_padding": ("modeling_mambavision", "ATTENTION_HEAD_PADDING", 1),  # attention at head size 49
    "channel_padding": ("modeling_mambavision", "CONV_CHANNEL_MULTIPLE", 1),  # level 0 of L at 196 channels
    "cuda_graphs": None,  # torch.compile's default mode instead of reduce-overhead
    "freezing": None,  # without inductor's freezing
    "discard_parameters": None,  # freezing keeps the float32 parameters beside its bfloat16 constants
}


@contextlib.contextmanager
def ablated(name):
    """Switch one of our speedups (``ABLATIONS``) off for a baseline run; None: everything on."""
    if ABLATIONS.get(name) is None:
        yield
        return
    module_name, attribute, baseline = ABLATIONS[name]
    module = model_code.load(module_name)
    kept = getattr(module, attribute)
    setattr(module, attribute, baseline)
    try:
        yield
    finally:
        setattr(module, attribute, kept)


@dataclass(frozen=True)
class DenseCase:
    """A dense-prediction architecture at its size and batch, with NVIDIA's backbone there where ARCHITECTURE.md
    has it (H200, bf16 autocast, channels_last, mamba-ssm's scan): img/s and peak GiB, (eager, compiled)."""

    variant: str  # T, B, L3-512
    part: str  # "backbone": the four normalised maps; otherwise the whole model (its heads' outputs)
    height: int
    width: int
    batch: int
    original_img_s: Optional[tuple] = None
    original_peak_gib: Optional[tuple] = None

    @property
    def name(self):
        return f"{self.variant} {self.part}"


SEGMENTATION_VARIANT_NAMES = {"T": "MambaVision-T-1K-UPerNet-ADE20K-512", "B": "MambaVision-B-1K-UPerNet-ADE20K-512",
                              "L3-512": "MambaVision-L3-512-21K-UPerNet-ADE20K-640"}
SEGMENTATION_CASES = [
    DenseCase("T", "backbone", 512, 512, 16, (735, 787), (0.70, 0.48)),
    DenseCase("T", "upernet", 512, 512, 16),
    DenseCase("B", "backbone", 512, 512, 16, (398, 579), (1.40, 0.96)),
    DenseCase("B", "upernet", 512, 512, 16),
    DenseCase("L3-512", "backbone", 640, 640, 8, (87, 112), (4.63, 3.36)),
    DenseCase("L3-512", "upernet", 640, 640, 8),
    # what ARCHITECTURE.md timed of the original: its classification model with the segmentation windows, which
    # keeps no stage maps (a backbone returns four, normalised in float32 under autocast)
    DenseCase("T", "classifier", 512, 512, 16, (735, 787), (0.70, 0.48)),
    DenseCase("B", "classifier", 512, 512, 16, (398, 579), (1.40, 0.96)),
    DenseCase("L3-512", "classifier", 640, 640, 8, (87, 112), (4.63, 3.36)),
]


def build_segmentation(case):
    """NVIDIA's ADE20K architecture of ``case``: the backbone alone, with its UPerNet heads, or as a classifier."""
    spec = SEGMENTATION_VARIANTS[SEGMENTATION_VARIANT_NAMES[case.variant]]
    if case.part == "classifier":
        config = configuration.MambaVisionConfig(**{**spec.architecture, "out_norm": False})
        return modeling.MambaVisionModelForImageClassification(config).eval()
    config = configuration.MambaVisionConfig(**spec.architecture, image_size=spec.image_size,
                                             out_indices=[1, 2, 3, 4])
    if case.part == "backbone":
        return modeling.MambaVisionBackbone(config).eval()
    return model_code.load("modeling_mambavision_segmentation").MambaVisionForSemanticSegmentation(config).eval()


def run_segmentation_cpu(args):
    """Eager float32 latency of T at 512, batch 1: the backbone alone and with the heads."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    os.environ[scan.ENV_BACKEND] = "torch"
    rows = []
    for case in [c for c in SEGMENTATION_CASES if c.variant == "T"]:
        model, size = build_segmentation(case), case.height
        pixels = torch.randn(1, 3, size, size)
        with torch.no_grad():
            for _ in range(args.cpu_warmup):
                model(pixels)
            times = []
            for _ in range(args.cpu_iters):
                start = time.perf_counter()
                model(pixels)
                times.append((time.perf_counter() - start) * 1e3)
        rows.append({"model": f"T {case.part} (ADE20K)", "batch": 1, "size": size, "threads": torch.get_num_threads(),
                     "ms": statistics.median(times), "img_s": 1e3 / statistics.median(times)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def build(variant, fold=False):
    spec = VARIANTS[SHORT_NAMES.get(variant, variant)]
    config = configuration.MambaVisionConfig(**spec.architecture, num_labels=1000)
    model = modeling.MambaVisionModelForImageClassification(config).eval()
    if fold:
        model.fold_batchnorm()
    return model, spec.image_size


def time_cuda(step, warmup, iters):
    """Median milliseconds of ``step`` over ``iters`` runs timed with CUDA events, after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu_pairs(step, baseline, warmup, iters):
    """Median milliseconds of ``step`` and of ``baseline``, run in turn, and the median of the pairs' ratios:
    pairing keeps the ratio meaningful while the machine's speed drifts (other processes, clocks)."""
    for _ in range(warmup):
        step()
        baseline()
    times, base_times = [], []
    for _ in range(iters):
        for fn, out in ((step, times), (baseline, base_times)):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    ratio = statistics.median(t / b for t, b in zip(times, base_times))
    return statistics.median(times), statistics.median(base_times), ratio


# Kernel kinds of the profile's summary: the first whose name fragments a kernel's name contains (lower case).
# Inductor's kernels come first: their names list the ops they fuse (``..._selective_scan_fwd_silu...``).
KERNEL_KINDS = (
    ("fused reduction (inductor: norms, sums)", ("triton_per", "triton_red")),
    ("fused pointwise (inductor: GELU, residuals, casts, layouts)", ("triton_",)),
    ("scan", ("_scan_fwd_kernel", "_scan_bwd_kernel")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "nhwc", "implicit")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "splitk")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
)


def print_profile(step, title, steps=5, rows=25):
    """The CUDA kernels that take the time, summed over a few steps (torch.profiler), and per step by kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"\n== profile: {title} ({steps} steps)")
    print(events.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    kinds = {}
    for event in events:
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        name = event.key.lower()
        kind = next((k for k, fragments in KERNEL_KINDS if any(f in name for f in fragments)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / steps / 1e3
    total = sum(kinds.values())
    print(f"kernel time per step by kind ({total:.2f} ms in all): " + "; ".join(
        f"{kind} {ms:.2f} ms ({ms / total:.0%})" for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])))


def cuda_case(args, variant, mode, dtype_name, backend, compile_mode, batch=None, ablation=None, freezing=None,
              discard=None):
    torch._dynamo.reset()  # each case compiles from scratch
    os.environ[scan.ENV_BACKEND] = backend
    compile_mode = "default" if ablation == "cuda_graphs" else compile_mode
    freezing = (args.freezing if freezing is None else freezing) and mode != "train" and ablation != "freezing"
    discard = (args.discard_parameters if discard is None else discard) and ablation != "discard_parameters"
    discard = discard and freezing
    model, size = build(variant, fold=args.fold and mode != "train")
    model = model.cuda().to(memory_format=torch.channels_last)
    batch = batch or {"infer": args.batch_size, "train": args.train_batch_size, "latency": 1}[mode]
    dtype = DTYPES[dtype_name]
    pixels = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    torch._inductor.config.freezing = freezing
    torch._inductor.config.freezing_discard_parameters = discard  # the eager model is unusable afterwards
    forward = torch.compile(model, mode=compile_mode) if compile_mode != "eager" else model
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            with autocast:
                loss = forward(pixels, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        def step():
            with torch.no_grad(), autocast:
                forward(pixels)
    with ablated(ablation):
        started = time.perf_counter()
        step()  # compile and autotune outside the timed region
        torch.cuda.synchronize()
        first_s = time.perf_counter() - started
        torch.cuda.reset_peak_memory_stats()  # from here: timed and profiled steps, CUDA-graph recording included
        ms = time_cuda(step, args.warmup, args.iters)
        if args.profile:  # after the timed steps: CUDA graphs' warm-up and recording are over
            print_profile(step, f"{variant} {mode} b{batch} {dtype_name} {backend} {compile_mode} "
                                f"{'without ' + ablation if ablation else ''}")
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"variant": variant, "mode": mode, "batch": batch, "size": size, "dtype": dtype_name, "scan": backend,
            "compile": compile_mode + ("+freezing" if freezing else "") + ("+discard" if discard else ""),
            "fold_bn": args.fold and mode != "train", "without": ablation or "", "ms": ms,
            "img_s": batch * 1e3 / ms, "peak_gib": peak, "first_s": first_s}


def guarded_case(args, variant, mode, dtype_name, backend, compile_mode, batch=None, ablation=None, freezing=None,
                 discard=None):
    """``cuda_case``, a failure reported as a row (the run goes on)."""
    try:
        row = cuda_case(args, variant, mode, dtype_name, backend, compile_mode, batch, ablation, freezing, discard)
    except Exception as error:  # report the failure in the table and go on
        row = {"variant": variant, "mode": mode, "dtype": dtype_name, "scan": backend, "compile": compile_mode,
               "without": ablation or "", "error": f"{type(error).__name__}: {error}"[:300]}
    print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()
    return row


def run_cuda(args):
    rows = []
    for variant in args.variants:
        for mode in args.modes:
            for dtype_name in args.dtypes:
                for backend in args.backends:
                    for compile_mode in args.compile_modes:
                        rows.append(guarded_case(args, variant, mode, dtype_name, backend, compile_mode))
    return rows


def run_targets(args):
    """The issue's target cases (bf16, Triton scan), with ``--ablate`` each also without each of its speedups."""
    results = []
    for target in TARGETS:
        if (args.variants_given and target.variant not in args.variants) or (
                args.modes_given and target.mode not in args.modes):
            continue
        ablations = [a for a in target.ablations if args.ablate is not None and (not args.ablate or a in args.ablate)]
        rows = [guarded_case(args, target.variant, target.mode, "bf16", "triton", target.compile_mode,
                             batch=target.batch, ablation=ablation, freezing=target.freezing or args.freezing,
                             discard=target.discard_parameters or args.discard_parameters)
                for ablation in (None, *ablations)]
        results.append((target, rows))
    return results


def print_targets(results, device):
    """The targets table (markdown): measured against the goal and the original's best, peak memory against the
    original's where the issue bounds it; a case is reached when both hold."""
    print(f"\n### Targets on {device}, torch {torch.__version__}, bf16 autocast, channels_last, Triton scan\n")
    print("| case | compile | measured | target | original's best | vs original | peak GiB | peak limit | reached |")
    print("|---|---|---|---|---|---|---|---|---|")
    for target, rows in results:
        row = rows[0]
        if "error" in row:
            print(f"| {target.name} | {target.compile_mode} | error: {row['error'][:80]} | | | | | | no |")
            continue
        latency = target.mode == "latency"
        value = row["ms"] if latency else row["img_s"]
        unit = " ms" if latency else ""
        fast = target.goal is None or (value <= target.goal if latency else value >= target.goal)
        small = target.peak_limit_gib is None or row["peak_gib"] <= target.peak_limit_gib
        reached = "-" if target.goal is None else ("yes" if fast and small else "**no**")
        original = f"{target.original:,g}{unit} ({target.original_run})" if target.original else "-"
        ratio = (target.original / value if latency else value / target.original) if target.original else None
        limit = "-" if target.peak_limit_gib is None else (
            f"<= {target.peak_limit_gib:.2f} ({target.peak_limit_run})" + ("" if small else " **exceeded**"))
        goal = "-" if target.goal is None else (f"<= {target.goal:g} ms" if latency else f">= {target.goal:,.0f}")
        print(f"| {target.name} ({row['size']}px) | {row['compile']} | {value:,.{2 if latency else 0}f}{unit} | "
              f"{goal} | {original} | {f'{ratio:.2f}x' if ratio else '-'} | {row['peak_gib']:.2f} | {limit} | "
              f"{reached} |")
    ablations = [(target, row, rows[0]) for target, rows in results for row in rows[1:]
                 if "error" not in row and "error" not in rows[0]]
    if ablations:
        print("\n| case | speedup | with | without | ratio | peak GiB with / without |\n|---|---|---|---|---|---|")
        for target, without, with_ in ablations:
            shown = (lambda r: f"{r['ms']:.2f} ms") if target.mode == "latency" else (lambda r: f"{r['img_s']:,.0f} img/s")
            print(f"| {target.name} | {without['without']} | {shown(with_)} | {shown(without)} | "
                  f"{with_['img_s'] / without['img_s']:.3f}x | {with_['peak_gib']:.2f} / {without['peak_gib']:.2f} |")


DETECTION_CASES = [
    DenseCase("T", "backbone", 800, 1344, 8, (165, 206), (1.01, 0.69)),
    DenseCase("B", "backbone", 800, 1344, 8, (98, 128), (1.93, 1.29)),
    DenseCase("T", "detector", 640, 640, 16),
    DenseCase("B", "detector", 640, 640, 16),
    # what ARCHITECTURE.md timed of the original, as for segmentation: its classifier with these windows
    DenseCase("T", "classifier", 800, 1344, 8, (165, 206), (1.01, 0.69)),
    DenseCase("B", "classifier", 800, 1344, 8, (98, 128), (1.93, 1.29)),
]


def build_detection(case):
    """NVIDIA's COCO backbone architecture of ``case``: alone, under a default Deformable DETR head (91 classes) or
    as a classifier."""
    spec = DETECTION_VARIANTS[f"MambaVision-{case.variant}-COCO-backbone"]
    if case.part == "classifier":
        config = configuration.MambaVisionConfig(**{**spec.architecture, "out_norm": False})
        return modeling.MambaVisionModelForImageClassification(config).eval()
    if case.part == "backbone":
        return modeling.MambaVisionBackbone(configuration.MambaVisionConfig(**spec.architecture)).eval()
    detection = model_code.load("modeling_mambavision_detection")
    backbone = configuration.MambaVisionConfig(**{**spec.architecture, "out_features": detection.DETECTION_OUT_FEATURES})
    config = detection.MambaVisionDetectionConfig(backbone_config=backbone, num_labels=91)
    return detection.MambaVisionForObjectDetection(config).eval()


def dense_case(args, case, build_model, compile_mode):
    """Inference img/s and peak memory of one dense-prediction case (bf16 autocast, channels_last, Triton scan),
    compiled with ``compile_mode`` and, as asked, inductor's freezing and parameter discarding."""
    torch._dynamo.reset()
    os.environ[scan.ENV_BACKEND] = "triton"
    model = build_model(case).cuda().to(memory_format=torch.channels_last)
    pixels = torch.randn(case.batch, 3, case.height, case.width, device="cuda").to(memory_format=torch.channels_last)
    compiled = compile_mode != "eager"
    torch._inductor.config.freezing = freezing = args.freezing and compiled
    torch._inductor.config.freezing_discard_parameters = discard = args.discard_parameters and freezing
    torch._inductor.config.allow_buffer_reuse = reuse = not args.no_buffer_reuse
    forward = torch.compile(model, mode=compile_mode) if compiled else model

    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            forward(pixels)

    if args.memory_trace:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        allocated_at_start = torch.cuda.memory_allocated()
    started = time.perf_counter()
    step()  # compile outside the timed region
    torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    if args.memory_trace:
        first_step_events = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
    torch.cuda.reset_peak_memory_stats()
    ms = time_cuda(step, args.warmup, args.iters)
    if args.memory_trace:
        print_memory_peak(allocated_at_start, first_step_events, f"{case.name} b{case.batch} {compile_mode}")
        torch.cuda.memory._record_memory_history(enabled=None)
    if args.profile:
        print_profile(step, f"{case.name} b{case.batch} {case.height}x{case.width} {compile_mode}")
    return {"variant": case.name, "mode": "infer", "batch": case.batch, "size": f"{case.height}x{case.width}",
            "dtype": "bf16", "scan": "triton",
            "compile": compile_mode + ("+freezing" if freezing else "") + ("+discard" if discard else "")
            + ("" if reuse or not compiled else "+no-reuse"), "ms": ms,
            "img_s": case.batch * 1e3 / ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "first_s": first_s}


def print_memory_peak(allocated_at_start, skip_events, title, rows=20):
    """What is allocated at the peak after the first ``skip_events`` events of the recorded allocator trace (the
    compiling step): the blocks allocated while recording, grouped by the line that allocated them (inductor's
    generated code shows its buffer), and what was allocated before recording started."""
    trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    live, current, peak, peak_live = {}, allocated_at_start, -1, {}
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
            current -= event["size"]
        if index >= skip_events and current > peak:
            peak, peak_live = current, dict(live)
    by_line = {}
    for event in peak_live.values():
        frame = next((f for f in event["frames"] if "torchinductor" in f["filename"] or "/torch/" not in f["filename"]),
                     event["frames"][0] if event["frames"] else {"filename": "?", "line": 0, "name": "?"})
        text = linecache.getline(frame["filename"], frame["line"]).strip()[:110]
        key = f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}: {text}"
        count, size = by_line.get(key, (0, 0))
        by_line[key] = (count + 1, size + event["size"])
    recorded = sum(size for _, size in by_line.values())
    print(f"\n### Memory at the peak after the first step, {title}: {peak / 2**30:.3f} GiB "
          f"({recorded / 2**30:.3f} allocated while recording, {(peak - recorded) / 2**30:.3f} before)\n")
    print("| MiB | blocks | allocated by |\n|---|---|---|")
    for key, (count, size) in sorted(by_line.items(), key=lambda item: -item[1][1])[:rows]:
        print(f"| {size / 2**20:,.1f} | {count} | `{key}` |")


def run_dense(args, cases, build_model):
    """Every case (``--variants`` and ``--parts`` filter), each compile mode; a failure is a row."""
    rows = []
    for case in [c for c in cases if (not args.variants_given or c.variant in args.variants)
                 and (not args.parts or c.part in args.parts)]:
        for compile_mode in args.compile_modes:
            try:
                row = dense_case(args, case, build_model, compile_mode)
            except Exception as error:  # report the failure in the table and go on
                row = {"variant": case.name, "compile": compile_mode, "error": f"{type(error).__name__}: {error}"[:300]}
            print(json.dumps(row), flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def print_dense(rows, cases, title):
    """The backbone rows against the original's best (the issues' goal: 1.5x, peak memory no higher)."""
    print(f"\n### {title}, torch {torch.__version__}, bf16 autocast, channels_last\n")
    print("| case | compile | ours img/s (GiB) | original best img/s (GiB) | ratio | goal 1.5x | memory |")
    print("|---|---|---|---|---|---|---|")
    by_name = {case.name: case for case in cases}
    for row in rows:
        case = by_name[row["variant"]]
        if "error" in row or case.original_img_s is None:
            continue
        best = max(range(2), key=lambda i: case.original_img_s[i])
        ratio = row["img_s"] / case.original_img_s[best]
        memory_ok = row["peak_gib"] <= case.original_peak_gib[best]
        print(f"| {row['variant']} b{row['batch']} {row['size']} | {row['compile']} | {row['img_s']:,.0f} "
              f"({row['peak_gib']:.2f}) | {case.original_img_s[best]:,} ({case.original_peak_gib[best]:.2f}, "
              f"{('eager', 'compiled')[best]}) | {ratio:.2f}x | {'yes' if ratio >= 1.5 else '**no**'} | "
              f"{'no higher' if memory_ok else '**higher**'} |")


def run_cpu(args):
    """Eager float32 latency beside timm's convnext_tiny (same batch and resolution, same run, pair by pair);
    with ``--onnx``, exporting T and onnxruntime against eager; with ``--second-size``, compiling at a second
    resolution."""
    import timm

    torch.set_num_threads(args.threads or torch.get_num_threads())
    os.environ[scan.ENV_BACKEND] = "torch"
    convnext = timm.create_model("convnext_tiny").eval()
    rows = []
    for case in args.cpu_cases:  # variant:batch
        variant, batch = case.rsplit(":", 1)
        model, size = build(variant, fold=args.fold)
        pixels = torch.randn(int(batch), 3, size, size)
        with torch.no_grad():
            ms, base_ms, ratio = time_cpu_pairs(lambda: model(pixels), lambda: convnext(pixels), args.cpu_warmup,
                                                args.cpu_iters)
        rows.append({"model": f"MambaVision-{variant}", "batch": int(batch), "size": size, "fold_bn": args.fold,
                     "threads": torch.get_num_threads(), "ms": ms, "img_s": int(batch) * 1e3 / ms, "vs": f"{ratio:.3f}",
                     "baseline": f"convnext_tiny {base_ms:.1f} ms"})
        print(json.dumps(rows[-1]), flush=True)
    if args.onnx:
        rows += cpu_export_rows(args)
    if args.second_size:
        rows += cpu_second_size_rows(args)
    return rows


def cpu_export_rows(args):
    """torch.export and ONNX export of T with dynamic batch, height and width (seconds), then onnxruntime against
    eager PyTorch at batch 1, pair by pair, and the largest difference of their logits at two other sizes."""
    import onnxruntime

    model, size = build("T", fold=args.fold)
    example = torch.randn(2, 3, size, size)
    rows = []
    start = time.perf_counter()
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    torch.export.export(model, (example,), dynamic_shapes={"pixel_values": dims})
    rows.append({"model": "MambaVision-T torch.export (dynamic batch/H/W)", "export_s": time.perf_counter() - start})
    path = Path(args.onnx_path) if args.onnx_path else Path(tempfile.mkdtemp()) / "mambavision-t.onnx"
    start = time.perf_counter()
    torch.onnx.export(model, (example,), path, dynamo=True, input_names=["pixel_values"], output_names=["logits"],
                      dynamic_shapes={"pixel_values": {0: "batch", 2: "height", 3: "width"}}, verbose=False)
    rows.append({"model": "MambaVision-T ONNX export (dynamic batch/H/W)", "export_s": time.perf_counter() - start})
    options = onnxruntime.SessionOptions()  # idle threads sleep, so they take no time from the eager runs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for shape in ((1, 3, size, size), (1, 3, 256, 320), (3, 3, 160, 192)):
        pixels = torch.randn(*shape)
        with torch.no_grad():
            eager = model(pixels).logits
        (logits,) = session.run(["logits"], {"pixel_values": pixels.numpy()})
        row = {"model": "MambaVision-T onnxruntime", "batch": shape[0], "size": f"{shape[2]}x{shape[3]}",
               "max_diff": f"{(torch.from_numpy(logits) - eager).abs().max().item():.1e}"}
        if shape[0] == 1 and shape[2] == size:
            with torch.no_grad():
                ms, base_ms, ratio = time_cpu_pairs(lambda: session.run(["logits"], {"pixel_values": pixels.numpy()}),
                                                    lambda: model(pixels), args.cpu_warmup, args.cpu_iters)
            row.update(ms=ms, vs=f"{ratio:.3f}", baseline=f"eager {base_ms:.1f} ms")
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cpu_second_size_rows(args):
    """Seconds to the first output of T compiled at its size and then at ``--second-size``, and the compiled
    latency: with ``dynamic=False`` (each size its own static graph) and with torch.compile's default (the
    second size recompiles with symbolic sizes)."""
    model, size = build("T", fold=args.fold)
    rows = []
    for dynamic in (False, None):
        torch._dynamo.reset()
        compiled = torch.compile(model, dynamic=dynamic)
        for side in (size, args.second_size):
            pixels = torch.randn(1, 3, side, side)
            with torch.no_grad():
                start = time.perf_counter()
                compiled(pixels)
                first_s = time.perf_counter() - start
                times = []
                for _ in range(args.cpu_iters):
                    start = time.perf_counter()
                    compiled(pixels)
                    times.append((time.perf_counter() - start) * 1e3)
            rows.append({"model": "MambaVision-T", "compile": f"dynamic={dynamic}", "batch": 1, "size": side,
                         "first_s": first_s, "ms": statistics.median(times)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows):
    rows = [r for r in rows if "error" not in r] + [r for r in rows if "error" in r]
    columns = [c for c in ("variant", "model", "mode", "batch", "size", "dtype", "scan", "compile", "fold_bn",
                           "without", "threads", "ms", "img_s", "vs", "baseline", "peak_gib", "first_s", "export_s",
                           "max_diff", "error")
               if any(c in r for r in rows)]

    def cell(value):
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    table = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(v.ljust(w) for v, w in zip(t, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--targets", action="store_true",
                        help="run the speed targets' cases (GPU) and print them against targets and the original")
    parser.add_argument("--ablate", nargs="*", choices=tuple(ABLATIONS),
                        help="with --targets, also run each case without each of our speedups that applies (ratios); "
                             "names: only those")
    parser.add_argument("--segmentation", action="store_true",
                        help="NVIDIA's ADE20K architectures (T, B at 512 batch 16; L3-512 at 640 batch 8), backbone "
                             "alone and with UPerNet; --variants filters; on the CPU: T at 512, batch 1")
    parser.add_argument("--variants", nargs="+", help="T, T2, S, B, L, L2, L2-512, L3-512 or a Hub variant name "
                        "(default T; with --targets, a filter)")
    parser.add_argument("--modes", nargs="+", choices=("infer", "train", "latency"),
                        help="default infer; with --targets, a filter")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["bf16"])
    parser.add_argument("--backends", nargs="+", choices=configuration.SCAN_BACKENDS, default=["triton"])
    parser.add_argument("--compile-modes", nargs="+", default=["eager"],
                        help="eager, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs")
    parser.add_argument("--fold", action="store_true", help="fold BatchNorm into convolutions (inference)")
    parser.add_argument("--freezing", action="store_true",
                        help="compile with inductor's freezing (weights as constants; inference only)")
    parser.add_argument("--discard-parameters", action="store_true",
                        help="with --freezing, drop the float32 parameters once frozen (inductor's "
                             "freezing_discard_parameters: less memory, the eager model is unusable afterwards)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--cpu-cases", nargs="+", default=["T:1", "T:8", "L2-512:1"],
                        help="CPU: variant:batch, each at its resolution beside convnext_tiny")
    parser.add_argument("--cpu-warmup", type=int, default=3)
    parser.add_argument("--cpu-iters", type=int, default=20, help="CPU: timed runs of each model (pairs)")
    parser.add_argument("--onnx", action="store_true",
                        help="CPU: also export T (torch.export, ONNX) and time onnxruntime against eager")
    parser.add_argument("--onnx-path", help="CPU: where --onnx writes the model (default: a temporary folder)")
    parser.add_argument("--second-size", type=int, help="CPU: also compile T at its size, then at this one")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each case")
    parser.add_argument("--detection", action="store_true",
                        help="GPU: NVIDIA's COCO backbones (T, B) at 800x1344 b8 and the detector at 640x640 b16")
    parser.add_argument("--parts", nargs="+", choices=("backbone", "upernet", "detector", "classifier"),
                        help="with --segmentation or --detection: only these parts (default all)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-buffer-reuse", action="store_true",
                        help="--segmentation/--detection: inductor frees each buffer at its last use instead of keeping "
                             "it for a later one of the same size (allow_buffer_reuse=False)")
    parser.add_argument("--memory-trace", action="store_true",
                        help="--segmentation/--detection: print what is allocated at each case's peak (allocator trace)")
    args = parser.parse_args(argv)
    args.variants_given, args.variants = args.variants is not None, args.variants or ["T"]
    args.modes_given, args.modes = args.modes is not None, args.modes or ["infer"]
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        device = torch.cuda.get_device_name()
        if args.segmentation:
            rows = run_dense(args, SEGMENTATION_CASES, build_segmentation)
        elif args.detection:
            rows = run_dense(args, DETECTION_CASES, build_detection)
        elif args.targets:
            results = run_targets(args)
            rows = [row for _, case_rows in results for row in case_rows]
        else:
            rows = run_cuda(args)
    else:
        rows = run_segmentation_cpu(args) if args.segmentation else run_cpu(args)
        device = f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{device}, torch {torch.__version__}")
    print_table(rows)
    if args.device == "cuda" and args.segmentation:
        print_dense(rows, SEGMENTATION_CASES, f"Segmentation backbones on {device}")
    elif args.device == "cuda" and args.detection:
        print_dense(rows, DETECTION_CASES, f"COCO backbones on {device}")
    elif args.device == "cuda" and args.targets:
        print_targets(results, device)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

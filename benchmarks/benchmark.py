"""Throughput, latency and memory of MambaVision, per variant, batch size, dtype, scan backend and mode.

GPU: img/s from CUDA events (median of the timed batches after warm-up), peak memory from the caching
allocator; modes ``infer`` (no_grad), ``train`` (forward + backward + SGD step) and ``latency`` (batch 1).
CPU (``--device cpu``): batch-1 and batch-8 latency beside timm's convnext_tiny in the same run.

    python benchmarks/benchmark.py --variants T S B --modes infer train latency --compile
    python benchmarks/benchmark.py --device cpu
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambavision_tools import model_code  # noqa: E402
from mambavision_tools.variants import VARIANTS  # noqa: E402

modeling = model_code.load("modeling_mambavision")
configuration = model_code.load("configuration_mambavision")
scan = model_code.load("selective_scan")

SHORT_NAMES = {"T": "MambaVision-T-1K", "T2": "MambaVision-T2-1K", "S": "MambaVision-S-1K", "B": "MambaVision-B-1K",
               "L": "MambaVision-L-1K", "L2": "MambaVision-L2-1K"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def time_cpu(step, warmup, iters):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def print_profile(step, title, steps=5, rows=25):
    """The CUDA kernels that take the time, summed over a few steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(f"\n== profile: {title} ({steps} steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def cuda_case(args, variant, mode, dtype_name, backend, compile_mode):
    os.environ[scan.ENV_BACKEND] = backend
    model, size = build(variant, fold=args.fold and mode != "train")
    model = model.cuda().to(memory_format=torch.channels_last)
    batch = {"infer": args.batch_size, "train": args.train_batch_size, "latency": 1}[mode]
    dtype = DTYPES[dtype_name]
    pixels = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    torch._inductor.config.freezing = args.freezing and mode != "train"
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
    step()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    if args.profile:
        print_profile(step, f"{variant} {mode} {dtype_name} {backend} {compile_mode}")
    torch.cuda.reset_peak_memory_stats()
    ms = time_cuda(step, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"variant": variant, "mode": mode, "batch": batch, "dtype": dtype_name, "scan": backend,
            "compile": compile_mode + ("+freezing" if args.freezing and mode != "train" else ""),
            "fold_bn": args.fold and mode != "train", "ms": ms,
            "img_s": batch * 1e3 / ms, "peak_gib": peak}


def run_cuda(args):
    rows = []
    for variant in args.variants:
        for mode in args.modes:
            for dtype_name in args.dtypes:
                for backend in args.backends:
                    for compile_mode in args.compile_modes:
                        try:
                            row = cuda_case(args, variant, mode, dtype_name, backend, compile_mode)
                        except Exception as error:  # report the failure in the table and go on
                            row = {"variant": variant, "mode": mode, "dtype": dtype_name, "scan": backend,
                                   "compile": compile_mode, "error": f"{type(error).__name__}: {error}"[:200]}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        torch.cuda.empty_cache()
    return rows


def run_cpu(args):
    import timm

    torch.set_num_threads(args.threads or torch.get_num_threads())
    os.environ[scan.ENV_BACKEND] = "torch"
    model, size = build("T", fold=args.fold)
    models = {"MambaVision-T": model, "convnext_tiny (timm)": timm.create_model("convnext_tiny").eval()}
    rows = []
    for batch in args.cpu_batch_sizes:
        pixels = torch.randn(batch, 3, size, size)
        for name, net in models.items():
            with torch.no_grad():
                ms = time_cpu(lambda: net(pixels), args.cpu_warmup, args.cpu_iters)
            rows.append({"model": name, "batch": batch, "ms": ms, "img_s": batch * 1e3 / ms,
                         "threads": torch.get_num_threads(), "fold_bn": args.fold and name.startswith("Mamba")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows):
    rows = [r for r in rows if "error" not in r] + [r for r in rows if "error" in r]
    columns = [c for c in ("variant", "model", "mode", "batch", "dtype", "scan", "compile", "fold_bn", "threads",
                           "ms", "img_s", "peak_gib", "error") if any(c in r for r in rows)]

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
    parser.add_argument("--variants", nargs="+", default=["T"], help="T, T2, S, B, L, L2 or a Hub variant name")
    parser.add_argument("--modes", nargs="+", choices=("infer", "train", "latency"), default=["infer"])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["bf16"])
    parser.add_argument("--backends", nargs="+", choices=("torch", "triton", "mamba_ssm"), default=["triton"])
    parser.add_argument("--compile-modes", nargs="+", default=["eager"],
                        help="eager, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs")
    parser.add_argument("--fold", action="store_true", help="fold BatchNorm into convolutions (inference)")
    parser.add_argument("--freezing", action="store_true",
                        help="compile with inductor's freezing (weights as constants; inference only)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--cpu-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cpu-warmup", type=int, default=3)
    parser.add_argument("--cpu-iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each case")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        rows = run_cuda(args)
        device = torch.cuda.get_device_name()
    else:
        rows = run_cpu(args)
        device = f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{device}, torch {torch.__version__}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Scale-out on N GPUs (NCCL): fine-tuning and feature-extraction throughput on 1 GPU and N, and the peak memory
per GPU of FSDP fine-tuning against DDP's for a large variant, printed as one table.

    .venv/bin/python benchmarks/scale_out.py                       # all three, 2 GPUs (about 5 minutes on H200s)
    .venv/bin/python benchmarks/scale_out.py --only train extract --gpus 4
    .venv/bin/python benchmarks/scale_out.py --only fsdp --fsdp-batch-size 8 --gradient-checkpointing

Every case runs examples/finetune.py or examples/extract_features.py under torchrun on random weights of a
variant's architecture (--variant) and random pixels (--synthetic), offline, bf16 autocast; throughput is what the
script measures after its warm-up (training steps 11 on, extraction after a warm-up batch), memory the caching
allocator's peak on each GPU. Work per GPU is the same on 1 GPU and N (N times the images), so the speed-up is
the N-GPU throughput over the 1-GPU one. The goals are issue 12's: training at least 1.85x, extraction 1.9x on 2.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CPU = False  # --cpu: CPU processes instead of GPUs (gloo), to try this script on a machine without them
GOALS = {("train", 2): 1.85, ("extract", 2): 1.9}  # speed-up on 2 GPUs over 1


def torchrun(gpus, script, arguments, log):
    """Run ``examples/script`` on ``gpus`` processes; returns its metrics (dict), or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory() as scratch:
        metrics_file = Path(scratch) / "metrics.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                   str(ROOT / "examples" / script), *map(str, arguments), "--metrics-file", str(metrics_file)]
        command += ["--cpu"] if CPU else []
        print("$ " + " ".join(command[2:]), flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        log.write(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}\n")
        log.flush()
        if result.returncode == 0 and metrics_file.is_file():
            return json.loads(metrics_file.read_text())
    output = result.stdout + result.stderr
    error = "out of memory" if "out of memory" in output.lower() else f"failed (exit {result.returncode}, see the log)"
    print(f"  {error}", flush=True)
    return {"error": error}


def training(gpus, args, log):
    steps = args.train_steps
    return torchrun(gpus, "finetune.py", [
        "--variant", args.variant, "--synthetic", (steps + 1) * args.train_batch_size * gpus,
        "--batch-size", args.train_batch_size, "--max-steps", steps, "--timing-warmup", 10,
        "--logging-steps", steps, "--num-workers", args.num_workers], log)


def extraction(gpus, args, log):
    return torchrun(gpus, "extract_features.py", [
        "--variant", args.variant, "--synthetic", args.extract_images_per_gpu * gpus,
        "--batch-size", args.extract_batch_size], log)


def large_finetuning(gpus, fsdp, args, log):
    steps = args.fsdp_steps
    arguments = ["--variant", args.fsdp_variant, "--synthetic", (steps + 1) * args.fsdp_batch_size * gpus,
                 "--batch-size", args.fsdp_batch_size, "--max-steps", steps, "--timing-warmup", 5,
                 "--logging-steps", steps, "--num-workers", args.num_workers]
    arguments += ["--fsdp"] if fsdp else []
    arguments += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    return torchrun(gpus, "finetune.py", arguments, log)


def row(case, gpus, metrics, speedup=None, goal=None):
    if "error" in metrics:
        return f"| {case} | {gpus} | {metrics['error']} | | | |"
    memory = ", ".join(f"{peak:.1f}" for peak in metrics["peak_memory_gib"] or []) or "-"
    verdict = ""
    if speedup is not None:
        verdict = f"{speedup:.2f}x" + (f" (goal {goal}x: {'met' if speedup >= goal else 'MISSED'})" if goal else "")
    return f"| {case} | {gpus} | {metrics['images_per_second']:,.0f} | {verdict} | {memory} | {metrics['device']} |"


def scaling_rows(task, case, run, gpus, args, log):
    one, many = run(1, args, log), run(gpus, args, log)
    speedup = None
    if "error" not in one and "error" not in many:
        speedup = many["images_per_second"] / one["images_per_second"]
    return [row(case, 1, one), row(case, gpus, many, speedup, GOALS.get((task, gpus)))], {"1": one, str(gpus): many}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU runs (default: 2)")
    parser.add_argument("--only", nargs="+", choices=("train", "extract", "fsdp"), default=("train", "extract", "fsdp"))
    parser.add_argument("--variant", default="MambaVision-T-1K", help="architecture of the throughput cases")
    parser.add_argument("--train-batch-size", type=int, default=128, help="per GPU (default: 128)")
    parser.add_argument("--train-steps", type=int, default=60, help="steps, the first 10 untimed (default: 60)")
    parser.add_argument("--extract-batch-size", type=int, default=256, help="(default: 256)")
    parser.add_argument("--extract-images-per-gpu", type=int, default=51200, help="(default: 51200)")
    parser.add_argument("--fsdp-variant", default="MambaVision-L3-512-21K", help="architecture of the FSDP case")
    parser.add_argument("--fsdp-batch-size", type=int, default=4, help="per GPU (default: 4)")
    parser.add_argument("--fsdp-steps", type=int, default=20, help="steps, the first 5 untimed (default: 20)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in the FSDP and DDP runs")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per GPU (default: 4)")
    parser.add_argument("--log", default="scale_out.log", help="the runs' output (default: scale_out.log)")
    parser.add_argument("--json", help="write every run's metrics to this file")
    parser.add_argument("--cpu", action="store_true", help="processes on the CPU instead of GPUs (a dry run)")
    args = parser.parse_args(argv)
    global CPU
    CPU = args.cpu
    if not args.cpu and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"error: {args.gpus} GPUs asked for, {torch.cuda.device_count()} visible")

    rows, results = [], {}
    with open(args.log, "w") as log:
        if "train" in args.only:
            new, results["train"] = scaling_rows(
                "train", f"fine-tune {args.variant}, batch {args.train_batch_size}/GPU, DDP", training, args.gpus,
                args, log)
            rows += new
        if "extract" in args.only:
            new, results["extract"] = scaling_rows(
                "extract", f"extract {args.variant}, batch {args.extract_batch_size}", extraction, args.gpus, args, log)
            rows += new
        if "fsdp" in args.only:
            checkpointing = ", checkpointing" if args.gradient_checkpointing else ""
            for fsdp in (False, True):
                name = "FSDP" if fsdp else "DDP"
                metrics = large_finetuning(args.gpus, fsdp, args, log)
                if "error" not in metrics and metrics["fsdp"] != fsdp:
                    metrics = {"error": f"ran {'sharded' if metrics['fsdp'] else 'unsharded'}, not as {name}"}
                results[name] = metrics
                case = f"fine-tune {args.fsdp_variant}, batch {args.fsdp_batch_size}/GPU, {name}{checkpointing}"
                rows.append(row(case, args.gpus, metrics))
    print("\n| case (random data, bf16 on GPU) | GPUs | img/s | speed-up | peak memory per GPU (GiB) | device |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

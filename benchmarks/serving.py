"""Requests per second and latency of the Inference Endpoints handler (handler.py) on the CPU.

A folder of MambaVision-T-1K with random weights (the architecture is what costs; nothing is downloaded) is
written by the converter's folder recipe and served by its handler.py, loaded as the inference toolkit loads it.
Requests are JSON bodies as clients send them: one base64 JPEG (224x224 after the processor), or a list of
``--batch`` of them. The toolkit calls the handler one request at a time, so one client thread is its figure;
``--threads`` more clients queue on the handler's lock. Prints requests/s, images/s and p50/p95 latency per case,
with the torch threads and the machine's load average: other processes on the same cores stretch the wall
times, so the CPU time per request (all threads of this process) is printed too, which they do not change much.

    .venv/bin/python benchmarks/serving.py                       # 2 torch threads, as the CI box has
    .venv/bin/python benchmarks/serving.py --torch-threads 16 --requests 100
"""

import argparse
import base64
import importlib.util
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambavision_tools import model_code  # noqa: E402
from mambavision_tools.configs import build_config  # noqa: E402
from mambavision_tools.hub_folder import save_model_folder  # noqa: E402
from mambavision_tools.variants import VARIANTS  # noqa: E402

modeling = model_code.load("modeling_mambavision")


def write_folder(folder, variant):
    with torch.device("meta"):
        model = modeling.MambaVisionModelForImageClassification(build_config(VARIANTS[variant]))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
        for name, buffer in model.named_buffers():
            if "running_var" in name:
                buffer.fill_(1.0)
            elif buffer.is_floating_point():
                buffer.zero_()
    save_model_folder(model.eval(), folder)


def load_handler(folder):
    """handler.py imported as the toolkit imports it (by file, the folder on sys.path)."""
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", Path(folder) / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(folder))


def photo_base64(seed):
    """A 320x240 JPEG of smooth random colour (compresses like a photo), base64-encoded as a JSON body holds it."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def run_case(handler, bodies, threads):
    """(wall seconds, process CPU seconds, per-request latencies) of answering ``bodies`` from ``threads``
    client threads."""
    def timed(body):
        start = time.perf_counter()
        handler(body)
        return time.perf_counter() - start

    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        latencies = list(pool.map(timed, bodies))
    return time.perf_counter() - start, time.process_time() - cpu_start, latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="MambaVision-T-1K")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40, help="timed requests per case (default 40)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="images per batched request (default 8)")
    parser.add_argument("--threads", type=int, default=4, help="client threads of the concurrent cases (default 4)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    images = [photo_base64(seed) for seed in range(args.batch)]
    cases = [("single", 1, {"inputs": images[0]}), (f"batch of {args.batch}", 1, {"inputs": images}),
             ("single", args.threads, {"inputs": images[0]}),
             (f"batch of {args.batch}", args.threads, {"inputs": images})]
    with tempfile.TemporaryDirectory() as scratch:
        write_folder(Path(scratch) / args.variant, args.variant)
        handler = load_handler(Path(scratch) / args.variant)
        print(f"{args.variant}, handler.py on the CPU, {args.torch_threads} torch threads, torch {torch.__version__}, "
              f"load average before {os.getloadavg()[0]:.1f}")
        print("| request | client threads | requests/s | images/s | p50 latency (ms) | p95 latency (ms) "
              "| CPU ms per request |")
        print("|---|---|---|---|---|---|---|")
        for name, threads, body in cases:
            images_per_request = len(body["inputs"]) if isinstance(body["inputs"], list) else 1
            run_case(handler, [body] * args.warmup, threads)
            seconds, cpu_seconds, latencies = run_case(handler, [body] * args.requests, threads)
            p50, p95 = np.percentile(latencies, [50, 95]) * 1000
            rate = args.requests / seconds
            print(f"| {name} | {threads} | {rate:.1f} | {rate * images_per_request:.1f} | {p50:.0f} | {p95:.0f} "
                  f"| {cpu_seconds / args.requests * 1000:.0f} |")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

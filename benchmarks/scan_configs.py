"""Time the Triton selective scan over launch configurations at MambaVision's shapes (CUDA).

Prints, per shape, the median time of each (channels per program, chunk length, warps) for the
inference forward, so INFER_CONFIG can be chosen from data (a chunk length of 1 runs the token-by-token walk). The
inference forward runs at the split count ``infer_config`` gives the shape (column "rule"), or at each of ``--splits``
(a count above length / chunk gives fewer splits). Training shapes (``...-train``) time the forward that saves chunk
states and the backward apart, each captured in a CUDA graph (eager launches made these timings host-bound), per
chunk length: TRAIN_CONFIG's and BACKWARD_CONFIG's choice; each backward config's gradients are checked against the
reference.

    python benchmarks/scan_configs.py
    python benchmarks/scan_configs.py --shapes B-l2-b128-train --configs 16,4,2 8,8,1
    python benchmarks/scan_configs.py --shapes T-seg-l2-b16 T-det-l2-b8 --configs 2,32,1 4,32,1 --splits 1 4 8 16
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambavision_tools import model_code  # noqa: E402

kernels = model_code.load("selective_scan_triton")
reference = model_code.load("selective_scan").selective_scan_sequential

# (sequences, channels, length): at 224x224 each image is one window at levels 2 and 3, so the level-2/3 mixers
# of T, S and B at batch 256 (inference) and 128 (training); the 512x512 variants' levels 2 and 3 (32x32 and
# 16x16 windows) at batch 32; the dense-prediction backbones' levels 2 and 3, each a single padded window:
# segmentation at 512 b16 (64x64, 32x32; L3 at 640 b8) and detection at 800x1344 b8 (112x112, 56x56)
SHAPES = {"T-l2-b256": (256, 160, 196), "T-l3-b256": (256, 320, 49), "B-l2-b256": (256, 256, 196),
          "B-l3-b256": (256, 512, 49), "L2-512-l2-b32": (32, 392, 1024), "L2-512-l3-b32": (32, 784, 256),
          "L3-512-l2-b32": (32, 512, 1024), "L3-512-l3-b32": (32, 1024, 256),
          "T-l2-b128-train": (128, 160, 196), "T-l3-b128-train": (128, 320, 49),
          "S-l2-b128-train": (128, 192, 196), "S-l3-b128-train": (128, 384, 49),
          "B-l2-b128-train": (128, 256, 196), "B-l3-b128-train": (128, 512, 49),
          "T-seg-l2-b16": (16, 160, 4096), "T-seg-l3-b16": (16, 320, 1024), "B-seg-l2-b16": (16, 256, 4096),
          "B-seg-l3-b16": (16, 512, 1024), "L3-seg-l2-b8": (8, 512, 4096), "L3-seg-l3-b8": (8, 1024, 1024),
          "T-det-l2-b8": (8, 160, 12544), "T-det-l3-b8": (8, 320, 3136), "B-det-l2-b8": (8, 256, 12544)}


def inputs(seqs, dim, length, dtype=torch.bfloat16):
    """Laid out as the mixer produces them: u and delta (B, C, L) views of (B, L, C) tokens, B and C views of
    x_proj's output."""
    u = torch.randn(seqs, length, dim, device="cuda", dtype=dtype).transpose(1, 2)
    delta = (torch.randn(seqs, length, dim, device="cuda", dtype=dtype) * 0.5).transpose(1, 2)
    bc = torch.randn(seqs, length, 16, device="cuda", dtype=dtype)
    B, C = bc[..., :8].transpose(1, 2), bc[..., 8:].transpose(1, 2)
    A = -torch.exp(torch.randn(dim, 8, device="cuda"))
    D, bias = torch.randn(dim, device="cuda"), torch.randn(dim, device="cuda") * 0.5
    return [u, delta, A, B, C, D], bias


def time_training(name, tensors, bias, configs):
    """Per chunk length: the forward that saves chunk states, and the backward op, at each (block, warps) of
    ``configs`` with that chunk, CUDA-graph-captured medians in us; prints the best few of each."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    grad = torch.randn(tensors[0].shape, device="cuda")
    want = torch.autograd.grad(reference(*leaves, delta_bias=bias, delta_softplus=True).float(), leaves, grad)
    u, delta, A, B, C, D = tensors
    backward_op = getattr(torch.ops.mambavision, kernels.BACKWARD_OP)
    for chunk in sorted({c[1] for c in configs}):
        states = torch.empty(*u.shape[:2], triton.cdiv(u.shape[2], chunk), A.shape[1], device="cuda")
        forward, backward = {}, {}
        for block, _, warps in (c for c in configs if c[1] == chunk):
            try:
                forward[block, warps] = 1e3 * triton.testing.do_bench_cudagraph(
                    lambda: kernels.scan_forward(u, delta, A, B, C, D, bias, (block, chunk, warps, 1), states),
                    rep=100, return_mode="median")
            except Exception as exc:  # a configuration that does not compile or fit is reported and skipped
                print(f"{name} forward {(block, chunk, warps)}: {type(exc).__name__}: {str(exc)[:120]}")
        kernels.scan_forward(u, delta, A, B, C, D, bias, (16, chunk, 2, 1), states)
        dy = grad.to(u.dtype)
        for block, _, warps in (c for c in configs if c[1] == chunk):
            kernels.TRAIN_CONFIG, kernels.BACKWARD_CONFIG = (16, chunk, 2), (block, warps)
            try:
                got = torch.autograd.grad(kernels.selective_scan_triton(*leaves, delta_bias=bias, delta_softplus=True),
                                          leaves, dy)
                error = max(((g.float() - w).norm() / w.norm()).item() for g, w in zip(got, want))
                assert error < 3e-2, f"wrong gradients, relative error {error}"
                backward[block, warps] = 1e3 * triton.testing.do_bench_cudagraph(
                    lambda: backward_op(u, delta, A, B, C, D, bias, states, dy),
                    rep=100, return_mode="median")
            except Exception as exc:
                print(f"{name} backward {(block, chunk, warps)}: {type(exc).__name__}: {str(exc)[:120]}")
        for kind, times in (("forward saving states", forward), ("backward (block, warps)", backward)):
            best = sorted(times, key=times.get)[:5]
            print(f"{name} {tuple(u.shape)} chunk {chunk:2d} {kind}: " + ", ".join(
                f"{config} {times[config]:.1f} us" for config in best))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--configs", nargs="+", type=lambda c: tuple(int(v) for v in c.split(",")),
                        help="block,chunk,warps triples (default: every block 2-64, chunk 1-32, warps 1-4)")
    parser.add_argument("--splits", nargs="+", type=int,
                        help="split counts for the inference forward (default: infer_config's for the shape)")
    args = parser.parse_args(argv)
    configs = args.configs or [c for c in itertools.product((2, 4, 8, 16, 32, 64), (1, 4, 8, 16, 32), (1, 2, 4))
                               if c[0] * c[1] <= 1024]
    split_counts = args.splits or [None]
    rule = kernels.infer_config  # replaced below by each config in turn
    for name in args.shapes:
        shape = SHAPES[name]
        tensors, bias = inputs(*shape)
        if name.endswith("train"):
            time_training(name, tensors, bias, configs)
            continue
        want = reference(*tensors, delta_bias=bias, delta_softplus=True).float()
        times = {}  # config -> {requested split count or None: (us, splits run)}
        for config, requested in itertools.product(configs, split_counts):
            splits = requested or rule(*shape)[3]
            kernels.infer_config = lambda *shape, config=(*config, splits): config  # every length at this config
            try:
                def step():
                    with torch.no_grad():
                        return kernels.selective_scan_triton(*tensors, delta_bias=bias, delta_softplus=True)
                got = step().float()
                error = ((got - want).norm() / want.norm()).item()
                assert error < 1e-2, f"wrong result, relative error {error}"
                ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                times.setdefault(config, {})[requested] = (ms * 1e3, splits)
            except Exception as exc:  # a configuration that does not compile or fit is reported and skipped
                print(f"{name} {config} splits {splits}: {type(exc).__name__}: {str(exc)[:120]}")
        best = sorted(times, key=lambda config: min(times[config].values()))
        columns = split_counts
        print(f"\n{name} {shape} fwd: best 6 of {len(times)} (block, chunk, warps), "
              f"us by splits")
        print(f"  {'config':>12}" + "".join(f"{'rule' if c is None else c:>14}" for c in columns))
        for config in best[:6]:
            cells = (times[config].get(c) for c in columns)
            print(f"  {str(config):>12}" + "".join(
                f"{'-':>14}" if cell is None else f"{cell[0]:9.1f}" + (f" ({cell[1]:2d})" if c is None else " " * 5)
                for c, cell in zip(columns, cells)))


if __name__ == "__main__":
    main()

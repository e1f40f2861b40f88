"""Would computing fc1's exact GELU inside the matrix product pay? (issue 17, H200)

Kernels: for the MLPs' fc1 shapes, CUDA-graph-replayed microseconds of cuBLAS's linear alone, the model's compiled
path (cuBLAS, then inductor's exact-GELU pass), a persistent TMA Triton GEMM written here with bias + exact GELU in
its epilogue (and with bias only, its GEMM speed), and cuBLASLt's fused GELU epilogue (tanh approximation, not the
model's function), each with its max error against the float64 reference relative to the output's max.

    python benchmarks/gelu_epilogue.py             # kernels
    python benchmarks/gelu_epilogue.py --model T B # also T and B inference (benchmark.py --targets) with the MLP's
                                                   # GELU exact, tanh, and removed: what a free GELU would give

"Removed" computes a different model: it bounds the speed any GELU fusion could reach. Each model run is a process
with its own compiler caches.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"T l2": (50176, 320, 1280), "T l3": (12544, 640, 2560), "B l2": (50176, 512, 2048),  # (tokens, in, out)
          "B l3": (12544, 1024, 4096), "L3-512 l2": (32768, 1024, 4096), "L3-512 l3": (8192, 2048, 8192)}
# block m, n, k, stages, warps, epilogue in two halves: the best of a 36-config sweep (tiles 64-128 x 128-256, 3-4
# stages, 4-8 warps, persistent or one tile a program, Triton's warp_specialize flag, which measured slower on Hopper)
CONFIGS = [(128, 128, 64, 4, 8, False), (128, 128, 64, 4, 8, True), (128, 256, 64, 3, 8, True)]


def kernels():
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def bias_gelu(acc, bias_ptr, n0, WIDTH: tl.constexpr, GELU: tl.constexpr):
        y = acc + tl.load(bias_ptr + n0 + tl.arange(0, WIDTH)).to(tl.float32)[None, :]
        if GELU:  # exact, as nn.GELU(): erf in float32 on the accumulator plus bias
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        return y

    @triton.jit
    def linear_gelu(x_desc, w_desc, out_desc, bias_ptr, M, N, K, PROGRAMS, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALVES: tl.constexpr, GELU: tl.constexpr):
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = 8 * tiles_n  # 8 row tiles share their column tiles (L2 reuse)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=True):
            rows = tl.minimum(tiles_m - tile // group * 8, 8)
            m0 = (tile // group * 8 + tile % group % rows) * BLOCK_M
            n0 = tile % group // rows * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(tl.cdiv(K, BLOCK_K)):
                acc = tl.dot(x_desc.load([m0, k * BLOCK_K]), w_desc.load([n0, k * BLOCK_K]).T, acc)
            if HALVES:  # (BM, BN) -> 2 x (BM, BN / 2): half the epilogue's registers and staging memory at a time
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                out_desc.store([m0, n0], bias_gelu(left, bias_ptr, n0, BLOCK_N // 2, GELU).to(out_desc.dtype))
                out_desc.store([m0, n0 + BLOCK_N // 2],
                               bias_gelu(right, bias_ptr, n0 + BLOCK_N // 2, BLOCK_N // 2, GELU).to(out_desc.dtype))
            else:
                out_desc.store([m0, n0], bias_gelu(acc, bias_ptr, n0, BLOCK_N, GELU).to(out_desc.dtype))

    programs = torch.cuda.get_device_properties(0).multi_processor_count

    def fused(x, w, b, out, config, gelu):
        bm, bn, bk, stages, warps, halves = config
        (m, k), n = x.shape, w.shape[0]
        linear_gelu[(programs,)](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
            TensorDescriptor.from_tensor(out, [bm, bn // 2 if halves else bn]), b, m, n, k, programs, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk, HALVES=halves, GELU=gelu, num_stages=stages, num_warps=warps)
        return out

    def time_us(fn):
        return triton.testing.do_bench_cudagraph(fn, rep=25) * 1e3

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}\n")
    print("| fc1 (tokens, in, out) | cuBLAS alone | compiled + exact GELU | fused exact GELU (bias only) | "
          "vs compiled | cuBLASLt tanh epilogue | errors: compiled / fused (worst config) / tanh |")
    print("|---|---|---|---|---|---|---|")
    for name, (m, k, n) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, device="cuda") * 0.1).to(torch.bfloat16)
        want = F.gelu(x.double() @ w.double().T + b.double())
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: F.gelu(F.linear(x, w, b)))
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        configs = [c for c in CONFIGS if n % c[1] == 0]
        # every output's error first, then the timings without the float64 reference in memory
        errors = [((y.double() - want).abs().max() / want.abs().max()).item()
                  for y in (compiled(x), torch._addmm_activation(b, x, w.t(), use_gelu=True),
                            *(fused(x, w, b, out, c, True).clone() for c in configs))]
        del want
        t_fused, config = min((time_us(lambda: fused(x, w, b, out, c, True)), c) for c in configs)
        t_compiled = time_us(lambda: compiled(x))
        t_tanh = time_us(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
        print(f"| {name} ({m}, {k}, {n}) | {time_us(lambda: F.linear(x, w, b)):.1f} | {t_compiled:.1f} | "
              f"{t_fused:.1f} ({time_us(lambda: fused(x, w, b, out, config, False)):.1f}) | "
              f"{t_compiled / t_fused:.2f}x | {t_tanh:.1f} | {errors[0]:.1e} / {max(errors[2:]):.1e} / "
              f"{errors[1]:.1e} |", flush=True)


def model_run(activation, variants):
    """benchmark.py's inference targets with the MLP's activation replaced (in this process only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchmark

    forward = {"exact": None, "tanh": lambda self, x: self.fc2(F.gelu(self.fc1(x), approximate="tanh")),
               "none": lambda self, x: self.fc2(self.fc1(x))}[activation]
    if forward is not None:
        benchmark.modeling.MambaVisionMLP.forward = forward
    print(f"MLP activation: {activation}", flush=True)
    benchmark.main(["--targets", "--variants", *variants, "--modes", "infer"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", metavar="VARIANT", help="also run these variants' inference targets")
    parser.add_argument("--model-run", choices=("exact", "tanh", "none"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_run:
        return model_run(args.model_run, args.model)
    kernels()
    for activation in ("exact", "tanh", "none") if args.model else ():
        with tempfile.TemporaryDirectory() as caches:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor", TRITON_CACHE_DIR=f"{caches}/triton")
            subprocess.run([sys.executable, __file__, "--model-run", activation, "--model", *args.model], env=env,
                           check=True)


if __name__ == "__main__":
    main()

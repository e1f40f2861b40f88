"""Would FP8 matrix products pay at MambaVision's shapes? Times bf16 ``mm`` against FP8 ``torch._scaled_mm`` (Hopper;
e4m3 inputs, row-wise scales for the activations, column-wise for the weights, bf16 out) and the activations'
quantisation (row amax, scale, cast: one compiled kernel), with the FP8 result's error against bf16.

Issue 17 names an opt-in FP8 path as the one lever for L3-512's bf16 matrix products (28.9-31.5 ms of its ~65 ms
a batch): this measures the kernels before any model code is written. Activations ~ N(0, 1), weights ~ N(0, 0.02).

    python benchmarks/fp8_matmul.py
"""

import torch
import triton.testing

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max

# (tokens, in, out) of the linear layers: L3-512 at 512 b32 (levels 2 and 3; its segmentation at 640 b8 has the same
# token counts), B at 224 b256 (level 2)
SHAPES = {"L3-512 l2 fc1": (32768, 1024, 4096), "L3-512 l2 fc2": (32768, 4096, 1024),
          "L3-512 l2 qkv": (32768, 1024, 3072), "L3-512 l3 fc1": (8192, 2048, 8192),
          "L3-512 l3 fc2": (8192, 8192, 2048), "B l2 fc1": (50176, 512, 2048), "B l2 fc2": (50176, 2048, 512)}


def quantize_rows(x):
    """(rows, K) -> e4m3 values and (rows, 1) float32 scales, each row's amax at the format's largest value."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def main():
    quantize = torch.compile(quantize_rows)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| shape (tokens, in, out) | bf16 mm us | fp8 mm us | quantise us | fp8 total us | speed-up | rel. error |")
    print("|---|---|---|---|---|---|---|")
    for name, (tokens, k, n) in SHAPES.items():
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w8, w_scale = quantize_rows(w)  # weights once, as freezing would: (N, K) e4m3, (N, 1)
        x8, x_scale = quantize(x)
        want = x @ w.t()
        got = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)
        error = ((got.float() - want.float()).norm() / want.float().norm()).item()
        bf16_us = triton.testing.do_bench(lambda: x @ w.t()) * 1e3
        fp8_us = triton.testing.do_bench(
            lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)) * 1e3
        quant_us = triton.testing.do_bench(lambda: quantize(x)) * 1e3
        total = fp8_us + quant_us
        print(f"| {name} ({tokens}, {k}, {n}) | {bf16_us:.1f} | {fp8_us:.1f} | {quant_us:.1f} | {total:.1f} | "
              f"{bf16_us / total:.2f}x | {error:.2e} |", flush=True)


if __name__ == "__main__":
    main()

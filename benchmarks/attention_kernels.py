"""Time scaled_dot_product_attention at MambaVision's window shapes, per kernel and head size (CUDA, bf16).

For each shape (windows, heads, tokens, head size) of the attention levels, the median time of each SDPA backend
that accepts it, with the head size as is and zero-padded to a multiple of 64 (exact: zero dimensions change
neither q.k nor the softmax, and the padded output columns are dropped), so ``ATTENTION_HEAD_PADDING`` can be
chosen from data. Each result is checked against the float32 math backend.

    python benchmarks/attention_kernels.py
    python benchmarks/attention_kernels.py --shapes T-seg-l2 B-seg-l2
"""

import argparse

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

# (windows, heads, tokens, head size): classification at 224 b256 (one window a level), segmentation at 512 b16
# and L3 at 640 b8 with windows (8, 8, 64, 32) (levels 2 and 3 padded to 64x64 and 32x32), detection at 800x1344 b8
# with windows (8, 8, 112, 56)
SHAPES = {"T-224-l2": (256, 8, 196, 40), "S-224-l2": (256, 8, 196, 48), "B-224-l2": (256, 8, 196, 64),
          "T-seg-l2": (16, 8, 4096, 40), "T-seg-l3": (16, 16, 1024, 40), "S-seg-l2": (16, 8, 4096, 48),
          "B-seg-l2": (16, 8, 4096, 64), "B-seg-l3": (16, 16, 1024, 64), "L3-seg-l2": (8, 16, 4096, 64),
          "T-det-l2": (8, 8, 12544, 40), "T-det-l3": (8, 16, 3136, 40), "B-det-l2": (8, 8, 12544, 64)}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    args = parser.parse_args(argv)
    print("| shape | head | default | " + " | ".join(BACKENDS) + " |\n|---|---|---|" + "---|" * len(BACKENDS))
    for name in args.shapes:
        windows, heads, tokens, head = SHAPES[name]
        q, k, v = (torch.randn(windows, heads, tokens, head, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel([SDPBackend.MATH]):
            want = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float())
        for padded in (head, -(-head // 64) * 64):
            pq, pk, pv = (F.pad(t, (0, padded - head)) for t in (q, k, v))
            scale = head ** -0.5  # the unpadded size's scale, as the model passes it

            def attend():
                return F.scaled_dot_product_attention(pq, pk, pv, scale=scale)[..., :head]

            cells = [f"{triton.testing.do_bench(attend, warmup=25, rep=100, return_mode='median') * 1e3:.0f} us"]
            for backend in BACKENDS.values():
                try:
                    with sdpa_kernel([backend]):
                        got = attend()[:1].float()
                        error = ((got - want).norm() / want.norm()).item()
                        assert error < 2e-2, f"relative error {error:.1e}"
                        cells.append(f"{triton.testing.do_bench(attend, warmup=25, rep=100, return_mode='median') * 1e3:.0f} us")
                except Exception as error:  # a backend that refuses the shape
                    cells.append(f"- ({type(error).__name__})")
            print(f"| {name} {SHAPES[name]} | {padded} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

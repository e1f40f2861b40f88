"""Build mamba-ssm's CUDA selective scan from its PyPI sdist for this GPU, to compare against it.

`pip install mamba-ssm` fails on most machines; this compiles only ``csrc/selective_scan`` with
``torch.utils.cpp_extension.load`` (sm_90 by default, about 2.5 minutes with 16 jobs) next to the
unpacked sources, then prints the PYTHONPATH under which ``import mamba_ssm`` finds it.

    python benchmarks/build_mamba_ssm.py mamba_ssm-2.3.2.post1.tar.gz /tmp/mamba_build
    export PYTHONPATH=$(tail -n 1 /tmp/mamba_build/pythonpath)
"""

import argparse
import os
import tarfile
from pathlib import Path

from torch.utils.cpp_extension import load

NVCC_FLAGS = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math"]  # as mamba-ssm's setup.py


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist")
    parser.add_argument("out")
    parser.add_argument("--arch", default="90")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.sdist) as archive:
        archive.extractall(out, filter="data")
    source = next(out.glob("mamba_ssm-*"))
    csrc = source / "csrc" / "selective_scan"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count()))
    load(name="selective_scan_cuda", sources=[str(csrc / "selective_scan.cpp"), *map(str, sorted(csrc.glob("*.cu")))],
         extra_cflags=["-O3", "-std=c++17"],
         extra_cuda_cflags=NVCC_FLAGS + [f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}"],
         build_directory=str(out), verbose=False)
    (out / "pythonpath").write_text(f"{out}:{source}\n")
    print(f"{out}:{source}")


if __name__ == "__main__":
    main()

"""The speed targets' table in benchmarks/benchmark.py names only speedups that --ablate can switch off."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import benchmark  # noqa: E402


def test_every_target_ablation_is_a_known_speedup():
    for target in benchmark.TARGETS:
        assert isinstance(target.ablations, tuple), target.name  # ("freezing") is a string, not a tuple
        assert set(target.ablations) <= set(benchmark.ABLATIONS), target.name

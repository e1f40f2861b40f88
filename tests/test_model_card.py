"""The model card's code blocks and NVIDIA's card snippets run as written on a converted folder (through
tests/readme_check.py: a fresh copy of the repository, offline, the Hub id replaced by a tiny converted folder, the
network image by a local one). A card block that cannot run offline carries readme_check's skip marker."""

import subprocess
import sys

import pytest

import readme_check
from conftest import ROOT
from mambavision_tools.variants import PROJECT_VARIANTS, VARIANTS


def check(*arguments):
    """readme_check.py's outcome lines for ``arguments``; fails with its output if a block failed."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_check.py"), *arguments], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith(("ok", "skip", "FAIL"))]


@pytest.mark.parametrize("variant", ["MambaVision-T-1K", "MambaVision-Digits"])  # a network image; a local one
def test_rendered_card_blocks_run(variant):
    assert variant in VARIANTS or variant in PROJECT_VARIANTS
    outcomes = check("--card", variant)
    assert sum(line.startswith("ok") for line in outcomes) >= 2, outcomes  # classification and features at least


def test_nvidia_card_snippets_run_as_written():
    """``outputs['logits']`` and ``out_avg_pool, features = model(inputs)``, with the shapes NVIDIA's card prints."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_check.py"),
                             str(ROOT / "tests" / "nvidia_card_snippets.md")], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    printed = result.stdout
    assert "Predicted class:" in printed
    assert "Size of the averaged pool features: torch.Size([1, 64])" in printed  # the tiny folder's widths
    assert "Number of stages in extracted features: 4" in printed
    assert "Size of extracted features in stage 1: torch.Size([1, 8, 56, 56])" in printed
    assert "Size of extracted features in stage 4: torch.Size([1, 64, 7, 7])" in printed


def test_card_template_markers_sit_on_blocks():
    text = (ROOT / "model_cards" / "mambavision.md").read_text()
    found = readme_check.blocks(text)
    assert any(block.language == "python" for block in found)
    markers = text.count("<!-- readme-check:")
    assert markers == sum(block.skip is not None for block in found), "a readme-check marker not right above a block"

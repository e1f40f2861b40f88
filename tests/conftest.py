"""Shared test helpers: the model code as a package, the fixtures in ../shared, small configs."""

import json
import os
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file
from timm.data import create_transform

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from mambavision_tools import model_code  # noqa: E402
from mambavision_tools.checkpoints import convert_state_dict  # noqa: E402
from mambavision_tools.configs import config_from_architecture  # noqa: E402
from mambavision_tools.hub_folder import save_model_folder  # noqa: E402

SHARED = Path(os.environ.get("MAMBAVISION_SHARED", ROOT.parent / "shared"))  # the team's reference folder
FIXTURES = SHARED / "fixtures"
REFERENCE = SHARED / "reference"
FIXTURE_NAMES = ("tiny_plain", "tiny_layerscale")
FIXTURE_SIZES = ("224x224", "64x96", "200x152")

modeling = model_code.load("modeling_mambavision")
configuration = model_code.load("configuration_mambavision")

needs_shared = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES} (../shared beside the checkout)"
)
needs_reference = pytest.mark.skipif(
    not REFERENCE.is_dir(), reason=f"reference layouts not found at {REFERENCE} (../shared beside the checkout)"
)


# The test suite's one tiny architecture: mixer and attention blocks at both windowed levels, widths 8-64.
TINY_ARCHITECTURE = dict(depths=[1, 1, 3, 2], num_heads=[1, 1, 2, 4], window_size=[4, 4, 4, 2], dim=8, in_dim=8,
                         mlp_ratio=2.0, drop_path_rate=0.0)


def tiny_config(**overrides):
    """``TINY_ARCHITECTURE`` with a 5-class head; ``overrides`` are further config fields."""
    return configuration.MambaVisionConfig(**{**TINY_ARCHITECTURE, "num_labels": 5, **overrides})


def randomize_batchnorm(model):
    """Non-trivial BatchNorm statistics, so that a lost buffer or train-mode norm shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def save_tiny_folder(folder, config):
    """A converted folder of a random classifier of ``config`` (seed 0, randomized BatchNorm statistics)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(modeling.MambaVisionModelForImageClassification(config))
    save_model_folder(model.eval(), folder)
    return folder


# Pictures for the image processor: square, landscape, portrait, odd sizes and an extreme aspect ratio.
IMAGE_SIZES = [(224, 224), (320, 240), (240, 320), (97, 151), (600, 90)]  # (width, height)


def timm_transform(config, is_training=False):
    """timm's transform built from the config's preprocessing fields, as NVIDIA's model card builds it: resize,
    crop and normalise (eval), or timm's default training augmentation (``is_training``)."""
    return create_transform(input_size=(3, config.image_size, config.image_size), is_training=is_training,
                            mean=config.mean, std=config.std, crop_mode=config.crop_mode, crop_pct=config.crop_pct,
                            interpolation=config.interpolation)


@pytest.fixture
def offline(monkeypatch):
    """Any Hub request raises: everything must come from local files."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def load_fixture(name):
    """(config, transformers-named state dict, expected outputs) of a fixture in the original format."""
    folder = FIXTURES / name
    config = config_from_architecture(json.loads((folder / "architecture.json").read_text()))
    checkpoint = torch.load(folder / "original_checkpoint.pth.tar", map_location="cpu", weights_only=True)
    return config, convert_state_dict(checkpoint["state_dict"]), load_file(folder / "expected_outputs.safetensors")


def assert_close_relative(actual, expected, rel=1e-5, what=""):
    """Relative error against the expected tensor's scale (elementwise, floored at rel * max|expected|)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")

"""Semantic segmentation: NVIDIA's mmseg backbone (per-output norms, its windows) and the UPerNet model, checked
against ../shared/fixtures/seg_tiny_upernet (made with NVIDIA's backbone code and mmsegmentation's heads)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, assert_close_relative, configuration, modeling, needs_shared, tiny_config
from mambavision_tools.configs import config_from_architecture
from mambavision_tools.mmlab import split_backbone

SEG_FIXTURE = FIXTURES / "seg_tiny_upernet"
SEG_SIZES = ("96x128", "64x64")
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def load_seg_fixture():
    """(architecture.json, the checkpoint's state dict, expected outputs) of seg_tiny_upernet."""
    architecture = json.loads((SEG_FIXTURE / "architecture.json").read_text())
    checkpoint = torch.load(SEG_FIXTURE / "original_checkpoint.pth", map_location="cpu", weights_only=True)
    return architecture, checkpoint["state_dict"], load_file(SEG_FIXTURE / "expected_outputs.safetensors")


@needs_shared
def test_backbone_with_output_norms_matches_nvidia_mmseg_backbone():
    architecture, state_dict, expected = load_seg_fixture()
    config = config_from_architecture(architecture["backbone"], out_norm=True, out_features=STAGES)
    backbone = modeling.MambaVisionBackbone(config).eval()
    backbone_weights, _ = split_backbone(state_dict)
    backbone.load_state_dict(backbone_weights, strict=True)
    for size in SEG_SIZES:
        with torch.no_grad():
            maps = backbone(expected[f"input_{size}"]).feature_maps
        for level, feature in enumerate(maps):
            assert_close_relative(feature, expected[f"feature{level}_{size}"], what=f"feature{level} at {size}")


def test_output_norms_are_off_by_default_and_add_only_their_weights():
    plain = modeling.MambaVisionBackbone(tiny_config()).state_dict()
    normed = modeling.MambaVisionBackbone(tiny_config(out_norm=True)).state_dict()
    assert not any("outnorm" in key for key in plain)
    added = set(normed) - set(plain)
    assert added == {f"model.outnorm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert all(normed[f"model.outnorm{i}.weight"].numel() == tiny_config().hidden_sizes[i] for i in range(4))
    norm = modeling.MambaVisionBackbone(tiny_config(out_norm=True)).model.outnorm3
    assert norm.eps == 1e-5


def test_out_norm_must_be_a_bool():
    with pytest.raises(ValueError, match="out_norm"):
        configuration.MambaVisionConfig(out_norm="yes")


@pytest.mark.parametrize("window", [64, 32])
def test_windows_larger_than_the_map_pad_the_map_as_the_original(window):
    """A window larger than the map pads the map up to the window with zeros (the padded tokens take part), so
    the result depends on the window even when one covers the whole map; it is not clipped to the map."""
    config = tiny_config(window_size=[4, 4, 4, window])
    torch.manual_seed(0)
    stage = modeling.MambaVisionStage(config, 3, [0.0, 0.0]).eval()
    x = torch.randn(1, config.hidden_sizes[3], 3, 5)
    with torch.no_grad():
        _, got = stage(x)
        padded = torch.nn.functional.pad(x, (0, window - 5, 0, window - 3))
        tokens = padded.flatten(2).transpose(1, 2)  # one window: (1, window * window, C), row-major
        for block in stage.blocks:
            tokens = block(tokens)
        expected = tokens.transpose(1, 2).reshape(1, -1, window, window)[:, :, :3, :5]
        stage.window = 5  # the clipped window: one 3x5 map padded to 5x5 only
        _, clipped = stage(x)
    torch.testing.assert_close(got, expected)
    assert (got - clipped).abs().max() > 1e-3

"""NVIDIA's published Hub repositories load into this repository's classes without conversion
(``mambavision_tools.nvidia_hub.from_nvidia``), offline: a local folder in their layout is built from the
reference fixtures (``model.safetensors`` holding the original tensors under ``model.``, as
../shared/reference/ARCHITECTURE.md says, and a ``config.json`` of NVIDIA's fields with NVIDIA's ``auto_map``),
and the loaded model must compute what the original code computed."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURE_NAMES, FIXTURES, assert_close_relative, modeling, needs_shared
from mambavision_tools.configs import read_config_file
from mambavision_tools.hub_folder import save_model_folder
from mambavision_tools.nvidia_hub import from_nvidia
from mambavision_tools.report import ConversionError

# NVIDIA's config.json: their config class's fields (the architecture) and their own code in auto_map
NVIDIA_AUTO_MAP = {"AutoConfig": "configuration_mambavision.MambaVisionConfig",
                   "AutoModel": "modeling_mambavision.MambaVisionModel",
                   "AutoModelForImageClassification": "modeling_mambavision.MambaVisionModelForImageClassification"}


def nvidia_layout_folder(name, folder):
    """A folder laid out as NVIDIA's Hub repositories are, holding fixture ``name``; returns its Variant."""
    variant, _ = read_config_file(FIXTURES / name / "architecture.json", name)
    original = torch.load(FIXTURES / name / "original_checkpoint.pth.tar", weights_only=True)["state_dict"]
    folder.mkdir()
    save_file({f"model.{key}": tensor.contiguous() for key, tensor in original.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    fields = {key: variant.architecture[key] for key in ("depths", "num_heads", "window_size", "dim", "in_dim",
                                                         "mlp_ratio", "layer_scale", "layer_scale_conv")}
    config = {"architectures": ["MambaVisionModel"], "auto_map": NVIDIA_AUTO_MAP, "model_type": "mambavision",
              "drop_path_rate": 0.2, "torch_dtype": "float32", "transformers_version": "4.41.2", **fields}
    (folder / "config.json").write_text(json.dumps(config))
    return variant


@needs_shared
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_nvidia_layout_loads_into_our_classes_and_computes_the_original(name, tmp_path):
    variant = nvidia_layout_folder(name, tmp_path / "nvidia")
    classifier = from_nvidia(variant, tmp_path / "nvidia")
    base = from_nvidia(variant, tmp_path / "nvidia", model_class="MambaVisionModel")
    assert type(classifier) is modeling.MambaVisionModelForImageClassification  # this repository's code
    assert classifier.config.crop_pct == variant.crop_pct and classifier.config.num_labels == 10
    expected = load_file(FIXTURES / name / "expected_outputs.safetensors")
    for size in ("64x96",):  # one input size: test_convert.py covers the three for the converted folders
        pixels = expected[f"input_{size}"]
        with torch.no_grad():
            logits = classifier(pixels).logits
            pooled, stage_maps = base(pixels, return_dict=False)
        assert_close_relative(logits, expected[f"logits_{size}"], what=f"{name} logits {size}")
        assert_close_relative(pooled, expected[f"pooled_{size}"], what=f"{name} pooled {size}")
        for i, stage_map in enumerate(stage_maps, start=1):
            assert_close_relative(stage_map, expected[f"stage{i}_{size}"], what=f"{name} stage{i} {size}")
    # and it saves as a complete folder of this repository's code
    save_model_folder(classifier, tmp_path / "ours")
    assert "MambaVisionImageProcessor" in (tmp_path / "ours" / "preprocessor_config.json").read_text()


@needs_shared
def test_refuses_another_architecture_or_missing_weights(tmp_path):
    variant = nvidia_layout_folder("tiny_plain", tmp_path / "nvidia")
    config = json.loads((tmp_path / "nvidia" / "config.json").read_text())
    (tmp_path / "nvidia" / "config.json").write_text(json.dumps({**config, "dim": 32}))
    with pytest.raises(ConversionError, match=r"is not tiny_plain: dim 32 \(the variant's: 16\)"):
        from_nvidia(variant, tmp_path / "nvidia")
    (tmp_path / "nvidia" / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "nvidia" / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "nvidia" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"do not fit tiny_plain: .*missing_keys.*model\.norm\.weight"):
        from_nvidia(variant, tmp_path / "nvidia")

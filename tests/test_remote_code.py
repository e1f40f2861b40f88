"""A saved folder loads through the Auto classes with trust_remote_code (in this process; every other
transformers version: tests/test_compat.py)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from conftest import modeling, randomize_batchnorm, tiny_config
from mambavision_tools.hub_folder import save_model_folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = modeling.MambaVisionModelForImageClassification(tiny_config(layer_scale=0.3, layer_scale_conv=0.2))
    randomize_batchnorm(model.eval())
    folder = tmp_path_factory.mktemp("remote") / "model"
    save_model_folder(model, folder)
    pixels = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        logits = model(pixels).logits
        pooled, stage_maps = modeling.MambaVisionModel.from_pretrained(folder)(pixels, return_dict=False)
    return folder, pixels, logits, pooled


def test_folder_has_code_and_auto_map(saved):
    folder = saved[0]
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoBackbone",
                                       "AutoModelForSemanticSegmentation"}
    assert config["architectures"] == ["MambaVisionModelForImageClassification"]
    for name in ("configuration_mambavision.py", "modeling_mambavision.py", "selective_scan.py"):
        assert (folder / name).is_file()


def test_loads_with_auto_classes(saved):
    folder, pixels, logits, pooled = saved
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "MambaVisionConfig"
    classifier, info = AutoModelForImageClassification.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    backbone, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(classifier.eval()(pixels).logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(backbone.eval()(pixels).pooler_output, pooled, rtol=0, atol=0)

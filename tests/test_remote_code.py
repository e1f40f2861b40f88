"""A saved folder loads through the Auto classes with trust_remote_code, on transformers 5.x and 4.57."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from conftest import ROOT, modeling, randomize_batchnorm, tiny_config
from mambavision_tools.hub_folder import save_model_folder

# transformers 4.57 installed with `pip install --target` (see .ci/run); the check runs it in a subprocess
TF4_SITE = os.environ.get("MAMBAVISION_TF4_SITE", str(ROOT / ".tf457"))


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
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoBackbone"}
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


TF4_SCRIPT = """
import sys, torch, transformers
from transformers import AutoModel, AutoModelForImageClassification
assert transformers.__version__.startswith("4.57"), transformers.__version__
folder, tensors = sys.argv[1], torch.load(sys.argv[2])
classifier, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
backbone, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
with torch.no_grad():
    torch.testing.assert_close(classifier.eval()(tensors["pixels"]).logits, tensors["logits"], rtol=0, atol=0)
    pooled, stage_maps = backbone.eval()(tensors["pixels"], return_dict=False)
    torch.testing.assert_close(pooled, tensors["pooled"], rtol=0, atol=0)
print("ok", transformers.__version__)
"""


@pytest.mark.skipif(not os.path.isdir(TF4_SITE), reason=f"transformers 4.57 not installed at {TF4_SITE} (.ci/run installs it)")
def test_loads_with_transformers_4_57(saved, tmp_path):
    folder, pixels, logits, pooled = saved
    torch.save({"pixels": pixels, "logits": logits, "pooled": pooled}, tmp_path / "tensors.pt")
    env = dict(os.environ, PYTHONPATH=TF4_SITE, HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", TF4_SCRIPT, str(folder), str(tmp_path / "tensors.pt")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok 4.57")

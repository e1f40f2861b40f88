"""MambaVision-Digits, the model trained here: its shipped checkpoint converts and classifies held-out digits
through the pipeline, its card is its own, demo.py (the README's main job) works offline, and the training
script still produces a checkpoint the converter takes."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import pipeline

import digits
import train_digits
from conftest import ROOT, modeling
from convert_checkpoint import main
from mambavision_tools.checkpoints import convert_state_dict
from mambavision_tools.configs import build_config, get_variant, read_config_file
from mambavision_tools.variants import PROJECT_VARIANTS, VARIANTS

VARIANT = PROJECT_VARIANTS[digits.VARIANT]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The shipped checkpoint converted by the converter's command line, verified."""
    folder = tmp_path_factory.mktemp("digits") / digits.VARIANT
    assert main(["--variant", digits.VARIANT, "--checkpoint", str(digits.CHECKPOINT), "--output-dir", str(folder),
                 "--verify"]) == 0
    return folder


def test_shipped_checkpoint_is_a_small_original_checkpoint():
    assert digits.CHECKPOINT.stat().st_size < 4 * 2**20
    checkpoint = torch.load(digits.CHECKPOINT, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"state_dict", "epoch"} and checkpoint["epoch"] == 20
    config = build_config(VARIANT)
    with torch.device("meta"):
        expected = modeling.MambaVisionModelForImageClassification(config).state_dict()
    assert not any(key.startswith(("model.", "module.")) for key in checkpoint["state_dict"])
    assert set(convert_state_dict(checkpoint["state_dict"])) == set(expected)
    # its config file describes the same model through --config
    _, from_file = read_config_file(digits.CONFIG, "x")
    assert from_file.to_dict() == config.to_dict()


def test_variant_is_found_by_name_but_not_among_nvidias():
    assert get_variant(digits.VARIANT) is VARIANT
    assert digits.VARIANT not in VARIANTS  # --all converts NVIDIA's checkpoints
    config = build_config(VARIANT)
    assert config.id2label == {i: str(i) for i in range(10)} and config.label2id == {str(i): i for i in range(10)}


def test_preprocessing_facts_are_the_training_images_own(converted):
    images, _ = digits.load_split("train")
    processor_config = json.loads((converted / "preprocessor_config.json").read_text())["pretrained_cfg"]
    assert processor_config["input_size"] == [3, 64, 64]
    processor = train_digits.image_processor(build_config(VARIANT))
    mean, std = digits.pixel_stats(images, processor)
    np.testing.assert_allclose(processor_config["mean"], mean, atol=train_digits.STATS_TOLERANCE)
    np.testing.assert_allclose(processor_config["std"], std, atol=train_digits.STATS_TOLERANCE)
    stale = dataclasses.replace(VARIANT, mean=(0.5,) * 3)
    with pytest.raises(SystemExit, match="update the entry"):
        train_digits.check_preprocessing(stale, images, processor)


def test_split_is_fixed_and_stratified():
    train_images, train_labels = digits.load_split("train")
    held_out_images, held_out_labels = digits.load_split("held_out")
    assert (len(train_labels), len(held_out_labels)) == (1437, 360)
    assert np.bincount(held_out_labels).min() >= 35  # every digit, about 36 each
    assert held_out_images[0].size == (8, 8) and held_out_images[0].mode == "RGB"
    assert digits.load_split("held_out")[1] == held_out_labels


def test_pipeline_accuracy_on_held_out_split(converted, offline):
    classifier = pipeline("image-classification", model=str(converted), trust_remote_code=True)
    images, labels = digits.load_split("held_out")
    predicted = [top["label"] for top, *_ in classifier(images, top_k=1, batch_size=64)]
    accuracy = np.mean([p == str(label) for p, label in zip(predicted, labels)])
    assert accuracy >= digits.MIN_ACCURACY
    assert f"{accuracy:.1%} of the other 20%" in VARIANT.description  # the card states what the model does


def test_model_card_is_its_own(converted):
    card = ModelCard.load(converted / "README.md")
    assert yaml.safe_load(str(card).split("---")[1]) == card.data.to_dict()
    assert (card.data.license, card.data.license_name) == ("apache-2.0", None)
    assert card.data.model_name == digits.VARIANT and card.data.eval_results is None
    assert VARIANT.description in card.text and "Apache License 2.0" in card.text
    assert "NVIDIA Source Code License" not in card.text and "nvidia/" not in card.text


def test_demo_prints_predictions_with_true_labels(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")  # a fresh cache, no network
    result = subprocess.run([sys.executable, "examples/demo.py", "--output-dir", str(tmp_path / "out"), "--samples", "5"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    predictions = re.findall(r"image +\d+: predicted (\d) \(score [01]\.\d{3}\), true (\d)", result.stdout)
    assert len(predictions) == 5
    assert sum(predicted == true for predicted, true in predictions) >= 4
    correct, total = map(int, re.search(r"held-out accuracy: (\d+)/(\d+)", result.stdout).groups())
    assert total == 360 and correct / total >= digits.MIN_ACCURACY
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_training_script_writes_a_checkpoint_the_converter_takes(tmp_path, capsys):
    metrics = train_digits.train(tmp_path / "trained", epochs=1, max_steps=2)
    assert np.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_accuracy"] <= 1
    checkpoint = tmp_path / "trained" / digits.CHECKPOINT.name
    assert json.loads((tmp_path / "trained" / digits.CONFIG.name).read_text()) == json.loads(digits.CONFIG.read_text())
    status = main(["--variant", digits.VARIANT, "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"),
                   "--verify"])
    assert status == 0, capsys.readouterr().err


def test_readme_and_ci_run_the_demo():
    readme = (ROOT / "README.md").read_text()
    first_block = readme[readme.index("```bash"):readme.index("```\n", readme.index("```bash") + 7)]
    assert "bash scripts/install.sh && .venv/bin/python examples/demo.py" in first_block
    assert ".venv/bin/python -m pytest -q tests" in first_block
    assert ".venv/bin/python examples/demo.py" in (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python examples/train_digits.py" in readme

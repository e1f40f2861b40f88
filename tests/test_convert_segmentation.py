"""Converting NVIDIA's mmsegmentation UPerNet checkpoints: the seg_tiny_upernet fixture end to end, the four
ADE20K variants' layouts, and the refusals (a checkpoint of the other kind, a truncated file, another variant)."""

import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSemanticSegmentation

from conftest import FIXTURES, assert_close_relative, needs_shared
from mambavision_tools import conversion
from mambavision_tools.configs import build_config
from mambavision_tools.variants import SEGMENTATION_VARIANTS, VARIANTS, Variant
from test_convert import assert_refused, run
from test_segmentation import SEG_FIXTURE, SEG_SIZES, load_seg_fixture, seg_fixture_config, segmentation

TINY_SEGMENTATION = "MambaVision-T-1K-UPerNet-ADE20K-512"


@needs_shared
def test_fixture_converts_strictly_and_reproduces_nvidia_outputs(tmp_path):
    architecture, _, expected = load_seg_fixture()
    variant = Variant("seg-tiny", "me/seg-tiny", None, {}, image_size=64, imagenet_labels=False,
                      datasets=("scene_parse_150",), task="semantic-segmentation",
                      results={"miou": 12.5, "params_m": 0.1, "flops_g": 0.1})
    folder = conversion.convert(variant, SEG_FIXTURE / "original_checkpoint.pth", tmp_path / "out",
                                config=seg_fixture_config(architecture), verify=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    for size in SEG_SIZES:
        with torch.no_grad():
            logits = model(expected[f"input_{size}"]).logits
        assert_close_relative(logits, expected[f"logits_{size}"], what=f"converted logits at {size}")
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-segmentation" and card.data.datasets == ["scene_parse_150"]
    assert card.data.eval_results[0].metric_value == 12.5 and card.data.eval_results[0].metric_type == "mean_iou"
    assert 'pipeline("image-segmentation", model="me/seg-tiny", trust_remote_code=True)' in card.text
    assert card.data.license_name == "nvclv1"


@pytest.mark.parametrize("name", sorted(SEGMENTATION_VARIANTS))
def test_segmentation_variant_takes_the_mmseg_layout(name):
    """Each variant's model holds exactly the keys and shapes of an mmseg UPerNet checkpoint of its architecture:
    NVIDIA's backbone with outnorm0-3, UPerHead with 512 channels and the FCN auxiliary head on stage 3 (256)."""
    variant = SEGMENTATION_VARIANTS[name]
    config = build_config(variant)
    assert config.out_norm and config.num_labels == 150 and config.id2label[7] == "bed"
    with torch.device("meta"):
        model = segmentation.MambaVisionForSemanticSegmentation(config)
    keys = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    width = config.hidden_sizes
    assert keys["model.outnorm3.weight"] == (width[3],)
    assert keys["decode_head.classifier.weight"] == (150, 512, 1, 1)
    assert keys["decode_head.bottleneck.conv.weight"] == (512, width[3] + 4 * 512, 3, 3)
    assert keys["auxiliary_head.convs.0.conv.weight"] == (256, width[2], 3, 3)
    assert keys["auxiliary_head.classifier.weight"] == (150, 256, 1, 1)
    assert not any(key.startswith(("model.norm.", "model.head.")) for key in keys)


def tiny_segmentation_argv(checkpoint, out):
    return ["--variant", TINY_SEGMENTATION, "--checkpoint", checkpoint, "--output-dir", out]


@needs_shared
def test_refuses_a_classification_checkpoint_for_a_segmentation_variant(tmp_path, capsys):
    classifier = FIXTURES / "tiny_plain" / "original_checkpoint.pth.tar"
    status, _, err = run(tiny_segmentation_argv(classifier, tmp_path / "out"), capsys)
    assert_refused(status, err, tmp_path, [], "not an mmsegmentation model", TINY_SEGMENTATION)


@needs_shared
def test_refuses_a_segmentation_checkpoint_for_a_classification_variant(tmp_path, capsys):
    argv = ["--variant", "MambaVision-T-1K", "--checkpoint", SEG_FIXTURE / "original_checkpoint.pth",
            "--output-dir", tmp_path / "out"]
    status, _, err = run(argv, capsys)
    assert_refused(status, err, tmp_path, [], "OpenMMLab model", "MambaVision-T-1K")


@needs_shared
def test_refuses_another_variants_segmentation_checkpoint(tmp_path, capsys):
    status, _, err = run(tiny_segmentation_argv(SEG_FIXTURE / "original_checkpoint.pth", tmp_path / "out"), capsys)
    assert_refused(status, err, tmp_path, [], f"does not fit {TINY_SEGMENTATION}", "wrong shape")


@needs_shared
def test_refuses_a_truncated_segmentation_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "truncated.pth"
    data = (SEG_FIXTURE / "original_checkpoint.pth").read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    status, _, err = run(tiny_segmentation_argv(checkpoint, tmp_path / "out"), capsys)
    assert_refused(status, err, tmp_path, ["truncated.pth"], "damaged or truncated")


def test_segmentation_variants_name_nvidia_checkpoints():
    for variant in SEGMENTATION_VARIANTS.values():
        assert variant.checkpoint_url.startswith("https://huggingface.co/nvidia/mamba_vision_160k_ade20k-")
        assert variant.task == "semantic-segmentation" and variant.name not in VARIANTS

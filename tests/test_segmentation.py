"""Semantic segmentation: NVIDIA's mmseg backbone (per-output norms, its windows) and the UPerNet model, checked
against ../shared/fixtures/seg_tiny_upernet (made with NVIDIA's backbone code and mmsegmentation's heads)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, pipeline

from conftest import FIXTURES, model_code, assert_close_relative, configuration, modeling, needs_shared, tiny_config
from mambavision_tools.configs import config_from_architecture
from mambavision_tools.hub_folder import save_model_folder
from mambavision_tools.mmlab import segmentation_state_dict, split_backbone

segmentation = model_code.load("modeling_mambavision_segmentation")
image_seg = model_code.load("image_processing_mambavision_segmentation")
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
    stage = modeling.MambaVisionBackbone(config).model.levels[3].eval()  # initialised as a model is
    x = torch.randn(1, config.hidden_sizes[3], 3, 5)
    with torch.no_grad():
        _, got, _ = stage(x)
        padded = torch.nn.functional.pad(x, (0, window - 5, 0, window - 3))
        tokens = padded.flatten(2).transpose(1, 2)  # one window: (1, window * window, C), row-major
        for block in stage.blocks:
            tokens, _ = block(tokens)
        expected = tokens.transpose(1, 2).reshape(1, -1, window, window)[:, :, :3, :5]
        stage.window = 5  # the clipped window: one 3x5 map padded to 5x5 only
        _, clipped, _ = stage(x)
    torch.testing.assert_close(got, expected)
    assert (got - clipped).abs().max() > 1e-3


def test_last_block_on_the_map_tokens_alone_gives_the_whole_window_gradients():
    """A level whose map fits in one padded window runs its last block for the map's tokens alone (the padded tokens
    still feed that block's keys, values and scan): outputs and gradients, input's and parameters', equal those of the
    whole window's blocks cropped afterwards (float64, so that rounding cannot hide a difference)."""
    config = tiny_config(window_size=[4, 4, 4, 8], depths=[1, 1, 2, 3], layer_scale=0.5)
    torch.manual_seed(0)
    stage = modeling.MambaVisionBackbone(config).model.levels[3].double().train()
    assert stage.padding_crop(3, 5, output_attentions=False) is not None
    x = torch.randn(2, config.hidden_sizes[3], 3, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, config.hidden_sizes[3], 3, 5, dtype=torch.float64)

    def gradients(forward):
        stage.zero_grad()
        x.grad = None
        (forward() * weights).sum().backward()
        return [x.grad] + [p.grad for p in stage.parameters()]

    def whole_window():
        tokens = torch.nn.functional.pad(x, (0, 3, 0, 5)).flatten(2).transpose(1, 2)  # (2, 64, C), row-major
        for block in stage.blocks:
            tokens, _ = block(tokens)
        return tokens.transpose(1, 2).reshape(2, -1, 8, 8)[:, :, :3, :5]

    for got, expected in zip(gradients(lambda: stage(x)[1]), gradients(whole_window)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)




def seg_fixture_config(architecture):
    """The fixture's model as a segmentation ``MambaVisionConfig``: its backbone arguments, per-output norms, and
    its heads' sizes under ``upernet`` (the rest are mmseg's upernet_swin defaults, as in NVIDIA's configs)."""
    decode, auxiliary = architecture["decode_head"], architecture["auxiliary_head"]
    assert decode["pool_scales"] == [1, 2, 3, 6] and auxiliary["num_convs"] == 1 and auxiliary["kernel_size"] == 3
    id2label = {int(k): v for k, v in architecture["id2label"].items()}
    return config_from_architecture(
        architecture["backbone"], out_norm=True, id2label=id2label, image_size=64,
        upernet={"hidden_size": decode["channels"], "auxiliary_in_index": auxiliary["in_index"],
                 "auxiliary_channels": auxiliary["channels"], "auxiliary_concat_input": auxiliary["concat_input"]},
    )


def fixture_model():
    architecture, state_dict, expected = load_seg_fixture()
    model = segmentation.MambaVisionForSemanticSegmentation(seg_fixture_config(architecture))
    model.load_state_dict(segmentation_state_dict(state_dict), strict=True)
    return model.eval(), expected


@needs_shared
def test_segmentation_model_matches_nvidia_mmseg_model():
    model, expected = fixture_model()
    for size in SEG_SIZES:
        pixels = expected[f"input_{size}"]
        with torch.no_grad():
            features = model.model(pixels)[0][1:]
            outputs = {f"feature{i}": feature for i, feature in enumerate(features)}
            outputs["decode_logits"] = model.decode_head(features)
            outputs["aux_logits"] = model.auxiliary_head(features)
            outputs["logits"] = model(pixels).logits
        for name, got in outputs.items():
            assert_close_relative(got, expected[f"{name}_{size}"], what=f"{name} at {size}")


RELOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForSemanticSegmentation
inputs = torch.load(sys.argv[2], weights_only=True)
model, info = AutoModelForSemanticSegmentation.from_pretrained(sys.argv[1], trust_remote_code=True,
                                                               output_loading_info=True)
assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
with torch.no_grad():
    logits = {name: model.eval()(pixels).logits for name, pixels in inputs.items()}
torch.save([type(model).__name__, logits], sys.argv[3])
"""


@pytest.fixture(scope="module")
def fixture_folder(tmp_path_factory):
    model, expected = fixture_model()
    folder = tmp_path_factory.mktemp("seg") / "MambaVision-seg-tiny"
    save_model_folder(model, folder)
    return folder, expected


@needs_shared
def test_saved_folder_reloads_in_a_fresh_process_through_the_auto_class(fixture_folder, tmp_path):
    folder, expected = fixture_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == (
        "modeling_mambavision_segmentation.MambaVisionForSemanticSegmentation")
    torch.save({size: expected[f"input_{size}"] for size in SEG_SIZES}, tmp_path / "pixels.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(folder), str(tmp_path / "pixels.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path, timeout=300)
    name, logits = torch.load(tmp_path / "out.pt", weights_only=True)
    assert name == "MambaVisionForSemanticSegmentation"
    for size in SEG_SIZES:
        assert_close_relative(logits[size], expected[f"logits_{size}"], what=f"reloaded logits at {size}")


@needs_shared
def test_image_processor_gives_mmseg_pixels(fixture_folder):
    folder, expected = fixture_folder
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "MambaVisionSegmentationImageProcessor"
    image = expected["image_rgb_64x64"][0].numpy().astype(np.uint8)
    pixels = processor(image, do_resize=False)["pixel_values"]
    torch.testing.assert_close(pixels, expected["input_64x64"], rtol=0, atol=1e-6)


def test_resize_keeps_the_ratio_within_mmseg_scale():
    processor = image_seg.MambaVisionSegmentationImageProcessor(scale=(2048, 512))
    assert processor.resized_size(375, 500) == (512, 683)  # short side to 512
    assert processor.resized_size(100, 1000) == (205, 2048)  # long side bounded by 2048
    image = Image.fromarray(np.full((30, 40, 3), 200, np.uint8))
    pixels = processor(image)["pixel_values"]
    assert pixels.shape == (1, 3, 512, 683)
    expected = (200 - torch.tensor(processor.mean)) / torch.tensor(processor.std)
    torch.testing.assert_close(pixels[0, :, 100, 100], expected)


def test_post_process_resizes_logits_to_each_image_then_takes_the_arg_max():
    processor = image_seg.MambaVisionSegmentationImageProcessor()
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1, :, :2] = 1  # left half class 1, right half class 0 (a tie: the first class)
    logits[1, 2] = 1
    maps = processor.post_process_semantic_segmentation(SimpleNamespace(logits=logits), target_sizes=[(8, 6), (3, 5)])
    assert [tuple(m.shape) for m in maps] == [(8, 6), (3, 5)]
    # bilinear, half-pixel centres: output column 3 samples input column 1.83, still above zero for class 1
    assert maps[0][:, :4].eq(1).all() and maps[0][:, 4:].eq(0).all() and maps[1].eq(2).all()


def shapes_image(size=(48, 64)):
    """A picture of two shapes on a textured background."""
    rng = np.random.default_rng(0)
    image = rng.integers(60, 120, (*size, 3), dtype=np.uint8)
    image[8:24, 10:30] = (230, 40, 40)
    image[28:44, 36:60] = (40, 40, 230)
    return Image.fromarray(image)


@needs_shared
def test_pipeline_returns_one_named_mask_per_class_present(fixture_folder):
    folder, _ = fixture_folder
    segmenter = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    assert type(segmenter).__name__ == "MambaVisionImageSegmentationPipeline"
    image = shapes_image()
    model = segmentation.MambaVisionForSemanticSegmentation.from_pretrained(folder).eval()
    processor = image_seg.MambaVisionSegmentationImageProcessor.from_pretrained(folder)
    for mode in ("whole", "slide"):
        with torch.no_grad():
            output = model(processor(image)["pixel_values"], inference_mode=mode)
        classes = processor.post_process_semantic_segmentation(output, target_sizes=[image.size[::-1]])[0]
        masks = segmenter(image, inference_mode=mode)
        assert [m["label"] for m in masks] == [model.config.id2label[int(c)] for c in classes.unique()]
        for mask, label in zip(masks, classes.unique()):
            assert mask["mask"].size == image.size
            np.testing.assert_array_equal(np.asarray(mask["mask"]) > 0, (classes == label).numpy())


def test_slide_inference_averages_overlapping_crops_as_mmseg():
    torch.manual_seed(0)
    model = segmentation.MambaVisionForSemanticSegmentation(tiny_config(out_norm=True, upernet={"hidden_size": 16,
                                                            "auxiliary_channels": 8}, image_size=32)).eval()
    pixels = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        got = model(pixels, inference_mode="slide", crop_size=(32, 32), stride=(16, 16)).logits
        crops = [(0, 0), (0, 16), (0, 24), (8, 0), (8, 16), (8, 24)]  # rows 0, 8 (flush); cols 0, 16, 24 (flush)
        total, counts = torch.zeros_like(got), torch.zeros(1, 1, 40, 56)
        for top, left in crops:
            total[:, :, top:top + 32, left:left + 32] += model(pixels[:, :, top:top + 32, left:left + 32]).logits
            counts[:, :, top:top + 32, left:left + 32] += 1
    torch.testing.assert_close(got, total / counts)
    with pytest.raises(ValueError, match="inference_mode"):
        model(pixels, inference_mode="tiles")
    # rows 16-24 and columns 16-40 in no crop (their logits were 0 / 0, NaN): as mmseg, refused, here before any crop
    runs = []
    model.model.register_forward_pre_hook(lambda module, args: runs.append(1))
    with pytest.raises(ValueError, match=r"stride \(40, 40\) leaves pixels out of every \(16, 16\) crop"):
        model(pixels, inference_mode="slide", crop_size=(16, 16), stride=(40, 40))
    assert runs == []


def test_loss_is_mmseg_cross_entropy_with_auxiliary_weight_and_ignored_pixels():
    torch.manual_seed(0)
    config = tiny_config(out_norm=True, upernet={"hidden_size": 16, "auxiliary_channels": 8})
    model = segmentation.MambaVisionForSemanticSegmentation(config).eval()
    pixels = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, config.num_labels, (2, 64, 64))
    labels[:, :10] = 255
    with torch.no_grad():
        output = model(pixels, labels=labels)
        features = model.model(pixels)[0][1:]
        aux = torch.nn.functional.interpolate(model.auxiliary_head(features), size=(64, 64), mode="bilinear")
        keep = labels != 255

        def mmseg_ce(logits):  # sum over the labelled pixels / all pixels
            picked = torch.nn.functional.cross_entropy(logits, labels.clamp(max=config.num_labels - 1),
                                                       reduction="none")
            return (picked * keep).sum() / labels.numel()

        expected = mmseg_ce(output.logits) + 0.4 * mmseg_ce(aux)
    torch.testing.assert_close(output.loss, expected)


def test_bad_head_settings_are_refused():
    with pytest.raises(ValueError, match="unknown `upernet` entries"):
        segmentation.MambaVisionForSemanticSegmentation(tiny_config(upernet={"channels": 8}))
    with pytest.raises(ValueError, match="auxiliary_in_index"):
        segmentation.MambaVisionForSemanticSegmentation(tiny_config(upernet={"auxiliary_in_index": 7}))

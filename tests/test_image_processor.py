"""The image processor: timm's own eval transform (to 1e-6) from preprocessor_config.json, every image mode and
array type as the RGB picture it shows, clear errors for the rest, and the same through both pipelines."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, pipeline

from compat_worker import image_inputs, sample_images
from conftest import IMAGE_SIZES, model_code, save_tiny_folder, timm_transform, tiny_config

image_processing = model_code.load("image_processing_mambavision")
# the preprocessing of two published variants: MambaVision-T2-1K and MambaVision-L3-512-21K
PREPROCESSING = {
    "center": dict(image_size=224, crop_pct=0.98, crop_mode="center"),
    "squash": dict(image_size=512, crop_pct=0.93, crop_mode="squash"),
}
TOLERANCE = dict(rtol=0, atol=1e-6)


def save_folder(folder, **overrides):
    return save_tiny_folder(folder, tiny_config(**{"image_size": 32, "crop_pct": 0.875, **overrides}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("processor") / "MambaVision-tiny")


@pytest.fixture(scope="module")
def processor(folder):
    return AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.mark.parametrize("mode", sorted(PREPROCESSING))
def test_processor_matches_timm_transform(mode, tmp_path, offline):
    folder = save_folder(tmp_path / mode, **PREPROCESSING[mode])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    transform = timm_transform(config)
    images = sample_images(IMAGE_SIZES)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    expected = torch.stack([transform(image) for image in images])
    assert pixels.shape == (len(images), 3, config.image_size, config.image_size)
    torch.testing.assert_close(pixels, expected, **TOLERANCE)


def test_processor_round_trip_and_folder_files(folder, processor, tmp_path):
    assert (folder / "preprocessor_config.json").is_file() and (folder / "image_processing_mambavision.py").is_file()
    assert type(processor).__name__ == "MambaVisionImageProcessor"
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.pretrained_cfg == processor.pretrained_cfg
    assert reloaded.pretrained_cfg["crop_pct"] == 0.875 and reloaded.pretrained_cfg["interpolation"] == "bicubic"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert image_processing.MambaVisionImageProcessor.from_model_config(config).pretrained_cfg == processor.pretrained_cfg


def test_train_transforms_are_timms_training_augmentation(folder, processor):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert repr(processor.train_transforms) == repr(timm_transform(config, is_training=True))
    torch.manual_seed(0)
    sixteen_bit = Image.fromarray(np.asarray(sample_images()[0].convert("L")).astype(np.uint16) * 257)
    augmented = processor.train_transforms(processor.to_rgb_image(sixteen_bit))
    assert augmented.shape == (3, config.image_size, config.image_size)
    assert processor.to_rgb_image(sixteen_bit).tobytes() == sample_images()[0].convert("L").convert("RGB").tobytes()


@pytest.mark.parametrize("kind", sorted(image_inputs(sample_images()[0])))
def test_every_mode_and_array_gives_the_pixels_of_its_rgb_picture(kind, processor):
    """PIL modes (alpha dropped, 16-bit and float scaled), numpy and tensor images: the RGB picture's pixels."""
    image, rgb = image_inputs(sample_images()[0])[kind]
    expected = processor(rgb)["pixel_values"]
    torch.testing.assert_close(processor(image)["pixel_values"], expected, **TOLERANCE)


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(processor):
    """A mid-grey 16-bit image is mid-grey, not white (PIL's own conversion clips 16-bit values to 255)."""
    grey = Image.new("L", (16, 16), 128)
    white = processor(Image.new("L", (16, 16), 255))["pixel_values"]
    for image in (Image.fromarray(np.full((16, 16), 128 * 257, np.uint16)), Image.new("F", (16, 16), 128 / 255),
                  np.full((16, 16), 128 * 257, np.uint16), torch.full((1, 16, 16), 128 / 255)):
        pixels = processor(image)["pixel_values"]
        torch.testing.assert_close(pixels, processor(grey)["pixel_values"], **TOLERANCE)
        assert not torch.allclose(pixels, white)


def test_batches_and_layouts(processor):
    images = sample_images([(40, 30)] * 3)
    arrays = np.stack([np.asarray(image) for image in images])  # (N, H, W, C)
    expected = processor(images)["pixel_values"]
    assert expected.shape[0] == 3
    torch.testing.assert_close(processor(arrays)["pixel_values"], expected, **TOLERANCE)
    torch.testing.assert_close(processor(list(arrays))["pixel_values"], expected, **TOLERANCE)
    tensors = torch.from_numpy(arrays).permute(0, 3, 1, 2)  # (N, C, H, W), uint8
    torch.testing.assert_close(processor(tensors)["pixel_values"], expected, **TOLERANCE)
    # the other layout when the usual one has no channel axis: numpy (C, H, W), tensor (H, W, C)
    torch.testing.assert_close(processor(np.moveaxis(arrays[0], -1, 0))["pixel_values"], expected[:1], **TOLERANCE)
    torch.testing.assert_close(processor(torch.from_numpy(arrays[0]))["pixel_values"], expected[:1], **TOLERANCE)
    assert processor(images, return_tensors="np")["pixel_values"].shape == tuple(expected.shape)


@pytest.mark.parametrize("image, message", [
    (np.full((8, 8, 3), 2.0), r"float images must hold intensities in 0\.\.1, got values in \[2\.0, 2\.0\]"),
    (np.full((8, 8), np.nan, np.float32), r"float images must hold intensities in 0\.\.1"),
    (np.full((8, 8), 300, np.int32), r"int32 image values must lie in 0\.\.255, got \[300, 300\]"),
    (np.zeros((8, 8, 2), np.uint8), r"1, 3 or 4 channels expected, got shape \(8, 8, 2\)"),
    (np.zeros((2, 8, 8, 3, 1), np.uint8), r"an image has 2 or 3 dimensions, got shape"),
    (np.zeros((8, 8), np.complex64), r"unsupported image dtype complex64"),
    ("not-a-file.png", r"expected a PIL image, numpy array or torch tensor, got str"),
    (Image.new("RGB", (0, 0)), r"an image has no pixels, got width x height 0x0"),
    (Image.new("I;16", (5, 0)), r"an image has no pixels, got width x height 5x0"),
    (np.zeros((0, 0, 3), np.uint8), r"an image has no pixels, got width x height 0x0"),
    (torch.zeros(3, 4, 0), r"an image has no pixels, got width x height 0x4"),
])
def test_bad_images_get_one_clear_error(processor, image, message):
    with pytest.raises((ValueError, TypeError), match=message):
        processor(image)


def test_per_call_settings_are_refused_not_ignored(processor):
    with pytest.raises(TypeError, match=r"takes images and return_tensors only, got \['do_resize'\]"):
        processor(sample_images()[0], do_resize=False)


def test_pipelines_take_sixteen_bit_images_and_paths(folder, tmp_path, offline):
    """Through both pipelines a 16-bit image (object or PNG file) is its 8-bit picture; transformers' own loader
    would have clipped it to white."""
    picture = sample_images([(40, 30)])[0].convert("L")
    sixteen_bit = Image.fromarray(np.asarray(picture).astype(np.uint16) * 257)
    sixteen_bit.save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    classify = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    expected = classify(picture, top_k=5)
    assert classify(sixteen_bit, top_k=5) == expected
    assert classify(str(tmp_path / "sixteen.png"), top_k=5) == expected
    assert classify(Image.new("I;16", (40, 30), 65535), top_k=5) == classify(Image.new("L", (40, 30), 255), top_k=5)
    extract = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True)
    features = extract(picture, return_tensors=True)
    torch.testing.assert_close(extract(sixteen_bit, return_tensors=True), features, **TOLERANCE)
    torch.testing.assert_close(extract(str(tmp_path / "sixteen.png"), return_tensors=True), features, **TOLERANCE)

"""MambaVision in the transformers/timm ecosystem: pipelines, Trainer, AutoBackbone with UperNet. References are
timm's own transform and eager outputs. The image processor has tests/test_image_processor.py; torch.compile,
torch.export and ONNX, tests/test_export.py; other transformers versions, tests/test_compat.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import ImageNetInfo
from transformers import (AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification,
                          Trainer, TrainingArguments, UperNetConfig, UperNetForSemanticSegmentation, pipeline)
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

from compat_worker import sample_images
from conftest import IMAGE_SIZES, TINY_ARCHITECTURE, configuration, save_tiny_folder, timm_transform


def tiny_imagenet_config(**overrides):
    """A tiny MambaVision with NVIDIA's default head: 1000 ImageNet classes, named."""
    fields = dict(layer_scale=0.5, layer_scale_conv=0.5, crop_pct=0.875)
    return configuration.MambaVisionConfig(**{**TINY_ARCHITECTURE, **fields, **overrides})


def backbone_from_folder(folder, **kwargs):
    """The folder's AutoBackbone class, loaded from it (``AutoBackbone.from_pretrained`` on transformers 4.57).

    transformers 5.23's ``AutoBackbone.from_pretrained`` asks the Hub whether the name is a repository before
    anything else, so it rejects every local folder (any model type); the class it maps to loads them.
    """
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    backbone_class = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], folder)
    return backbone_class.from_pretrained(folder, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("ecosystem") / "MambaVision-tiny", tiny_imagenet_config())


# ---------------------------------------------------------------------------------------------------------
# Pipelines


def test_image_classification_pipeline(folder, offline):
    classifier = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    transform = timm_transform(model.config)
    imagenet = set(ImageNetInfo().label_descriptions())
    for image in sample_images(IMAGE_SIZES)[:2]:
        predictions = classifier(image, top_k=3)
        with torch.no_grad():
            probabilities = model(transform(image)[None]).logits.softmax(-1)[0]
        top = probabilities.topk(3)
        assert [p["label"] for p in predictions] == [model.config.id2label[i] for i in top.indices.tolist()]
        assert all(p["label"] in imagenet for p in predictions)
        np.testing.assert_allclose([p["score"] for p in predictions], top.values.numpy(), rtol=1e-4, atol=1e-6)


def test_image_feature_extraction_pipeline(folder, offline):
    extractor = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    image = sample_images(IMAGE_SIZES)[1]
    with torch.no_grad():
        pooled = model(timm_transform(model.config)(image)[None]).pooler_output
    features = extractor(image, return_tensors=True)
    assert features.shape == (1, model.config.num_features)
    torch.testing.assert_close(features, pooled, rtol=1e-5, atol=1e-6)
    assert np.allclose(extractor(image, pool=True), pooled.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning


class ColourDataset(torch.utils.data.Dataset):
    """Reddish (label 0) and bluish (label 1) noisy images, through the model's image processor."""

    def __init__(self, processor, size=16, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = [i % 2 for i in range(size)]
        self.images = []
        for label in self.labels:
            base = np.array([200, 40, 40]) if label == 0 else np.array([40, 40, 200])
            pixels = np.clip(base + rng.normal(0, 50, (40, 48, 3)), 0, 255).astype(np.uint8)
            self.images.append(processor(Image.fromarray(pixels))["pixel_values"][0])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def test_head_swap_and_trainer_reduce_loss(folder, tmp_path, offline):
    id2label = {0: "red", 1: "blue"}
    model, info = AutoModelForImageClassification.from_pretrained(
        folder, trust_remote_code=True, id2label=id2label, label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True, output_loading_info=True)
    width = model.config.num_features
    assert {tuple(map(tuple, (s1, s2))) for _, s1, s2 in info["mismatched_keys"]} == {((1000, width), (2, width)),
                                                                                       ((1000,), (2,))}
    assert {key for key, _, _ in info["mismatched_keys"]} == {"model.head.weight", "model.head.bias"}
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    dataset = ColourDataset(processor)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, max_steps=8, learning_rate=3e-3, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=processor)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert after < 0.7 * before, (before, after, losses)

    # the trained folder works in the pipeline with its new labels
    trainer.save_model(tmp_path / "finetuned")
    classifier = pipeline("image-classification", model=str(tmp_path / "finetuned"), trust_remote_code=True)
    assert {p["label"] for p in classifier(sample_images(IMAGE_SIZES)[0])} == {"red", "blue"}


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_multi_label_and_regression_heads(folder, problem_type):
    num_labels = 3 if problem_type == "multi_label_classification" else 1
    model = AutoModelForImageClassification.from_pretrained(
        folder, trust_remote_code=True, num_labels=num_labels, problem_type=problem_type, ignore_mismatched_sizes=True)
    pixels = torch.randn(2, 3, 64, 64)
    labels = torch.rand(2, num_labels) if num_labels > 1 else torch.randn(2)
    output = model(pixels, labels=labels)
    assert output.logits.shape == (2, num_labels)
    if problem_type == "regression":
        expected = F.mse_loss(output.logits.squeeze(-1), labels)
    else:
        expected = F.binary_cross_entropy_with_logits(output.logits, labels)
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert model.model.head.weight.grad.abs().sum() > 0 and model.model.levels[0].blocks[0].conv1.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------
# AutoBackbone and UperNet


def test_auto_backbone_feature_maps(folder):
    backbone, info = backbone_from_folder(folder, out_indices=[0, 2, 4], output_loading_info=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(AutoBackbone.from_config(config, trust_remote_code=True)) is type(backbone)  # auto_map
    assert not info["missing_keys"] and not info["unexpected_keys"]  # a classifier checkpoint loads as it is
    dim = backbone.config.dim
    assert backbone.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert backbone.out_features == ["stem", "stage2", "stage4"] and backbone.channels == [dim, 2 * dim, 8 * dim]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    pixels = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        output = backbone.eval()(pixels, output_hidden_states=True)
        _, stage_maps = model(pixels, return_dict=False)
        stem = model.model.patch_embed(pixels)
    assert type(output).__name__ == "BackboneOutput"
    assert [tuple(f.shape) for f in output.feature_maps] == [(2, dim, 18, 14), (2, 2 * dim, 9, 7), (2, 8 * dim, 3, 2)]
    for got, want in zip(output.feature_maps, (stem, stage_maps[1], stage_maps[3])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(output.hidden_states) == 5
    feature_maps, = backbone(pixels, return_dict=False)
    assert len(feature_maps) == 3

    backbone.out_features = ["stage1", "stage3"]  # re-selecting updates indices and channels
    assert backbone.out_indices == [1, 3] and backbone.channels == [dim, 4 * dim]


def test_backbone_config_fields_are_backwards_compatible_and_validated():
    nvidia_style = {"depths": [1, 3, 8, 4], "num_heads": [2, 4, 8, 16], "window_size": [8, 8, 14, 7], "dim": 80,
                    "in_dim": 32, "mlp_ratio": 4, "drop_path_rate": 0.2, "layer_scale": None,
                    "layer_scale_conv": None, "model_type": "mambavision"}
    config = configuration.MambaVisionConfig.from_dict(nvidia_style)
    assert config.out_features == ["stage4"] and config.out_indices == [4] and config.num_labels == 1000
    reloaded = configuration.MambaVisionConfig.from_dict(tiny_imagenet_config(out_features=["stem", "stage3"]).to_dict())
    assert reloaded.out_features == ["stem", "stage3"] and reloaded.out_indices == [0, 3]
    with pytest.raises(ValueError, match="MambaVisionConfig: out_features must be a subset of stage_names"):
        tiny_imagenet_config(out_features=["stage5"])
    with pytest.raises(ValueError, match="MambaVisionConfig: out_features and out_indices should correspond"):
        tiny_imagenet_config(out_features=["stage1"], out_indices=[2])


@pytest.fixture
def registered_backbone(folder):
    """AutoConfig/AutoBackbone registrations for the remote classes, as the README shows, undone afterwards."""
    backbone = backbone_from_folder(folder, out_indices=[1, 2, 3, 4])
    config_class, backbone_class = type(backbone.config), type(backbone)
    AutoConfig.register("mambavision", config_class, exist_ok=True)
    AutoBackbone.register(config_class, backbone_class, exist_ok=True)
    yield backbone
    CONFIG_MAPPING._extra_content.pop("mambavision", None)  # other tests load the remote code again
    MODEL_FOR_BACKBONE_MAPPING._extra_content.pop(config_class, None)


def test_upernet_with_mambavision_backbone(registered_backbone):
    backbone = registered_backbone
    config = UperNetConfig(backbone_config=backbone.config, hidden_size=16, auxiliary_channels=8, num_labels=3)
    model = UperNetForSemanticSegmentation(config)
    assert type(model.backbone).__name__ == "MambaVisionBackbone"
    model.backbone.load_state_dict(backbone.state_dict())  # the pretrained weights
    pixels, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    output = model(pixels, labels=labels)
    assert output.logits.shape == (2, 3, 64, 64) and torch.isfinite(output.loss)
    output.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing

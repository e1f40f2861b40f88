"""The published MambaVision variants as one data table, for the converter and the model cards.

Each entry holds what a Hub repository needs: the architecture (``MambaVisionConfig`` fields, as in
NVIDIA's model definitions), the pretrained eval preprocessing, where the original checkpoint lives, the
license, and the numbers NVIDIA publishes for it (github.com/NVlabs/MambaVision README). A custom entry
(another architecture, another license) is a ``Variant`` too, and renders the same model card.
"""

from dataclasses import dataclass, field
from typing import Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NVIDIA_LICENSE = {
    "license": "other",
    "license_name": "nvclv1",
    "license_link": "https://github.com/NVlabs/MambaVision/blob/main/LICENSE",
    "title": "NVIDIA Source Code License-NC",
    "terms": (
        "The weights and the model code are NVIDIA's, licensed for non-commercial use only (research and "
        "evaluation). Read the full terms before using the model; for commercial use, contact NVIDIA Research "
        "Licensing (https://www.nvidia.com/en-us/research/inquiries/)."
    ),
}
RESULTS_SOURCE = {"name": "NVlabs/MambaVision", "url": "https://github.com/NVlabs/MambaVision"}
IMAGENET_1K = "ILSVRC/imagenet-1k"
IMAGENET_21K = "ILSVRC/imagenet-21k"


@dataclass(frozen=True)
class Variant:
    """One Hub repository: architecture, preprocessing, original checkpoint, card facts.

    Args:
        name: the Hub model name (``MambaVision-T-1K``), also the card's title.
        repo_id: the Hub repository that publishes it (and holds the original ``checkpoint``).
        checkpoint: file name of the original checkpoint in ``repo_id``, or ``None`` for a custom entry.
        architecture: ``MambaVisionConfig`` architecture fields (and ``id2label``/``label2id`` for a head with
            classes of its own).
        image_size, crop_pct, crop_mode, interpolation, mean, std: the pretrained eval preprocessing.
        imagenet_labels: whether the head predicts the ImageNet-1k classes (names from timm).
        datasets: Hub dataset ids it was trained on (pretraining first).
        description: what the model is, one paragraph of the card.
        results: published ``top1``/``top5`` accuracy (%), ``params_m``, ``flops_g``, ``throughput`` (img/s,
            ``None`` where unpublished), or ``None``.
        license: ``license``/``license_name``/``license_link`` for the card metadata, ``title`` and
            ``terms`` for its text.
        task: ``"image-classification"`` (an original MambaVision checkpoint), ``"semantic-segmentation"`` (an
            mmsegmentation UPerNet checkpoint; ``results`` then hold ``miou``, ``params_m``, ``flops_g``) or
            ``"detection-backbone"`` (an mmdetection detector: its ``backbone.*`` becomes a ``MambaVisionBackbone``
            folder; the detector's neck and heads, which transformers has no equivalent of, are left out).
    """

    name: str
    repo_id: str
    checkpoint: Optional[str]
    architecture: dict
    image_size: int = 224
    crop_pct: float = 1.0
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    imagenet_labels: bool = True
    datasets: tuple = (IMAGENET_1K,)
    description: str = ""
    results: Optional[dict] = None
    license: dict = field(default_factory=lambda: dict(NVIDIA_LICENSE))
    task: str = "image-classification"

    @property
    def checkpoint_url(self):
        """Download address of the original checkpoint."""
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.checkpoint}"

    @property
    def preprocessing(self):
        """The ``MambaVisionConfig`` preprocessing fields."""
        return {"image_size": self.image_size, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}


def _architecture(dim, in_dim, depths, num_heads, window_size, drop_path_rate, layer_scale=None):
    return {"dim": dim, "in_dim": in_dim, "depths": depths, "num_heads": num_heads, "window_size": window_size,
            "mlp_ratio": 4.0, "drop_path_rate": drop_path_rate, "layer_scale": layer_scale, "layer_scale_conv": None}


# NVIDIA's definitions (mamba_vision.py); levels 0-1 are convolutional, their head counts go unused.
TINY = _architecture(80, 32, [1, 3, 8, 4], [2, 4, 8, 16], [8, 8, 14, 7], 0.2)
TINY2 = _architecture(80, 32, [1, 3, 11, 4], [2, 4, 8, 16], [8, 8, 14, 7], 0.2)
SMALL = _architecture(96, 64, [3, 3, 7, 5], [2, 4, 8, 16], [8, 8, 14, 7], 0.2)
BASE = _architecture(128, 64, [3, 3, 10, 5], [2, 4, 8, 16], [8, 8, 14, 7], 0.3, 1e-5)
LARGE = _architecture(196, 64, [3, 3, 10, 5], [4, 8, 16, 32], [8, 8, 14, 7], 0.3, 1e-5)
LARGE2 = _architecture(196, 64, [3, 3, 12, 5], [4, 8, 16, 32], [8, 8, 14, 7], 0.3, 1e-5)
LARGE2_512 = _architecture(196, 64, [3, 3, 12, 5], [4, 8, 16, 32], [8, 8, 32, 16], 0.3, 1e-5)
LARGE3_256 = _architecture(256, 64, [3, 3, 20, 10], [4, 8, 16, 32], [8, 8, 16, 8], 0.5, 1e-5)
LARGE3_512 = _architecture(256, 64, [3, 3, 20, 10], [4, 8, 16, 32], [8, 8, 32, 16], 0.5, 1e-5)

# NVIDIA's ADE20K UPerNet backbones (semantic_segmentation/configs/mamba_vision/*.py): the classifiers'
# architectures with the windows of those configs (larger than the 1/16 and 1/32 maps, which are padded up to them),
# per-output norms, and MambaVision's default drop-path rate (MM_mamba_vision passes the configs' rates on to nothing).
SEGMENTATION_BACKBONE = {"out_norm": True, "drop_path_rate": 0.2}
TINY_SEGMENTATION = {**TINY, **SEGMENTATION_BACKBONE, "window_size": [8, 8, 64, 32]}
SMALL_SEGMENTATION = {**SMALL, **SEGMENTATION_BACKBONE, "window_size": [8, 8, 160, 56]}
BASE_SEGMENTATION = {**BASE, **SEGMENTATION_BACKBONE, "window_size": [8, 8, 64, 32]}
LARGE3_SEGMENTATION = {**LARGE3_512, **SEGMENTATION_BACKBONE, "window_size": [8, 8, 64, 32]}

IN1K = "Trained from scratch on ImageNet-1K at 224x224."
IN21K = ("Pretrained on ImageNet-21K, then fine-tuned on ImageNet-1K at {size}x{size}; it predicts the 1,000 "
         "ImageNet-1K classes.")


def _results(top1, top5, params_m, flops_g, throughput=None):
    return {"top1": top1, "top5": top5, "params_m": params_m, "flops_g": flops_g, "throughput": throughput}


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("MambaVision-T-1K", "nvidia/MambaVision-T-1K", "mambavision_tiny_1k.pth.tar", TINY,
                description=f"The smallest MambaVision. {IN1K}", results=_results(82.3, 96.2, 31.8, 4.4, 6298)),
        Variant("MambaVision-T2-1K", "nvidia/MambaVision-T2-1K", "mambavision_tiny2_1k.pth.tar", TINY2,
                crop_pct=0.98, description=f"MambaVision-T with three more blocks in its third level. {IN1K}",
                results=_results(82.7, 96.3, 35.1, 5.1, 5990)),
        Variant("MambaVision-S-1K", "nvidia/MambaVision-S-1K", "mambavision_small_1k.pth.tar", SMALL,
                crop_pct=0.93, description=f"The small MambaVision. {IN1K}",
                results=_results(83.3, 96.5, 50.1, 7.5, 4700)),
        Variant("MambaVision-B-1K", "nvidia/MambaVision-B-1K", "mambavision_base_1k.pth.tar", BASE,
                description=f"The base MambaVision, with layer scale. {IN1K}",
                results=_results(84.2, 96.9, 97.7, 15.0, 3670)),
        Variant("MambaVision-B-21K", "nvidia/MambaVision-B-21K", "mambavision_base_21k.pth.tar", BASE,
                datasets=(IMAGENET_21K, IMAGENET_1K), description=f"The base MambaVision. {IN21K.format(size=224)}",
                results=_results(84.9, 97.5, 97.7, 15.0)),
        Variant("MambaVision-L-1K", "nvidia/MambaVision-L-1K", "mambavision_large_1k.pth.tar", LARGE,
                description=f"The large MambaVision. {IN1K}", results=_results(85.0, 97.1, 227.9, 34.9, 2190)),
        Variant("MambaVision-L-21K", "nvidia/MambaVision-L-21K", "mambavision_large_21k.pth.tar", LARGE,
                datasets=(IMAGENET_21K, IMAGENET_1K), description=f"The large MambaVision. {IN21K.format(size=224)}",
                results=_results(86.1, 97.9, 227.9, 34.9)),
        Variant("MambaVision-L2-1K", "nvidia/MambaVision-L2-1K", "mambavision_large2_1k.pth.tar", LARGE2,
                description=f"MambaVision-L with two more blocks in its third level. {IN1K}",
                results=_results(85.3, 97.2, 241.5, 37.5, 1021)),
        Variant("MambaVision-L2-512-21K", "nvidia/MambaVision-L2-512-21K", "mambavision_L2_21k_240m_512.pth.tar",
                LARGE2_512, image_size=512, crop_pct=0.93, crop_mode="squash", datasets=(IMAGENET_21K, IMAGENET_1K),
                description=f"MambaVision-L2 with larger windows for high resolution. {IN21K.format(size=512)}",
                results=_results(87.3, 98.4, 241.5, 196.3)),
        Variant("MambaVision-L3-256-21K", "nvidia/MambaVision-L3-256-21K", "mambavision_L3_21k_740m_256.pth.tar",
                LARGE3_256, image_size=256, datasets=(IMAGENET_21K, IMAGENET_1K),
                description=f"The largest MambaVision (740M parameters). {IN21K.format(size=256)}",
                results=_results(87.3, 98.3, 739.6, 122.3)),
        Variant("MambaVision-L3-512-21K", "nvidia/MambaVision-L3-512-21K", "mambavision_L3_21k_740m_512.pth.tar",
                LARGE3_512, image_size=512, crop_pct=0.93, crop_mode="squash", datasets=(IMAGENET_21K, IMAGENET_1K),
                description=f"The largest MambaVision (740M parameters), with larger windows for high resolution. "
                            f"{IN21K.format(size=512)}",
                results=_results(88.1, 98.6, 739.6, 489.1)),
    )
}


# ADE20K's 150 classes, in the order of mmsegmentation's ADE20KDataset (labels 1-150 of the dataset, less one)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat",
    "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
ADE20K = "scene_parse_150"
ADE20K_LABELS = {"id2label": dict(enumerate(ADE20K_CLASSES)),
                 "label2id": {name: index for index, name in enumerate(ADE20K_CLASSES)}}
ADE20K_DESCRIPTION = ("MambaVision-{backbone} with a UPerNet decode head, trained by NVIDIA with mmsegmentation on ADE20K "
                      "(160k iterations, {size}x{size} crops) from the ImageNet classifier {backbone}; it labels every "
                      "pixel with one of ADE20K's 150 classes.")


def _segmentation(backbone, size, architecture, checkpoint, results):
    name = f"mamba_vision_160k_ade20k-{size}x{size}_{checkpoint}"
    return Variant(f"MambaVision-{backbone}-UPerNet-ADE20K-{size}", f"nvidia/{name}", f"{name}.pth",
                   {**architecture, **ADE20K_LABELS}, image_size=size, imagenet_labels=False, task="semantic-segmentation",
                   datasets=(ADE20K,), description=ADE20K_DESCRIPTION.format(backbone=backbone, size=size),
                   results=results)


# NVIDIA's four ADE20K models (semantic_segmentation/README.md): mIoU single scale, parameters (M), FLOPs (G)
SEGMENTATION_VARIANTS = {
    variant.name: variant
    for variant in (
        _segmentation("T-1K", 512, TINY_SEGMENTATION, "tiny", {"miou": 46.0, "params_m": 55, "flops_g": 945}),
        _segmentation("S-1K", 512, SMALL_SEGMENTATION, "small", {"miou": 48.2, "params_m": 84, "flops_g": 1135}),
        _segmentation("B-1K", 512, BASE_SEGMENTATION, "base", {"miou": 49.1, "params_m": 126, "flops_g": 1342}),
        _segmentation("L3-512-21K", 640, LARGE3_SEGMENTATION, "l3_21k", {"miou": 53.2, "params_m": 780,
                                                                        "flops_g": 3670}),
    )
}


# Models this project trains (weights in checkpoints/): converted with --variant like NVIDIA's, not part of --all.
DIGIT_LABELS = [str(digit) for digit in range(10)]
DIGITS = {**_architecture(16, 16, [1, 1, 2, 2], [1, 1, 2, 4], [8, 8, 4, 2], 0.0),
          "id2label": dict(enumerate(DIGIT_LABELS)), "label2id": {label: i for i, label in enumerate(DIGIT_LABELS)}}
PROJECT_LICENSE = {
    "license": "apache-2.0",
    "license_link": "https://www.apache.org/licenses/LICENSE-2.0",
    "title": "Apache License 2.0",
    "terms": "These weights were trained from scratch by this project (train_digits.py); no NVIDIA weights are "
             "involved.",
}

PROJECT_VARIANTS = {
    variant.name: variant
    for variant in (
        # 64x64 inputs leave 4x4 tokens at level 2 and 2x2 at level 3: one window each
        Variant("MambaVision-Digits", "MambaVision-Digits", None, DIGITS, image_size=64, mean=(0.3093,) * 3,
                std=(0.3490,) * 3, imagenet_labels=False, datasets=(), license=PROJECT_LICENSE,
                description="A tiny MambaVision trained from scratch on scikit-learn's handwritten digits (its copy "
                            "of the UCI ML hand-written digits test set: 8x8 grayscale scans of the digits 0-9, "
                            "upscaled to 64x64 by the image processor), so that the whole path from an original "
                            "checkpoint to a pipeline runs offline. Trained with transformers' Trainer "
                            "(train_digits.py: 20 epochs, about a minute on 2 CPU cores) on a fixed stratified 80% of"
                            " the 1,797 images, it classifies 99.4% of the other 20% (360 images) correctly. A "
                            "demonstration, not a general digit reader: it knows white-on-black 8x8 scans."),
    )
}


# NVIDIA's COCO Cascade Mask R-CNN checkpoints (object_detection/README.md, configs/mamba_vision/*_3x_coco.py): their
# backbones, with the detection configs' windows (8, 8, 112, 56) and per-output norms ("ln2d"), all four maps out.
COCO_LICENSE = {
    "license": "cc-by-nc-sa-4.0",
    "license_link": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
    "title": "CC-BY-NC-SA-4.0",
    "terms": "NVIDIA shares its COCO-trained models under CC-BY-NC-SA-4.0 (non-commercial; derivatives under the same "
             "license). The model code is NVIDIA's, under the NVIDIA Source Code License-NC "
             "(https://github.com/NVlabs/MambaVision/blob/main/LICENSE). COCO's images have their own terms of use "
             "(https://cocodataset.org/#termsofuse).",
}
DETECTION_WINDOWS = [8, 8, 112, 56]
ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]
COCO = "detection-datasets/coco"
COCO_DESCRIPTION = (
    "The backbone of NVIDIA's Cascade Mask R-CNN {size} (MambaVision-{size}-1K, then trained with the detector on COCO "
    "2017 for 36 epochs by mmdetection; the full detector reaches {box} box mAP and {mask} mask mAP on COCO val2017). "
    "transformers has no Cascade Mask R-CNN: this folder holds the backbone alone (the four stage maps, each through "
    "its output LayerNorm), a starting point for a detection head (examples/finetune_detection.py puts it under "
    "transformers' Deformable DETR). Converted from the backbone.* tensors of {checkpoint}.")


def _coco_backbone(size, architecture, box, mask):
    repo = f"nvidia/cascade_mask_rcnn_mamba_vision_{size}_3x_coco"
    checkpoint = f"cascade_mask_rcnn_mamba_vision_{size}_3x_coco.pth"
    letter = size[0].upper()
    return Variant(f"MambaVision-{letter}-COCO-backbone", repo, checkpoint,
                   {**architecture, "out_norm": True, "drop_path_rate": 0.2, "window_size": DETECTION_WINDOWS,
                    "out_features": ALL_STAGES},
                   imagenet_labels=False, datasets=(IMAGENET_1K, COCO), license=dict(COCO_LICENSE), task="detection-backbone",
                   description=COCO_DESCRIPTION.format(size=letter, box=box, mask=mask, checkpoint=checkpoint))


# not part of --all (their own command line: --variant)
DETECTION_VARIANTS = {
    variant.name: variant
    for variant in (
        _coco_backbone("tiny", TINY, 51.1, 44.3),
        _coco_backbone("small", SMALL, 52.3, 45.2),
        _coco_backbone("base", BASE, 52.8, 45.7),
    )
}

"""MambaVision under transformers' Deformable DETR: an object detector that saves, reloads and serves as remote code.

Deformable DETR is the head because it is the detection head that every supported transformers release (4.40 to
5.x) has, with the same constructor and a pure-PyTorch multi-scale deformable attention on any device (RT-DETR
appeared in 4.44); it takes several feature levels (MambaVision's stage maps at strides 8, 16 and 32) and, unlike
DETR, converges in tens of epochs rather than hundreds, which is what fine-tuning on a small set needs.

transformers builds a head's backbone with ``load_backbone`` (``AutoBackbone.from_config(config.backbone_config)``),
which knows only its own model types: the detector registers ``MambaVisionBackbone`` for ``MambaVisionConfig``
before building the head (``HeadOnMambaVisionBackbone``, shared with the instance-segmentation model), so a saved
detector loads in a fresh process with ``AutoModelForObjectDetection.from_pretrained(repo,
trust_remote_code=True)`` and nothing for the user to register. The folder's image processor is transformers' own
``DeformableDetrImageProcessor`` (resize, normalise, pad; ``post_process_object_detection``).
"""

from transformers import (
    AutoImageProcessor,
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    ObjectDetectionPipeline,
)

from .compatibility_mambavision import LegacyGammaLoading
from .configuration_mambavision import MambaVisionConfig, head_backbone_config
from .modeling_mambavision import HeadOnMambaVisionBackbone

# Files travel with this one: for a local folder, transformers < 5.10 copies into its module cache only the relative
# imports written in the file it loads, so every file that the backbone imports is named here (see modeling_mambavision)
from .selective_scan import selective_scan  # noqa: F401

try:
    from .selective_scan_triton import selective_scan_triton  # noqa: F401
except ImportError:  # no triton, or a torch without custom ops: the scan falls back
    pass

# The maps the head reads: strides 8, 16 and 32 (Deformable DETR adds a fourth level, stride 64, by a conv)
DETECTION_OUT_FEATURES = ["stage2", "stage3", "stage4"]

try:  # transformers >= 5.1 renamed Deformable DETR's modules and maps checkpoints by model type, which skips
    # remote code: the same renames under this class's name keep every folder in the layout of 4.x and 5.0
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    _RENAMES = get_checkpoint_conversion_mapping("deformable_detr")
except ImportError:
    _RENAMES = None

try:  # transformers >= 4.46 picks a model's loss by its class name, which would give this class DETR's
    from transformers.loss.loss_utils import LOSS_MAPPING

    DEFORMABLE_DETR_LOSS = LOSS_MAPPING["DeformableDetrForObjectDetection"]
except (ImportError, KeyError):  # earlier: Deformable DETR's forward computes its own loss
    DEFORMABLE_DETR_LOSS = None


class MambaVisionDetectionConfig(DeformableDetrConfig):
    r"""Deformable DETR's configuration with a MambaVision backbone (``backbone_config``, a ``MambaVisionConfig``
    or its dict; default: MambaVision-T's architecture returning ``DETECTION_OUT_FEATURES``).

    The deformable attention runs its pure-PyTorch path (``disable_custom_kernels``, default True): the same
    numbers on every device and release, and ``torch.compile`` sees it. Other arguments are
    ``DeformableDetrConfig``'s.
    """

    model_type = "mambavision_deformable_detr"
    sub_configs = {"backbone_config": MambaVisionConfig}  # transformers 4.x: how to_dict/from_dict treat it
    sub_configs_defaults = {"backbone_config": MambaVisionConfig}  # transformers 5.x

    def __init__(self, backbone_config=None, disable_custom_kernels=True, **kwargs):
        backbone_config = head_backbone_config(backbone_config, DETECTION_OUT_FEATURES, kwargs)
        super().__init__(backbone_config=backbone_config, use_timm_backbone=False, use_pretrained_backbone=False,
                         backbone=None, disable_custom_kernels=disable_custom_kernels, **kwargs)

    @property
    def custom_pipelines(self):
        """``pipeline("object-detection", model=<folder or repo>, trust_remote_code=True)`` runs
        ``MambaVisionObjectDetectionPipeline`` (a fresh dict on each read: transformers rewrites it in place)."""
        return {"object-detection": {"impl": "modeling_mambavision_detection.MambaVisionObjectDetectionPipeline",
                                     "pt": ["AutoModelForObjectDetection"], "type": "image"}}


class MambaVisionForObjectDetection(LegacyGammaLoading, HeadOnMambaVisionBackbone, DeformableDetrForObjectDetection):
    """transformers' ``DeformableDetrForObjectDetection`` on ``MambaVisionBackbone``: same inputs (``pixel_values``,
    ``pixel_mask``, ``labels``), outputs and loss. The backbone computes exactly what ``MambaVisionBackbone`` does
    (its own BatchNorms, frozen statistics in training: ``HeadOnMambaVisionBackbone``)."""

    config_class = MambaVisionDetectionConfig
    backbone_out_features = DETECTION_OUT_FEATURES

    if DEFORMABLE_DETR_LOSS is not None:

        @property
        def loss_function(self):
            """Deformable DETR's loss (sigmoid focal classification, L1 and GIoU boxes, Hungarian matching)."""
            return DEFORMABLE_DETR_LOSS


if _RENAMES:
    register_checkpoint_conversion_mapping(MambaVisionForObjectDetection.__name__, _RENAMES, overwrite=True)


class MambaVisionObjectDetectionPipeline(ObjectDetectionPipeline):
    """transformers' object-detection pipeline, with the folder's image processor loaded where transformers
    (< 4.55) loads none for remote code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = AutoImageProcessor.from_pretrained(self.model.config.name_or_path)


# save_pretrained writes this file's code and the auto_map: what transformers registers when an Auto class loads the
# model, except on 4.46 to 4.52 (see modeling_mambavision), and what a model built here needs
MambaVisionDetectionConfig.register_for_auto_class()
MambaVisionForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")

__all__ = ["MambaVisionDetectionConfig", "MambaVisionForObjectDetection", "MambaVisionObjectDetectionPipeline"]

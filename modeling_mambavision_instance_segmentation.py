"""MambaVision under transformers' Mask2Former: an instance-segmentation model that saves, reloads and serves as
remote code.

Mask2Former is the mask head that every supported transformers release (4.40 to 5.x) has, with the same modules
and a pure-PyTorch multi-scale deformable attention in its pixel decoder; it reads four feature levels, which are
MambaVision's stage maps at strides 4, 8, 16 and 32. The model is transformers' ``Mask2FormerForUniversalSegmentation``
with ``MambaVisionBackbone`` in its pixel-level module (``HeadOnMambaVisionBackbone``), so a saved folder loads in a
fresh process with ``AutoModelForUniversalSegmentation.from_pretrained(repo, trust_remote_code=True)``. The folder's
image processor is transformers' own ``Mask2FormerImageProcessor`` (resize, normalise, pad; the labels' masks for
training; ``post_process_instance_segmentation``), and ``pipeline("image-segmentation", ...)`` returns one mask per
instance with its label name and score.
"""

import torch
from transformers import AutoImageProcessor, ImageSegmentationPipeline, Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

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

# The maps the pixel decoder reads: strides 4 (its mask features), 8, 16 and 32 (its deformable encoder)
INSTANCE_OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]


class MambaVisionMask2FormerConfig(Mask2FormerConfig):
    r"""Mask2Former's configuration with a MambaVision backbone (``backbone_config``, a ``MambaVisionConfig`` or its
    dict; default: MambaVision-T's architecture returning ``INSTANCE_OUT_FEATURES``). Other arguments are
    ``Mask2FormerConfig``'s (``feature_strides`` must be the strides of the backbone's maps: 4, 8, 16, 32)."""

    model_type = "mambavision_mask2former"
    backbones_supported = ["mambavision"]  # Mask2Former warns about any other backbone type
    sub_configs = {"backbone_config": MambaVisionConfig}  # transformers 4.x: how to_dict/from_dict treat it
    sub_configs_defaults = {"backbone_config": MambaVisionConfig}  # transformers 5.x

    def __init__(self, backbone_config=None, **kwargs):
        backbone_config = head_backbone_config(backbone_config, INSTANCE_OUT_FEATURES, kwargs)
        super().__init__(backbone_config=backbone_config, use_timm_backbone=False, use_pretrained_backbone=False,
                         backbone=None, **kwargs)

    @property
    def custom_pipelines(self):
        """``pipeline("image-segmentation", model=<folder or repo>, trust_remote_code=True)`` runs
        ``MambaVisionInstanceSegmentationPipeline`` (a fresh dict on each read: transformers rewrites it in place)."""
        return {"image-segmentation": {
            "impl": "modeling_mambavision_instance_segmentation.MambaVisionInstanceSegmentationPipeline",
            "pt": ["AutoModelForUniversalSegmentation"], "type": "image"}}


class MambaVisionMask2FormerLoss(Mask2FormerLoss):
    """transformers' Mask2Former loss with Mask2Former's own mask count on N processes: the mask and dice terms are
    divided by all processes' masks over N (each process's share, as the original's ``all_reduce`` then division by
    the world size). transformers averages the processes' counts (accelerate's ``reduce``, a mean) and divides by N
    once more (every release of 4.40 to 5.x), so its mask terms came out about N times too large while its class
    term, not normalised by the count, stayed."""

    def get_num_masks(self, class_labels, device):
        count = torch.as_tensor(float(sum(len(classes) for classes in class_labels)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return torch.clamp(count, min=1)


class MambaVisionForUniversalSegmentation(LegacyGammaLoading, HeadOnMambaVisionBackbone,
                                          Mask2FormerForUniversalSegmentation):
    """transformers' ``Mask2FormerForUniversalSegmentation`` on ``MambaVisionBackbone``: same inputs
    (``pixel_values``, ``pixel_mask``; for the loss ``mask_labels``, a (instances, height, width) float tensor per
    image, and ``class_labels``, their class indices), outputs and loss (Hungarian matching; cross entropy, mask
    BCE and dice on sampled points, on every decoder layer; on N processes normalised as Mask2Former does:
    ``MambaVisionMask2FormerLoss``). The backbone computes exactly what
    ``MambaVisionBackbone`` does (its own BatchNorms, frozen statistics in training: ``HeadOnMambaVisionBackbone``).
    """

    config_class = MambaVisionMask2FormerConfig
    backbone_out_features = INSTANCE_OUT_FEATURES

    def __init__(self, config):
        super().__init__(config)
        self.criterion = MambaVisionMask2FormerLoss(config=config, weight_dict=self.weight_dict)


class MambaVisionInstanceSegmentationPipeline(ImageSegmentationPipeline):
    """transformers' image-segmentation pipeline answering with instances (``subtask="instance"`` unless asked for
    ``"semantic"`` or ``"panoptic"``): one mask per instance, with its label name and score. It loads the folder's
    image processor where transformers (< 4.55) loads none for remote code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = AutoImageProcessor.from_pretrained(self.model.config.name_or_path)

    def postprocess(self, model_outputs, subtask="instance", **kwargs):
        return super().postprocess(model_outputs, subtask=subtask, **kwargs)


# save_pretrained writes this file's code and the auto_map: what transformers registers when an Auto class loads the
# model, except on 4.46 to 4.52 (see modeling_mambavision), and what a model built here needs
MambaVisionMask2FormerConfig.register_for_auto_class()
MambaVisionForUniversalSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")

__all__ = ["MambaVisionMask2FormerConfig", "MambaVisionForUniversalSegmentation",
           "MambaVisionInstanceSegmentationPipeline"]

"""MambaVision's image processor: timm's own eval transform, stored in ``preprocessor_config.json``.

transformers' ``TimmWrapperImageProcessor`` already builds the transform from a timm ``pretrained_cfg``
(``timm.data.resolve_data_config`` + ``create_transform``), so resize, crop_pct/crop_mode, interpolation and
normalisation are exactly timm's. It reads and writes that cfg in ``config.json`` only (timm's Hub layout);
this subclass keeps it in the standard ``preprocessor_config.json`` so ``AutoImageProcessor`` and the
pipelines load it from a model folder next to the model's own config.
"""

from transformers import TimmWrapperImageProcessor
from transformers.utils import IMAGE_PROCESSOR_NAME


class MambaVisionImageProcessor(TimmWrapperImageProcessor):
    """``TimmWrapperImageProcessor`` that saves and loads ``preprocessor_config.json``."""

    _auto_class = "AutoImageProcessor"  # save_pretrained writes this file's code and the auto_map

    def __init__(self, pretrained_cfg, **kwargs):
        super().__init__(pretrained_cfg, **kwargs)
        self.pretrained_cfg = pretrained_cfg  # the parent keeps only the resolved data_config

    @classmethod
    def from_model_config(cls, config):
        """The processor of a ``MambaVisionConfig``: its image size, crop, interpolation, mean and std."""
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else [config.image_size] * 2
        pretrained_cfg = {
            "input_size": [config.num_channels, *size],
            "interpolation": config.interpolation,
            "mean": list(config.mean),
            "std": list(config.std),
            "crop_pct": config.crop_pct,
            "crop_mode": config.crop_mode,
        }
        return cls(pretrained_cfg=pretrained_cfg)

    @classmethod
    def get_image_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        kwargs.setdefault("image_processor_filename", IMAGE_PROCESSOR_NAME)
        return super().get_image_processor_dict(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        # skips TimmWrapperImageProcessor's override, which saves nothing
        return super(TimmWrapperImageProcessor, self).save_pretrained(*args, **kwargs)

    def to_dict(self):
        output = super().to_dict()
        output.pop("data_config", None)  # derived from pretrained_cfg when loading
        return output


__all__ = ["MambaVisionImageProcessor"]

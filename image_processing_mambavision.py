"""MambaVision's image processor: timm's own eval transform, stored in ``preprocessor_config.json``.

The transform is built by timm from a ``pretrained_cfg`` (``timm.data.resolve_data_config`` +
``create_transform``), so resize, crop_pct/crop_mode, interpolation and normalisation are exactly timm's. It is
a plain ``BaseImageProcessor``, so ``AutoImageProcessor`` and the pipelines load it from a model folder on every
transformers version (transformers' own ``TimmWrapperImageProcessor`` appeared in 4.48 and keeps its settings
in ``config.json``).

Every input becomes an 8-bit RGB PIL image first, as timm's transform expects:

- PIL images of any mode: alpha dropped (``RGBA``, ``LA``, ``P`` with transparency), grey levels, palettes,
  ``1`` and ``CMYK`` converted by PIL; 16-bit modes (``I;16*``, and ``I``, which is how PIL opens 16-bit PNGs)
  scaled from 0..65535, ``F`` taken as intensities in 0..1.
- numpy arrays (``HxW``, ``HxWxC``; ``CxHxW`` when the last axis is not 1, 3 or 4 channels) and torch tensors
  (``CxHxW``, ``HxW``; ``HxWxC`` when the first axis is not 1, 3 or 4 channels), alone or as a batch (a list,
  or one more leading axis), with 1, 3 or 4 channels: ``uint8`` and ``bool`` as they are, ``uint16`` scaled from
  0..65535, floats in 0..1, other integers in 0..255; anything else is refused with a one-line error.

So an image gives the same pixels whatever mode or type it arrives in. The pipelines convert PIL images to RGB
with PIL before the processor sees them, which turns a 16-bit image white: ``MambaVisionImageClassificationPipeline``
and ``MambaVisionImageFeatureExtractionPipeline`` (declared in the config's ``custom_pipelines``) hand images to
this processor's conversion first.
"""

import os

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config
from transformers import ImageClassificationPipeline, ImageFeatureExtractionPipeline
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
CHANNEL_COUNTS = (1, 3, 4)


class MambaVisionImageProcessor(BaseImageProcessor):
    """timm's eval transform of a ``pretrained_cfg``; ``train_transforms`` is timm's training augmentation.

    Args:
        pretrained_cfg: timm's data settings: ``input_size`` ([3, H, W]), ``interpolation``, ``mean``, ``std``,
            ``crop_pct``, ``crop_mode``.
    """

    model_input_names = ["pixel_values"]
    _auto_class = "AutoImageProcessor"  # save_pretrained writes this file's code and the auto_map

    def __init__(self, pretrained_cfg, **kwargs):
        super().__init__(**kwargs)
        self.pretrained_cfg = dict(pretrained_cfg)
        self.data_config = resolve_data_config(pretrained_cfg=self.pretrained_cfg)

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

    @property
    def val_transforms(self):
        """timm's eval transform (built on use: it is cheap, and the processor stays plain data to save)."""
        return create_transform(**self.data_config, is_training=False)

    @property
    def train_transforms(self):
        """timm's training augmentation (random resized crop, flip, colour jitter) for the same settings."""
        return create_transform(**self.data_config, is_training=True)

    @staticmethod
    def to_rgb_image(image):
        """One image of any accepted kind -> the 8-bit RGB PIL image that ``val_transforms`` and
        ``train_transforms`` take (what ``preprocess`` does first; use it before ``train_transforms``)."""
        return to_rgb_image(image)

    def preprocess(self, images, return_tensors="pt", **kwargs):
        """An image or a batch of images (see the module docstring for what is accepted) -> ``pixel_values``,
        (batch, 3, H, W) float32. The settings are the saved ``pretrained_cfg``'s; none can be changed per call."""
        if kwargs:
            raise TypeError(f"MambaVisionImageProcessor takes images and return_tensors only, got {sorted(kwargs)}; "
                            "change preprocessing through pretrained_cfg")
        transform = self.val_transforms
        pixels = torch.stack([transform(to_rgb_image(image)) for image in _as_list(images)])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

    def to_dict(self):
        output = super().to_dict()
        output.pop("data_config", None)  # derived from pretrained_cfg when loading
        return output


def _as_list(images):
    """A single image or a batch (list/tuple, 4-D array or tensor) -> a list of images."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def to_rgb_image(image):
    """Any single image a user may pass (PIL of any mode, numpy array, torch tensor) -> an 8-bit RGB PIL image."""
    if isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image)
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        array = (array.float() if array.dtype in (torch.float16, torch.bfloat16) else array).numpy()
        rgb = _array_to_rgb(array, channels_first=True)
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image, channels_first=False)
    else:
        raise TypeError(
            f"MambaVisionImageProcessor: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}"
        )
    if 0 in rgb.size:  # the resize would divide by the shorter side
        raise ValueError(
            f"MambaVisionImageProcessor: an image has no pixels, got width x height {rgb.width}x{rgb.height}"
        )
    return rgb


def _pil_to_rgb(image):
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:  # I;16B arrays are big-endian, I arrays int32: native uint16 / int64
        array = np.asarray(image).astype(np.int64 if image.mode == "I" else np.uint16)
        return _array_to_rgb(array, channels_first=False, sixteen_bit=True)
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image), channels_first=False)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL wants palette transparency resolved through RGBA
    try:
        return image.convert("RGB")  # drops alpha; greys, palettes, 1-bit and CMYK by PIL's own rules
    except ValueError as error:
        raise ValueError(
            f"MambaVisionImageProcessor: cannot convert a PIL image of mode {image.mode!r} to RGB: {error}"
        ) from None


def _array_to_rgb(array, channels_first, sixteen_bit=False):
    """A numpy image (HxW, HxWxC or CxHxW; see ``to_rgb_image`` for the layout rule) -> 8-bit RGB PIL image."""
    if array.ndim == 3:
        first, last = array.shape[0] in CHANNEL_COUNTS, array.shape[-1] in CHANNEL_COUNTS
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(
                f"MambaVisionImageProcessor: an image with 1, 3 or 4 channels expected, got shape {array.shape}"
            )
        array = array[..., :3] if array.shape[-1] == 4 else array  # alpha dropped
        array = array[..., 0] if array.shape[-1] == 1 else array
    elif array.ndim != 2:
        raise ValueError(f"MambaVisionImageProcessor: an image has 2 or 3 dimensions, got shape {array.shape}")
    return Image.fromarray(_to_uint8(array, sixteen_bit)).convert("RGB")


def _to_uint8(array, sixteen_bit=False):
    """Pixel values in the dtype's usual range -> uint8: 16-bit scaled from 0..65535, floats from 0..1."""
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if kind == "f":
        if not np.isfinite(array).all() or array.min(initial=0) < 0 or array.max(initial=0) > 1:
            raise ValueError(
                "MambaVisionImageProcessor: float images must hold intensities in 0..1, got values in "
                f"[{array.min()}, {array.max()}] (divide 8-bit values by 255, or pass uint8)"
            )
        return np.rint(array * 255).astype(np.uint8)
    if kind in "iu":
        full = 65535 if sixteen_bit or array.dtype == np.uint16 else 255
        if array.min(initial=0) < 0 or array.max(initial=0) > full:
            raise ValueError(
                f"MambaVisionImageProcessor: {array.dtype} image values must lie in 0..{full}, got "
                f"[{array.min()}, {array.max()}] (pass uint16 for 16-bit images)"
            )
        return (np.rint(array / 257.0) if full == 65535 else array).astype(np.uint8)
    raise ValueError(f"MambaVisionImageProcessor: unsupported image dtype {array.dtype}")


def _open_local(image):
    """A pipeline input -> an RGB PIL image by ``to_rgb_image`` (a local path opened in its own mode, orientation
    applied), so transformers' loader, which converts with PIL and clips 16-bit images, gets 8-bit RGB already.
    URLs and other strings are left to that loader."""
    if isinstance(image, str) and os.path.isfile(image):
        image = ImageOps.exif_transpose(Image.open(image))
    if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        return to_rgb_image(image)
    return image


class _MambaVisionPipelineMixin:
    """What the folder's pipelines add to transformers' own: inputs converted by ``to_rgb_image``, and the
    processor built from the model's config where transformers (< 4.55) loads none for remote code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = MambaVisionImageProcessor.from_model_config(self.model.config)

    def preprocess(self, image, *args, **kwargs):
        return super().preprocess(_open_local(image), *args, **kwargs)


class MambaVisionImageClassificationPipeline(_MambaVisionPipelineMixin, ImageClassificationPipeline):
    """``pipeline("image-classification", model=folder_or_repo, trust_remote_code=True)``."""


class MambaVisionImageFeatureExtractionPipeline(_MambaVisionPipelineMixin, ImageFeatureExtractionPipeline):
    """``pipeline("image-feature-extraction", model=folder_or_repo, trust_remote_code=True)``.

    ``stages=True`` adds each stage map averaged over its positions: ``{"features": <what the pipeline returns
    otherwise>, "stages": [(1, C_i) for the four levels]}``, as lists (tensors with ``return_tensors=True``).
    The maps are read from ``hidden_states``: the pipeline splits a batch's outputs per image by key, and
    ``hidden_states`` is the tuple of maps it knows to split.
    """

    def _sanitize_parameters(self, stages=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if stages is not None:
            forward_params["output_hidden_states"] = postprocess_params["stages"] = stages
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, output_hidden_states=False):
        return self.model(**model_inputs, output_hidden_states=output_hidden_states)

    def postprocess(self, model_outputs, stages=False, **kwargs):
        features = super().postprocess(model_outputs, **kwargs)
        if not stages:
            return features
        stage_maps = model_outputs["hidden_states"][1:]  # the stem's output comes first
        pooled = [stage_map.float().mean(dim=(2, 3)) for stage_map in stage_maps]  # (1, C_i, H_i, W_i) -> (1, C_i)
        return {"features": features,
                "stages": pooled if kwargs.get("return_tensors") else [p.tolist() for p in pooled]}

__all__ = [
    "MambaVisionImageProcessor", "MambaVisionImageClassificationPipeline", "MambaVisionImageFeatureExtractionPipeline"
]

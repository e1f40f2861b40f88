"""The image processor and pipeline of MambaVision's semantic segmentation: mmsegmentation's test preprocessing.

NVIDIA's ADE20K models are tested on the image resized keeping its ratio to fit ``scale`` (long side at most
``scale[0]``, short side at most ``scale[1]``: (2048, 512) at 512, (2560, 640) at 640), as 8-bit pixels, then
normalised on the 0-255 scale by mean [123.675, 116.28, 103.53] and std [58.395, 57.12, 57.375] (RGB), unpadded.
mmseg resizes with OpenCV's bilinear filter, which this processor computes with ``torch.nn.functional.interpolate``
(bilinear, half-pixel centres, no antialiasing), rounded back to 8 bits as mmseg keeps it: a pixel may differ from
OpenCV's by one level (OpenCV interpolates in fixed point). Inputs are converted as the classification processor
converts them (``to_rgb_image``: any PIL mode, numpy arrays and tensors).
"""

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ImageSegmentationPipeline
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .image_processing_mambavision import _as_list, _open_local, to_rgb_image


class MambaVisionSegmentationImageProcessor(BaseImageProcessor):
    """mmseg's test preprocessing; ``post_process_semantic_segmentation`` gives each image's class map.

    Args:
        scale: (long side, short side) bounds of mmseg's keep-ratio ``Resize``.
        mean, std: per-channel normalisation on the 0-255 scale (RGB).
        do_resize: resize as mmseg's test pipeline (off: the image's own size).
    """

    model_input_names = ["pixel_values"]
    _auto_class = "AutoImageProcessor"  # save_pretrained writes this file's code and the auto_map

    def __init__(self, scale=(2048, 512), mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                 do_resize=True, **kwargs):
        super().__init__(**kwargs)
        self.scale = list(scale)
        self.mean = list(mean)
        self.std = list(std)
        self.do_resize = do_resize

    @classmethod
    def from_model_config(cls, config):
        """The processor of a segmentation ``MambaVisionConfig``: short side ``image_size`` (long side at most four
        times it, as mmseg's ADE20K pipelines), its mean and std on the 0-255 scale."""
        return cls(scale=[4 * config.image_size, config.image_size], mean=[round(m * 255, 6) for m in config.mean],
                   std=[round(s * 255, 6) for s in config.std])

    def resized_size(self, height, width):
        """mmcv's ``rescale_size`` for a keep-ratio resize within ``scale``: (height, width)."""
        factor = min(max(self.scale) / max(height, width), min(self.scale) / min(height, width))
        return int(height * factor + 0.5), int(width * factor + 0.5)

    def output_size(self, height, width, do_resize=None):
        """The (height, width) that ``preprocess`` gives an image of this size."""
        resize = self.do_resize if do_resize is None else do_resize
        return self.resized_size(height, width) if resize else (height, width)

    def resize(self, image, do_resize=None):
        """An image of any accepted kind -> (3, H', W') uint8 tensor, resized as mmseg's test pipeline."""
        pixels = torch.from_numpy(np.array(to_rgb_image(image))).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        size = self.output_size(*pixels.shape[1:], do_resize)
        if size == tuple(pixels.shape[1:]):
            return pixels
        resized = F.interpolate(pixels[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        return resized.round().clamp(0, 255).to(torch.uint8)

    def normalize_pixels(self, pixels):
        """(3, H, W) 0-255 values -> float32 ``(x - mean) / std``."""
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (pixels.float() - mean) / std

    def preprocess(self, images, return_tensors="pt", do_resize=None):
        """An image or a batch -> ``pixel_values`` (batch, 3, H, W) float32. Images of a batch must come out of the
        resize with one size (mmseg tests one image at a time, unpadded)."""
        pixels = [self.normalize_pixels(self.resize(image, do_resize)) for image in _as_list(images)]
        sizes = sorted({tuple(p.shape[1:]) for p in pixels})
        if len(sizes) > 1:
            raise ValueError(f"MambaVisionSegmentationImageProcessor: the images resize to different sizes {sizes}; "
                             "pass them one at a time (as mmseg tests) or resize them to one size first")
        return BatchFeature({"pixel_values": torch.stack(pixels)}, tensor_type=return_tensors)

    def post_process_semantic_segmentation(self, outputs, target_sizes=None):
        """Model outputs -> one (height, width) map of class indices per image: the logits resized bilinearly to
        ``target_sizes[i]`` (each image's original (height, width), as mmseg resizes to the original shape),
        then the arg max. Without ``target_sizes``, at the logits' size."""
        logits = outputs.logits
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"post_process_semantic_segmentation: {len(target_sizes)} target sizes for "
                             f"{len(logits)} images")
        maps = []
        for index, image_logits in enumerate(logits):
            if target_sizes is not None:
                size = tuple(int(s) for s in target_sizes[index])
                image_logits = F.interpolate(image_logits[None].float(), size=size, mode="bilinear",
                                             align_corners=False)[0]
            maps.append(image_logits.argmax(dim=0))
        return maps


class MambaVisionImageSegmentationPipeline(ImageSegmentationPipeline):
    """``pipeline("image-segmentation", model=folder_or_repo, trust_remote_code=True)``: one mask per class present.

    Call arguments beside transformers' own: ``inference_mode`` (``"whole"`` or ``"slide"``), ``crop_size`` and
    ``stride`` (for ``"slide"``), passed to the model.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:  # transformers < 4.55 loads none for remote code
            self.image_processor = MambaVisionSegmentationImageProcessor.from_model_config(self.model.config)

    def _sanitize_parameters(self, inference_mode=None, crop_size=None, stride=None, **kwargs):
        preprocess_params, _, postprocess_params = super()._sanitize_parameters(**kwargs)
        forward_params = {name: value for name, value in
                          (("inference_mode", inference_mode), ("crop_size", crop_size), ("stride", stride))
                          if value is not None}
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, *args, **kwargs):
        return super().preprocess(_open_local(image), *args, **kwargs)

    def _forward(self, model_inputs, **forward_params):
        target_size = model_inputs.pop("target_size")
        model_outputs = self.model(**model_inputs, **forward_params)
        model_outputs["target_size"] = target_size
        return model_outputs


__all__ = ["MambaVisionSegmentationImageProcessor", "MambaVisionImageSegmentationPipeline"]

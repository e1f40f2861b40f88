"""MambaVision + UPerNet semantic segmentation, as NVIDIA's ADE20K models (mmsegmentation) build it.

The backbone is NVIDIA's ``MM_mamba_vision``: the MambaVision encoder with a LayerNorm on each stage map
(``config.out_norm``) and the windows of its segmentation configs. The heads are transformers' UperNet modules, which
compute what mmsegmentation's ``UPerHead`` and ``FCNHead`` compute (same layers, same bilinear resizes), with the
settings of mmseg's ``upernet_swin`` base that NVIDIA's configs inherit. They are read from ``config.upernet`` (a dict
under transformers' ``UperNetConfig`` names, missing entries taken from ``UPERNET_DEFAULTS``).
"""

import inspect
from types import SimpleNamespace

import torch.nn.functional as F
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

from .modeling_mambavision import MambaVisionEncoder, MambaVisionPreTrainedModel

# Files travel with this one: for a local folder, transformers < 5.10 copies into its module cache only the relative
# imports written in the file it loads, so the model files' own imports are named here too (see modeling_mambavision).
from .compatibility_mambavision import is_compiling  # noqa: F401
from .configuration_mambavision import MambaVisionConfig  # noqa: F401
from .selective_scan import selective_scan  # noqa: F401

try:
    from .selective_scan_triton import selective_scan_triton  # noqa: F401
except ImportError:  # no triton, or a torch without custom ops: the scan falls back
    pass

# mmseg's configs/_base_/models/upernet_swin.py (decode head: 512 channels, pool scales 1/2/3/6; auxiliary FCN head on
# stage 3 with 256 channels, one 3x3 conv, loss weight 0.4), and mmseg's ignore index 255
UPERNET_DEFAULTS = {
    "hidden_size": 512,
    "pool_scales": [1, 2, 3, 6],
    "use_auxiliary_head": True,
    "auxiliary_in_index": 2,
    "auxiliary_channels": 256,
    "auxiliary_num_convs": 1,
    "auxiliary_concat_input": False,
    "auxiliary_loss_weight": 0.4,
    "loss_ignore_index": 255,
}
# mmseg's test_cfg modes: the whole image at once, or overlapping crops whose logits are averaged
INFERENCE_MODES = ("whole", "slide")


def upernet_settings(config):
    """The heads' settings: ``config.upernet`` over ``UPERNET_DEFAULTS``, checked, with the class count, as the
    attribute namespace transformers' heads read (ValueError naming the entry)."""
    given = getattr(config, "upernet", None) or {}
    unknown = sorted(set(given) - set(UPERNET_DEFAULTS))
    if unknown:
        raise ValueError(f"MambaVisionConfig: unknown `upernet` entries {unknown}; known: {sorted(UPERNET_DEFAULTS)}")
    settings = {**UPERNET_DEFAULTS, **given}
    for name in ("hidden_size", "auxiliary_channels"):
        if not _is_int(settings[name]) or settings[name] <= 0:
            raise ValueError(f"MambaVisionConfig: upernet `{name}` must be a positive integer, got {settings[name]!r}")
    if not settings["pool_scales"] or not all(_is_int(s) and s > 0 for s in settings["pool_scales"]):
        raise ValueError(f"MambaVisionConfig: upernet `pool_scales` must be positive integers, got "
                         f"{settings['pool_scales']!r}")
    if settings["auxiliary_in_index"] not in range(len(config.hidden_sizes)):
        raise ValueError(f"MambaVisionConfig: upernet `auxiliary_in_index` must be a stage index 0-3, got "
                         f"{settings['auxiliary_in_index']!r}")
    if config.num_labels < 2:
        raise ValueError(f"MambaVisionConfig: segmentation needs at least 2 classes, got num_labels={config.num_labels}")
    in_channels = config.hidden_sizes[settings["auxiliary_in_index"]]
    return SimpleNamespace(**settings, num_labels=config.num_labels, auxiliary_in_channels=in_channels)


def auxiliary_head(settings, in_channels):
    """transformers' FCN head on stage ``auxiliary_in_index``: it takes the stage widths from 4.4x on, and reads
    ``auxiliary_in_channels`` (set by ``upernet_settings``) on every version."""
    if "in_channels" in inspect.signature(UperNetFCNHead.__init__).parameters:
        return UperNetFCNHead(settings, in_channels, in_index=settings.auxiliary_in_index)
    return UperNetFCNHead(settings, in_index=settings.auxiliary_in_index)


class MambaVisionForSemanticSegmentation(MambaVisionPreTrainedModel):
    """MambaVision with a UPerNet decode head and an auxiliary FCN head (used for the loss only).

    ``logits`` are the decode head's, resized bilinearly to the input (mmseg's ``encode_decode``). With ``labels``
    (batch, H, W), the loss is mmseg's: cross entropy of the decode logits plus ``auxiliary_loss_weight`` times that
    of the auxiliary logits, both resized to the labels, pixels labelled ``loss_ignore_index`` contributing zero and
    the sum divided by all pixels (mmseg's ``avg_non_ignore=False``).
    """

    _keys_to_ignore_on_load_unexpected = [r"^model\.norm\.", r"^model\.head\."]  # a classifier's, for fine-tuning

    def __init__(self, config):
        super().__init__(config)
        settings = upernet_settings(config)
        self.model = MambaVisionEncoder(config)
        self.decode_head = UperNetHead(settings, in_channels=config.hidden_sizes)
        self.auxiliary_head = auxiliary_head(settings, config.hidden_sizes) if settings.use_auxiliary_head else None
        self.settings = settings
        self.post_init()

    def forward(self, pixel_values, labels=None, inference_mode="whole", crop_size=None, stride=None,
                output_hidden_states=None, return_dict=None):
        """``inference_mode``: ``"whole"`` (the image at once) or ``"slide"`` (mmseg's sliding window: ``crop_size``
        crops, ``stride`` apart, their logits averaged where they overlap; both (height, width), default
        ``config.image_size`` and two thirds of it)."""
        pixel_values = self._prepare_pixel_values(pixel_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES}, got {inference_mode!r}")
        if inference_mode == "slide":
            if labels is not None or output_hidden_states:
                raise ValueError("inference_mode='slide' gives logits only (no loss, no hidden states)")
            logits = self.slide_logits(pixel_values, crop_size, stride)
            return SemanticSegmenterOutput(logits=logits) if return_dict else (logits,)
        maps, _ = self.model(pixel_values)  # the stem's output and the four stage maps; no attentions
        features = maps[1:]  # the four normalised stage maps, 1/4 to 1/32 of the input
        logits = self.resize(self.decode_head(features), pixel_values.shape[2:])
        loss = None
        if labels is not None:
            loss = self.loss(logits, labels)
            if self.auxiliary_head is not None:
                auxiliary_logits = self.resize(self.auxiliary_head(features), pixel_values.shape[2:])
                loss = loss + self.settings.auxiliary_loss_weight * self.loss(auxiliary_logits, labels)
        output = SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=maps if output_hidden_states else None)
        return output if return_dict else output.to_tuple()

    @staticmethod
    def resize(logits, size):
        """mmseg's resize of logits: bilinear, ``align_corners=False``."""
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, logits, labels):
        """Cross entropy over every pixel, ignored ones counting zero (mmseg's ``CrossEntropyLoss`` default)."""
        logits = self.resize(logits, labels.shape[-2:]) if logits.shape[-2:] != labels.shape[-2:] else logits
        per_pixel = F.cross_entropy(logits.float(), labels.long(), ignore_index=self.settings.loss_ignore_index,
                                    reduction="none")
        return per_pixel.mean()

    def slide_windows(self, height, width, crop_size=None, stride=None):
        """mmseg's sliding windows over a (height, width) input: crops of ``crop_size`` every ``stride`` (both
        (height, width), default ``config.image_size`` and two thirds of it), the last flush with the edge, cut from
        the input as it is (an input smaller than a crop gives a smaller crop). -> [((top, bottom), (left, right))].
        ValueError before any crop runs when a pixel would be in none (a stride longer than the crop)."""
        size = self.config.image_size
        crop_h, crop_w = crop_size or (size, size)
        stride_h, stride_w = stride or (crop_h * 2 // 3, crop_w * 2 // 3)
        rows, cols = _slide_spans(height, crop_h, stride_h), _slide_spans(width, crop_w, stride_w)
        if not (_covers(rows, height) and _covers(cols, width)):  # mmseg asserts this after the crops have run
            raise ValueError(f"stride {(stride_h, stride_w)} leaves pixels out of every {(crop_h, crop_w)} crop; "
                             "use a stride no longer than crop_size")
        return [(row, col) for row in rows for col in cols]

    def slide_logits(self, pixel_values, crop_size=None, stride=None):
        """mmseg's ``slide_inference``: each window of ``slide_windows`` run whole; the logits of overlapping crops
        are averaged."""
        batch, _, height, width = pixel_values.shape
        logits = pixel_values.new_zeros(batch, self.config.num_labels, height, width)
        counts = pixel_values.new_zeros(1, 1, height, width)
        for (top, bottom), (left, right) in self.slide_windows(height, width, crop_size, stride):
            crop = pixel_values[:, :, top:bottom, left:right]
            features = self.model(crop)[0][1:]
            logits[:, :, top:bottom, left:right] += self.resize(self.decode_head(features), crop.shape[2:])
            counts[:, :, top:bottom, left:right] += 1
        return logits / counts


def _slide_spans(length, crop, stride):
    """The (start, end) of mmseg's windows along one side: every ``stride``, the last flush with the edge."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    ends = [min(index * stride + crop, length) for index in range(count)]
    return [(max(end - crop, 0), end) for end in ends]


def _covers(spans, length):
    """Whether ``spans`` (in increasing order) leave no position of ``range(length)`` out."""
    reached = 0
    for start, end in spans:
        if start > reached:
            return False
        reached = max(reached, end)
    return reached >= length


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


MambaVisionForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

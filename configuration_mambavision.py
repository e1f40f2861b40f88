"""MambaVision configuration.

Field names follow NVIDIA's published ``config.json`` files (``depths``, ``num_heads``, ``window_size``,
``dim``, ``in_dim``, ``mlp_ratio``, ``drop_path_rate``, ``layer_scale``, ``layer_scale_conv``), so those
files load unchanged. Defaults describe MambaVision-T.
"""

import math

from timm.data import ImageNetInfo
from transformers import PretrainedConfig

from .compatibility_mambavision import BackboneConfigMixin, align_backbone_outputs

# The folder's own pipelines (image_processing_mambavision*.py): transformers' image pipelines with every image mode
# accepted and, on transformers < 4.55, the image processor that it would not load for remote code.
CUSTOM_PIPELINES = {
    "image-classification": ("image_processing_mambavision.MambaVisionImageClassificationPipeline",
                             "AutoModelForImageClassification"),
    "image-feature-extraction": ("image_processing_mambavision.MambaVisionImageFeatureExtractionPipeline", "AutoModel"),
    "image-segmentation": ("image_processing_mambavision_segmentation.MambaVisionImageSegmentationPipeline",
                           "AutoModelForSemanticSegmentation"),
}

SCAN_BACKENDS = ("torch", "triton", "mamba_ssm")  # every selective-scan implementation; "auto" chooses among them
CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # those timm's eval transform applies to images of any type
NUM_LEVELS = 4
HYBRID_LEVELS = (2, 3)  # mixer and attention blocks in windows; the levels before them are convolutional
STAGE_NAMES = ["stem"] + [f"stage{i}" for i in range(1, NUM_LEVELS + 1)]


class MambaVisionConfig(BackboneConfigMixin, PretrainedConfig):
    r"""Architecture, mixer constants and preprocessing facts of a MambaVision model.

    Args:
        depths: blocks per level (4 levels; levels 0-1 are convolutional, 2-3 mixer/attention hybrids).
        num_heads: attention heads per level (only levels 2-3 use them).
        window_size: window side per level (levels 2-3 attend/scan inside windows).
        dim: width of level 0; level ``i`` has ``dim * 2**i`` channels.
        in_dim: width of the stem's first convolution.
        mlp_ratio: MLP hidden width over block width.
        drop_path_rate: stochastic-depth rate of the last block (rises linearly from 0).
        layer_scale: initial per-channel scale of mixer/attention blocks, ``None`` for none.
        layer_scale_conv: initial per-channel scale of conv blocks, ``None`` for none.
        d_state, d_conv, expand: selective-scan state size, depthwise conv width and expansion.
        scan_backend: ``"auto"`` or one of ``"torch"``, ``"triton"``, ``"mamba_ssm"``; the environment
            variable ``MAMBAVISION_SCAN_BACKEND`` overrides it.
        image_size, mean, std, crop_pct, crop_mode, interpolation: the pretrained eval preprocessing (``mean`` and
            ``std``: one number per input channel; ``crop_pct`` in (0, 1]; ``interpolation``: one of
            ``INTERPOLATIONS``).
        out_features, out_indices: the maps ``MambaVisionBackbone`` returns, by name in ``stage_names``
            (``"stem"``, ``"stage1"`` ... ``"stage4"``) or by index; default: the last stage.
        out_norm: a LayerNorm over channels (eps 1e-5, weights ``outnorm{i}``) on each of the four stage maps, as
            NVIDIA's segmentation and detection backbones add; off for the classifiers.
    """

    model_type = "mambavision"

    def __init__(
        self,
        depths=(1, 3, 8, 4),
        num_heads=(2, 4, 8, 16),
        window_size=(8, 8, 14, 7),
        dim=80,
        in_dim=32,
        mlp_ratio=4.0,
        drop_path_rate=0.2,
        layer_scale=None,
        layer_scale_conv=None,
        num_channels=3,
        d_state=8,
        d_conv=3,
        expand=1,
        scan_backend="auto",
        image_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=1.0,
        crop_mode="center",
        interpolation="bicubic",
        out_features=None,
        out_indices=None,
        out_norm=False,
        **kwargs,
    ):
        self.depths = list(depths)
        self.num_heads = list(num_heads)
        self.window_size = list(window_size)
        self.dim = dim
        self.in_dim = in_dim
        self.mlp_ratio = mlp_ratio
        self.drop_path_rate = drop_path_rate
        self.layer_scale = layer_scale
        self.layer_scale_conv = layer_scale_conv
        self.num_channels = num_channels
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.scan_backend = scan_backend
        self.image_size = image_size
        self.mean = list(mean)
        self.std = list(std)
        self.crop_pct = crop_pct
        self.crop_mode = crop_mode
        self.interpolation = interpolation
        self.out_norm = out_norm
        self._validate()
        kwargs.pop("stage_names", None)  # written by to_dict, always the same
        self.stage_names = list(STAGE_NAMES)
        self._set_backbone_outputs(out_features, out_indices)
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            # NVIDIA's config.json files name no labels: their heads are ImageNet-1k classifiers (timm's class names)
            names = ImageNetInfo("imagenet-1k").label_descriptions()
            kwargs["id2label"] = dict(enumerate(names))
            kwargs.setdefault("label2id", {name: index for index, name in enumerate(names)})
        super().__init__(**kwargs)

    @property
    def hidden_sizes(self):
        """Channels of the four stage maps."""
        return [self.dim * 2**i for i in range(NUM_LEVELS)]

    @property
    def num_features(self):
        """Channels of the pooled features."""
        return self.hidden_sizes[-1]

    @property
    def custom_pipelines(self):
        """What ``pipeline(task, model=<folder or repo>, trust_remote_code=True)`` runs (a fresh dict on each read:
        transformers rewrites it in place). Not saved: it follows the code, not the folder."""
        return {
            task: {"impl": impl, "pt": [model_class], "type": "image"}
            for task, (impl, model_class) in CUSTOM_PIPELINES.items()
        }

    def _set_backbone_outputs(self, out_features, out_indices):
        """Check ``out_features``/``out_indices`` against ``stage_names`` and fill in the missing one."""
        out_features = list(out_features) if out_features is not None else None
        out_indices = list(out_indices) if out_indices is not None else None
        try:
            align_backbone_outputs(self, out_features, out_indices)
        except ValueError as error:
            raise ValueError(f"MambaVisionConfig: {error}") from None

    def _validate(self):
        """Refuse what no model or processor can be built from, in one line naming the field (``ValueError``)."""
        for name in ("depths", "num_heads", "window_size"):
            value = getattr(self, name)
            if len(value) != NUM_LEVELS:
                raise ValueError(f"MambaVisionConfig: `{name}` needs {NUM_LEVELS} entries, got {len(value)}: {value}")
        if any(not isinstance(d, int) or d < 0 for d in self.depths):
            raise ValueError(f"MambaVisionConfig: `depths` must be non-negative integers, got {self.depths}")
        for name in ("dim", "in_dim", "num_channels", "d_state", "d_conv", "expand", "image_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"MambaVisionConfig: `{name}` must be a positive integer, got {value!r}")
        if self.dim % 2:
            raise ValueError(f"MambaVisionConfig: `dim` must be even (the mixer splits channels in halves), got {self.dim}")
        for level, window in enumerate(self.window_size):
            if not _is_int(window) or window <= 0:
                raise ValueError(f"MambaVisionConfig: window_size[{level}] must be a positive integer, got {window!r}")
        for level in HYBRID_LEVELS:
            width, heads = self.dim * 2**level, self.num_heads[level]
            if not _is_int(heads) or heads <= 0 or width % heads:
                raise ValueError(
                    f"MambaVisionConfig: num_heads[{level}]={heads!r} must be a positive divisor of the level width {width}"
                )
        if not _is_number(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"MambaVisionConfig: `mlp_ratio` must be a positive number, got {self.mlp_ratio!r}")
        if not _is_number(self.drop_path_rate) or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"MambaVisionConfig: `drop_path_rate` must be in [0, 1), got {self.drop_path_rate!r}")
        for name in ("layer_scale", "layer_scale_conv"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise ValueError(f"MambaVisionConfig: `{name}` must be a finite number or None, got {value!r}")
        if not isinstance(self.out_norm, bool):
            raise ValueError(f"MambaVisionConfig: `out_norm` must be true or false, got {self.out_norm!r}")
        check_backend_name(self.scan_backend, "MambaVisionConfig: `scan_backend`")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.num_channels or not all(_is_number(v) for v in values):
                raise ValueError(f"MambaVisionConfig: `{name}` needs one finite number per input channel "
                                 f"(num_channels={self.num_channels}), got {values}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"MambaVisionConfig: `std` must be positive, got {self.std}")
        if not _is_number(self.crop_pct) or not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"MambaVisionConfig: `crop_pct` must be in (0, 1], got {self.crop_pct!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"MambaVisionConfig: `crop_mode` must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"MambaVisionConfig: `interpolation` must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def head_backbone_config(backbone_config, out_features, head_kwargs):
    """A task model's ``backbone_config`` as a ``MambaVisionConfig``: MambaVision-T's architecture returning
    ``out_features`` when None, built from a dict (a saved config's) when one. The backbone of those models is always
    this one, so the arguments in ``head_kwargs`` that would choose another (saved configs carry them) are dropped."""
    for name in ("use_timm_backbone", "use_pretrained_backbone", "backbone", "backbone_kwargs"):
        head_kwargs.pop(name, None)
    if backbone_config is None:
        return MambaVisionConfig(out_features=out_features)
    if isinstance(backbone_config, dict):
        return MambaVisionConfig(**{k: v for k, v in backbone_config.items() if k != "model_type"})
    return backbone_config


def check_backend_name(name, what):
    """Refuse a scan backend name other than "auto" and ``SCAN_BACKENDS`` with a ValueError that says ``what`` held
    it (the config field, the environment variable, the requested backend): the config and the scan dispatcher
    (``selective_scan.resolve_backend``) both check with it."""
    if name != "auto" and name not in SCAN_BACKENDS:
        raise ValueError(f"{what}: unknown scan backend {name!r}; choose auto or one of {', '.join(SCAN_BACKENDS)}")

"""Configs of the models to convert: the variants' table entries and custom ``--config`` files, validated up front.

``MambaVisionConfig`` refuses what no model can be built from; this module adds what a conversion must refuse
besides: class names that are not the classes 0 to N-1, and sizes past the converter's bounds (checked before
the model is built on the meta device and its parameters counted). A typo or an absurd size is one clear error
before any checkpoint is read, not a traceback minutes later or a model too large to hold.
"""

import difflib
import inspect
import json
import reprlib
from pathlib import Path

import torch

from . import model_code, variants
from .report import ConversionError, first_line, listing

MambaVisionConfig = model_code.load("configuration_mambavision").MambaVisionConfig
modeling = model_code.load("modeling_mambavision")

# Original constructor arguments -> config fields (same names except the class count).
ARGUMENT_RENAMES = {"num_classes": "num_labels"}
ARCHITECTURE_FIELDS = ("depths", "num_heads", "window_size", "dim", "in_dim", "mlp_ratio", "drop_path_rate",
                       "layer_scale", "layer_scale_conv", "out_norm")
# Fields of a ``Variant`` of their own (the rest of a --config file is its architecture).
PREPROCESSING_FIELDS = ("image_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
# what --config accepts: MambaVisionConfig's own arguments and the label fields
CONFIG_FIELDS = set(inspect.signature(MambaVisionConfig.__init__).parameters) - {"self", "kwargs"}
CONFIG_FIELDS |= {"num_labels", "id2label", "label2id"}

# The converter's bounds, generous around NVIDIA's largest (20 blocks in a level, windows of 160 in segmentation,
# 512 pixels, 740M parameters) and ImageNet-21k's 21,841 classes.
MAX_BLOCKS_PER_LEVEL = 64
MAX_WINDOW = 512
MAX_IMAGE_SIZE = 4096
MAX_PARAMETERS = 2 * 10**9
MAX_LABELS = 10**6


def config_from_architecture(architecture, **extra):
    """A ``MambaVisionConfig`` from the original constructor arguments (as in variants.json)."""
    fields = {ARGUMENT_RENAMES.get(k, k): v for k, v in architecture.items()
              if k in ARCHITECTURE_FIELDS or k in ARGUMENT_RENAMES}
    fields["num_heads"] = [h if h is not None else 1 for h in fields.get("num_heads", [])] or None
    return MambaVisionConfig(**{k: v for k, v in fields.items() if v is not None or k.startswith("layer_scale")},
                             **extra)


def _non_negative_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _label_index(key):
    """A class index from an ``id2label`` key (an integer, or its decimal string in JSON); -1 if neither."""
    if _non_negative_int(key):
        return key
    return int(key) if isinstance(key, str) and key.isdecimal() else -1


def check_labels(fields, where):
    """Refuse class fields that the config would take but that do not name the classes 0 to N-1 consistently."""
    num_labels, id2label, label2id = (fields.get(name) for name in ("num_labels", "id2label", "label2id"))
    if num_labels is not None and not (_non_negative_int(num_labels) and num_labels <= MAX_LABELS):
        raise ConversionError(f"invalid num_labels in {where}: {reprlib.repr(num_labels)} is not an integer from 0 "
                              f"to {MAX_LABELS:,}")
    if id2label is not None:
        if not (isinstance(id2label, dict) and len(id2label) <= MAX_LABELS
                and all(isinstance(name, str) for name in id2label.values())
                and sorted(_label_index(key) for key in id2label) == list(range(len(id2label)))):
            raise ConversionError(f"invalid id2label in {where}: {reprlib.repr(id2label)} is not an object mapping "
                                  "the class indices 0 to N-1 to names")
        if num_labels is not None and num_labels != len(id2label):
            raise ConversionError(f"invalid num_labels in {where}: {num_labels} but id2label names {len(id2label)} "
                                  "classes")
    if label2id is not None:
        if not (isinstance(label2id, dict) and all(_non_negative_int(index) for index in label2id.values())):
            raise ConversionError(f"invalid label2id in {where}: {reprlib.repr(label2id)} is not an object mapping "
                                  "class names to indices")
        if id2label is not None and label2id != {name: _label_index(key) for key, name in id2label.items()}:
            raise ConversionError(f"invalid label2id in {where}: it is not the inverse of id2label")


def check_bounds(config, where):
    """Refuse a valid config past the converter's bounds: the blocks before the model is built, then its
    parameters, counted on the meta device (shapes only, no memory)."""
    for name, values, bound in (("depths", config.depths, MAX_BLOCKS_PER_LEVEL),
                                ("window_size", config.window_size, MAX_WINDOW),
                                ("image_size", [config.image_size], MAX_IMAGE_SIZE)):
        if max(values) > bound:
            raise ConversionError(f"invalid {name} in {where}: {reprlib.repr(getattr(config, name))} exceeds the "
                                  f"converter's bound of {bound:,}")
    too_large = f"more than the converter's bound of {MAX_PARAMETERS:,} parameters (MambaVision-L3 has 740 million)"
    try:
        with torch.device("meta"):
            count = modeling.MambaVisionModelForImageClassification(config).num_parameters()
    except RuntimeError as error:  # a tensor whose element count overflows int64
        if "overflow" not in str(error).lower():
            raise
        raise ConversionError(f"{where} describes a model too large to build ({first_line(error)}), {too_large}") from None
    if count > MAX_PARAMETERS:
        raise ConversionError(f"{where} describes a model of {count:,} parameters, {too_large}")


def _config(fields, where):
    """The config of ``fields``, after every check: the config's own (``ValueError``s become one error line), the
    class names and the converter's bounds."""
    check_labels(fields, where)
    try:
        config = MambaVisionConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"invalid configuration in {where}: {first_line(error)}") from None
    check_bounds(config, where)
    return config


def build_config(variant):
    """The ``MambaVisionConfig`` of a variant (a head without classes of its own gets the config's default, timm's
    ImageNet-1k class names)."""
    return _config({**variant.architecture, **variant.preprocessing}, f"variant {variant.name}")


def read_config_file(path, name):
    """A custom ``Variant`` and its config from a JSON of config fields (original argument names such as
    ``num_classes`` too), validated completely before any checkpoint is read."""
    path = Path(path)
    try:
        fields = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"cannot read the config {path}: {first_line(error)}") from None
    if not isinstance(fields, dict):
        raise ConversionError(f"the config {path} must hold a JSON object of config fields")
    fields = {ARGUMENT_RENAMES.get(key, key): value for key, value in fields.items()}
    unknown = sorted(set(fields) - CONFIG_FIELDS)
    if unknown:
        raise ConversionError(f"unknown field(s) in the config {path}: {listing(unknown)}")
    # a 1000-class head without names of its own is an ImageNet-1k classifier: the config's default names
    imagenet_labels = "id2label" not in fields and fields.get("num_labels", 1000) == 1000
    if imagenet_labels:
        fields.pop("num_labels", None)
    config = _config(fields, f"the config {path}")
    preprocessing = {key: fields.pop(key) for key in PREPROCESSING_FIELDS if key in fields}
    variant = variants.Variant(name=name, repo_id=name, checkpoint=None, architecture=fields,
                               imagenet_labels=imagenet_labels, datasets=(),
                               description=f"A MambaVision model with a custom architecture ({path.name}).",
                               **preprocessing)
    return variant, config


def get_variant(name):
    """The table entry for a Hub name (NVIDIA's or one trained here), or an error that suggests the closest names."""
    known = {**variants.VARIANTS, **variants.SEGMENTATION_VARIANTS, **variants.DETECTION_VARIANTS,
             **variants.PROJECT_VARIANTS}
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConversionError(f"unknown variant {name!r}{hint}; --list-variants shows the {len(known)} variants")

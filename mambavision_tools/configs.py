"""Configs of the models to convert: the variants' table entries and custom ``--config`` files, validated up front.

Every field is checked for type, length and range, and the parameters of the model are counted on the meta
device (shapes only), before any checkpoint is read: a typo or an absurd size is one clear error, not a
traceback minutes later or a model too large to hold.
"""

import difflib
import inspect
import json
import math
import reprlib
from pathlib import Path

import torch

from . import model_code, variants
from .report import ConversionError, first_line, listing

configuration = model_code.load("configuration_mambavision")
MambaVisionConfig = configuration.MambaVisionConfig
modeling = model_code.load("modeling_mambavision")

# Original constructor arguments -> config fields (same names except the class count).
ARGUMENT_RENAMES = {"num_classes": "num_labels"}
ARCHITECTURE_FIELDS = ("depths", "num_heads", "window_size", "dim", "in_dim", "mlp_ratio", "drop_path_rate",
                       "layer_scale", "layer_scale_conv")
# Fields of a ``Variant`` of their own (the rest of a --config file is its architecture).
PREPROCESSING_FIELDS = ("image_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
# what --config accepts: MambaVisionConfig's own arguments and the label fields
CONFIG_FIELDS = set(inspect.signature(MambaVisionConfig.__init__).parameters) - {"self", "kwargs"}
CONFIG_FIELDS |= {"num_labels", "id2label", "label2id"}

# Bounds, generous around NVIDIA's largest (20 blocks in a level, windows of 32, 512 pixels, 740M parameters).
MAX_BLOCKS_PER_LEVEL = 64
MAX_WINDOW = 128
MAX_IMAGE_SIZE = 4096
MAX_PARAMETERS = 2 * 10**9
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # those timm's eval transform applies to images of any type


def config_from_architecture(architecture, **extra):
    """A ``MambaVisionConfig`` from the original constructor arguments (as in variants.json)."""
    fields = {ARGUMENT_RENAMES.get(k, k): v for k, v in architecture.items()
              if k in ARCHITECTURE_FIELDS or k in ARGUMENT_RENAMES}
    fields["num_heads"] = [h if h is not None else 1 for h in fields.get("num_heads", [])] or None
    return MambaVisionConfig(**{k: v for k, v in fields.items() if v is not None or k.startswith("layer_scale")},
                             **extra)


# --- field rules: (check, what a valid value is) ---------------------------------------------------------------


def _is_int(value, low=None, high=None):
    return (isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)
            and (high is None or value <= high))


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low, high=None):
    return (lambda v: _is_int(v, low, high)), f"an integer {f'from {low} to {high}' if high else f'>= {low}'}"


def _integers(low, high):
    return ((lambda v: isinstance(v, (list, tuple)) and len(v) == configuration.NUM_LEVELS
             and all(_is_int(x, low, high) for x in v)),
            f"a list of {configuration.NUM_LEVELS} integers from {low} to {high}")


def _numbers(positive):
    return ((lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) and (x > 0 or not positive) for x in v)),
            f"a list of {'positive ' if positive else ''}numbers, one per channel")


FIELD_RULES = {
    "depths": _integers(0, MAX_BLOCKS_PER_LEVEL),
    "num_heads": ((lambda v: isinstance(v, (list, tuple)) and len(v) == configuration.NUM_LEVELS
                   and all(h is None or _is_int(h, 1) for h in v)),
                  f"a list of {configuration.NUM_LEVELS} positive integers (null for the convolutional levels 0-1)"),
    "window_size": _integers(1, MAX_WINDOW),
    "dim": _integer(2),
    "in_dim": _integer(1),
    "mlp_ratio": ((lambda v: _is_number(v) and 0 < v <= 64), "a number in (0, 64]"),
    "drop_path_rate": ((lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "layer_scale": ((lambda v: v is None or _is_number(v)), "a number or null"),
    "layer_scale_conv": ((lambda v: v is None or _is_number(v)), "a number or null"),
    "num_channels": _integer(1, 16),
    "d_state": _integer(1, 256),
    "d_conv": _integer(1, 31),
    "expand": _integer(1, 16),
    "scan_backend": ((lambda v: isinstance(v, str)), "a string"),
    "image_size": _integer(1, MAX_IMAGE_SIZE),
    "crop_pct": ((lambda v: _is_number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "crop_mode": ((lambda v: isinstance(v, str)), "a string"),
    "interpolation": ((lambda v: v in INTERPOLATIONS), f"one of {', '.join(INTERPOLATIONS)}"),
    "mean": _numbers(positive=False),
    "std": _numbers(positive=True),
    "out_features": ((lambda v: v is None or isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)),
                     "a list of stage names"),
    "out_indices": ((lambda v: v is None or isinstance(v, (list, tuple)) and all(_is_int(x) for x in v)),
                    "a list of stage indices"),
    "num_labels": _integer(0, 10**6),
    "id2label": ((lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
                  and sorted(_label_index(k) for k in v) == list(range(len(v)))),
                 "an object mapping the class indices 0 to N-1 to names"),
    "label2id": ((lambda v: isinstance(v, dict) and all(_is_int(x, 0) for x in v.values())),
                 "an object mapping class names to indices"),
}


def _label_index(key):
    """A class index from an ``id2label`` key (an integer, or its decimal string in JSON); -1 if neither."""
    if _is_int(key):
        return key
    return int(key) if isinstance(key, str) and key.isdecimal() else -1


def validate_fields(fields, where):
    """Refuse any field of the wrong type, length or range, naming it and ``where`` it comes from."""
    for name, value in fields.items():
        check, valid = FIELD_RULES.get(name, (lambda v: True, ""))
        if not check(value):
            raise ConversionError(f"invalid {name} in {where}: {reprlib.repr(value)} is not {valid}")
    channels = fields.get("num_channels", 3)
    for name in ("mean", "std"):
        if name in fields and len(fields[name]) != channels:
            raise ConversionError(f"invalid {name} in {where}: {len(fields[name])} entries for {channels} channels")
    labels = fields.get("id2label")
    if labels is not None and fields.get("num_labels", len(labels)) != len(labels):
        raise ConversionError(f"invalid num_labels in {where}: {fields['num_labels']} but id2label names "
                              f"{len(labels)} classes")
    if labels is not None and "label2id" in fields and fields["label2id"] != {v: _label_index(k) for k, v in labels.items()}:
        raise ConversionError(f"invalid label2id in {where}: it is not the inverse of id2label")


def _config(fields, where):
    """Validate ``fields`` and the parameter count of the model they describe; the config."""
    validate_fields(fields, where)
    try:
        config = MambaVisionConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"invalid configuration in {where}: {first_line(error)}") from None
    too_large = f"more than the converter's bound of {MAX_PARAMETERS:,} parameters (MambaVision-L3 has 740 million)"
    try:
        with torch.device("meta"):  # shapes only, no memory
            count = modeling.MambaVisionModelForImageClassification(config).num_parameters()
    except RuntimeError as error:  # a tensor whose element count overflows int64
        if "overflow" not in str(error).lower():
            raise
        raise ConversionError(f"{where} describes a model too large to build ({first_line(error)}), {too_large}") from None
    if count > MAX_PARAMETERS:
        raise ConversionError(f"{where} describes a model of {count:,} parameters, {too_large}")
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


def variant_from_config_file(path, name):
    """The ``Variant`` of ``read_config_file`` (its config is ``build_config(variant)``)."""
    return read_config_file(path, name)[0]


def get_variant(name):
    """The table entry for a Hub name (NVIDIA's or one trained here), or an error that suggests the closest names."""
    known = {**variants.VARIANTS, **variants.PROJECT_VARIANTS}
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConversionError(f"unknown variant {name!r}{hint}; --list-variants shows the {len(known)} variants")

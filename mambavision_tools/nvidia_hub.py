"""NVIDIA's published Hub repositories read straight into this repository's classes, without a conversion step.

NVIDIA's repositories (``nvidia/MambaVision-T-1K``, ...) hold ``model.safetensors`` with the original tensor names
under ``model.``, which are this repository's names, and a ``config.json`` whose architecture fields are this
config's. They lack the preprocessing and the ImageNet class names, which the variant table supplies. Loading them
with NVIDIA's ``auto_map`` would run NVIDIA's code; loading them with this repository's class runs this one.
"""

import json
from pathlib import Path

from huggingface_hub import hf_hub_download
from transformers.utils import logging as transformers_logging

from . import model_code
from .configs import build_config, get_variant
from .report import ConversionError, first_line


def _published_config(source):
    """The ``config.json`` fields of NVIDIA's repository ``source`` (a Hub id or a local copy)."""
    try:
        path = Path(source) / "config.json" if Path(source).is_dir() else Path(hf_hub_download(source, "config.json"))
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read config.json of {source}: {first_line(error)}") from None


def from_nvidia(variant, source=None, model_class="MambaVisionModelForImageClassification", **kwargs):
    """This repository's ``model_class`` holding ``variant``'s published weights, read from NVIDIA's Hub repository
    (``source``: its id, by default the variant's, or a local copy of it). ``kwargs`` go to ``from_pretrained``.

    The repository's architecture must be the variant's; every weight must load (a missing or mis-shaped tensor is
    refused, naming it); the config carries the variant's preprocessing and class names, so that
    ``save_model_folder`` (or ``convert_checkpoint.py``) writes a complete folder from it.
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    source = str(source or variant.repo_id)
    published = _published_config(source)
    differing = [f"{key} {published[key]!r} (the variant's: {value!r})" for key, value in variant.architecture.items()
                 if key in published and published[key] != value]
    if published.get("model_type") != "mambavision" or differing:
        raise ConversionError(f"{source} is not {variant.name}: " + ("; ".join(differing) or
                                                                    f"model_type {published.get('model_type')!r}"))
    model_type = getattr(model_code.load("modeling_mambavision"), model_class)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the load report (a table): checked below instead
    try:
        model, info = model_type.from_pretrained(source, config=build_config(variant), output_loading_info=True,
                                                 **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    problems = {what: sorted(key for key, *_ in map(_as_tuple, info.get(what) or ()))
                for what in ("missing_keys", "mismatched_keys")}
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        raise ConversionError(f"the weights of {source} do not fit {variant.name}: {problems}")
    return model.eval()


def _as_tuple(entry):
    return entry if isinstance(entry, tuple) else (entry,)

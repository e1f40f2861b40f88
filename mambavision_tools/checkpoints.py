"""NVIDIA's original checkpoints: reading them safely and completely, and their tensor names.

A checkpoint is read without running pickled code (``torch.load(weights_only=True)``, or safetensors), and
what is read is verified before anything is built from it: the zip's CRC-32 of every record, each record's size
against the tensor it holds (a plain load checks it; a memory-mapped one would not), and finite values.
"""

import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .report import ConversionError, first_line, listing, progress

# Original names -> transformers names: the backbone lives under `model` in every transformers class. Added to
# convert a checkpoint, removed to save a transformers model in the original layout.
PREFIX = "model."
# Wrappers around the original names, dropped when every key has one: DataParallel's `module.`, and `model.`
# in the safetensors files of NVIDIA's Hub repos.
WRAPPER_PREFIXES = ("module.", "model.")


def convert_state_dict(state_dict):
    """Original tensors under transformers names."""
    return {PREFIX + key: tensor for key, tensor in state_dict.items()}


def original_key(key):
    """Transformers tensor name -> original name."""
    return key.removeprefix(PREFIX)


def original_state_dict(state_dict):
    """Transformers tensors under their original names: what NVIDIA's checkpoints hold."""
    return {original_key(key): tensor for key, tensor in state_dict.items()}


def file_format(path):
    """``"zip"`` (torch.save), ``"safetensors"``, ``"pickle"`` (legacy torch.save) or ``None``, by content."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head[:4] == b"PK\x03\x04":  # a zip archive, perhaps damaged (checked next)
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return "pickle"
    return None


def check_zip_records(path):
    """Refuse a ``torch.save`` archive whose records fail their CRC-32 (torch.load itself checks none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every record through the CRC check
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error) as error:
        raise ConversionError(f"cannot read {path}, the file is damaged or truncated: {first_line(error)}") from None
    if damaged is not None:
        raise ConversionError(f"cannot read {path}, the file is damaged: record {damaged!r} fails its CRC-32 check")


def read_checkpoint(path):
    """The tensors of an original checkpoint, by original name, after every check of what was read.

    Reads ``torch.save`` files with ``weights_only=True`` (no pickled code runs) and safetensors files; unwraps
    ``{"state_dict": ...}`` / ``{"model": ...}``; drops a ``module.`` (DataParallel) or a Hub-style ``model.``
    prefix; refuses NaN and infinite values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    kind = file_format(path)
    if kind is None:
        raise ConversionError(f"{path} is not a PyTorch checkpoint (torch.save) nor a safetensors file")
    progress(f"reading {path} ({path.stat().st_size / 2**20:,.1f} MiB)")
    if kind == "zip":
        check_zip_records(path)
    try:
        if kind == "safetensors":
            checkpoint = load_file(path)
        else:  # not memory-mapped: a plain load checks each record's size against its tensor
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"unsupported global[^\n]*", str(error), flags=re.IGNORECASE)
        reason = blocked.group(0) if blocked else first_line(error)
        raise ConversionError(f"refusing to load {path}: it holds pickled objects other than tensors, "
                              f"which could run code ({reason})") from None
    except Exception as error:  # torch.load and safetensors report damage with many exception types
        raise ConversionError(f"cannot read {path}, the file is damaged or truncated: {first_line(error)}") from None
    state_dict = _unwrap(checkpoint)
    if state_dict is None:
        raise ConversionError(f"{path} holds no state dict (tensors by name, alone or under 'state_dict' or 'model')")
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key.removeprefix(prefix): tensor for key, tensor in state_dict.items()}
    check_finite(state_dict, path)
    return state_dict


def _unwrap(checkpoint):
    while isinstance(checkpoint, dict):
        inner = next((checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)), None)
        if inner is None:
            break
        checkpoint = inner
    if isinstance(checkpoint, dict) and checkpoint and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items()
    ):
        return checkpoint
    return None


def check_finite(state_dict, path):
    """Refuse NaN and infinite values as the folder would hold them (float32: a float64 1e300 becomes infinite),
    naming the tensors that hold them (a model that computes NaN is no model)."""
    bad = []
    for key, tensor in state_dict.items():
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            nan, total = int(torch.isnan(tensor).sum()), tensor.numel()
            inf = int(torch.isinf(tensor).sum())
            counts = ", ".join(f"{n:,} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
            bad.append(f"{key} ({counts} of {total:,})")
    if bad:
        raise ConversionError(f"{path} holds non-finite weights in {len(bad)} tensor(s): {listing(bad, limit=3)}")


def check_state_dict(expected, state_dict, what):
    """Raise naming every missing, unexpected, mis-shaped and non-float tensor (``expected``: name -> tensor).

    Names are reported as in the original checkpoint.
    """
    common = sorted(set(expected) & set(state_dict))
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [f"{original_key(key)} {tuple(state_dict[key].shape)} instead of {tuple(expected[key].shape)}"
                  for key in common if state_dict[key].shape != expected[key].shape]
    not_float = [key for key in common if expected[key].is_floating_point() and not state_dict[key].is_floating_point()]
    listed = (("missing", missing), ("unexpected", unexpected), ("not floating point", not_float))
    problems = [f"{label} {len(names)}: {listing(original_key(key) for key in names)}" for label, names in listed if names]
    if mis_shaped:
        problems.append(f"wrong shape {len(mis_shaped)}: {listing(mis_shaped)}")
    if problems:
        raise ConversionError(f"the checkpoint does not fit {what}: " + "; ".join(problems))

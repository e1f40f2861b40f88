"""Original checkpoint -> Hub-ready model folder, step by step, each step refusing bad input before anything is
written: the config (``configs``), the checkpoint (``checkpoints``), the model, the folder (``hub_folder``,
written atomically by ``staging``), the card (``publishing``) and an optional reload check."""

import time
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from . import model_code
from .checkpoints import check_state_dict, convert_state_dict, read_checkpoint
from .mmlab import BACKBONE, segmentation_state_dict, split_backbone
from .configs import build_config
from .hub_folder import CARD, files_not_written_here, is_model_folder, save_model_folder
from .publishing import example_of, render_model_card
from .report import ConversionError, first_line, listing, progress
from .staging import output_lock, staged_folder

VERIFY_TOLERANCE = 1e-5


def _reload_with(auto_class):
    """A folder's reload through ``auto_class`` (trust_remote_code), with loading info."""
    def reload(folder, config):
        progress(f"verifying: reloading with {auto_class.__name__}.from_pretrained(trust_remote_code=True)")
        return auto_class.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    return reload


def _reload_backbone(folder, config):
    """A backbone folder's reload through its class in the folder (its AutoBackbone entry): transformers >= 5.1's
    AutoBackbone asks the Hub first."""
    progress("verifying: reloading the folder's MambaVisionBackbone (its AutoBackbone entry)")
    backbone_class = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], folder)
    return backbone_class.from_pretrained(folder, output_loading_info=True)


def detector_backbone(state_dict):
    """An mmdetection detector's ``backbone.*`` under our names; its neck and heads are left out."""
    return split_backbone(state_dict)[0]


# per task: the model file and class, the renames from the original checkpoint, how the Hub reloads the folder
TASKS = {
    "image-classification": ("modeling_mambavision", "MambaVisionModelForImageClassification", convert_state_dict,
                             _reload_with(AutoModelForImageClassification)),
    "semantic-segmentation": ("modeling_mambavision_segmentation", "MambaVisionForSemanticSegmentation",
                              segmentation_state_dict, _reload_with(AutoModelForSemanticSegmentation)),
    "detection-backbone": ("modeling_mambavision", "MambaVisionBackbone", detector_backbone, _reload_backbone),
}


def fetch_checkpoint(variant):
    """Download a variant's original checkpoint from its Hub repository (cached by huggingface_hub)."""
    if not variant.checkpoint:
        raise ConversionError(f"{variant.name} names no original checkpoint to download: pass --checkpoint PATH")
    progress(f"downloading {variant.checkpoint} from {variant.repo_id}")
    try:
        return Path(hf_hub_download(variant.repo_id, variant.checkpoint))
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"could not download {variant.checkpoint} from the Hub repo {variant.repo_id} ({first_line(error)}); "
            "check the connection, or pass --checkpoint PATH (--checkpoint-dir DIR with --all)"
        ) from None


def build_model(config, original_state_dict, what, task="image-classification"):
    """The ``task``'s model holding the checkpoint's tensors (float32), after checking every name and shape."""
    module, name, rename, _ = TASKS[task]
    check_checkpoint_kind(original_state_dict, what, task)
    with torch.device("meta"):  # no memory for weights that the checkpoint replaces
        model = getattr(model_code.load(module), name)(config)
    state_dict = rename(original_state_dict)
    progress(f"checking {len(state_dict)} tensors against {what}")
    check_state_dict(model.state_dict(), state_dict, what)
    state_dict = {key: tensor.float() if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def check_checkpoint_kind(original_state_dict, what, task):
    """Refuse a checkpoint of the other kind by its layout: an mmseg/mmdet one holds its backbone under
    ``backbone.``, an original classifier's holds none."""
    dense = any(key.startswith(BACKBONE) for key in original_state_dict)
    if task == "semantic-segmentation" and not dense:
        raise ConversionError(f"the checkpoint is not an mmsegmentation model (no backbone.* keys; a classification "
                              f"checkpoint?): {what} needs NVIDIA's UPerNet ADE20K checkpoint")
    if task == "image-classification" and dense:
        raise ConversionError(f"the checkpoint holds an OpenMMLab model (backbone.* keys: segmentation or detection), "
                              f"not the classifier {what}")
    if task == "detection-backbone":
        check_detector(original_state_dict, what)


# What an mmdetection detector holds beside its backbone (Cascade Mask R-CNN: FPN neck, RPN, cascade RoI heads)
DETECTOR_PARTS = ("neck.", "rpn_head.", "roi_head.", "bbox_head.", "mask_head.")


def check_detector(original_state_dict, what):
    """Refuse what is not an mmdetection detector: a classifier (no ``backbone.*``), an mmsegmentation model
    (heads that no detector has)."""
    backbone_state, rest = split_backbone(original_state_dict)
    if not backbone_state:
        hint = " (it holds a classifier's head.*: convert it with a classification variant)" if any(
            key.startswith("head.") for key in original_state_dict) else ""
        raise ConversionError(f"the checkpoint does not fit {what}: it holds no mmdetection backbone.* tensors{hint}")
    foreign = sorted(key for key in rest if not key.startswith(DETECTOR_PARTS))
    if foreign:
        kind = " (an mmsegmentation model's heads: use a segmentation variant)" if any(
            key.startswith(("decode_head.", "auxiliary_head.")) for key in foreign) else ""
        raise ConversionError(f"the checkpoint does not fit {what}: besides the backbone it holds {len(foreign)} "
                              f"tensor(s) that are no part of an mmdetection detector{kind}: {listing(foreign)}")
    progress(f"{len(rest)} detector-head tensors left out (neck, RPN, RoI heads: no transformers equivalent)")


def check_output_dir(output_dir, overwrite=False, force=False, checkpoint=None):
    """Refuse an output path that converting must not replace.

    A non-empty folder is replaced only with ``overwrite``, and only if it is a converted MambaVision folder
    holding nothing else and not the input ``checkpoint``; ``force`` replaces any folder.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"the output path {output_dir} exists and is not a folder")
    if not output_dir.is_dir() or not any(output_dir.iterdir()) or force:
        return
    if not overwrite:
        raise ConversionError(f"the output folder {output_dir} is not empty (pass --overwrite to replace a converted "
                              "folder)")
    if checkpoint is not None and Path(output_dir).resolve() in Path(checkpoint).resolve().parents:
        raise ConversionError(f"the output folder {output_dir} holds the input checkpoint {checkpoint}; "
                              "--overwrite would delete it (convert into another folder, or pass --force-overwrite)")
    if not is_model_folder(output_dir):
        raise ConversionError(f"--overwrite replaces converted MambaVision folders only, and {output_dir} holds no "
                              "MambaVision config.json (pass --force-overwrite to delete it anyway)")
    foreign = files_not_written_here(output_dir)
    if foreign:
        raise ConversionError(f"the output folder {output_dir} holds what converting does not write: "
                              f"{listing(foreign)}; --overwrite would delete it (move it away, or pass "
                              "--force-overwrite)")


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def verify_folder(folder, model, tolerance=VERIFY_TOLERANCE, task="image-classification"):
    """Reload ``folder`` as the Hub would (the task's reload, ``TASKS``) and compare outputs."""
    reloaded, info = TASKS[task][3](folder, model.config)
    problems = {key: info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ConversionError(f"verification failed: reloading reported {problems}")
    size = model.config.image_size
    pixels = torch.randn(1, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True)
        actual = reloaded.eval()(pixels, output_hidden_states=True)
    pairs = [("logits", actual.logits, expected.logits)] if hasattr(expected, "logits") else []
    pairs += [(f"hidden state {i}", a, e) for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states))]
    worst = 0.0
    for name, a, e in pairs:
        if not torch.isfinite(e).all():
            raise ConversionError(f"verification failed: the converted model's {name} hold NaN or infinite values on "
                                  "a random image (its weights overflow in float32)")
        if not torch.isfinite(a).all():
            raise ConversionError(f"verification failed: the reloaded folder's {name} hold NaN or infinite values "
                                  "where the converted model's are finite")
        error = _relative_error(a, e)
        if error > tolerance:
            raise ConversionError(f"verification failed: the reloaded folder's {name} differ by {error:.3g} "
                                  f"(relative) > {tolerance:g}")
        worst = max(worst, error)
    progress(f"verified: outputs at {size}x{size} match, largest relative difference {worst:.3g}")


def _write_folder(folder, model, variant, repo_id, max_shard_size):
    try:
        example = example_of(variant)
        save_model_folder(model, folder, max_shard_size=max_shard_size,
                          example_image=example["load"]() if example else None)
        render_model_card(variant, model, repo_id).save(folder / CARD)
    except (OSError, SafetensorError) as error:  # a full disk surfaces as either
        raise ConversionError(f"cannot write the model folder: {first_line(error)}") from None


def convert(variant, checkpoint, output_dir, *, config=None, repo_id=None, overwrite=False, force=False,
            max_shard_size="2GB", verify=False):
    """Original checkpoint -> complete model folder at ``output_dir``; returns its path. ``config``: the variant's,
    if already built (default: ``build_config(variant)``).

    The folder appears whole or not at all; an existing one is replaced only as ``check_output_dir`` allows,
    and stays in place until the new one is complete (and verified, with ``verify``).
    """
    start = time.monotonic()
    config = config if config is not None else build_config(variant)
    with output_lock(output_dir) as target:
        check_output_dir(target, overwrite, force, checkpoint)  # now that no other converter writes it
        model = build_model(config, read_checkpoint(checkpoint), variant.name, variant.task)
        with staged_folder(target, replace=overwrite or force) as folder:
            progress(f"writing {folder.name}: config, weights (safetensors shards up to {max_shard_size}), code, card")
            _write_folder(folder, model, variant, repo_id or variant.repo_id, max_shard_size)
            if verify:
                verify_folder(folder, model, task=variant.task)
    progress(f"wrote {output_dir} in {time.monotonic() - start:.1f} s")
    return Path(output_dir)

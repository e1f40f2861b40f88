"""A Hub model folder: config, safetensors weights, the model code and the image processor, so that it loads with
``trust_remote_code``, plus ``handler.py`` and an example image, so that it serves itself on Inference Endpoints
and its card's widget has an image to show. What it loads from is the recipe at the end of
``modeling_mambavision.py`` (``AUTO_MAP``, ``HUB_FILES``); this module writes it, and recognises a folder written so
(what ``--overwrite`` may replace)."""

import json
import re
import shutil
from pathlib import Path

from . import model_code

modeling = model_code.load("modeling_mambavision")
# preprocessor_config.json gets the AutoImageProcessor entry from the processor's own save_pretrained
# (its `_auto_class`); config.json gets the rest
CONFIG_AUTO_MAP = {name: path for name, path in modeling.AUTO_MAP.items() if name != "AutoImageProcessor"}
# the image processor a folder gets, by model class (module, class): mmseg's for segmentation, else timm's
PROCESSORS = {
    "MambaVisionForSemanticSegmentation": ("image_processing_mambavision_segmentation",
                                           "MambaVisionSegmentationImageProcessor"),
    None: ("image_processing_mambavision", "MambaVisionImageProcessor"),
}
CARD = "README.md"
HANDLER = "handler.py"  # Inference Endpoints' custom handler (the toolkit looks for this name)
EXAMPLE_IMAGE = "example.jpg"  # what the card's widget and Deploy snippet show
EXAMPLE_IMAGE_SIDE = 256  # longest side of the stored example, in pixels
# what save_model_folder and the card write, beside HUB_FILES (weights: one file, or shards and their index)
FOLDER_FILES = re.compile(r"config\.json|preprocessor_config\.json|README\.md|model(-\d+-of-\d+)?\.safetensors"
                          rf"|model\.safetensors\.index\.json|{re.escape(HANDLER)}|{re.escape(EXAMPLE_IMAGE)}")


def save_model_folder(model, folder, max_shard_size="2GB", example_image=None):
    """``save_pretrained`` plus the model code, the ``auto_map`` entries and the image processor of the config's
    preprocessing (``preprocessor_config.json``), so the folder loads with trust_remote_code; ``handler.py``; and
    ``example_image`` (a PIL image, if given) as ``example.jpg``."""
    module, name = PROCESSORS.get(type(model).__name__, PROCESSORS[None])
    processor = getattr(model_code.load(module), name).from_model_config(model.config)
    _save_folder(model, processor, folder, CONFIG_AUTO_MAP, max_shard_size)
    shutil.copy2(model_code.ROOT / HANDLER, Path(folder) / HANDLER)
    if example_image is not None:
        save_example_image(example_image, folder)


def save_head_folder(model, processor, folder, max_shard_size="2GB"):
    """The folder of a transformers head on MambaVision (``MambaVisionForObjectDetection``,
    ``MambaVisionForUniversalSegmentation``): ``save_pretrained``, the model code, the head's ``auto_map``
    (``HEAD_AUTO_MAPS``) and its image processor (transformers' own: ``processor``), so it loads with
    trust_remote_code; and ``handler.py``."""
    _save_folder(model, processor, folder, modeling.HEAD_AUTO_MAPS[type(model).__name__], max_shard_size)
    shutil.copy2(model_code.ROOT / HANDLER, Path(folder) / HANDLER)


def _save_folder(model, processor, folder, auto_map, max_shard_size):
    folder = Path(folder)
    model.config.auto_map = dict(auto_map)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    processor.save_pretrained(folder)
    for name in modeling.HUB_FILES:  # after save_pretrained, which copies some of them
        shutil.copy2(model_code.ROOT / name, folder / name)
    # transformers 5 writes the weights through a private temporary file (mode 0600): give them the mode that
    # config.json got from the umask, so that whoever may read the folder may read its weights
    mode = (folder / "config.json").stat().st_mode & 0o777
    for weights in folder.glob("model*.safetensors*"):
        weights.chmod(mode)


def is_model_folder(folder):
    """Whether ``folder`` holds a MambaVision ``config.json`` (a converted folder, or one saved by transformers)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "mambavision"
    except (OSError, ValueError, AttributeError):
        return False


def files_not_written_here(folder):
    """Entries of ``folder`` that converting does not write (sub-folders end in ``/``): what must not be deleted
    in passing."""
    ours = set(modeling.HUB_FILES)
    return [entry.name + ("/" if entry.is_dir() else "") for entry in sorted(Path(folder).iterdir())
            if entry.is_symlink() or not entry.is_file() or not (entry.name in ours or FOLDER_FILES.fullmatch(entry.name))]


def save_example_image(image, folder):
    """``image`` as the folder's ``example.jpg``: RGB, its longest side at most ``EXAMPLE_IMAGE_SIDE`` (a widget
    thumbnail, kilobytes); smaller images are kept at their size."""
    image = image.convert("RGB")
    image.thumbnail((EXAMPLE_IMAGE_SIDE, EXAMPLE_IMAGE_SIDE))  # keeps the aspect ratio; never enlarges
    image.save(Path(folder) / EXAMPLE_IMAGE, quality=90)

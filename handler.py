"""The repository's Inference Endpoints handler: ``EndpointHandler(path)`` serves the folder at ``path`` with its
own pipeline (``trust_remote_code``), as Hugging Face's inference toolkit expects of a ``handler.py``.

The toolkit loads this file with the repository folder on ``sys.path``, builds ``EndpointHandler(model_dir)``
once, then calls it with each request body, one call at a time:

- an image body (``Content-Type: image/*``) arrives as ``{"inputs": <PIL image>}``, decoded by the toolkit;
- a JSON body as sent: ``{"inputs": <image>, "parameters": {...}}``, an image being a base64 string (a
  ``data:image/...;base64,`` prefix is allowed) or an ``http(s)`` URL, fetched here with transformers' image
  loader as the toolkit's default handler does through the pipeline; ``inputs`` may be a list of them (a batch).
  Raw ``bytes`` are taken too, for direct calls. Local file paths are refused: a request names no server file.

The answer is what the pipeline returns, plain JSON types (the toolkit serialises it with orjson). A bad payload
raises ``ValueError`` with one line naming the problem: the toolkit answers any exception from the handler with
status 400 and ``{"error": str(exception)}``; returning an error dict instead would go out with status 200.

The task is the folder's own (``TASKS``: the entry whose model class the config names), or ``HF_TASK`` when the
endpoint sets one of the tasks the folder serves (a classifier's folder also serves ``image-feature-extraction``).
A task is one ``Task`` entry: its pipeline task, the parameters a request may give and their checks, the
pipeline's keyword arguments made from them, and its answer as JSON: segmentation masks as base64-encoded PNGs, as
the toolkit encodes the PIL images of transformers' own image-segmentation pipeline.
"""

import base64
import binascii
import inspect
import io
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image, ImageOps
from transformers import AutoConfig, pipeline
from transformers.image_utils import load_image

URL_TIMEOUT_S = 10.0
MAX_IMAGES = 64  # per request: a batch decoded at once must fit in memory
MAX_CROPS = 32  # per image in slide mode, each a forward pass (mmseg's ADE20K windows: at most 6 an image)
BATCH_SIZE = 16  # images per forward pass within a request, where they have one size


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"parameter {name!r} must be a positive integer, got {value!r}")
    return value


def _boolean(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")
    return value


def _fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"parameter {name!r} must be a number from 0 to 1, got {value!r}")
    return float(value)


def _one_of(choices):
    def check(name, value):
        if value not in choices:
            raise ValueError(f"parameter {name!r} must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _height_width(name, value):
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in value)):
        raise ValueError(f"parameter {name!r} must be [height, width], two positive integers, got {value!r}")
    return tuple(value)


def _slide_settings(parameters):
    """``crop_size`` and ``stride`` shape the sliding window only: without it they would be ignored."""
    given = [name for name in ("crop_size", "stride") if name in parameters]
    if given and parameters.get("inference_mode") != "slide":
        raise ValueError(f"parameter {given[0]!r} goes with 'inference_mode': 'slide'")


SUBTASKS = ("instance", "panoptic", "semantic")  # a model answers those its image processor post-processes
INFERENCE_MODES = ("whole", "slide")  # a UPerNet model's: the image at once, or mmseg's sliding window


def _png_masks(segments):
    """image-segmentation's answer with each mask (a PIL image, 0 or 255) as a base64-encoded PNG."""
    return [{**segment, "mask": _png_base64(segment["mask"])} for segment in segments]


def _png_base64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class Task:
    """One task a folder serves.

    Args:
        model_classes: the config ``architectures`` whose folder serves this task by default.
        parameters: each parameter a request may give -> its check (name, value) -> value, raising ValueError.
        model_parameters: further parameters of a model class's own pipeline: architecture -> parameters.
        check_together: a check of a request's checked parameters together, raising ValueError.
        defaults: pipeline keyword arguments sent with every call (request parameters override them).
        also_from: further ``architectures`` whose folder serves this task when ``HF_TASK`` asks for it.
        batch_size: images per forward pass within a request; 1 where images keep their own sizes (detection and
            segmentation processors resize keeping the aspect ratio), which the pipeline's batching cannot stack.
    """

    model_classes: tuple
    parameters: dict = field(default_factory=dict)
    model_parameters: dict = field(default_factory=dict)
    check_together: Callable = lambda parameters: None
    defaults: dict = field(default_factory=dict)
    to_json: Callable = lambda result: result  # one image's pipeline answer -> JSON types
    also_from: tuple = ()
    batch_size: int = BATCH_SIZE


# The parameters are those of the Inference API's task specifications; their defaults are the pipelines' own.
TASKS = {
    "image-classification": Task(("MambaVisionModelForImageClassification",), {"top_k": _positive_int},
                                 defaults={"top_k": 5}),
    # pooled features; ``stages``: each stage map averaged over its positions too
    "image-feature-extraction": Task(("MambaVisionModel",), {"stages": _boolean}, defaults={"pool": True},
                                     also_from=("MambaVisionModelForImageClassification",)),
    # [{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}}]: the detections scoring above ``threshold``
    "object-detection": Task(("MambaVisionForObjectDetection",), {"threshold": _fraction}, batch_size=1),
    # [{"score", "label", "mask"}]: a semantic model's one mask per class present (score null; the thresholds do not
    # apply), a Mask2Former model's one per instance scoring above ``threshold``. A semantic (UPerNet) model also
    # takes its pipeline's ``inference_mode`` (mmseg's test modes), ``crop_size`` and ``stride`` ([height, width]).
    "image-segmentation": Task(("MambaVisionForSemanticSegmentation", "MambaVisionForUniversalSegmentation"),
                               {"threshold": _fraction, "mask_threshold": _fraction,
                                "overlap_mask_area_threshold": _fraction, "subtask": _one_of(SUBTASKS)},
                               model_parameters={"MambaVisionForSemanticSegmentation": {
                                   "inference_mode": _one_of(INFERENCE_MODES), "crop_size": _height_width,
                                   "stride": _height_width}},
                               check_together=_slide_settings, to_json=_png_masks, batch_size=1),
}
# the toolkit's default task names when the endpoint runs a custom handler
UNSET_TASKS = (None, "", "custom")


def folder_task(config):
    """The task of a folder's ``config``: the ``TASKS`` entry whose model class it was saved as."""
    for architecture in config.architectures or ():
        for name, task in TASKS.items():
            if architecture in task.model_classes:
                return name
    raise ValueError(f"no task of this handler serves a model saved as {config.architectures}")


def served_tasks(config):
    """The tasks a folder's ``config`` serves: its own, and those that take it too (``also_from``)."""
    architectures = set(config.architectures or ())
    return [name for name, task in TASKS.items() if architectures & {*task.model_classes, *task.also_from}]


def _check_parameters(task_name, parameters, architectures):
    """A request's ``parameters`` checked for the task and the model's ``architectures`` -> the pipeline's."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ValueError(f"'parameters' must be an object, got {type(parameters).__name__}")
    task = TASKS[task_name]
    accepted = dict(task.parameters)
    for architecture in architectures:
        accepted.update(task.model_parameters.get(architecture, {}))
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} for {task_name} "
                         f"(accepted: {', '.join(accepted) or 'none'})")
    checked = {name: accepted[name](name, value) for name, value in parameters.items()}
    task.check_together(checked)
    return checked


def decode_image(value, where="inputs"):
    """One request image (PIL image, bytes, base64 string or http(s) URL) -> a PIL image, EXIF orientation applied."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        try:
            return load_image(value, timeout=URL_TIMEOUT_S)  # transformers' loader, as the pipeline would
        except Exception as error:  # noqa: BLE001 - network, HTTP and decoding errors alike: one line
            raise ValueError(f"{where}: could not fetch an image from {value[:200]} "
                             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if isinstance(value, str):
        encoded = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            value = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: a string must be a base64-encoded image or an http(s) URL, got "
                             f"{value[:40]!r}{'...' if len(value) > 40 else ''}") from None
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{where}: expected an image (bytes, a base64 string or an http(s) URL), "
                         f"got {type(value).__name__}")
    try:
        image = Image.open(io.BytesIO(value))
        image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(f"{where}: image too large ({error})") from None
    except (OSError, ValueError, SyntaxError):  # PIL's UnidentifiedImageError is an OSError; truncated files too
        raise ValueError(f"{where}: not an image PIL can read ({len(value)} bytes)") from None
    return ImageOps.exif_transpose(image)


def decode_inputs(inputs):
    """The request's ``inputs`` -> (list of PIL images, whether it was a list)."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("'inputs' is an empty list: send one image or a list of images")
        if len(inputs) > MAX_IMAGES:
            raise ValueError(f"'inputs' holds {len(inputs)} images; at most {MAX_IMAGES} per request")
        return [decode_image(item, f"inputs[{i}]") for i, item in enumerate(inputs)], True
    return [decode_image(inputs)], False


def _dtype_argument():
    """The pipeline's name for the model dtype: ``dtype`` (transformers >= 4.56) or ``torch_dtype``."""
    return "dtype" if "dtype" in inspect.signature(pipeline).parameters else "torch_dtype"


class EndpointHandler:
    """Serves a MambaVision folder: ``EndpointHandler(path)({"inputs": ..., "parameters": {...}})``.

    Args:
        path: the folder (on an endpoint, the repository's copy) or a Hub repository id.
        task: one of ``TASKS``; default: ``HF_TASK`` if set to one of them, else the folder's own task.
        device: default: the first GPU if there is one, else the CPU.
        dtype: the weights' dtype; default: bf16 on a GPU, float32 on the CPU.
    """

    def __init__(self, path="", task=None, device=None, dtype=None):
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        task = task or os.environ.get("HF_TASK")
        if task in UNSET_TASKS:
            task = folder_task(config)
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not served by this handler; use one of {list(TASKS)}")
        if task not in served_tasks(config):
            raise ValueError(f"task {task!r} is not served by a model saved as {config.architectures}; "
                             f"this folder serves {served_tasks(config)}")
        self.task, self.architectures = task, tuple(config.architectures or ())
        device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.pipeline = pipeline(task, model=path, trust_remote_code=True, device=device,
                                 **{_dtype_argument(): dtype})
        self._lock = threading.Lock()  # one forward pass at a time, as the toolkit calls (other servers may not)

    def __call__(self, data):
        """A request body -> the pipeline's answer: a list per image, or a list of those for a list of images."""
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError("the request body must be an object with 'inputs' (and optionally 'parameters')")
        unknown = sorted(set(data) - {"inputs", "parameters"})
        if unknown:
            raise ValueError(f"unknown request field {unknown[0]!r} (expected 'inputs' and 'parameters')")
        parameters = _check_parameters(self.task, data.get("parameters"), self.architectures)
        images, batched = decode_inputs(data["inputs"])
        if parameters.get("inference_mode") == "slide":
            self._check_crops(images, batched, parameters.get("crop_size"), parameters.get("stride"))
        task = TASKS[self.task]
        arguments = {**task.defaults, **parameters}
        with self._lock:
            results = self.pipeline(images, batch_size=min(len(images), task.batch_size), **arguments)
        results = [task.to_json(result) for result in results]
        return results if batched else results[0]

    def _check_crops(self, images, batched, crop_size, stride):
        """Slide mode runs a forward pass per crop: at most ``MAX_CROPS`` an image, counted before any runs with the
        model's own windows on the image's size after the processor's resize."""
        processor, model = self.pipeline.image_processor, self.pipeline.model
        for index, image in enumerate(images):
            height, width = processor.output_size(image.height, image.width)
            crops = len(model.slide_windows(height, width, crop_size, stride))
            if crops > MAX_CROPS:
                given = (("crop_size", crop_size), ("stride", stride))
                shown = (", ".join(f"{name} {list(value)}" for name, value in given if value is not None)
                         or "the model's default crop_size and stride")
                raise ValueError(f"{f'inputs[{index}]' if batched else 'inputs'}: sliding {shown} over it ({height}x"
                                 f"{width} after resizing) runs {crops} crops; at most {MAX_CROPS} an image: use a "
                                 "longer 'stride' or a larger 'crop_size'")

"""A saved detector folder used as users do, in a fresh process, on the transformers this interpreter imports:
``AutoModelForObjectDetection`` with trust_remote_code, its image processor and ``pipeline("object-detection")``.
Writes what it computed for ``tests/test_detection.py`` to compare with the model that wrote the folder.

    python tests/detection_worker.py FOLDER OUT.pt
"""

import sys

import numpy as np
import torch
from PIL import Image


def picture():
    """A 70x90 picture: noise over a gradient, with a filled square (something for the pipeline to look at)."""
    rng = np.random.default_rng(0)
    array = np.clip(np.linspace(0, 255, 90)[None, :, None] + rng.normal(0, 30, (70, 90, 3)), 0, 255)
    array[20:45, 30:55] = (250, 40, 40)
    return Image.fromarray(array.astype(np.uint8))


def run(folder, pixels):
    import transformers
    from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline

    model, info = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    with torch.no_grad():
        outputs = model.eval()(pixel_values=pixels)
    processor = AutoImageProcessor.from_pretrained(folder)
    detector = pipeline("object-detection", model=folder, trust_remote_code=True)
    return {"transformers": transformers.__version__, "loading_problems": str(problems),
            "class": type(model).__name__, "logits": outputs.logits, "pred_boxes": outputs.pred_boxes,
            "processor": type(processor).__name__.removesuffix("Fast"),
            "processed": processor(picture(), return_tensors="pt")["pixel_values"],
            "pipeline": type(detector).__name__, "detections": detector(picture(), threshold=0.0)}


if __name__ == "__main__":
    folder, out = sys.argv[1:3]
    pixels = torch.load(f"{folder}/../pixels.pt", weights_only=True)
    torch.save(run(folder, pixels), out)

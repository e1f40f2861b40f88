"""A saved instance-segmentation folder used as users do, in a fresh process, on the transformers this interpreter
imports: ``AutoModelForUniversalSegmentation`` with trust_remote_code, its image processor and
``pipeline("image-segmentation")``. Writes what it computed for ``tests/test_instance_segmentation.py`` to compare
with the model that wrote the folder.

    python tests/instance_segmentation_worker.py FOLDER OUT.pt
"""

import sys

import numpy as np
import torch

from detection_worker import picture


def run(folder, pixels):
    import transformers
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline

    model, info = AutoModelForUniversalSegmentation.from_pretrained(folder, trust_remote_code=True,
                                                                    output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    with torch.no_grad():
        outputs = model.eval()(pixel_values=pixels)
    processor = AutoImageProcessor.from_pretrained(folder)
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    segments = segmenter(picture(), threshold=0.0)
    return {"transformers": transformers.__version__, "loading_problems": str(problems),
            "class": type(model).__name__, "class_queries_logits": outputs.class_queries_logits,
            "masks_queries_logits": outputs.masks_queries_logits,
            "processor": type(processor).__name__.removesuffix("Fast"),
            "processed": processor(picture(), return_tensors="pt")["pixel_values"],
            "pipeline": type(segmenter).__name__,
            "segments": [{"label": s["label"], "score": s["score"], "mask": np.array(s["mask"])} for s in segments]}


if __name__ == "__main__":
    folder, out = sys.argv[1:3]
    pixels = torch.load(f"{folder}/../pixels.pt", weights_only=True)
    torch.save(run(folder, pixels), out)

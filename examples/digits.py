"""MambaVision-Digits' data and files: scikit-learn's handwritten digits as PIL images, split as the model was
trained and evaluated, and where its original-format checkpoint lives.

The 1,797 8x8 grayscale scans (values 0-16) ship inside scikit-learn, so nothing is downloaded. Images stay
8x8: the model's image processor upscales them (bicubic) to the model's input size, as it would any image.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

VARIANT = "MambaVision-Digits"
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mambavision_digits.pth.tar"
CONFIG = CHECKPOINT.with_name("mambavision_digits.json")  # the same model as --config fields
SPLITS = ("train", "held_out")
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
MIN_ACCURACY = 0.95  # the held-out accuracy demo.py requires (the shipped checkpoint reaches 99.4%)


def digit_image(pixels):
    """An 8x8 array of 0-16 ink values -> an 8x8 RGB PIL image (white ink on black)."""
    grey = np.round(np.asarray(pixels, dtype=np.float64).reshape(8, 8) * (255 / 16)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def load_split(split):
    """``(images, labels)`` of the ``"train"`` (1,437) or ``"held_out"`` (360) split.

    The split is stratified by class, 80/20, with ``random_state=0``: fixed, so training and evaluation agree.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    digits = load_digits()
    indices = dict(zip(SPLITS, train_test_split(np.arange(len(digits.target)), test_size=HELD_OUT_FRACTION,
                                                stratify=digits.target, random_state=SPLIT_SEED)))[split]
    return [digit_image(digits.images[i]) for i in indices], digits.target[indices].tolist()


def pixel_stats(images, processor):
    """Per-channel mean and std of ``images`` as the model sees them: after the processor's resize and crop,
    before its normalisation (the preprocessing facts of a model trained on them)."""
    unnormalised = type(processor)(pretrained_cfg={**processor.pretrained_cfg, "mean": [0.0] * 3, "std": [1.0] * 3})
    pixels = unnormalised(images, return_tensors="pt")["pixel_values"].double()
    return pixels.mean(dim=(0, 2, 3)).tolist(), pixels.std(dim=(0, 2, 3)).tolist()

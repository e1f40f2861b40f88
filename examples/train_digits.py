"""Train MambaVision-Digits from scratch with transformers' Trainer, and save it as an original checkpoint.

    .venv/bin/python examples/train_digits.py    # a few minutes on 2 CPU cores; writes trained/ (ignored by git)
    .venv/bin/python examples/train_digits.py --output-dir checkpoints   # replaces the shipped checkpoint

The architecture and preprocessing are the ``MambaVision-Digits`` entry of ``variants.py``; the data is
scikit-learn's handwritten digits (``digits.py``: the fixed 80/20 split), through the project's image processor,
so training, evaluation and the converted model's pipeline see the same pixels. Deterministic: seeded, PyTorch's
deterministic algorithms, 2 threads; a rerun with the same code and torch on the same kind of CPU writes the same
file (other CPUs round matrix products differently, which moves the result by a few held-out images). The result
is what NVIDIA publishes: ``{"state_dict": <original names>, "epoch": N}`` in a ``.pth.tar`` (plus the model's
config fields as JSON), for ``convert_checkpoint.py`` to convert.
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed

import digits
from mambavision_tools import model_code
from mambavision_tools.checkpoints import original_state_dict
from mambavision_tools.configs import build_config
from mambavision_tools.variants import PROJECT_VARIANTS

STATS_TOLERANCE = 5e-4  # the variant stores the dataset's mean/std to 4 decimals
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "trained"  # not checkpoints/: the shipped files stay
THREADS = 2  # fixed, so that the machine's core count does not change how sums are split (and rounded)


def image_processor(config):
    """The project's image processor for ``config``: the one the converted folder saves."""
    return model_code.load("image_processing_mambavision").MambaVisionImageProcessor.from_model_config(config)


def check_preprocessing(variant, images, processor):
    """Refuse to train with a mean/std that are not the training images' own (e.g. after changing the data)."""
    mean, std = digits.pixel_stats(images, processor)
    if not np.allclose([mean, std], [variant.mean, variant.std], atol=STATS_TOLERANCE):
        raise SystemExit(f"{variant.name} in variants.py has mean {list(variant.mean)}, std {list(variant.std)}, "
                         f"but its training images have mean {mean[0]:.4f}, std {std[0]:.4f}: update the entry")


def encode(images, labels, processor):
    """Trainer examples: the processor's pixels and the class index of each image."""
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    return [{"pixel_values": p, "labels": label} for p, label in zip(pixels, labels)]


def accuracy(eval_prediction):
    """Trainer's metric: the share of images whose top class is the label."""
    return {"accuracy": float((eval_prediction.predictions.argmax(-1) == eval_prediction.label_ids).mean())}


@contextlib.contextmanager
def deterministic():
    """PyTorch's deterministic algorithms on ``THREADS`` threads, as before afterwards."""
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


def train(output_dir, epochs, seed=0, max_steps=-1):
    """Train, evaluate on the held-out split and write the checkpoint and config JSON; returns the metrics."""
    variant = PROJECT_VARIANTS[digits.VARIANT]
    config = build_config(variant)
    processor = image_processor(config)
    train_images, train_labels = digits.load_split("train")
    check_preprocessing(variant, train_images, processor)
    train_set = encode(train_images, train_labels, processor)
    held_out = encode(*digits.load_split("held_out"), processor)

    set_seed(seed)
    model = model_code.load("modeling_mambavision").MambaVisionModelForImageClassification(config)
    with tempfile.TemporaryDirectory() as scratch, deterministic():  # scratch: Trainer's folder, nothing is saved
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=64,
            per_device_eval_batch_size=128, learning_rate=3e-3, weight_decay=0.05, lr_scheduler_type="cosine",
            warmup_steps=0.1, logging_strategy="epoch", eval_strategy="no", save_strategy="no", report_to=[],
            use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=held_out,
                          processing_class=processor, compute_metrics=accuracy)
        start = time.monotonic()
        trainer.train()
        minutes = (time.monotonic() - start) / 60
        metrics = trainer.evaluate()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = output_dir / digits.CHECKPOINT.name
    epoch = round(trainer.state.epoch)
    weights = {key: tensor.detach().clone() for key, tensor in model.eval().state_dict().items()}
    torch.save({"state_dict": original_state_dict(weights), "epoch": epoch}, checkpoint)  # the original names
    fields = {**variant.architecture, **variant.preprocessing}
    (output_dir / digits.CONFIG.name).write_text(json.dumps(fields, indent=2) + "\n")
    print(f"trained {trainer.state.global_step} steps ({epoch} epochs) in {minutes:.1f} min; held-out accuracy "
          f"{metrics['eval_accuracy']:.4f} ({len(held_out)} images); wrote {checkpoint} "
          f"({checkpoint.stat().st_size / 2**20:.1f} MiB)")
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT),
                        help="where to write the checkpoint and its config (default: trained/; "
                             "--output-dir checkpoints replaces the shipped ones)")
    parser.add_argument("--epochs", type=float, default=20, help="training epochs (default: 20)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (a quick check)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    args = parser.parse_args(argv)
    train(args.output_dir, args.epochs, seed=args.seed, max_steps=args.max_steps)


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune MambaVision + UPerNet for semantic segmentation with transformers' Trainer, on one device or many.

    # from NVIDIA's ADE20K model, or a classifier (its backbone; new UPerNet heads), converted by convert_checkpoint.py
    .venv/bin/python examples/finetune_segmentation.py --model converted/MambaVision-T-1K-UPerNet-ADE20K-512 \\
        --train-dir rooms/train --eval-dir rooms/val --output-dir MambaVision-T-rooms
    # a `datasets` dataset with an image column and a label-mask column, from a classifier converted here
    .venv/bin/python examples/finetune_segmentation.py --model converted/MambaVision-T-1K --dataset my/scenes \\
        --mask-column annotation --labels labels.txt --eval-split validation --output-dir MambaVision-T-scenes
    # N GPUs: torchrun --nproc_per_node N examples/finetune_segmentation.py ...  (or accelerate launch)

Data: a folder with ``images/`` and ``masks/`` (a PNG of class indices per image, same file stem; 255 = not
labelled) and the class names one per line in ``labels.txt`` (or --labels), or a `datasets` dataset (--dataset).
--reduce-zero-label reads masks whose 0 means "not labelled" and classes start at 1 (ADE20K's convention).
Training sees mmseg's augmentation at the model's size (random rescale 0.5-2x keeping the ratio, random crop,
flip); evaluation the image processor's resize, with masks resized to the same size (nearest), and reports the mean
IoU over classes present (torchmetrics' macro Jaccard index, unlabelled pixels ignored), as mmseg does. The output
folder is Hub-ready: weights, config with the class names, model code, image processor and a short model card.

Long runs lose no finished work, as with finetune.py: the training state is saved every --save-steps optimizer steps
into ``<output-dir>-checkpoints`` and the same command run again resumes from the newest complete checkpoint
(--no-resume starts over); the output folder appears whole or not at all, after which the checkpoints go unless
--keep-checkpoints. With --no-augment (fixed centre crops) a resumed run computes the uninterrupted run's losses.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex
from transformers import AutoModelForSemanticSegmentation, TrainingArguments, set_seed

import scale_utils
from finetune import CHECKPOINTING
from mambavision_tools import hub_folder, model_code
from scale_utils import fail

IGNORE = 255  # mmseg's ignore index: pixels without a label
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ name }} is MambaVision + UPerNet ({{ base }}) fine-tuned for semantic segmentation on {{ data }}: it labels every
pixel with one of {{ labels | length }} classes ({{ labels[:20] | join(", ") }}{% if labels | length > 20 %}, ...{% endif %}).
{% if miou is not none %}Mean IoU on the {{ eval_images }} evaluation images: {{ "%.2f" | format(miou * 100) }}%.{% endif %}

```python
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="{{ repo_id }}", trust_remote_code=True)
print([segment["label"] for segment in segmenter("image.jpg")])
```

Trained with transformers' Trainer (`examples/finetune_segmentation.py`): {{ steps }} steps, AdamW, learning rate
{{ learning_rate }} (polynomial decay), seed {{ seed }}.
"""


class SegmentationExamples(torch.utils.data.Dataset):
    """(image, mask) pairs -> ``{"pixel_values", "labels"}``: mmseg's training augmentation at ``crop`` pixels
    (``augment=False``: the same crop without randomness), or the processor's test resize (``crop=None``); masks
    follow the image with nearest-neighbour resizing."""

    def __init__(self, pairs, processor, crop=None, reduce_zero_label=False, augment=True):
        self.pairs, self.processor, self.crop, self.reduce_zero_label = pairs, processor, crop, reduce_zero_label
        self.augment = augment

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image, mask = self.pairs[index]
        mask = torch.from_numpy(np.array(mask, dtype=np.int64))
        if mask.ndim != 2:
            fail(f"mask {index} is not a single-channel image of class indices (shape {tuple(mask.shape)})")
        if self.reduce_zero_label:  # 0 is unlabelled, classes start at 1
            mask = torch.where(mask == 0, IGNORE, mask - 1)
        if image.size[::-1] != tuple(mask.shape):  # PIL's (width, height)
            fail(f"image {index} is {image.size[::-1]} but its mask {tuple(mask.shape)}")
        pixels = self.processor.resize(image, do_resize=self.crop is None)  # (3, H, W) uint8
        if self.crop is None:
            return {"pixel_values": self.processor.normalize_pixels(pixels), "labels": resize_mask(mask, pixels.shape[1:])}
        if not self.augment:  # the shorter side at the crop size, the centre crop, no flip
            return self.crop_example(pixels, mask, ratio=1.0, position=(0.5, 0.5), flip=False)
        # draws from torch's generator, which Trainer seeds (and each DataLoader worker from it)
        draw = lambda: torch.rand(()).item()  # noqa: E731
        return self.crop_example(pixels, mask, ratio=0.5 + 1.5 * draw(), position=(draw(), draw()), flip=draw() < 0.5)

    def crop_example(self, pixels, mask, ratio, position, flip):
        """mmseg's RandomResize (the shorter side to ``ratio`` x the crop size, keeping the aspect ratio), RandomCrop
        (``position``: where in the room left, as fractions from the top and the left) and RandomFlip; a crop larger
        than the image is padded (0 after normalisation, masks 255), as mmseg's preprocessor does."""
        scale = self.crop * ratio / min(pixels.shape[1:])
        size = [max(1, int(side * scale + 0.5)) for side in pixels.shape[1:]]
        pixels = F.interpolate(pixels[None].float(), size=size, mode="bilinear", align_corners=False)[0].round()
        mask = resize_mask(mask, size)
        top, left = (int(fraction * (max(side - self.crop, 0) + 1)) for fraction, side in zip(position, size))
        pixels = self.processor.normalize_pixels(pixels[:, top:top + self.crop, left:left + self.crop])
        mask = mask[top:top + self.crop, left:left + self.crop]
        if flip:
            pixels, mask = pixels.flip(-1), mask.flip(-1)
        pad = (0, self.crop - mask.shape[1], 0, self.crop - mask.shape[0])
        return {"pixel_values": F.pad(pixels, pad), "labels": F.pad(mask, pad, value=IGNORE)}


def resize_mask(mask, size):
    """Nearest-neighbour resize of a (H, W) class map."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()


def folder_pairs(path):
    """(image, mask) pairs of ``path/images`` and ``path/masks`` (same stem, masks PNG)."""
    images = sorted(p for p in (Path(path) / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        fail(f"{path} has no images/ folder of images (and masks/ of PNG class maps beside it)")
    missing = [p.name for p in images if not (Path(path) / "masks" / f"{p.stem}.png").is_file()]
    if missing:
        fail(f"{path}/masks lacks the masks of {len(missing)} image(s), e.g. {missing[0]} (masks/<stem>.png)")
    return [(Image.open(p), Image.open(Path(path) / "masks" / f"{p.stem}.png")) for p in images]


def dataset_pairs(args, split):
    """(image, mask) pairs of a `datasets` split (image and mask columns)."""
    try:
        import datasets

        rows = datasets.load_dataset(args.dataset, split=split)
    except ImportError:
        fail("--dataset needs the `datasets` package (pip install datasets)")
    except (OSError, ValueError) as error:
        fail(f"cannot load split {split!r} of {args.dataset}: {str(error).splitlines()[0]}")
    for column in (args.image_column, args.mask_column):
        if column not in rows.column_names:
            fail(f"{args.dataset} has no column {column!r} (columns: {rows.column_names})")
    return [(row[args.image_column], row[args.mask_column]) for row in rows]


def class_names(args):
    """Class names from --labels, else from labels.txt of --train-dir; ``None``: keep the model's."""
    path = Path(args.labels) if args.labels else (Path(args.train_dir) / "labels.txt" if args.train_dir else None)
    if args.labels and not path.is_file():
        fail(f"--labels {args.labels}: no such file")
    if path is None or not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        fail(f"{path} names {len(names)} class(es); segmentation needs at least 2, one per line")
    return names


class MeanIoU:
    """Trainer's ``compute_metrics`` with ``batch_eval_metrics``: torchmetrics' macro Jaccard index (classes
    absent from both prediction and labels left out, as mmseg's mIoU), accumulated batch by batch."""

    def __init__(self, num_classes):
        self.metric = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE)

    def __call__(self, prediction, compute_result=False):
        predictions, labels = (torch.as_tensor(t).cpu() for t in (prediction.predictions, prediction.label_ids))
        padding = labels < 0  # Trainer's, where maps of other processes' images were longer
        self.metric.update(predictions.masked_fill(padding, 0), labels.masked_fill(padding, IGNORE))
        if not compute_result:
            return {}
        result = self.metric.compute().item()
        self.metric.reset()
        return {"mean_iou": result}


class SegmentationTrainer(scale_utils.FineTuningTrainer):
    """Trainer whose evaluation hands ``compute_metrics`` each image's class map (the logits' arg max, at the
    labels' size) and labels flattened, (batch, height * width): Trainer pads them to one length across processes
    and gathers them (it pads the second dimension only: maps of images of other widths made its gather abort)."""

    def get_train_dataloader(self):
        """Whole batches only, in training alone (``dataloader_drop_last`` would drop held-out images too): UPerNet's
        pooling module normalises 1x1 maps with BatchNorm, which a last batch of one crop cannot."""
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, True
        try:
            return super().get_train_dataloader()
        finally:
            self.args.dataloader_drop_last = drop_last

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is None:
            return loss, None, None
        return loss, logits.argmax(dim=1).flatten(1), labels.flatten(1)


def training_arguments(args, evaluate):
    use_cpu = args.cpu or not torch.cuda.is_available()
    return TrainingArguments(
        **scale_utils.checkpointing(args), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=1,  # whole images, unpadded
        gradient_accumulation_steps=args.gradient_accumulation, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, lr_scheduler_type="polynomial", warmup_steps=args.warmup_steps,
        bf16=not use_cpu and not args.fp32, use_cpu=use_cpu,
        **{CHECKPOINTING: args.gradient_checkpointing, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}},
        ddp_find_unused_parameters=True,  # the auxiliary head is used for the loss only: unused in evaluation
        seed=args.seed, data_seed=args.seed, dataloader_num_workers=args.num_workers,
        remove_unused_columns=False, eval_strategy="epoch" if evaluate else "no",
        batch_eval_metrics=True, logging_steps=args.logging_steps, report_to="none",
    )


def model_card(args, trainer, labels, metrics, eval_images, repo_id):
    miou = metrics.get("eval_mean_iou")
    data = args.dataset or Path(args.train_dir).resolve().name
    eval_results = None
    if miou is not None:
        eval_results = [EvalResult(task_type="image-segmentation", dataset_type=data, dataset_name=data,
                                   metric_type="mean_iou", metric_value=miou)]
    card_data = ModelCardData(library_name="transformers", pipeline_tag="image-segmentation",
                              tags=["vision", "image-segmentation", "mambavision", "upernet"],
                              model_name=Path(repo_id).name, eval_results=eval_results)
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, name=Path(repo_id).name, base=args.model or args.variant, data=data,
        labels=labels, miou=miou, eval_images=eval_images, repo_id=repo_id, steps=trainer.state.global_step,
        learning_rate=trainer.args.learning_rate, seed=args.seed,
    )


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale_utils.add_model_arguments(parser)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-dir", help="folder with images/ and masks/ (and labels.txt)")
    data.add_argument("--dataset", help="a `datasets` dataset (Hub id or local folder) with image and mask columns")
    parser.add_argument("--eval-dir", help="evaluation folder laid out as --train-dir")
    parser.add_argument("--train-split", default="train", help="--dataset split to train on (default: train)")
    parser.add_argument("--eval-split", help="--dataset split to evaluate on (default: none)")
    parser.add_argument("--image-column", default="image", help="--dataset image column (default: image)")
    parser.add_argument("--mask-column", default="annotation", help="--dataset mask column (default: annotation)")
    parser.add_argument("--labels", help="class names, one per line (default: labels.txt, else the model's)")
    parser.add_argument("--reduce-zero-label", action="store_true", help="masks' 0 is unlabelled, classes from 1")
    parser.add_argument("--crop-size", type=int, help="training crop (default: the model's image_size)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train on fixed crops: the shorter side at --crop-size, the centre (no randomness)")
    parser.add_argument("--epochs", type=float, default=10, help="training epochs (default: 10)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="crops per process and step, at least 2 (default: 8)")
    parser.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per step (default: 1)")
    parser.add_argument("--learning-rate", type=float, default=6e-5, help="AdamW peak learning rate (NVIDIA: 5e-5)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (NVIDIA: 0.01)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (NVIDIA: 1500)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    parser.add_argument("--fp32", action="store_true", help="float32 on GPU (default there: bf16 autocast)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process (default: 2)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of new weights and the data order (default 0)")
    scale_utils.add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.eval_dir and not args.train_dir:
        parser.error("--eval-dir goes with --train-dir (with --dataset: --eval-split)")
    if args.batch_size < 2:  # UPerNet's pooling module normalises 1x1 maps with BatchNorm: one crop has no statistics
        parser.error(f"--batch-size must be at least 2, got {args.batch_size}")
    scale_utils.check_output_dir(parser, args)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        return run(args)
    finally:
        scale_utils.leave_process_group()


def run(args):
    evaluate = bool(args.eval_dir or (args.dataset and args.eval_split))
    training_args = training_arguments(args, evaluate)  # first: it sets up torchrun's processes
    with scale_utils.output_lock(args):
        return train(args, training_args, evaluate)


def train(args, training_args, evaluate):
    with scale_utils.main_process_first():
        set_seed(args.seed)  # the new heads' initialisation
        train_pairs = folder_pairs(args.train_dir) if args.train_dir else dataset_pairs(args, args.train_split)
        eval_pairs = None
        if evaluate:
            eval_pairs = folder_pairs(args.eval_dir) if args.eval_dir else dataset_pairs(args, args.eval_split)
        labels = class_names(args)
        fields = {"out_norm": True}  # NVIDIA's segmentation backbone, also when starting from a classifier
        if labels:
            fields.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
        model, _ = scale_utils.load_model(args, AutoModelForSemanticSegmentation, fields,
                                          ignore_mismatched_sizes=True)
        labels = labels or [model.config.id2label[i] for i in range(model.config.num_labels)]
        checkpoint = scale_utils.resume_point(args)
    processing = model_code.load("image_processing_mambavision_segmentation")
    processor = processing.MambaVisionSegmentationImageProcessor.from_model_config(model.config)
    crop = args.crop_size or model.config.image_size
    train_set = SegmentationExamples(train_pairs, processor, crop, args.reduce_zero_label, augment=not args.no_augment)
    if len(train_set) < args.batch_size * training_args.world_size:  # whole batches only
        fail(f"{len(train_set)} training images are fewer than one batch (--batch-size {args.batch_size} on "
             f"{training_args.world_size} process(es))")
    eval_set = SegmentationExamples(eval_pairs, processor, None, args.reduce_zero_label) if evaluate else None
    model.accepts_loss_kwargs = False  # the loss is mmseg's mean over pixels: Trainer leaves it alone
    trainer = SegmentationTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                                  processing_class=processor, compute_metrics=MeanIoU(len(labels)),
                                  callbacks=[scale_utils.CompleteCheckpoints(args.save_total_limit)])
    metrics = scale_utils.train(trainer, checkpoint)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
    trained = scale_utils.trained_model(trainer, type(model))  # every process takes part
    if not trainer.is_world_process_zero():
        return 0
    output_dir = Path(args.output_dir)
    with scale_utils.staged_output(args) as folder:
        hub_folder.save_model_folder(trained, folder)
        scale_utils.save_results(folder, trainer, metrics)
        model_card(args, trainer, labels, metrics, len(eval_set or []), output_dir.name).save(folder / "README.md")
    print(f"wrote {output_dir}" + (f" (eval mean IoU {metrics['eval_mean_iou']:.4f})" if eval_set else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

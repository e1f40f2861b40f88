"""Fine-tune a MambaVision instance-segmentation model (transformers' Mask2Former head) on your instances with
transformers' Trainer, on one device or many.

    # a new model on NVIDIA's COCO-trained backbone (convert_checkpoint.py --variant MambaVision-T-COCO-backbone)
    .venv/bin/python examples/finetune_instance_segmentation.py --backbone converted/MambaVision-T-COCO-backbone \\
        --train-images data/train --train-annotations data/train.json \\
        --eval-images data/val --eval-annotations data/val.json --output-dir MambaVision-T-instances
    # N GPUs with DDP
    .venv/bin/torchrun --nproc_per_node N examples/finetune_instance_segmentation.py ...

Data: a folder of images with a COCO json whose annotations carry their ``segmentation`` (polygons or RLE, as COCO
exports them; crowd annotations are left out). The model is a new one on a MambaVision backbone folder
(``--backbone``: a converted classifier or COCO backbone; the head starts from random weights) or an
instance-segmentation folder (``--model``, given a new class head when the classes differ). transformers'
``Mask2FormerImageProcessor`` resizes (shortest edge ``--image-size``), normalises, pads and turns each image's
instance map into ``mask_labels``/``class_labels`` (where instances overlap, a pixel goes to the later one).
Evaluation, after training and on every process, is COCO mask mAP (torchmetrics' MeanAveragePrecision on
pycocotools) of ``post_process_instance_segmentation`` at each image's size, the batch's padding cut off first. The
output folder is Hub-ready (weights, config, model code, image processor, ``handler.py``, model card) and loads with
``AutoModelForUniversalSegmentation.from_pretrained(folder, trust_remote_code=True)`` or
``pipeline("image-segmentation", model=folder, trust_remote_code=True)``.

Long runs lose no finished work, as with finetune_detection.py (whose checkpoints, output folder, evaluation and
arguments past the head this script shares): the training state is saved every --save-steps optimizer steps into
``<output-dir>-checkpoints`` and the same command run again resumes from the newest complete checkpoint
(--no-resume starts over), computing the uninterrupted run's losses; the output folder appears whole or not at
all, after which the checkpoints go unless --keep-checkpoints.
"""

import argparse
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as coco_mask
from transformers import AutoModelForUniversalSegmentation, Mask2FormerImageProcessor, set_seed

import finetune_detection
import scale_utils
from mambavision_tools import model_code
from mambavision_tools.report import first_line
from scale_utils import fail

instance_segmentation = model_code.load("modeling_mambavision_instance_segmentation")

NO_INSTANCE = 255  # the instance maps' id of pixels without an instance (the processor's ignore_index)

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ name }} finds and outlines instances of {{ labels | length }} classes ({{ labels[:20] | join(", ") }}) with a
MambaVision backbone ({{ base }}) under transformers' Mask2Former head, fine-tuned on {{ data }}.
{% if map is not none %}
On the {{ eval_images }} evaluation images: mask mAP {{ "%.3f" | format(map) }}, mAP@0.5 {{ "%.3f" | format(map50) }}.
{% endif %}
## Usage

```python
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="{{ repo_id }}", trust_remote_code=True)
print(segmenter("image.jpg", threshold=0.5))  # one mask per instance, with its label and score
```

## Training

transformers' Trainer (`examples/finetune_instance_segmentation.py` of the MambaVision Hugging Face port): {{ steps }}
steps, global batch {{ global_batch }}, AdamW (learning rate {{ learning_rate }}, backbone {{ backbone_learning_rate }}),
shortest edge {{ image_size }} pixels, seed {{ seed }}.

## License

{{ license }}
"""


def instance_masks(annotations, height, width, where):
    """COCO ``segmentation`` entries (polygons, or RLE compressed or not) -> (instances, height, width) bool masks."""
    masks = []
    for annotation in annotations:
        try:
            encoded = coco_mask.frPyObjects(annotation["segmentation"], height, width)
            with warnings.catch_warnings():  # pycocotools' decode under numpy 2, once per mask: not ours to fix
                warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword",
                                        DeprecationWarning)
                masks.append(coco_mask.decode(coco_mask.merge(encoded) if isinstance(encoded, list) else encoded))
        except (TypeError, ValueError, KeyError, IndexError) as error:
            fail(f"{where}: annotation {annotation.get('id')}'s segmentation is not COCO polygons or RLE: "
                 f"{first_line(error)}")
    return np.stack(masks).astype(bool) if masks else np.zeros((0, height, width), dtype=bool)


class InstanceExamples(torch.utils.data.Dataset):
    """(RGB image, instance masks, class index of each mask) from a folder of images and a COCO json, crowd
    annotations left out."""

    def __init__(self, images, annotations):
        self.coco, self.annotations = finetune_detection.CocoFolder(images, annotations), annotations
        unmasked = next((annotation for objects in self.coco.by_image.values() for annotation in objects
                         if not annotation.get("iscrowd") and not annotation.get("segmentation")), None)
        if unmasked is not None:
            fail(f"{annotations}: annotation {unmasked.get('id')} has no segmentation (polygons or RLE); "
                 "instance segmentation trains on masks")

    def __len__(self):
        return len(self.coco)

    def __getitem__(self, index):
        image, annotations = self.coco[index]
        kept = [annotation for annotation in annotations if not annotation.get("iscrowd")]
        masks = instance_masks(kept, image.height, image.width, f"{self.annotations}, image {index}")
        return image, masks, [annotation["category_id"] for annotation in kept]


class Collator:
    """A batch of examples -> the processor's ``pixel_values``, ``pixel_mask`` (padding), ``mask_labels`` and
    ``class_labels``, from an instance map per image (ids 0, 1, ..., ``NO_INSTANCE`` elsewhere)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples):
        images, maps, classes = [], [], []
        for image, masks, labels in examples:
            if len(masks) >= NO_INSTANCE:
                fail(f"an image holds {len(masks)} instances; at most {NO_INSTANCE - 1} are supported")
            ids = np.full(masks.shape[1:], NO_INSTANCE, dtype=np.uint8)
            for instance, mask in enumerate(masks):
                ids[mask] = instance
            images.append(image)
            maps.append(ids)
            classes.append(dict(enumerate(labels)))
        batch = self.processor(images, segmentation_maps=maps, instance_id_to_semantic_id=classes, return_tensors="pt")
        return {key: batch[key] for key in ("pixel_values", "pixel_mask", "mask_labels", "class_labels")}


POST_PROCESSING_SIZE = (384, 384)  # post_process_instance_segmentation scales every image's mask logits from there


def instance_outputs(outputs, inputs):
    """What mask mAP needs of the model's outputs: the class logits, and each image's mask logits without the batch's
    padding, at ``POST_PROCESSING_SIZE`` (post_process_instance_segmentation would scale the padded ones to the
    image)."""
    masks = outputs.masks_queries_logits  # (batch, queries, height / 4, width / 4) of the padded batch
    pixel_mask = inputs["pixel_mask"]  # (batch, height, width): 1 on the image, 0 on padding
    heights = (pixel_mask.any(-1).sum(-1) * masks.shape[-2] + pixel_mask.shape[-2] - 1) // pixel_mask.shape[-2]
    widths = (pixel_mask.any(-2).sum(-1) * masks.shape[-1] + pixel_mask.shape[-1] - 1) // pixel_mask.shape[-1]
    unpadded = [F.interpolate(image_masks[None, :, :height, :width], size=POST_PROCESSING_SIZE, mode="bilinear",
                              align_corners=False)[0]
                for image_masks, height, width in zip(masks, heights.tolist(), widths.tolist())]
    return outputs.class_queries_logits, torch.stack(unpadded)


def compare_masks(processor, examples):
    """``AveragePrecision``'s ``compare`` for masks: the post-processed instances at each image's size (every query
    kept) and the image's masks."""

    def compare(predictions, indices):
        classes, masks = (tensor.float().cpu() for tensor in predictions)
        found = [examples[index] for index in indices]
        sizes = [image.size[::-1] for image, _, _ in found]  # (height, width)
        results = processor.post_process_instance_segmentation(
            SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks), threshold=0.0,
            target_sizes=sizes, return_binary_maps=True)
        instances, truths = [], []
        for (height, width), result, (_, true_masks, labels) in zip(sizes, results, found):
            segments = result["segments_info"]
            instances.append({
                "masks": result["segmentation"].bool() if segments else torch.zeros(0, height, width, dtype=torch.bool),
                "scores": torch.tensor([segment["score"] for segment in segments], dtype=torch.float32),
                "labels": torch.tensor([segment["label_id"] for segment in segments], dtype=torch.long)})
            truths.append({"masks": torch.from_numpy(true_masks), "labels": torch.tensor(labels, dtype=torch.long)})
        return instances, truths

    return compare


def build_model(args, labels):
    """A new model on ``--backbone``'s weights, or ``--model``'s with a class head for ``labels``."""
    label_fields = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    head = dict(hidden_dim=args.hidden_dim, feature_size=args.hidden_dim, mask_feature_size=args.hidden_dim,
                encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers, num_queries=args.queries,
                encoder_feedforward_dim=4 * args.hidden_dim, dim_feedforward=8 * args.hidden_dim,
                train_num_points=args.train_points)
    try:
        if args.model:
            return AutoModelForUniversalSegmentation.from_pretrained(args.model, trust_remote_code=True,
                                                                     ignore_mismatched_sizes=True, **label_fields)
        return instance_segmentation.MambaVisionForUniversalSegmentation.from_backbone(args.backbone, **head,
                                                                                      **label_fields)
    except (OSError, ValueError) as error:
        fail(f"cannot load {args.model or args.backbone}: {first_line(error)}")


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="MambaVision folder or Hub id whose backbone a new model starts from")
    source.add_argument("--model", help="a MambaVision instance-segmentation folder or Hub id to fine-tune further")
    parser.add_argument("--train-images", required=True, help="folder of training images")
    parser.add_argument("--train-annotations", required=True, help="COCO json of --train-images, with segmentations")
    parser.add_argument("--hidden-dim", type=int, default=256, help="new head: width, a multiple of 32 (default: 256)")
    parser.add_argument("--encoder-layers", type=int, default=6, help="new head: pixel decoder layers (default: 6)")
    parser.add_argument("--decoder-layers", type=int, default=10, help="new head: transformer decoder layers "
                                                                        "(default: 10)")
    parser.add_argument("--queries", type=int, default=100, help="new head: instance queries (default: 100)")
    parser.add_argument("--train-points", type=int, default=12544, help="points sampled per mask in the loss "
                                                                        "(default: 12544)")
    finetune_detection.add_arguments(parser, learning_rate=1e-4, backbone_learning_rate=1e-5, weight_decay=0.05)
    args = parser.parse_args(argv)
    if args.hidden_dim % 32:  # the pixel decoder's GroupNorm has 32 groups
        parser.error(f"--hidden-dim must be a multiple of 32, got {args.hidden_dim}")
    finetune_detection.check_arguments(parser, args)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        return run(args)
    finally:
        scale_utils.leave_process_group()


def run(args):
    training_args = finetune_detection.training_arguments(args, lr_scheduler_type="polynomial",
                                                          ddp_find_unused_parameters=False)
    with scale_utils.output_lock(args):
        return train(args, training_args)


def load_data(args):
    """(train set, eval set or None, class names)."""
    train_set = InstanceExamples(args.train_images, args.train_annotations)
    eval_set = InstanceExamples(args.eval_images, args.eval_annotations) if args.eval_images else None
    labels = train_set.coco.labels
    if eval_set is not None and eval_set.coco.labels != labels:
        fail(f"the categories of {args.eval_annotations} differ from those of {args.train_annotations}")
    return train_set, eval_set, labels


def train(args, training_args):
    with scale_utils.main_process_first():
        train_set, eval_set, labels = load_data(args)
        set_seed(args.seed)  # the new head's initialisation
        model = build_model(args, labels)
        checkpoint = scale_utils.resume_point(args)
    processor = Mask2FormerImageProcessor(size={"shortest_edge": args.image_size, "longest_edge": args.max_size},
                                          ignore_index=NO_INSTANCE)
    trainer = finetune_detection.DetectionTrainer(
        model=model, args=training_args, train_dataset=finetune_detection.Numbered(train_set),
        eval_dataset=finetune_detection.Numbered(eval_set) if eval_set is not None else None,
        data_collator=finetune_detection.NumberedCollator(Collator(processor)), kept_outputs=instance_outputs,
        compute_metrics=finetune_detection.AveragePrecision("segm", compare_masks(processor, eval_set)),
        backbone_learning_rate=args.backbone_learning_rate,
        callbacks=[scale_utils.CompleteCheckpoints(args.save_total_limit)])
    metrics = scale_utils.train(trainer, checkpoint)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
    trained = scale_utils.trained_model(trainer, type(model))  # every process takes part
    if trainer.is_world_process_zero():
        card = finetune_detection.model_card(
            args, trainer, CARD_TEMPLATE, labels, metrics, len(eval_set or []),
            args.push_to_hub or Path(args.output_dir).name, data=Path(args.train_annotations).stem,
            pipeline_tag="image-segmentation", tags=["image-segmentation", "instance-segmentation", "mask2former"])
        finetune_detection.write_output(args, trainer, trained, processor, metrics, card, "mask mAP",
                                        "instance-segmentation model")
    return 0


if __name__ == "__main__":
    sys.exit(main())

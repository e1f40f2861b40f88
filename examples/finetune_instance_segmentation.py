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
Evaluation, after training on the main process, is COCO mask mAP (torchmetrics' MeanAveragePrecision on
pycocotools) of ``post_process_instance_segmentation`` at each image's size. The output folder is Hub-ready
(weights, config, model code, image processor, ``handler.py``, model card) and loads with
``AutoModelForUniversalSegmentation.from_pretrained(folder, trust_remote_code=True)`` or
``pipeline("image-segmentation", model=folder, trust_remote_code=True)``.
"""

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelCardData
from pycocotools import mask as coco_mask
from torchmetrics.detection import MeanAveragePrecision
from transformers import AutoModelForUniversalSegmentation, Mask2FormerImageProcessor, TrainingArguments, set_seed

import scale_utils
from finetune_detection import CocoFolder, DetectionTrainer
from mambavision_tools import hub_folder, model_code, publishing
from mambavision_tools.report import ConversionError, first_line
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
        self.coco, self.annotations = CocoFolder(images, annotations), annotations
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


@torch.no_grad()
def mask_map(model, processor, examples, batch_size):
    """COCO mask mAP, mAP@0.5 and mAP@0.75 of the model's instances (post-processed at each image's size, every
    query kept) against the examples' masks, by torchmetrics on pycocotools."""
    metric = MeanAveragePrecision(iou_type="segm", backend="pycocotools")
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        inputs = processor([image for image, _, _ in batch], return_tensors="pt").to(model.device)
        outputs = model(pixel_values=inputs["pixel_values"].to(model.dtype), pixel_mask=inputs["pixel_mask"])
        sizes = [image.size[::-1] for image, _, _ in batch]
        found = processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=sizes,
                                                             return_binary_maps=True)
        predictions, truths = [], []
        for (height, width), result, (_, masks, labels) in zip(sizes, found, batch):
            segments = result["segments_info"]
            predicted = result["segmentation"]
            predictions.append({
                "masks": predicted.bool().cpu() if segments else torch.zeros(0, height, width, dtype=torch.bool),
                "scores": torch.tensor([segment["score"] for segment in segments], dtype=torch.float32),
                "labels": torch.tensor([segment["label_id"] for segment in segments], dtype=torch.long)})
            truths.append({"masks": torch.from_numpy(masks), "labels": torch.tensor(labels, dtype=torch.long)})
        metric.update(predictions, truths)
    result = metric.compute()
    return {f"eval_{name}": float(result[name]) for name in ("map", "map_50", "map_75")}


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


def model_card(args, trainer, labels, metrics, eval_images, repo_id):
    base = args.backbone or args.model
    try:
        base_card = ModelCard.load(Path(base) / "README.md" if Path(base).is_dir() else base).data
    except (OSError, ValueError):
        base_card = ModelCardData()
    license_text = (f"The base model's license applies: {base_card.get('license_name') or base_card.license}"
                    f" ({base_card.get('license_link')})." if base_card.license else
                    f"Check the license of the base model ({base}) before use.")
    card_data = ModelCardData(license=base_card.license, license_name=base_card.get("license_name"),
                              license_link=base_card.get("license_link"), library_name="transformers",
                              pipeline_tag="image-segmentation",
                              tags=["vision", "image-segmentation", "instance-segmentation", "mambavision", "mask2former"])
    targs = trainer.args
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, name=Path(repo_id).name, base=base,
        data=Path(args.train_annotations).stem, labels=labels, map=metrics.get("eval_map"),
        map50=metrics.get("eval_map_50"), eval_images=eval_images, repo_id=repo_id, steps=trainer.state.global_step,
        learning_rate=targs.learning_rate, backbone_learning_rate=args.backbone_learning_rate,
        image_size=args.image_size, seed=args.seed, license=license_text,
        global_batch=targs.per_device_train_batch_size * targs.world_size * targs.gradient_accumulation_steps)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="MambaVision folder or Hub id whose backbone a new model starts from")
    source.add_argument("--model", help="a MambaVision instance-segmentation folder or Hub id to fine-tune further")
    parser.add_argument("--train-images", required=True, help="folder of training images")
    parser.add_argument("--train-annotations", required=True, help="COCO json of --train-images, with segmentations")
    parser.add_argument("--eval-images", help="folder of evaluation images (with --eval-annotations)")
    parser.add_argument("--eval-annotations", help="COCO json of --eval-images")
    parser.add_argument("--output-dir", required=True, help="the Hub-ready folder to write")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output folder to this Hub repository")
    parser.add_argument("--image-size", type=int, default=800, help="shortest image edge (default: 800)")
    parser.add_argument("--max-size", type=int, default=1333, help="longest image edge (default: 1333)")
    parser.add_argument("--hidden-dim", type=int, default=256, help="new head: width, a multiple of 32 (default: 256)")
    parser.add_argument("--encoder-layers", type=int, default=6, help="new head: pixel decoder layers (default: 6)")
    parser.add_argument("--decoder-layers", type=int, default=10, help="new head: transformer decoder layers "
                                                                        "(default: 10)")
    parser.add_argument("--queries", type=int, default=100, help="new head: instance queries (default: 100)")
    parser.add_argument("--train-points", type=int, default=12544, help="points sampled per mask in the loss "
                                                                        "(default: 12544)")
    parser.add_argument("--epochs", type=float, default=50, help="training epochs (default: 50)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="images per process and step (default: 4)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="head learning rate (default: 1e-4)")
    parser.add_argument("--backbone-learning-rate", type=float, default=1e-5, help="backbone's (default: 1e-5)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process (default: 2)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new head and the data order (default: 0)")
    args = parser.parse_args(argv)
    if args.hidden_dim % 32:  # the pixel decoder's GroupNorm has 32 groups
        parser.error(f"--hidden-dim must be a multiple of 32, got {args.hidden_dim}")
    if bool(args.eval_images) != bool(args.eval_annotations):
        parser.error("--eval-images and --eval-annotations go together")
    output = Path(args.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        parser.error(f"the output folder {output} exists and is not empty")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        return run(args)
    finally:
        scale_utils.leave_process_group()


def run(args):
    use_cpu = args.cpu or not torch.cuda.is_available()
    train_set = InstanceExamples(args.train_images, args.train_annotations)
    eval_set = InstanceExamples(args.eval_images, args.eval_annotations) if args.eval_images else None
    labels = train_set.coco.labels
    if eval_set is not None and eval_set.coco.labels != labels:
        fail(f"the categories of {args.eval_annotations} differ from those of {args.train_annotations}")
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        lr_scheduler_type="polynomial", warmup_steps=0.05, bf16=not use_cpu, use_cpu=use_cpu, seed=args.seed,
        data_seed=args.seed, dataloader_num_workers=args.num_workers, remove_unused_columns=False,
        eval_strategy="no", save_strategy="no", logging_steps=args.logging_steps, report_to="none",
        ddp_find_unused_parameters=False,
    )
    with scale_utils.main_process_first():
        set_seed(args.seed)  # the new head's initialisation
        model = build_model(args, labels)
    processor = Mask2FormerImageProcessor(size={"shortest_edge": args.image_size, "longest_edge": args.max_size},
                                          ignore_index=NO_INSTANCE)
    trainer = DetectionTrainer(model=model, args=training_args, train_dataset=train_set,
                               data_collator=Collator(processor), backbone_learning_rate=args.backbone_learning_rate)
    metrics = dict(trainer.train().metrics)
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if eval_set is not None:
            metrics.update(mask_map(trained, processor, eval_set, args.batch_size))
        output_dir = Path(args.output_dir)
        hub_folder.save_head_folder(trained, processor, output_dir)
        trainer.save_metrics("all", metrics)
        trainer.save_state()  # trainer_state.json: the logged losses
        repo_id = args.push_to_hub or output_dir.name
        model_card(args, trainer, labels, metrics, len(eval_set or []), repo_id).save(output_dir / "README.md")
        summary = f" (eval mask mAP {metrics['eval_map']:.3f}, mAP@0.5 {metrics['eval_map_50']:.3f})" if eval_set else ""
        print(f"wrote {output_dir}{summary}")
        if args.push_to_hub:
            try:
                publishing.push_to_hub(output_dir, args.push_to_hub,
                                       commit_message="Upload fine-tuned MambaVision instance-segmentation model")
            except ConversionError as error:
                fail(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())

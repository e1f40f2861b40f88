"""Fine-tune a MambaVision object detector (Deformable DETR head) on your boxes with transformers' Trainer, on one
device or many.

    # a new detector on NVIDIA's COCO-trained backbone (convert_checkpoint.py --variant MambaVision-T-COCO-backbone)
    .venv/bin/python examples/finetune_detection.py --backbone converted/MambaVision-T-COCO-backbone \\
        --train-images data/train --train-annotations data/train.json \\
        --eval-images data/val --eval-annotations data/val.json --output-dir MambaVision-T-detector
    # N GPUs with DDP
    .venv/bin/torchrun --nproc_per_node N examples/finetune_detection.py ...
    # continue from a detector folder, or train on a `datasets` dataset with an "objects" column (cppe-5's layout)
    .venv/bin/python examples/finetune_detection.py --model MambaVision-T-detector --dataset cppe-5 \\
        --eval-split test --output-dir MambaVision-T-cppe5

Data: a folder of images with a COCO json (``images``, ``annotations`` with ``bbox`` [x, y, width, height],
``categories``), or a `datasets` dataset whose ``objects`` column holds ``bbox`` (COCO boxes) and ``category``
(a ClassLabel sequence). The model is a new detector on a MambaVision backbone folder (``--backbone``: a
converted classifier or COCO backbone; the head starts from random weights) or a detector folder (``--model``,
given a new class head when the classes differ). transformers' ``DeformableDetrImageProcessor`` resizes (shortest
edge ``--image-size``), normalises and pads; evaluation, after training and on every process, reports COCO box mAP
(torchmetrics' MeanAveragePrecision on pycocotools) of the predictions at each image's size against its annotations.
The output folder is Hub-ready (weights, config, model code, image processor, ``handler.py``, model card) and loads
with ``AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True)`` or
``pipeline("object-detection", model=folder, trust_remote_code=True)``.

Long runs lose no finished work, as with finetune.py: the training state is saved every --save-steps optimizer steps
into ``<output-dir>-checkpoints`` and the same command run again resumes from the newest complete checkpoint
(--no-resume starts over), computing the uninterrupted run's losses; the output folder appears whole or not at
all, after which the checkpoints go unless --keep-checkpoints.
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision
from transformers import AutoModelForObjectDetection, DeformableDetrImageProcessor, TrainingArguments, set_seed

import scale_utils
from mambavision_tools import hub_folder, model_code, publishing
from mambavision_tools.report import ConversionError, first_line
from scale_utils import fail

detection = model_code.load("modeling_mambavision_detection")

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ name }} detects {{ labels | length }} classes ({{ labels[:20] | join(", ") }}) with a MambaVision backbone
({{ base }}) under transformers' Deformable DETR head, fine-tuned on {{ data }}.
{% if map is not none %}
On the {{ eval_images }} evaluation images: box mAP {{ "%.3f" | format(map) }}, mAP@0.5 {{ "%.3f" | format(map50) }}.
{% endif %}
## Usage

```python
from transformers import pipeline

detector = pipeline("object-detection", model="{{ repo_id }}", trust_remote_code=True)
print(detector("image.jpg", threshold=0.5))
```

## Training

transformers' Trainer (`examples/finetune_detection.py` of the MambaVision Hugging Face port): {{ steps }} steps,
global batch {{ global_batch }}, AdamW (learning rate {{ learning_rate }}, backbone {{ backbone_learning_rate }}),
shortest edge {{ image_size }} pixels, seed {{ seed }}.

## License

{{ license }}
"""


class CocoFolder(torch.utils.data.Dataset):
    """(PIL image, COCO annotations of that image) from a folder of images and a COCO json."""

    def __init__(self, images, annotations):
        try:
            coco = json.loads(Path(annotations).read_text())
            self.categories = sorted(coco["categories"], key=lambda category: category["id"])
            self.images = coco["images"]
            by_image = {image["id"]: [] for image in self.images}
            for annotation in coco["annotations"]:
                by_image[annotation["image_id"]].append(annotation)
        except (OSError, ValueError, KeyError, TypeError) as error:
            fail(f"{annotations} is not a COCO detection json (images, annotations, categories): {first_line(error)}")
        self.folder, self.by_image = Path(images), by_image
        self.category_index = {category["id"]: index for index, category in enumerate(self.categories)}

    @property
    def labels(self):
        return [category["name"] for category in self.categories]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        record = self.images[index]
        path = self.folder / record["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as error:
            fail(f"cannot read the image {path}: {first_line(error)}")
        objects = [{**annotation, "category_id": self.category_index[annotation["category_id"]]}
                   for annotation in self.by_image[record["id"]]]
        return image, objects


class DatasetRows(torch.utils.data.Dataset):
    """(PIL image, COCO annotations) from a `datasets` dataset with ``image`` and ``objects`` columns."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        objects = row["objects"]
        annotations = [{"bbox": list(box), "category_id": int(category), "area": float(box[2] * box[3]), "iscrowd": 0}
                       for box, category in zip(objects["bbox"], objects["category"])]
        return row["image"].convert("RGB"), annotations


def load_data(args):
    """(train set, eval set or None, class names)."""
    if args.dataset:
        import datasets

        try:  # a folder written by save_to_disk, or anything load_dataset reads (a Hub id, a data folder)
            saved = (Path(args.dataset) / "dataset_dict.json").is_file()
            splits = datasets.load_from_disk(args.dataset) if saved else datasets.load_dataset(args.dataset)
        except (OSError, ValueError) as error:
            fail(f"cannot load the dataset {args.dataset}: {first_line(error)}")
        train = splits[args.train_split]
        if "objects" not in train.column_names or "image" not in train.column_names:
            fail(f"the dataset {args.dataset} needs 'image' and 'objects' columns (it has {', '.join(train.column_names)})")
        objects = train.features["objects"]  # a Sequence of a dict (cppe-5), or a dict of lists
        category = objects.feature["category"] if hasattr(objects, "feature") else objects["category"].feature
        labels = getattr(category, "names", None)
        if labels is None:
            fail(f"the dataset {args.dataset}'s objects.category is not a ClassLabel: class names are needed")
        evaluation = DatasetRows(splits[args.eval_split]) if args.eval_split else None
        return DatasetRows(train), evaluation, list(labels)
    train = CocoFolder(args.train_images, args.train_annotations)
    evaluation = CocoFolder(args.eval_images, args.eval_annotations) if args.eval_images else None
    if evaluation is not None and evaluation.labels != train.labels:
        fail(f"the categories of {args.eval_annotations} differ from those of {args.train_annotations}")
    return train, evaluation, train.labels


class Collator:
    """A batch of (image, annotations) -> the processor's ``pixel_values``, ``pixel_mask`` (padding) and ``labels``
    (per image: class indices and boxes as normalised centre x/y, width, height)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples):
        images = [image for image, _ in examples]
        annotations = [{"image_id": index, "annotations": objects} for index, (_, objects) in enumerate(examples)]
        batch = self.processor(images=images, annotations=annotations, return_tensors="pt")
        return {"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"], "labels": batch["labels"]}


EXAMPLE_INDEX = "example_index"  # a batch's indices into its dataset: evaluation looks the ground truth up by them


class Numbered(torch.utils.data.Dataset):
    """(index, example) of a dataset's examples, for ``NumberedCollator``."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return index, self.examples[index]


class NumberedCollator:
    """``collate``'s batch of the examples of (index, example) pairs, with their indices as ``EXAMPLE_INDEX``."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, pairs):
        indices, examples = zip(*pairs)
        return {**self.collate(list(examples)), EXAMPLE_INDEX: torch.tensor(indices)}


class AveragePrecision:
    """Trainer's ``compute_metrics`` with ``batch_eval_metrics``: COCO mAP, mAP@0.5 and mAP@0.75 (torchmetrics'
    MeanAveragePrecision on pycocotools), accumulated batch by batch. ``compare(predictions, indices)`` gives
    torchmetrics' predictions and ground truths of a batch: the outputs that ``DetectionTrainer.prediction_step``
    keeps, of the evaluation examples at ``indices``. Trainer hands every process every process's batches: each one
    computes the whole result."""

    def __init__(self, iou_type, compare):
        self.metric = MeanAveragePrecision(iou_type=iou_type, backend="pycocotools", sync_on_compute=False)
        self.compare = compare

    def __call__(self, prediction, compute_result=False):
        self.metric.update(*self.compare(prediction.predictions, prediction.label_ids.tolist()))
        if not compute_result:
            return {}
        result = self.metric.compute()
        self.metric.reset()
        return {name: float(result[name]) for name in ("map", "map_50", "map_75")}


def detection_outputs(outputs, inputs):
    """What box mAP needs of the detector's outputs: class logits and boxes (normalised centre x/y, width, height)."""
    return outputs.logits, outputs.pred_boxes


def compare_boxes(processor, examples):
    """``AveragePrecision``'s ``compare`` for boxes: the post-processed detections at each image's size (every query
    and class kept) and the image's COCO boxes (crowd regions marked, which COCO's evaluation ignores)."""

    def compare(predictions, indices):
        logits, boxes = (tensor.float().cpu() for tensor in predictions)
        found = [examples[index] for index in indices]
        sizes = torch.tensor([image.size[::-1] for image, _ in found])  # (height, width)
        detections = processor.post_process_object_detection(
            SimpleNamespace(logits=logits, pred_boxes=boxes), threshold=0.0, target_sizes=sizes)
        truths = []
        for _, objects in found:
            x, y, width, height = torch.tensor([o["bbox"] for o in objects]).reshape(-1, 4).float().unbind(-1)
            truths.append({"boxes": torch.stack([x, y, x + width, y + height], -1),
                           "labels": torch.tensor([o["category_id"] for o in objects], dtype=torch.long),
                           "iscrowd": torch.tensor([o.get("iscrowd", 0) for o in objects], dtype=torch.long)})
        return detections, truths

    return compare


def build_model(args, labels):
    """A new detector on ``--backbone``'s weights, or ``--model``'s detector with a head for ``labels``."""
    label_fields = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    head = dict(d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers, num_queries=args.queries,
                encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model)
    try:
        if args.model:
            return AutoModelForObjectDetection.from_pretrained(args.model, trust_remote_code=True,
                                                               ignore_mismatched_sizes=True, **label_fields)
        return detection.MambaVisionForObjectDetection.from_backbone(args.backbone, **head, **label_fields)
    except (OSError, ValueError) as error:
        fail(f"cannot load {args.model or args.backbone}: {first_line(error)}")


def model_card(args, trainer, template, labels, metrics, eval_images, repo_id, data, pipeline_tag, tags):
    """The output folder's README.md from ``template``: the base model's license, the evaluation's mAP, the training
    settings."""
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
                              pipeline_tag=pipeline_tag, tags=["vision", *tags, "mambavision"])
    targs = trainer.args
    return ModelCard.from_template(
        card_data, template_str=template, name=Path(repo_id).name, base=base, data=data, labels=labels,
        map=metrics.get("eval_map"), map50=metrics.get("eval_map_50"), eval_images=eval_images, repo_id=repo_id,
        steps=trainer.state.global_step, learning_rate=targs.learning_rate, seed=args.seed,
        backbone_learning_rate=args.backbone_learning_rate, image_size=args.image_size, license=license_text,
        global_batch=targs.per_device_train_batch_size * targs.world_size * targs.gradient_accumulation_steps)


class DetectionTrainer(scale_utils.FineTuningTrainer):
    """Trainer with the backbone at its own learning rate (DETR practice: a tenth of the head's), whose evaluation
    hands ``compute_metrics`` what ``kept_outputs(outputs, inputs)`` keeps of each batch's outputs and the batch's
    ``EXAMPLE_INDEX``: tensors of one shape on every process, which Trainer gathers across processes (the labels,
    a list of each image's objects, it cannot).

    ``object_count(inputs)`` (optional) counts a batch's objects, for a loss that transformers normalises by the
    count of all processes' objects, with its multi-process bug undone (``loss_scale``)."""

    def __init__(self, *args, backbone_learning_rate, kept_outputs, object_count=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_learning_rate, self.kept_outputs = backbone_learning_rate, kept_outputs
        self.object_count = object_count

    def create_optimizer(self, *args, **kwargs):
        backbone = {id(parameter) for parameter in self.model.backbone.parameters()}
        groups = [[p for p in self.model.parameters() if p.requires_grad and (id(p) in backbone) == is_backbone]
                  for is_backbone in (False, True)]
        self.optimizer = torch.optim.AdamW([{"params": groups[0]},
                                            {"params": groups[1], "lr": self.backbone_learning_rate}],
                                           lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return self.optimizer

    def compute_loss(self, model, inputs, *args, **kwargs):
        inputs.pop(EXAMPLE_INDEX, None)  # for evaluation, not the model
        scale = self.loss_scale(inputs)
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if scale == 1.0:
            return result
        return (result[0] * scale, *result[1:]) if isinstance(result, tuple) else result * scale

    def loss_scale(self, inputs):
        """transformers' DETR-family losses divide by the processes' mean object count (accelerate's ``reduce``)
        divided by the world size once more, clamped at 1: on N processes about N times DETR's loss, whose
        normaliser is each process's share of all objects (every release of 4.40 to 5.x). The factor that restores
        DETR's (so N processes train and evaluate as one with the same global batch); 1 on one process."""
        processes = self.args.world_size
        if processes == 1 or self.object_count is None:
            return 1.0
        total = torch.tensor(float(self.object_count(inputs)), device=self.args.device)
        torch.distributed.all_reduce(total)
        return max(total.item() / processes**2, 1.0) / max(total.item() / processes, 1.0)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        indices = inputs.pop(EXAMPLE_INDEX)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.mean().detach(), self.kept_outputs(outputs, inputs), indices


def add_arguments(parser, learning_rate, backbone_learning_rate, weight_decay):
    """The arguments of finetune_detection.py and finetune_instance_segmentation.py past their data and head."""
    parser.add_argument("--eval-images", help="folder of evaluation images (with --eval-annotations)")
    parser.add_argument("--eval-annotations", help="COCO json of --eval-images")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output folder to this Hub repository")
    parser.add_argument("--image-size", type=int, default=800, help="shortest image edge (default: 800)")
    parser.add_argument("--max-size", type=int, default=1333, help="longest image edge (default: 1333)")
    parser.add_argument("--epochs", type=float, default=50, help="training epochs (default: 50)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="images per process and step (default: 4)")
    parser.add_argument("--eval-batch-size", type=int,
                        help="evaluation images per process and batch (default: --batch-size); 1 scores each image "
                             "as the pipeline does: a batch is padded to its largest image, and MambaVision's windows "
                             "carry that padding into every image's features")
    parser.add_argument("--learning-rate", type=float, default=learning_rate,
                        help=f"head learning rate (default: {learning_rate})")
    parser.add_argument("--backbone-learning-rate", type=float, default=backbone_learning_rate,
                        help=f"backbone's (default: {backbone_learning_rate})")
    parser.add_argument("--weight-decay", type=float, default=weight_decay,
                        help=f"AdamW weight decay (default: {weight_decay})")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process (default: 2)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new head and the data order (default: 0)")
    scale_utils.add_output_arguments(parser)


def check_arguments(parser, args):
    """Refuse what ``add_arguments``' arguments cannot be, before any training."""
    if bool(args.eval_images) != bool(args.eval_annotations):
        parser.error("--eval-images and --eval-annotations go together")
    for name in ("batch_size", "eval_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    scale_utils.check_output_dir(parser, args)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="MambaVision folder or Hub id whose backbone a new detector starts from")
    source.add_argument("--model", help="a MambaVision detector folder or Hub id to fine-tune further")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-images", help="folder of training images (with --train-annotations)")
    data.add_argument("--dataset", help="a `datasets` dataset (Hub id or folder) with image and objects columns")
    parser.add_argument("--train-annotations", help="COCO json of --train-images")
    parser.add_argument("--train-split", default="train", help="--dataset split to train on (default: train)")
    parser.add_argument("--eval-split", help="--dataset split to evaluate on (default: none)")
    parser.add_argument("--d-model", type=int, default=256, help="new head: width (default: 256)")
    parser.add_argument("--layers", type=int, default=6, help="new head: encoder and decoder layers (default: 6)")
    parser.add_argument("--queries", type=int, default=300, help="new head: object queries (default: 300)")
    add_arguments(parser, learning_rate=2e-4, backbone_learning_rate=2e-5, weight_decay=1e-4)
    args = parser.parse_args(argv)
    if args.layers < 2:  # transformers 5.x fails to build Deformable DETR with one decoder layer
        parser.error("--layers must be at least 2")
    if args.train_images and not args.train_annotations:
        parser.error("--train-images needs --train-annotations")
    check_arguments(parser, args)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        return run(args)
    finally:
        scale_utils.leave_process_group()


def training_arguments(args, **fields):
    """The TrainingArguments of both scripts, with ``fields`` (the scheduler, DDP's unused parameters) on top.
    First: they set up torchrun's processes."""
    use_cpu = args.cpu or not torch.cuda.is_available()
    return TrainingArguments(
        **scale_utils.checkpointing(args), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, warmup_steps=0.05, bf16=not use_cpu,
        use_cpu=use_cpu, seed=args.seed, data_seed=args.seed, dataloader_num_workers=args.num_workers,
        remove_unused_columns=False, eval_strategy="no", batch_eval_metrics=True, logging_steps=args.logging_steps,
        report_to="none", **fields)


def run(args):
    training_args = training_arguments(
        args, lr_scheduler_type="cosine",
        ddp_find_unused_parameters=True)  # the backbone's stage-1 output norm, which the head does not read
    with scale_utils.output_lock(args):
        return train(args, training_args)


def train(args, training_args):
    with scale_utils.main_process_first():
        train_set, eval_set, labels = load_data(args)
        set_seed(args.seed)  # the new head's initialisation
        model = build_model(args, labels)
        checkpoint = scale_utils.resume_point(args)
    processor = DeformableDetrImageProcessor(size={"shortest_edge": args.image_size, "longest_edge": args.max_size})
    trainer = DetectionTrainer(
        model=model, args=training_args, train_dataset=Numbered(train_set),
        eval_dataset=Numbered(eval_set) if eval_set is not None else None,
        data_collator=NumberedCollator(Collator(processor)), kept_outputs=detection_outputs,
        object_count=lambda inputs: sum(len(target["class_labels"]) for target in inputs["labels"]),
        compute_metrics=AveragePrecision("bbox", compare_boxes(processor, eval_set)),
        backbone_learning_rate=args.backbone_learning_rate,
        callbacks=[scale_utils.CompleteCheckpoints(args.save_total_limit)])
    metrics = scale_utils.train(trainer, checkpoint)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
    trained = scale_utils.trained_model(trainer, type(model))  # every process takes part
    if trainer.is_world_process_zero():
        card = model_card(args, trainer, CARD_TEMPLATE, labels, metrics, len(eval_set or []),
                          args.push_to_hub or Path(args.output_dir).name,
                          data=args.dataset or Path(args.train_annotations).stem, pipeline_tag="object-detection",
                          tags=["object-detection"])
        write_output(args, trainer, trained, processor, metrics, card, "box mAP", "detector")
    return 0


def write_output(args, trainer, trained, processor, metrics, card, measure, kind):
    """Process 0: the Hub-ready folder (the trained model with its code and handler, the processor, the results, the
    model card), written whole or not at all, then uploaded with --push-to-hub; ``measure`` names the mAP in the
    printed line, ``kind`` the model in the upload's commit message."""
    output_dir = Path(args.output_dir)
    with scale_utils.staged_output(args) as folder:
        hub_folder.save_head_folder(trained, processor, folder)
        scale_utils.save_results(folder, trainer, metrics)
        card.save(folder / "README.md")
    summary = f" (eval {measure} {metrics['eval_map']:.3f}, mAP@0.5 {metrics['eval_map_50']:.3f})" \
        if "eval_map" in metrics else ""
    print(f"wrote {output_dir}{summary}")
    if args.push_to_hub:
        try:
            publishing.push_to_hub(output_dir, args.push_to_hub, commit_message=f"Upload fine-tuned MambaVision {kind}")
        except ConversionError as error:
            fail(str(error))


if __name__ == "__main__":
    sys.exit(main())

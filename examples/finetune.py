"""Fine-tune MambaVision on your image-classification data with transformers' Trainer, on one device or many.

    # one GPU (bf16), or the CPU where there is none
    .venv/bin/python examples/finetune.py --model nvidia/MambaVision-T-1K --train-dir pets/train \\
        --eval-dir pets/val --output-dir MambaVision-T-pets
    # N GPUs with DDP (add --fsdp to shard parameters, gradients and optimizer states: FSDP2)
    .venv/bin/torchrun --nproc_per_node N examples/finetune.py ...    # or: accelerate launch --num_processes N ...
    # training throughput on random images and random weights, offline; nothing is saved
    .venv/bin/torchrun --nproc_per_node 2 examples/finetune.py --variant MambaVision-T-1K --synthetic 25600 \\
        --batch-size 128 --max-steps 60

Data: an ImageFolder tree (a folder per class: --train-dir, optional --eval-dir) or a `datasets` dataset with an
image column and a ClassLabel column (--dataset). The model gets a new head for the data's classes
(``ignore_mismatched_sizes``), with their names in its config. Training sees timm's augmentation at the model's
preprocessing (the image processor's ``train_transforms``), evaluation the image processor itself. The output
folder is Hub-ready: weights, config, model code, image processor, the Inference Endpoints handler, an example
image (the first evaluation image, else the first training one: it is uploaded with the folder) and a model card
(license from the base model's card); --push-to-hub uploads it. Seeded: a rerun on the same hardware and number
of processes repeats the run.
--batch-size is per process: the global batch is batch size x processes x --gradient-accumulation.

Long runs lose no finished work: the training state is saved every --save-steps optimizer steps into
``<output-dir>-checkpoints`` (the newest --save-total-limit complete checkpoints kept), and the same command run
again after an interruption (a kill, a preemption, an out-of-memory error) resumes from the newest complete one;
--no-resume starts over. The output folder appears whole or not at all (written beside it, then renamed); the
checkpoints are removed then, unless --keep-checkpoints. With --no-augment and a fixed seed, a resumed run
computes the losses of an uninterrupted one.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForImageClassification, TrainerCallback, TrainingArguments, set_seed

import scale_utils
from mambavision_tools import hub_folder, publishing
from mambavision_tools.report import ConversionError, first_line
from scale_utils import fail

# transformers 5.2x renamed gradient_checkpointing (the old name warns); 4.57 knows only that one
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ name }} is {{ base }} fine-tuned on {{ data }} to tell {{ labels | length }} classes apart:
{{ labels[:20] | join(", ") }}{% if labels | length > 20 %}, ...{% endif %}.
{% if accuracy is not none %}
It classifies {{ "%.2f" | format(accuracy * 100) }}% of the {{ eval_images }} evaluation images correctly.
{% endif %}
## Usage

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{{ repo_id }}", trust_remote_code=True)
print(classifier("image.jpg"))
```

## Deploy

The repository serves itself on [Inference Endpoints](https://huggingface.co/docs/inference-endpoints) (task
"Custom"): its `handler.py` answers an image body, or JSON `{"inputs": IMAGE, "parameters": {"top_k": 3}}` where
`IMAGE` is a base64-encoded image, an http(s) URL or a list of them, with the pipeline's labels and scores; a bad
request gets status 400 and `{"error": "..."}`. The same handler, called here as the endpoint calls it:

```python
import base64

from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.utils import cached_file

EndpointHandler = get_class_from_dynamic_module("handler.EndpointHandler", "{{ repo_id }}")
classifier = EndpointHandler("{{ repo_id }}")  # the endpoint passes its copy of the repository
with open(cached_file("{{ repo_id }}", "{{ example_image }}"), "rb") as file:  # the widget's example
    print(classifier({"inputs": base64.b64encode(file.read()).decode(), "parameters": {"top_k": 3}}))
```

## Training

transformers' Trainer (`examples/finetune.py` of the MambaVision Hugging Face port), {{ processes }} process(es):

| | |
|---|---|
| Steps (epochs) | {{ steps }} ({{ "%.1f" | format(epochs) }}) |
| Global batch | {{ global_batch }} |
| Optimizer | AdamW, learning rate {{ learning_rate }} (cosine, 10% warmup), weight decay {{ weight_decay }} |
| Precision | {{ precision }} |
| Augmentation | {{ augmentation }} |
| Seed | {{ seed }} |

## License

{% if license %}The base model's license applies: {{ license }}{% if license_link %} ({{ license_link }}){% endif %}.
{% else %}Check the license of the base model ({{ base }}) before use.
{% endif %}"""


class Examples(torch.utils.data.Dataset):
    """Trainer examples from (image, label) pairs: ``{"pixel_values": transform(image), "labels": label}``, any
    image mode first made RGB as the model's processor does (``to_rgb``: 16-bit and float images scaled)."""

    def __init__(self, pairs, transform, to_rgb):
        self.pairs, self.transform, self.to_rgb = pairs, transform, to_rgb

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image, label = self.pairs[index]
        return {"pixel_values": self.transform(self.to_rgb(image)), "labels": label}


class DatasetRows(torch.utils.data.Dataset):
    """(image, label) pairs from a ``datasets`` dataset's image and label columns."""

    def __init__(self, rows, image_column, label_column):
        self.rows, self.image_column, self.label_column = rows, image_column, label_column

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        return row[self.image_column], row[self.label_column]


class SyntheticImages(torch.utils.data.Dataset):
    """Random pixels (a pool of 64 tensors, repeated) and labels cycling through the classes: data that costs
    nothing to decode, for throughput measurements."""

    def __init__(self, size, num_classes, image_size, seed):
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(min(size, 64), 3, image_size, image_size, generator=generator)
        self.size, self.num_classes = size, num_classes

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"pixel_values": self.pool[index % len(self.pool)], "labels": index % self.num_classes}


def image_folder(path):
    """torchvision's ImageFolder over ``path`` (one subfolder per class)."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path)
    except (FileNotFoundError, NotADirectoryError) as error:
        fail(f"{path} is not an image folder tree (one subfolder of images per class): {error}")


def hub_dataset(args):
    """(train pairs, eval pairs or None, class names) from ``datasets.load_dataset(args.dataset)``."""
    try:
        import datasets
    except ImportError:
        fail("--dataset needs the datasets package: pip install datasets")
    try:
        splits = datasets.load_dataset(args.dataset)
    except (OSError, ValueError) as error:
        fail(f"cannot load the dataset {args.dataset}: {first_line(error)}")
    for split in filter(None, (args.train_split, args.eval_split)):
        if split not in splits:
            fail(f"the dataset {args.dataset} has no split {split!r} (it has {', '.join(splits)})")
    train = splits[args.train_split]
    for column in (args.image_column, args.label_column):
        if column not in train.column_names:
            fail(f"the dataset {args.dataset} has no column {column!r} (it has {', '.join(train.column_names)})")
    names = getattr(train.features[args.label_column], "names", None)
    if names is None:
        fail(f"the column {args.label_column!r} of {args.dataset} is not a ClassLabel: class names are needed")

    def pairs(split):
        return DatasetRows(splits[split], args.image_column, args.label_column)

    return pairs(args.train_split), pairs(args.eval_split) if args.eval_split else None, list(names)


def load_data(args):
    """(train pairs or None for --synthetic, eval pairs or None, class names)."""
    if args.dataset:
        return hub_dataset(args)
    if args.synthetic:
        return None, None, [f"class_{i}" for i in range(args.synthetic_classes)]
    train = image_folder(args.train_dir)
    evaluation = image_folder(args.eval_dir) if args.eval_dir else None
    if evaluation is not None and evaluation.classes != train.classes:
        fail(f"the class folders of {args.eval_dir} ({', '.join(evaluation.classes)}) differ from those of "
             f"{args.train_dir} ({', '.join(train.classes)})")
    return train, evaluation, train.classes


class Throughput(TrainerCallback):
    """Training images per second from the end of this run's step ``warmup`` (compilation, allocator and
    autotuning behind) to the end of training, evaluations left out, and each GPU's peak memory: printed and
    written to ``metrics_file``."""

    def __init__(self, global_batch, warmup, metrics_file=None):
        self.global_batch, self.warmup, self.metrics_file = global_batch, warmup, metrics_file
        self.start = self.warmup_end = None
        self.evaluation_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.warmup_end = state.global_step + self.warmup  # a resumed run starts at its checkpoint's step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_end:
            scale_utils.synchronize()
            self.start = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.start is not None:  # the epoch-end evaluations run inside the timed span
            self.evaluation_seconds += metrics["eval_runtime"]

    def on_train_end(self, args, state, control, **kwargs):
        scale_utils.synchronize()
        steps = state.global_step - self.warmup_end
        if self.start is None or steps <= 0:
            scale_utils.main_process_print(f"throughput: not measured (training ended at step {state.global_step}, "
                                           f"warm-up at {self.warmup_end}: raise --max-steps)")
            return
        sharded = isinstance(kwargs["model"], FSDPModule)  # what ran, whatever was asked
        seconds = time.perf_counter() - self.start - self.evaluation_seconds
        scale_utils.report("train", steps * self.global_batch, seconds, self.metrics_file,
                           global_batch=self.global_batch, steps=steps, bf16=args.bf16, fsdp=sharded)


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def training_arguments(args, scratch, evaluate):
    # on a machine without CUDA, Trainer runs torchrun's processes as one each unless told to use the CPU
    use_cpu = args.cpu or not torch.cuda.is_available()
    if args.fsdp and use_cpu:
        fail("--fsdp needs GPUs: accelerate runs FSDP on accelerators only (on the CPU, processes use DDP)")
    bf16 = not use_cpu and not args.fp32
    fsdp_config = None
    if args.fsdp:  # one FSDP unit per block: accelerate wraps the model's _no_split_modules by default
        fsdp_config = {"version": 2, "activation_checkpointing": args.gradient_checkpointing, "state_dict_type": "FULL_STATE_DICT"}
    # checkpoints where there is an output folder; --synthetic saves nothing (Trainer's folder: scratch)
    checkpoints = scale_utils.checkpointing(args) if args.output_dir else {"output_dir": scratch, "save_strategy": "no"}
    training_args = TrainingArguments(
        **checkpoints, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, lr_scheduler_type="cosine", warmup_steps=0.1, bf16=bf16, use_cpu=use_cpu,
        # with FSDP, FSDP's own activation checkpointing (fsdp_config) replaces the model's
        **{CHECKPOINTING: args.gradient_checkpointing and not args.fsdp,
           f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}},
        fsdp=args.fsdp, fsdp_config=fsdp_config,
        ddp_find_unused_parameters=False, torch_compile=args.torch_compile, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=args.num_workers, dataloader_persistent_workers=args.num_workers > 0,
        remove_unused_columns=False, eval_strategy="epoch" if evaluate else "no",
        logging_steps=args.logging_steps, report_to="none",
    )
    if args.fsdp:
        # FSDP2 would otherwise hold the parameters in bf16 (param_dtype), and BatchNorm refuses bf16 weights beside
        # its float32 running statistics: parameters stay float32 and bf16 comes from autocast, as with DDP
        training_args.fsdp_plugin_args["mixed_precision_policy"] = "fp32"
    return training_args


def example_image(eval_pairs, train_pairs, to_rgb):
    """The folder's example (the card's widget shows it): the first evaluation image, else the first training one."""
    pairs = eval_pairs if eval_pairs is not None and len(eval_pairs) else train_pairs
    return to_rgb(pairs[0][0])


def base_card_data(model):
    """The base model's card metadata (for its license), or empty metadata where it has no card."""
    readme = Path(model) / "README.md"
    if Path(model).is_dir() and not readme.is_file():
        return ModelCardData()
    try:
        return ModelCard.load(readme if readme.is_file() else model).data
    except (OSError, ValueError):  # no card on the Hub, offline, not a Hub id
        return ModelCardData()


def data_name(args):
    """(the training data's name for the card, its Hub dataset id or None): ``pets`` for ``pets/train``."""
    if args.dataset and not Path(args.dataset).exists():
        return args.dataset, args.dataset
    folder = Path(args.dataset or args.train_dir).resolve()
    return (folder.parent.name if folder.name.lower() in ("train", "training") else folder.name), None


def model_card(args, trainer, labels, metrics, eval_images, repo_id):
    """The output folder's README.md: metadata (license inherited, eval accuracy) and a short description."""
    base = base_card_data(args.model) if args.model else ModelCardData()
    is_hub_id = args.model and not Path(args.model).exists()
    data, hub_dataset_id = data_name(args)
    accuracy_value = metrics.get("eval_accuracy")
    eval_results = None
    if accuracy_value is not None:
        eval_results = [EvalResult(task_type="image-classification", dataset_type=hub_dataset_id or data,
                                   dataset_name=data, metric_type="accuracy", metric_value=accuracy_value)]
    card_data = ModelCardData(
        license=base.license, license_name=base.get("license_name"), license_link=base.get("license_link"),
        library_name="transformers", pipeline_tag="image-classification",
        tags=["vision", "image-classification", "mambavision", "mamba"],
        base_model=args.model if is_hub_id else None, datasets=[hub_dataset_id] if hub_dataset_id else None,
        model_name=Path(repo_id).name, eval_results=eval_results, widget=publishing.widget(repo_id, "Example"),
    )
    targs, state = trainer.args, trainer.state
    base_text = f"[{args.model}](https://huggingface.co/{args.model})" if is_hub_id else \
        f"MambaVision ({Path(args.variant or args.model).name})"
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, name=Path(repo_id).name, base=base_text, data=data, labels=labels,
        accuracy=accuracy_value, eval_images=eval_images, repo_id=repo_id, processes=targs.world_size,
        steps=state.global_step, epochs=state.epoch or 0.0, learning_rate=targs.learning_rate,
        weight_decay=targs.weight_decay, precision="bf16 autocast" if targs.bf16 else "float32",
        global_batch=targs.per_device_train_batch_size * targs.world_size * targs.gradient_accumulation_steps,
        augmentation="none (eval preprocessing)" if args.no_augment else "timm's training transform",
        seed=args.seed, license=base.get("license_name") or base.license, license_link=base.get("license_link"),
        example_image=hub_folder.EXAMPLE_IMAGE,
    )


def check_arguments(parser, args):
    if args.synthetic and (args.output_dir or args.push_to_hub or args.eval_dir):
        parser.error("--synthetic measures throughput and saves nothing: drop --output-dir, --eval-dir, --push-to-hub")
    if not args.synthetic and not args.output_dir:
        parser.error("--output-dir is required")
    if args.eval_dir and not args.train_dir:
        parser.error("--eval-dir goes with --train-dir (with --dataset: --eval-split)")
    scale_utils.check_output_dir(parser, args)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale_utils.add_model_arguments(parser)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-dir", help="ImageFolder tree of training images: one subfolder per class")
    data.add_argument("--dataset", help="a `datasets` dataset (Hub id or local folder) with image and label columns")
    data.add_argument("--synthetic", type=int, metavar="N", help="N random images (throughput measurement)")
    parser.add_argument("--eval-dir", help="ImageFolder tree of evaluation images, the same class folders")
    parser.add_argument("--train-split", default="train", help="--dataset split to train on (default: train)")
    parser.add_argument("--eval-split", help="--dataset split to evaluate on (default: none)")
    parser.add_argument("--image-column", default="image", help="--dataset image column (default: image)")
    parser.add_argument("--label-column", default="label", help="--dataset ClassLabel column (default: label)")
    parser.add_argument("--synthetic-classes", type=int, default=1000, help="classes of --synthetic (default 1000)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the --push-to-hub repository private")
    parser.add_argument("--epochs", type=float, default=10, help="training epochs (default: 10)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process and step (default: 32)")
    parser.add_argument("--eval-batch-size", type=int, help="evaluation images per process (default: --batch-size)")
    parser.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per step (default: 1)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW peak learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    parser.add_argument("--drop-path-rate", type=float, help="stochastic depth (default: the model's config)")
    parser.add_argument("--no-augment", action="store_true", help="train on the eval preprocessing (no randomness)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2, one unit per block (multi-GPU)")
    parser.add_argument("--torch-compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    parser.add_argument("--fp32", action="store_true", help="float32 on GPU (default there: bf16 autocast)")
    parser.add_argument("--num-workers", type=int, default=scale_utils.DEFAULT_WORKERS,
                        help="DataLoader workers per process (default: 4, at most the usable cores)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new head and the data order (default 0)")
    parser.add_argument("--timing-warmup", type=int, default=10,
                        help="steps left out of the throughput measurement (default: 10)")
    parser.add_argument("--metrics-file", help="write the throughput and peak memory to this JSON file")
    scale_utils.add_output_arguments(parser, required=False)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        return run(args)
    finally:
        scale_utils.leave_process_group()


def run(args):
    with tempfile.TemporaryDirectory() as scratch:  # Trainer's folder for --synthetic, where nothing is saved
        # first: it sets up the processes (torchrun's), which then load one after the other
        evaluate = bool(args.eval_dir or (args.dataset and args.eval_split))
        training_args = training_arguments(args, scratch, evaluate)
        with scale_utils.output_lock(args):
            return train(args, training_args, evaluate)


def train(args, training_args, evaluate):
    with scale_utils.main_process_first():
        train_pairs, eval_pairs, labels = load_data(args)
        set_seed(args.seed)  # the new head's initialisation
        config_fields = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
        if args.drop_path_rate is not None:
            config_fields["drop_path_rate"] = args.drop_path_rate
        model, processor = scale_utils.load_model(args, AutoModelForImageClassification, config_fields,
                                                  ignore_mismatched_sizes=True)
        checkpoint = scale_utils.resume_point(args) if args.output_dir else None
    model_class = type(model)  # FSDP2 changes the class of the model it shards
    # The loss is a mean over the batch: Trainer must scale it for gradient accumulation and leave it alone
    # across processes (it would normalise by num_items_in_batch for model code whose forward has **kwargs,
    # as a --model from another repository may have).
    model.accepts_loss_kwargs = False
    if args.synthetic:
        train_set = SyntheticImages(args.synthetic, len(labels), model.config.image_size, args.seed)
        eval_set = None
    else:
        train_transform = processor.val_transforms if args.no_augment else processor.train_transforms
        train_set = Examples(train_pairs, train_transform, processor.to_rgb_image)
        eval_set = None if eval_pairs is None else Examples(eval_pairs, processor.val_transforms,
                                                            processor.to_rgb_image)

    global_batch = args.batch_size * training_args.world_size * args.gradient_accumulation
    callbacks = [Throughput(global_batch, args.timing_warmup, args.metrics_file)]
    if args.output_dir:
        callbacks.append(scale_utils.CompleteCheckpoints(args.save_total_limit))
    trainer = scale_utils.FineTuningTrainer(model=model, args=training_args, train_dataset=train_set,
                                            eval_dataset=eval_set, processing_class=processor,
                                            compute_metrics=accuracy, callbacks=callbacks)
    metrics = scale_utils.train(trainer, checkpoint)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
    if args.synthetic:
        return 0
    model = scale_utils.trained_model(trainer, model_class)  # every process takes part
    if not trainer.is_world_process_zero():
        return 0
    output_dir = Path(args.output_dir)
    repo_id = args.push_to_hub or output_dir.name
    with scale_utils.staged_output(args) as folder:
        example = example_image(eval_pairs, train_pairs, processor.to_rgb_image)
        hub_folder.save_model_folder(model, folder, example_image=example)
        scale_utils.save_results(folder, trainer, metrics)
        model_card(args, trainer, labels, metrics, len(eval_set or []), repo_id).save(folder / "README.md")
    print(f"wrote {output_dir}" + (f" (eval accuracy {metrics['eval_accuracy']:.4f})" if eval_set else ""))
    if args.push_to_hub:
        try:
            publishing.push_to_hub(output_dir, args.push_to_hub, private=args.private,
                                   commit_message="Upload fine-tuned MambaVision")
        except ConversionError as error:
            fail(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())

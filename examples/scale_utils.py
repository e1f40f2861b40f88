"""What the example scripts share: where the model comes from, the throughput report, and the fine-tuning
scripts' checkpoints and output folder.

The model is a converted folder or Hub id (transformers' Auto classes with ``trust_remote_code``), that
folder's config with random weights (``--random-weights``), or a variant's architecture from
``mambavision_tools.variants`` with random weights (``--variant``): the last two need no weights and the last no
folder, so that benchmarks of the large variants run offline.

Fine-tuning (with Trainer) loses no finished work: Trainer saves its state (model, optimizer, scheduler, RNG,
step) every ``--save-steps`` into ``<output-dir>-checkpoints``, ``CompleteCheckpoints`` marks each one complete once
every process has written it and keeps the newest ``--save-total-limit``, and the same command run again resumes
from the newest complete one (``resume_point``, ``train``); the output folder is written beside and renamed into
place (``staged_output``), after which the checkpoints go unless ``--keep-checkpoints``. The four fine-tuning
scripts use them as::

    add_output_arguments(parser); ...; check_output_dir(parser, args)
    TrainingArguments(**scale_utils.checkpointing(args), ...)
    with scale_utils.output_lock(args):
        with scale_utils.main_process_first():
            ...  # load the data and the model
            checkpoint = scale_utils.resume_point(args)
        trainer = scale_utils.FineTuningTrainer(  # or a subclass
            ..., callbacks=[scale_utils.CompleteCheckpoints(args.save_total_limit)])
        metrics = scale_utils.train(trainer, checkpoint)
        model = scale_utils.trained_model(trainer, model_class)  # every process takes part
        if trainer.is_world_process_zero():
            with scale_utils.staged_output(args) as folder:
                ...  # write the output into folder
                scale_utils.save_results(folder, trainer, metrics)
"""

import argparse
import contextlib
import difflib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoImageProcessor, Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging as transformers_logging

from mambavision_tools import model_code, staging
from mambavision_tools.report import ConversionError, first_line
from mambavision_tools.variants import PROJECT_VARIANTS, VARIANTS

GIB = 2**30
# DataLoader workers: 4, or fewer where the process may use fewer cores (PyTorch warns above that)
DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
NEW_HEAD = "model.head."  # the classifier's weights, replaced when the classes change
COMPLETE = "checkpoint_complete"  # in a checkpoint folder once every process's files of it are on disk


def fail(message):
    """Stop with one ``error:`` line (exit status 1)."""
    raise SystemExit(f"error: {message}")


def add_model_arguments(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="converted model folder or Hub id, loaded with trust_remote_code")
    source.add_argument("--variant", help="a variant's architecture with random weights, offline (for benchmarks), "
                                          "e.g. MambaVision-T-1K or MambaVision-L3-512-21K")
    parser.add_argument("--random-weights", action="store_true",
                        help="with --model: its config and processor, random weights (for benchmarks)")


def variant_config(name, **fields):
    """The ``MambaVisionConfig`` of a variant's architecture and preprocessing, with ``fields`` on top."""
    known = {**VARIANTS, **PROJECT_VARIANTS}
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        fail(f"unknown variant {name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    variant = known[name]
    config_class = model_code.load("configuration_mambavision").MambaVisionConfig
    return config_class(**{**variant.architecture, **variant.preprocessing, **fields})


def load_model(args, auto_class, config_fields=None, **load_kwargs):
    """(model, image processor) from ``--model``/``--variant``/``--random-weights``.

    ``auto_class`` is the transformers Auto class to load (``AutoModel``, ``AutoModelForImageClassification``);
    ``config_fields`` override fields of the config (labels, ``drop_path_rate``); ``load_kwargs`` go to
    ``from_pretrained`` (e.g. ``ignore_mismatched_sizes``).
    """
    config_fields = config_fields or {}
    if args.variant:
        if args.random_weights:
            fail("--random-weights goes with --model (a --variant model has random weights already)")
        config = variant_config(args.variant, **config_fields)
        model_class = _model_class(auto_class)
        processor = model_code.load("image_processing_mambavision").MambaVisionImageProcessor.from_model_config(config)
        return model_class(config), processor
    try:
        if args.random_weights:
            config = AutoConfig.from_pretrained(args.model, trust_remote_code=True, **config_fields)
            model = auto_class.from_config(config, trust_remote_code=True)
        else:
            model = _from_pretrained(auto_class, args.model, **config_fields, **load_kwargs)
        processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    except (OSError, ValueError) as error:  # missing folder or repo, no weights, not a MambaVision model
        fail(f"cannot load {args.model}: {first_line(error)}")
    return model, processor


@contextlib.contextmanager
def quiet_loading():
    """transformers without its loading report and its progress bar per file read or written, as before
    afterwards: a model loads in a second or two, and the scripts print one line per result."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _from_pretrained(auto_class, model, **kwargs):
    """``auto_class.from_pretrained(model)``, with transformers' loading report (a table) replaced by one line: the
    new head, where the classes change, is expected; anything else the report would list is printed."""
    with quiet_loading():
        loaded, info = auto_class.from_pretrained(model, trust_remote_code=True, output_loading_info=True, **kwargs)
    mismatched = sorted(key for key, *_ in info.get("mismatched_keys") or ())
    heads = [key for key in mismatched if key.startswith(NEW_HEAD)]
    surprises = {"missing": sorted(info.get("missing_keys") or ()), "unexpected": sorted(info.get("unexpected_keys") or ()),
                 "mismatched": [key for key in mismatched if key not in heads]}
    if heads:
        print(f"loaded {model} with a new head for {loaded.config.num_labels} classes (random {', '.join(heads)})")
    for what, keys in surprises.items():
        if keys:
            print(f"warning: loading {model}: {len(keys)} {what} tensor(s): {', '.join(keys[:5])}"
                  f"{', ...' if len(keys) > 5 else ''}", file=sys.stderr)
    return loaded


def _model_class(auto_class):
    """The class of this repository's model code that ``auto_class`` loads from a converted folder."""
    module, name = model_code.load("modeling_mambavision").AUTO_MAP[auto_class.__name__].split(".")
    return getattr(model_code.load(module), name)


def distributed():
    """(rank, world size): torch.distributed's when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first, the other ranks once it is done: loading remote code writes transformers'
    module cache, which a rank could otherwise import half-written from another (huggingface/transformers#27421);
    a dataset download likewise happens once."""
    rank, world = distributed()
    if rank != 0:
        dist.barrier()
    yield
    if rank == 0 and world > 1:
        dist.barrier()


def leave_process_group():
    """Destroy torch.distributed's process group, where one was made (here or by Trainer), before the interpreter
    shuts down: gloo's worker threads otherwise abort the process at exit (SIGABRT, "terminate called")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def peak_memory_per_device():
    """Peak CUDA memory allocated by each process (GiB, in rank order), or ``None`` on CPU. Every rank calls it."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / GIB
    rank, world = distributed()
    if world == 1:
        return [peak]
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    return peaks


def report(task, images, seconds, metrics_file=None, **details):
    """Print the throughput line on rank 0 and write it, with ``details``, to ``metrics_file`` as JSON.

    Every rank calls it (the memory gather is collective); ``images`` counts all ranks' images.
    """
    peaks = peak_memory_per_device()
    rank, world = distributed()
    if rank != 0:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    line = (f"throughput: {task} {images / seconds:,.1f} img/s ({images:,} images in {seconds:.2f} s, "
            f"{world} process{'es' if world > 1 else ''} on {device})")
    if peaks is not None:
        line += "; peak memory per GPU: " + ", ".join(f"{peak:.2f}" for peak in peaks) + " GiB"
    print(line, flush=True)
    if metrics_file:
        record = {"task": task, "images_per_second": images / seconds, "images": images, "seconds": seconds,
                  "processes": world, "device": device, "peak_memory_gib": peaks, **details}
        Path(metrics_file).write_text(json.dumps(record, indent=2) + "\n")


def synchronize():
    """Wait for the GPU's queued work, so that wall-clock times cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main_process_print(*values):
    if distributed()[0] == 0:
        print(*values, file=sys.stdout, flush=True)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {text}")
    return value


def add_output_arguments(parser, required=True):
    """--output-dir (the Hub-ready folder, written whole at the end), --overwrite, and the checkpoints' arguments."""
    parser.add_argument("--output-dir", required=required, help="the Hub-ready folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    group = parser.add_argument_group("checkpoints", "the same command run again resumes from the newest complete one")
    group.add_argument("--save-steps", type=_positive_int, default=500,
                       help="save the training state every N optimizer steps (default: 500)")
    group.add_argument("--save-total-limit", type=_positive_int, default=2,
                       help="how many complete checkpoints to keep, the newest (default: 2)")
    group.add_argument("--checkpoint-dir", help="where they go (default: <output-dir>-checkpoints)")
    group.add_argument("--keep-checkpoints", action="store_true",
                       help="keep them once the output folder is written (default: removed then)")
    group.add_argument("--no-resume", action="store_true", help="start over: remove the checkpoints of an earlier run")


def check_output_dir(parser, args):
    """Refuse, before any training, an --output-dir that a finished run would not be allowed to replace."""
    output = Path(args.output_dir) if args.output_dir else None
    if output and output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        parser.error(f"the output folder {output} exists and is not empty (pass --overwrite to replace it)")


def checkpoint_dir(args):
    output = Path(args.output_dir).resolve()
    folder = Path(args.checkpoint_dir or output.with_name(f"{output.name}-checkpoints")).resolve()
    if folder == output or output in folder.parents:
        fail(f"--checkpoint-dir {folder} lies in --output-dir, which is written whole at the end: choose another")
    return folder


def checkpointing(args):
    """TrainingArguments' fields for checkpoints every --save-steps in ``checkpoint_dir(args)``; their number is
    ``CompleteCheckpoints``' to limit, not Trainer's (its rotation would delete the newest complete checkpoint
    before the next is)."""
    return {"output_dir": str(checkpoint_dir(args)), "save_strategy": "steps", "save_steps": args.save_steps}


def checkpoints(folder):
    """Trainer's ``checkpoint-<step>`` folders in ``folder``, oldest first."""
    steps = {}
    for path in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if step.isascii() and step.isdigit() and path.is_dir():
            steps[int(step)] = path
    return [steps[step] for step in sorted(steps)]


def complete_checkpoints(folder):
    return [path for path in checkpoints(folder) if (path / COMPLETE).is_file()]


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once every process has written its part, then keeps the newest ``limit``.

    Trainer (4.40 .. 5.x) writes a checkpoint file after file into its final folder, each process its own files
    with no barrier after them: a run killed meanwhile leaves a folder without the mark, which ``resume_point``
    never loads. The files reach the disk before the mark does (a preempted machine may not flush them)."""

    def __init__(self, limit):
        self.limit = limit

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process's files are written
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        for path in [*checkpoint.rglob("*"), checkpoint]:  # files and folders (FSDP writes folders of shards)
            _fsync(path)
        mark = checkpoint / f".{COMPLETE}.tmp"
        mark.write_text(f"{state.global_step}\n")
        _fsync(mark)
        mark.rename(checkpoint / COMPLETE)
        _fsync(checkpoint)
        for old in complete_checkpoints(args.output_dir)[:-self.limit]:
            (old / COMPLETE).unlink()  # first: a removal cut short leaves an incomplete folder, never a marked one
            shutil.rmtree(old)


class FineTuningTrainer(Trainer):
    """The fine-tuning scripts' Trainer: a learning-rate schedule that outlasts its warm-up, and every process
    evaluating the model that process 0 saves."""

    def create_scheduler(self, num_training_steps, optimizer=None):
        """A schedule at least one step longer than its warm-up: transformers' polynomial schedule divides by the
        steps after the warm-up, and fails (ZeroDivisionError) after the last step where the warm-up takes them all
        (one step under a 5% warm-up, --warmup-steps equal to the steps). The steps taken get the learning rates of
        the schedule asked for."""
        steps = max(num_training_steps, self.args.get_warmup_steps(num_training_steps) + 1)
        return super().create_scheduler(steps, optimizer)

    def evaluate(self, *args, **kwargs):
        """Evaluation with process 0's buffers (BatchNorm's running statistics) on every process: DDP gives each
        training forward process 0's, which each process then updates from its own batch, so after training every
        process would evaluate statistics of its own, not those of the model that process 0 saves."""
        if dist.is_available() and dist.is_initialized():
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        return super().evaluate(*args, **kwargs)


def resume_point(args):
    """The newest complete checkpoint of ``checkpoint_dir(args)`` to resume from, or None (none, or --no-resume).

    Process 0 removes the other checkpoints that must never be loaded (cut short by a kill; all of them with
    --no-resume) and says where training starts, in one line. Every process calls it, in ``main_process_first``.
    """
    folder = checkpoint_dir(args)
    found = checkpoints(folder)
    complete = [] if args.no_resume else [path for path in found if (path / COMPLETE).is_file()]
    if distributed()[0] == 0:
        removed = [path for path in found if path not in complete]
        for path in removed:
            shutil.rmtree(path)
        line = "starting from step 0"
        if complete:
            state = TrainerState.load_from_json(complete[-1] / "trainer_state.json")
            line = f"resuming from {complete[-1]} (step {state.global_step}, epoch {state.epoch:.2f})" + \
                ("; training had finished" if state.global_step >= state.max_steps else "")
        if removed:
            why = "--no-resume" if args.no_resume else "cut short before complete"
            line += f"; removed {', '.join(path.name for path in removed)} from {folder} ({why})"
        if found:
            print(line, flush=True)
    return str(complete[-1]) if complete else None


def finished_state(checkpoint):
    """The TrainerState of ``checkpoint`` where it was saved at the end of training (the run was killed while
    writing its output), else None."""
    if checkpoint is None:
        return None
    state = TrainerState.load_from_json(Path(checkpoint) / "trainer_state.json")
    return state if state.global_step >= state.max_steps else None


def train(trainer, checkpoint):
    """``trainer.train`` resumed from ``checkpoint`` (``resume_point``'s): its metrics. From a checkpoint saved at
    the end of training, the trainer takes the checkpoint's weights and state instead and trains no more (Trainer
    resumed from it would take one more step, 5.x): no metrics. Every process calls it, before the model is
    wrapped (FSDP, DDP).

    The weights are loaded here, through ``from_pretrained``, and not only by Trainer: transformers 5 saves some
    models' weights under their original names (Deformable DETR's) and Trainer loads them without renaming them
    back, leaving most weights as they were (huggingface/transformers#43701); its warnings about those keys are
    dropped, the weights being loaded already."""
    if checkpoint is not None:
        load_weights(trainer.model, checkpoint)
    finished = finished_state(checkpoint)
    if finished is not None:
        trainer.state = finished
        return {}
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addFilter(_unmatched_keys_warnings)
    try:
        return dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
    finally:
        trainer_logger.removeFilter(_unmatched_keys_warnings)


def _unmatched_keys_warnings(record):
    return "keys in the checkpoint model loaded" not in record.getMessage()


def load_weights(model, checkpoint):
    """The weights (and buffers) of a checkpoint that Trainer saved from a model like ``model`` into ``model``, in
    place (where Trainer put it: its device); a checkpoint that lacks any, has others or has them in other shapes
    (another model's: the command changed) is refused in one line."""
    try:
        with quiet_loading():
            trained, info = type(model).from_pretrained(checkpoint, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:  # no weights file, an unreadable one, not its config's
        fail(f"cannot resume from {checkpoint}: {first_line(error)}; --no-resume starts over")
    expected, weights = model.state_dict(), trained.state_dict()
    wrong = {"missing": {*map(str, info.get("missing_keys") or ()), *(expected.keys() - weights.keys())},
             "unexpected": {*map(str, info.get("unexpected_keys") or ()), *(weights.keys() - expected.keys())},
             "of another shape": {name for name in expected.keys() & weights.keys()
                                  if expected[name].shape != weights[name].shape}}
    if any(wrong.values()):
        fail(f"cannot resume from {checkpoint}: its weights do not fit the model (" + "; ".join(
            f"{len(names)} {what}, e.g. {min(names)}" for what, names in wrong.items() if names) +
            "); --no-resume starts over")
    model.load_state_dict(weights)


def trained_model(trainer, model_class):
    """The trained model on process 0 (None on the others), its weights gathered from every process (FSDP shards
    too), all of them taking part. A new model of the original class: under FSDP2 the trained model's class is a
    subclass made by torch, whose module and name would be saved instead."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    with torch.device("meta"):  # no memory, no initialisation: the weights come next
        model = model_class(trainer.model.config)
    model.load_state_dict(state_dict, assign=True)
    return model


def save_results(folder, trainer, metrics):
    """``all_results.json`` (``metrics``) and ``trainer_state.json`` (the logged losses) into ``folder``."""
    (Path(folder) / "all_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True) + "\n")
    trainer.state.save_to_json(Path(folder) / "trainer_state.json")


@contextlib.contextmanager
def output_lock(args):
    """Process 0 holds --output-dir's lock for the block (one run at a time writes its checkpoints and folder) and
    first removes the staging folders of killed runs (``mambavision_tools.staging``). Nothing without
    --output-dir. Errors of the block's staged output become one line."""
    if not args.output_dir or int(os.environ.get("RANK", 0)) != 0:  # torchrun's and accelerate's rank
        yield
        return
    try:
        with staging.output_lock(Path(args.output_dir), job="fine-tuning run"):
            yield
    except ConversionError as error:
        fail(str(error))


@contextlib.contextmanager
def staged_output(args):
    """An empty folder that becomes --output-dir once the block ends (replacing a folder there with --overwrite);
    nothing of it is left if the block fails. Then the checkpoints go, unless --keep-checkpoints. Process 0 only,
    inside ``output_lock(args)``."""
    with staging.staged_folder(Path(args.output_dir).resolve(), replace=args.overwrite) as folder:
        yield folder
    if not args.keep_checkpoints:
        for checkpoint in checkpoints(checkpoint_dir(args)):
            shutil.rmtree(checkpoint)
        with contextlib.suppress(OSError):  # kept where something else is in it
            checkpoint_dir(args).rmdir()

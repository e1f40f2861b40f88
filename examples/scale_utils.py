"""What finetune.py and extract_features.py share: where the model comes from, and the throughput report.

The model is a converted folder or Hub id (transformers' Auto classes with ``trust_remote_code``), that
folder's config with random weights (``--random-weights``), or a variant's architecture from
``mambavision_tools.variants`` with random weights (``--variant``): the last two need no weights and the last no
folder, so that benchmarks of the large variants run offline.
"""

import contextlib
import difflib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoImageProcessor
from transformers.utils import logging as transformers_logging

from mambavision_tools import model_code
from mambavision_tools.report import first_line
from mambavision_tools.variants import PROJECT_VARIANTS, VARIANTS

GIB = 2**30
# DataLoader workers: 4, or fewer where the process may use fewer cores (PyTorch warns above that)
DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
NEW_HEAD = "model.head."  # the classifier's weights, replaced when the classes change


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

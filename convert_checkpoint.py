"""Convert NVIDIA's original MambaVision checkpoints into Hub-ready model folders, and publish them.

    python convert_checkpoint.py --variant MambaVision-T-1K --checkpoint mambavision_tiny_1k.pth.tar \\
        --output-dir converted/MambaVision-T-1K --verify
    python convert_checkpoint.py --all --checkpoint-dir originals/ --output-dir converted/ --verify
    python convert_checkpoint.py --variant MambaVision-T-1K --output-dir converted/MambaVision-T-1K \\
        --push-to-hub my-org/MambaVision-T-1K --dry-run

A folder holds ``config.json``, safetensors weights, the model code (loaded with ``trust_remote_code``) and a
model card. Checkpoints are read without running pickled code, checked tensor by tensor against the
architecture before anything is written, and folders appear only once complete.
"""

import argparse
import difflib
import inspect
import json
import math
import pickle
import re
import shutil
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from safetensors.torch import load_file
from timm.data import ImageNetInfo
from transformers import AutoModelForImageClassification
from transformers.utils.hub import convert_file_size_to_int
from transformers.utils import logging as transformers_logging

from mambavision_tools import model_code
from mambavision_tools.variants import PROJECT_VARIANTS, RESULTS_SOURCE, VARIANTS, Variant

MambaVisionConfig = model_code.load("configuration_mambavision").MambaVisionConfig

# Original state-dict key -> transformers key, applied in order (the dinov3 converter's style).
KEY_RENAMES = [
    (r"^module\.", ""),  # DistributedDataParallel wrapper
    (r"^", "model."),  # the backbone lives under `model` in both transformers classes
]

# Original constructor arguments -> config fields (same names except the class count).
ARGUMENT_RENAMES = {"num_classes": "num_labels"}
ARCHITECTURE_FIELDS = ("depths", "num_heads", "window_size", "dim", "in_dim", "mlp_ratio", "drop_path_rate",
                       "layer_scale", "layer_scale_conv")


def rename_key(key):
    for pattern, replacement in KEY_RENAMES:
        key = re.sub(pattern, replacement, key, count=1)
    return key


def convert_state_dict(state_dict):
    """Original tensors under transformers names."""
    return {rename_key(key): tensor for key, tensor in state_dict.items()}


def config_from_architecture(architecture, **extra):
    """A ``MambaVisionConfig`` from the original constructor arguments (as in variants.json)."""
    fields = {ARGUMENT_RENAMES.get(k, k): v for k, v in architecture.items()
              if k in ARCHITECTURE_FIELDS or k in ARGUMENT_RENAMES}
    fields["num_heads"] = [h if h is not None else 1 for h in fields.get("num_heads", [])] or None
    return MambaVisionConfig(**{k: v for k, v in fields.items() if v is not None or k.startswith("layer_scale")},
                             **extra)


AUTO_MAP = {
    "AutoConfig": "configuration_mambavision.MambaVisionConfig",
    "AutoModel": "modeling_mambavision.MambaVisionModel",
    "AutoModelForImageClassification": "modeling_mambavision.MambaVisionModelForImageClassification",
    "AutoBackbone": "modeling_mambavision.MambaVisionBackbone",
}


def save_model_folder(model, folder, max_shard_size="2GB"):
    """``save_pretrained`` plus the model code, an ``auto_map`` and the image processor of the config's
    preprocessing (``preprocessor_config.json``), so the folder loads with trust_remote_code."""
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    for name in model_code.MODEL_FILES:
        shutil.copy2(model_code.ROOT / name, Path(folder) / name)
    image_processing = model_code.load("image_processing_mambavision")
    image_processing.MambaVisionImageProcessor.from_model_config(model.config).save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# The converter

CARD_TEMPLATE = model_code.ROOT / "model_cards" / "mambavision.md"
CARD_TAGS = ["vision", "image-classification", "image-feature-extraction", "mambavision", "mamba"]
PREPROCESSING_FIELDS = {"image_size": int, "crop_pct": (int, float), "crop_mode": str, "interpolation": str,
                        "mean": list, "std": list}
# what --config accepts: MambaVisionConfig's own arguments and the label fields
CONFIG_FIELDS = set(inspect.signature(MambaVisionConfig.__init__).parameters) - {"self", "kwargs"}
CONFIG_FIELDS |= {"num_labels", "id2label", "label2id"}
VERIFY_TOLERANCE = 1e-5


class ConversionError(Exception):
    """Bad input or a failed step: reported as one ``error:`` line, exit status 1."""

    exit_code = 1


class UsageError(ConversionError):
    """Bad command-line arguments: exit status 2."""

    exit_code = 2


def progress(message):
    print(message, flush=True)


def _listing(names, limit=6):
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def get_variant(name):
    """The table entry for a Hub name (NVIDIA's or one trained here), or an error that suggests the closest names."""
    known = {**VARIANTS, **PROJECT_VARIANTS}
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConversionError(f"unknown variant {name!r}{hint}; --list-variants shows the {len(VARIANTS)} variants")


def variant_from_config_file(path, name):
    """A custom ``Variant`` from a JSON of config fields (original argument names such as ``num_classes`` too)."""
    path = Path(path)
    try:
        fields = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"cannot read the config {path}: {_first_line(error)}") from None
    if not isinstance(fields, dict):
        raise ConversionError(f"the config {path} must hold a JSON object of config fields")
    fields = {ARGUMENT_RENAMES.get(key, key): value for key, value in fields.items()}
    unknown = sorted(set(fields) - CONFIG_FIELDS)
    if unknown:
        raise ConversionError(f"unknown field(s) in the config {path}: {_listing(unknown)}")
    preprocessing = {key: fields.pop(key) for key in PREPROCESSING_FIELDS if key in fields}
    wrong = [key for key, value in preprocessing.items() if not isinstance(value, PREPROCESSING_FIELDS[key])
             or isinstance(value, bool) or (key == "image_size" and value <= 0)]
    if wrong:
        raise ConversionError(f"invalid value of {_listing(wrong)} in the config {path}")
    # a 1000-class head without names of its own is an ImageNet-1k classifier
    imagenet_labels = "id2label" not in fields and fields.get("num_labels", 1000) == 1000
    if imagenet_labels:
        fields.pop("num_labels", None)
    variant = Variant(name=name, repo_id=name, checkpoint=None, architecture=fields, imagenet_labels=imagenet_labels,
                      datasets=(), description=f"A MambaVision model with a custom architecture ({path.name}).",
                      **preprocessing)
    build_config(variant)  # fail now on invalid values, before any checkpoint is read
    return variant


def build_config(variant):
    """The ``MambaVisionConfig`` of a variant, with timm's ImageNet-1k class names where it predicts them."""
    labels = {}
    if variant.imagenet_labels:
        names = ImageNetInfo("imagenet-1k").label_descriptions()
        labels = {"id2label": dict(enumerate(names)), "label2id": {label: i for i, label in enumerate(names)}}
    try:
        return MambaVisionConfig(**variant.architecture, **variant.preprocessing, **labels)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"invalid configuration for {variant.name}: {_first_line(error)}") from None


def fetch_checkpoint(variant):
    """Download a variant's original checkpoint from its Hub repository (cached by huggingface_hub)."""
    if not variant.checkpoint:
        raise ConversionError(f"{variant.name} names no original checkpoint to download: pass --checkpoint PATH")
    progress(f"downloading {variant.checkpoint} from {variant.repo_id}")
    try:
        return Path(hf_hub_download(variant.repo_id, variant.checkpoint))
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"could not download {variant.checkpoint} from the Hub repo {variant.repo_id} ({_first_line(error)}); "
            "check the connection, or pass --checkpoint PATH (--checkpoint-dir DIR with --all)"
        ) from None


def _file_format(path):
    """``"zip"`` (torch.save), ``"safetensors"``, ``"pickle"`` (legacy torch.save) or ``None``, by content."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head[:4] == b"PK\x03\x04":  # a zip archive, perhaps truncated (torch.load then says so)
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return "pickle"
    return None


def read_checkpoint(path):
    """The tensors of an original checkpoint, by original name.

    Reads ``torch.save`` files with ``weights_only=True`` (no pickled code runs) and safetensors files; unwraps
    ``{"state_dict": ...}`` / ``{"model": ...}``; drops a ``module.`` (DataParallel) or a Hub-style ``model.``
    prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    kind = _file_format(path)
    if kind is None:
        raise ConversionError(f"{path} is not a PyTorch checkpoint (torch.save) nor a safetensors file")
    progress(f"reading {path} ({path.stat().st_size / 2**20:,.1f} MiB)")
    try:
        if kind == "safetensors":
            checkpoint = load_file(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as error:
        blocked = re.search(r"unsupported global[^\n]*", str(error), flags=re.IGNORECASE)
        reason = blocked.group(0) if blocked else _first_line(error)
        raise ConversionError(f"refusing to load {path}: it holds pickled objects other than tensors, "
                              f"which could run code ({reason})") from None
    except Exception as error:  # torch.load and safetensors report damage with many exception types
        raise ConversionError(f"cannot read {path}, the file is damaged or truncated: {_first_line(error)}") from None
    state_dict = _unwrap(checkpoint)
    if state_dict is None:
        raise ConversionError(f"{path} holds no state dict (tensors by name, alone or under 'state_dict' or 'model')")
    if all(key.startswith("model.") for key in state_dict):  # the layout of NVIDIA's Hub safetensors
        state_dict = {key[len("model."):]: tensor for key, tensor in state_dict.items()}
    return state_dict


def _unwrap(checkpoint):
    while isinstance(checkpoint, dict):
        inner = next((checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)), None)
        if inner is None:
            break
        checkpoint = inner
    if isinstance(checkpoint, dict) and checkpoint and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items()
    ):
        return checkpoint
    return None


def check_state_dict(expected, state_dict, what):
    """Raise naming every missing, unexpected, mis-shaped and non-float tensor (``expected``: name -> tensor).

    Names are reported as in the original checkpoint (without the ``model.`` prefix).
    """
    common = sorted(set(expected) & set(state_dict))
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [f"{key.removeprefix('model.')} {tuple(state_dict[key].shape)} instead of {tuple(expected[key].shape)}"
                  for key in common if state_dict[key].shape != expected[key].shape]
    not_float = [key for key in common if expected[key].is_floating_point() and not state_dict[key].is_floating_point()]
    listed = (("missing", missing), ("unexpected", unexpected), ("not floating point", not_float))
    problems = [f"{label} {len(names)}: {_listing(key.removeprefix('model.') for key in names)}"
                for label, names in listed if names]
    if mis_shaped:
        problems.append(f"wrong shape {len(mis_shaped)}: {_listing(mis_shaped)}")
    if problems:
        raise ConversionError(f"the checkpoint does not fit {what}: " + "; ".join(problems))


def build_model(config, original_state_dict, what):
    """The classifier holding the checkpoint's tensors (float32), after checking every name and shape."""
    modeling = model_code.load("modeling_mambavision")
    with torch.device("meta"):  # no memory for weights that the checkpoint replaces
        model = modeling.MambaVisionModelForImageClassification(config)
    state_dict = convert_state_dict(original_state_dict)
    progress(f"checking {len(state_dict)} tensors against {what}")
    check_state_dict(model.state_dict(), state_dict, what)
    state_dict = {key: tensor.float() if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _stage_shapes(config):
    """Shapes of the four stage maps for one image at the pretrained resolution, for the card."""
    shapes, size = [], math.ceil(math.ceil(config.image_size / 2) / 2)  # the stem's two stride-2 convolutions
    for width in config.hidden_sizes:
        shapes.append(f"(1, {width}, {size}, {size})")
        size = math.ceil(size / 2)
    return shapes


def render_model_card(variant, model, repo_id):
    """The README.md of a model folder: metadata from ``variant`` (license, datasets, results), body from the
    template."""
    config, results, license_ = model.config, variant.results, variant.license
    eval_results = None
    if results:
        common = dict(task_type="image-classification", task_name="Image Classification",
                      dataset_type="ILSVRC/imagenet-1k", dataset_name="ImageNet-1K", dataset_split="validation",
                      source_name=RESULTS_SOURCE["name"], source_url=RESULTS_SOURCE["url"])
        eval_results = [
            EvalResult(metric_type="accuracy", metric_name="Top-1 accuracy", metric_value=results["top1"], **common),
            EvalResult(metric_type="top_5_accuracy", metric_name="Top-5 accuracy", metric_value=results["top5"],
                       **common),
        ]
    card_data = ModelCardData(
        license=license_["license"], license_name=license_.get("license_name"),
        license_link=license_.get("license_link"), library_name="transformers", pipeline_tag="image-classification",
        tags=CARD_TAGS, datasets=list(variant.datasets) or None, model_name=variant.name, eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE), name=variant.name, description=variant.description,
        repo_id=repo_id, checkpoint=variant.checkpoint,
        checkpoint_url=variant.checkpoint_url if variant.checkpoint else None,
        num_parameters=sum(p.numel() for p in model.parameters()),
        hidden_sizes=config.hidden_sizes, depths=config.depths, window_size=config.window_size,
        num_labels=config.num_labels, stage_shapes=_stage_shapes(config), results=results,
        results_source=RESULTS_SOURCE, license_title=license_.get("title", license_["license"]),
        license_terms=license_.get("terms", ""), license_link=license_.get("license_link"),
        datasets=list(variant.datasets), imagenet_labels=variant.imagenet_labels,
        **variant.preprocessing,
    )


def check_output_dir(output_dir, overwrite):
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"the output path {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"the output folder {output_dir} is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_folder(output_dir, overwrite=False):
    """Yield an empty folder beside ``output_dir`` that replaces it on success; on failure nothing is left."""
    output_dir = Path(output_dir).resolve()
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    replaced = staging / "replaced"
    try:
        folder = staging / output_dir.name  # the final name, so that remote code caches under it
        folder.mkdir()
        yield folder
        if output_dir.exists():
            output_dir.rename(replaced)
        try:
            folder.rename(output_dir)
        except OSError:
            if replaced.exists():
                replaced.rename(output_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_folder(folder, model, tolerance=VERIFY_TOLERANCE):
    """Reload ``folder`` as the Hub would (AutoModelForImageClassification, trust_remote_code) and compare outputs."""
    progress("verifying: reloading with AutoModelForImageClassification.from_pretrained(trust_remote_code=True)")
    reloaded, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True,
                                                                     output_loading_info=True)
    problems = {key: info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ConversionError(f"verification failed: reloading reported {problems}")
    size = model.config.image_size
    pixels = torch.randn(1, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True)
        actual = reloaded.eval()(pixels, output_hidden_states=True)
    pairs = [("logits", actual.logits, expected.logits)]
    pairs += [(name, a, e) for name, a, e in zip(model.config.stage_names, actual.hidden_states, expected.hidden_states)]
    worst = 0.0
    for name, a, e in pairs:
        error = ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
        if not error <= tolerance:  # NaN fails too
            raise ConversionError(f"verification failed: {name} differs by {error:.3g} (relative) > {tolerance:g}")
        worst = max(worst, error)
    progress(f"verified: outputs at {size}x{size} match, largest relative difference {worst:.3g}")


def convert(variant, checkpoint, output_dir, *, repo_id=None, overwrite=False, max_shard_size="2GB", verify=False):
    """Original checkpoint -> complete model folder at ``output_dir``; returns its path."""
    output_dir, start = Path(output_dir), time.monotonic()
    check_output_dir(output_dir, overwrite)
    config = build_config(variant)
    model = build_model(config, read_checkpoint(checkpoint), variant.name)
    with staged_folder(output_dir, overwrite) as folder:
        progress(f"writing {folder.name}: config, weights (safetensors shards up to {max_shard_size}), code, card")
        save_model_folder(model, folder, max_shard_size=max_shard_size)
        card = render_model_card(variant, model, repo_id or variant.repo_id)
        card.save(folder / "README.md")
        if verify:
            verify_folder(folder, model)
    progress(f"wrote {output_dir} in {time.monotonic() - start:.1f} s")
    return output_dir


def push_to_hub(folder, repo_id, *, private=False, token=None, commit_message=None, revision=None, dry_run=False):
    """Create the Hub model repo if needed and upload ``folder`` in one commit; ``dry_run`` only lists it."""
    folder = Path(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    commit_message = commit_message or f"Upload {folder.name}"
    target = f"{repo_id}" + (f" (branch {revision})" if revision else "")
    if dry_run:
        total = sum(path.stat().st_size for path in files)
        progress(f"dry run: would create {'private ' if private else ''}model repo {repo_id} if missing and upload "
                 f"{len(files)} files ({total / 2**20:,.1f} MiB) to {target}, commit message {commit_message!r}:")
        for path in files:
            progress(f"  {path.relative_to(folder).as_posix()}  {path.stat().st_size:,} bytes")
        return None
    api = HfApi(token=token)
    progress(f"pushing {len(files)} files to {target}")
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                   commit_message=commit_message, revision=revision)
    except (OSError, ValueError) as error:  # hub HTTP errors are OSErrors; invalid repo ids ValueErrors
        raise ConversionError(f"could not push to {repo_id}: {_first_line(error)}") from None
    progress(f"pushed: {getattr(commit, 'commit_url', repo_id)}")
    return commit


def _parser():
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()  # none: --push-to-hub publishes an existing --output-dir
    what.add_argument("--variant", help="Hub name of a published variant, e.g. MambaVision-T-1K")
    what.add_argument("--config", help="JSON of config fields for a custom architecture (needs --checkpoint)")
    what.add_argument("--all", action="store_true", help="convert every variant, one folder each under --output-dir")
    what.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    parser.add_argument("--checkpoint", help="original checkpoint (.pth.tar or .safetensors); default: download it")
    parser.add_argument("--checkpoint-dir", help="with --all: folder holding the original files (default: download)")
    parser.add_argument("--output-dir", help="folder to create (with --all: parent of one folder per variant)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--max-shard-size", default="2GB", type=_shard_size,
                        help="split weights above this size, e.g. 500MB (default: 2GB)")
    parser.add_argument("--verify", action="store_true",
                        help="reload the folder with trust_remote_code and compare outputs (tolerance 1e-5)")
    hub = parser.add_argument_group("publishing")
    hub.add_argument("--push-to-hub", metavar="REPO_ID",
                     help="upload the folder to this Hub repo (with --all: an owner, each variant to OWNER/<variant>)")
    hub.add_argument("--private", action="store_true", help="create the repo private")
    hub.add_argument("--token", help="Hub token (default: the logged-in one)")
    hub.add_argument("--commit-message", help="commit message of the upload")
    hub.add_argument("--revision", help="branch to upload to (created if missing)")
    hub.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    return parser


def _shard_size(value):
    """Validate a size such as ``2GB`` now, rather than after the checkpoint is read."""
    try:
        valid = convert_file_size_to_int(value) > 0
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"invalid size {value!r}: an integer and a unit, e.g. 500MB or 2GB")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _check_arguments(args):
    if args.list_variants:
        return
    if not (args.variant or args.config or args.all or args.push_to_hub):
        raise UsageError("one of --variant, --config, --all or --list-variants is required "
                         "(or --push-to-hub alone, to publish an existing --output-dir)")
    if not args.output_dir:
        raise UsageError("--output-dir is required")
    if args.checkpoint and not (args.variant or args.config):
        raise UsageError("--checkpoint goes with --variant or --config (use --checkpoint-dir with --all)")
    if args.checkpoint_dir and not args.all:
        raise UsageError("--checkpoint-dir goes with --all; use --checkpoint for one variant")
    if args.config and not args.checkpoint:
        raise UsageError("--config needs --checkpoint (a custom architecture has no file to download)")
    if not args.push_to_hub:
        given = [flag for flag, value in (("--private", args.private), ("--token", args.token),
                                          ("--commit-message", args.commit_message), ("--revision", args.revision),
                                          ("--dry-run", args.dry_run)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --push-to-hub")
    elif args.all and "/" in args.push_to_hub:
        raise UsageError("with --all, --push-to-hub takes an owner (user or organisation), not a repo id")


def _commit_message(push, variant, checkpoint):
    """The push options, with a commit message that names the source file unless one was given."""
    message = push["commit_message"] or f"Upload {variant.name} (converted from {Path(checkpoint).name})"
    return {**push, "commit_message": message}


def _run(args):
    push = dict(private=args.private, token=args.token, commit_message=args.commit_message,
                revision=args.revision, dry_run=args.dry_run)
    options = dict(overwrite=args.overwrite, max_shard_size=args.max_shard_size, verify=args.verify)
    if args.list_variants:
        for variant in VARIANTS.values():
            print(f"{variant.name:24} {variant.repo_id:32} {variant.checkpoint}")
        return
    if not (args.variant or args.config or args.all):
        folder = Path(args.output_dir)
        if not (folder / "config.json").is_file():
            raise ConversionError(f"{folder} holds no converted model (no config.json) to push")
        push_to_hub(folder, args.push_to_hub, **push)
        return
    if not args.all:
        output_dir = Path(args.output_dir)
        if args.config:
            variant = variant_from_config_file(args.config, (args.push_to_hub or output_dir.name).split("/")[-1])
        else:
            variant = get_variant(args.variant)
        check_output_dir(output_dir, args.overwrite)
        checkpoint = args.checkpoint or fetch_checkpoint(variant)
        convert(variant, checkpoint, output_dir, repo_id=args.push_to_hub, **options)
        if args.push_to_hub:
            push_to_hub(output_dir, args.push_to_hub, **_commit_message(push, variant, checkpoint))
        return
    root = Path(args.output_dir)
    jobs = [(variant, root / name) for name, variant in VARIANTS.items()]
    for _, folder in jobs:  # fail before converting anything
        check_output_dir(folder, args.overwrite)
    if args.checkpoint_dir:
        missing = [v.checkpoint for v, _ in jobs if not (Path(args.checkpoint_dir) / v.checkpoint).is_file()]
        if missing:
            raise ConversionError(f"not in {args.checkpoint_dir}: {_listing(missing, limit=len(missing))}")
    for index, (variant, folder) in enumerate(jobs, 1):
        progress(f"[{index}/{len(jobs)}] {variant.name}")
        repo_id = f"{args.push_to_hub}/{variant.name}" if args.push_to_hub else None
        try:
            if args.checkpoint_dir:
                checkpoint = Path(args.checkpoint_dir) / variant.checkpoint
            else:
                checkpoint = fetch_checkpoint(variant)
            convert(variant, checkpoint, folder, repo_id=repo_id, **options)
            if repo_id:
                push_to_hub(folder, repo_id, **_commit_message(push, variant, checkpoint))
        except ConversionError as error:
            raise ConversionError(f"{variant.name}: {error}") from None


def main(argv=None):
    """Command-line entry point; returns the exit status (0 on success)."""
    transformers_logging.disable_progress_bar()  # stderr is for errors; progress goes to stdout
    try:
        args = _parser().parse_args(argv)
        _check_arguments(args)
        _run(args)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # disk full, permissions, ...
        print(f"error: {_first_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

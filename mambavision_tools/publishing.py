"""Publishing a converted folder: its model card (metadata from the variant's entry, body from
``model_cards/mambavision.md``) and the upload to the Hub, both through huggingface_hub."""

import math
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from . import model_code
from .report import ConversionError, first_line, progress
from .variants import RESULTS_SOURCE

CARD_TEMPLATE = model_code.ROOT / "model_cards" / "mambavision.md"
CARD_TAGS = ["vision", "image-classification", "image-feature-extraction", "mambavision", "mamba"]
# a backbone converted from an mmdetection detector (Variant.layout "mmdet")
BACKBONE_CARD_TEMPLATE = model_code.ROOT / "model_cards" / "mambavision_coco_backbone.md"
BACKBONE_CARD_TAGS = ["vision", "object-detection", "backbone", "mambavision", "mamba"]


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
    backbone = variant.layout == "mmdet"
    card_data = ModelCardData(
        license=license_["license"], license_name=license_.get("license_name"),
        license_link=license_.get("license_link"), library_name="transformers",
        pipeline_tag=None if backbone else "image-classification", tags=BACKBONE_CARD_TAGS if backbone else CARD_TAGS,
        datasets=list(variant.datasets) or None, model_name=variant.name, eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data, template_path=str(BACKBONE_CARD_TEMPLATE if backbone else CARD_TEMPLATE), name=variant.name, description=variant.description,
        repo_id=repo_id, checkpoint=variant.checkpoint,
        checkpoint_url=variant.checkpoint_url if variant.checkpoint else None,
        num_parameters=model.num_parameters(),
        hidden_sizes=config.hidden_sizes, depths=config.depths, window_size=config.window_size,
        num_labels=config.num_labels, stage_shapes=_stage_shapes(config), results=results,
        results_source=RESULTS_SOURCE, license_title=license_.get("title", license_["license"]),
        license_terms=license_.get("terms", ""), license_link=license_.get("license_link"),
        datasets=list(variant.datasets), imagenet_labels=variant.imagenet_labels,
        **variant.preprocessing,
    )


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
        raise ConversionError(f"could not push to {repo_id}: {first_line(error)}") from None
    progress(f"pushed: {getattr(commit, 'commit_url', repo_id)}")
    return commit

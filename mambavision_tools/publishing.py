"""Publishing a converted folder: its model card (metadata from the variant's entry, body from
``model_cards/mambavision.md``) and the upload to the Hub, both through huggingface_hub."""

import math
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from PIL import Image

from . import model_code
from .hub_folder import EXAMPLE_IMAGE
from .report import ConversionError, first_line, progress
from .variants import RESULTS_SOURCE

CARD_TEMPLATE = model_code.ROOT / "model_cards" / "mambavision.md"
CARD_TAGS = ["vision", "image-classification", "image-feature-extraction", "mambavision", "mamba"]
SEGMENTATION_CARD_TEMPLATE = model_code.ROOT / "model_cards" / "mambavision_segmentation.md"
SEGMENTATION_CARD_TAGS = ["vision", "image-segmentation", "semantic-segmentation", "upernet", "mambavision", "mamba"]
# a backbone converted from an mmdetection detector (Variant.task "detection-backbone")
BACKBONE_CARD_TEMPLATE = model_code.ROOT / "model_cards" / "mambavision_coco_backbone.md"
BACKBONE_CARD_TAGS = ["vision", "object-detection", "backbone", "mambavision", "mamba"]


def _scikit_learn_flower():
    from sklearn.datasets import load_sample_image  # only the converter needs scikit-learn

    return Image.fromarray(load_sample_image("flower.jpg"))


# The example image of ImageNet classifiers (the widget's and the Deploy snippet's): a photo that ships with
# scikit-learn, a dependency, under CC BY 2.0; the card credits it.
EXAMPLE_PHOTO = {
    "title": "Flower",
    "credit": "[flower.jpg](https://www.flickr.com/photos/vultilion/6056698931) by vultilion "
              "([CC BY 2.0](https://creativecommons.org/licenses/by/2.0/)), from scikit-learn's sample images, "
              "downscaled",
    "load": _scikit_learn_flower,  # -> a PIL image
}


def example_of(variant):
    """The example image a ``variant``'s folder carries (``EXAMPLE_PHOTO`` for ImageNet classifiers), or ``None``
    for a head of other classes: what suits it is not known here."""
    return EXAMPLE_PHOTO if variant.imagenet_labels else None


def widget(repo_id, title):
    """The card's ``widget`` metadata: the folder's example image, by its Hub address."""
    return [{"src": f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLE_IMAGE}", "example_title": title}]


def _stage_shapes(config):
    """Shapes of the four stage maps for one image at the pretrained resolution, for the card."""
    shapes, size = [], math.ceil(math.ceil(config.image_size / 2) / 2)  # the stem's two stride-2 convolutions
    for width in config.hidden_sizes:
        shapes.append(f"(1, {width}, {size}, {size})")
        size = math.ceil(size / 2)
    return shapes


def render_segmentation_card(variant, model, repo_id):
    """The README.md of a segmentation folder: mIoU on ADE20K (``scene_parse_150``), the pipeline snippet."""
    config, results, license_ = model.config, variant.results, variant.license
    eval_results = None
    if results:
        eval_results = [EvalResult(task_type="image-segmentation", task_name="Semantic Segmentation",
                                   dataset_type="scene_parse_150", dataset_name="ADE20K", dataset_split="validation",
                                   metric_type="mean_iou", metric_name="mIoU", metric_value=results["miou"],
                                   source_name=RESULTS_SOURCE["name"], source_url=RESULTS_SOURCE["url"])]
    card_data = ModelCardData(
        license=license_["license"], license_name=license_.get("license_name"),
        license_link=license_.get("license_link"), library_name="transformers", pipeline_tag="image-segmentation",
        tags=SEGMENTATION_CARD_TAGS, datasets=list(variant.datasets) or None, model_name=variant.name,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data, template_path=str(SEGMENTATION_CARD_TEMPLATE), name=variant.name, description=variant.description,
        repo_id=repo_id, checkpoint=variant.checkpoint,
        checkpoint_url=variant.checkpoint_url if variant.checkpoint else None, num_parameters=model.num_parameters(),
        hidden_sizes=config.hidden_sizes, depths=config.depths, window_size=config.window_size,
        num_labels=config.num_labels, image_size=config.image_size, results=results, results_source=RESULTS_SOURCE,
        license_title=license_.get("title", license_["license"]), license_terms=license_.get("terms", ""),
        license_link=license_.get("license_link"), datasets=list(variant.datasets),
    )


def render_model_card(variant, model, repo_id):
    """The README.md of a model folder: metadata from ``variant`` (license, datasets, results), body from the
    template of its task."""
    if variant.task == "semantic-segmentation":
        return render_segmentation_card(variant, model, repo_id)
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
    example = example_of(variant)
    backbone = variant.task == "detection-backbone"
    card_data = ModelCardData(
        license=license_["license"], license_name=license_.get("license_name"),
        license_link=license_.get("license_link"), library_name="transformers",
        pipeline_tag=None if backbone else "image-classification", tags=BACKBONE_CARD_TAGS if backbone else CARD_TAGS,
        datasets=list(variant.datasets) or None, model_name=variant.name, eval_results=eval_results,
        widget=widget(repo_id, example["title"]) if example else None,
    )
    return ModelCard.from_template(
        card_data, template_path=str(BACKBONE_CARD_TEMPLATE if backbone else CARD_TEMPLATE), name=variant.name,
        description=variant.description,
        repo_id=repo_id, checkpoint=variant.checkpoint,
        checkpoint_url=variant.checkpoint_url if variant.checkpoint else None,
        num_parameters=model.num_parameters(),
        hidden_sizes=config.hidden_sizes, depths=config.depths, window_size=config.window_size,
        num_labels=config.num_labels, stage_shapes=_stage_shapes(config), results=results,
        results_source=RESULTS_SOURCE, license_title=license_.get("title", license_["license"]),
        license_terms=license_.get("terms", ""), license_link=license_.get("license_link"),
        datasets=list(variant.datasets), imagenet_labels=variant.imagenet_labels,
        example_image=EXAMPLE_IMAGE if example else None, example_credit=example and example["credit"],
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

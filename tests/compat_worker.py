"""One row of the compatibility matrix: everything a user does with a converted folder, on the transformers
that this interpreter imports, offline. Writes what it computed (a dict of tensors and lists) for
``tests/test_compat.py`` to compare with the main environment's run of the same function.

    python tests/compat_worker.py FOLDER OUT.pt [--hub-repo ID] [--segmentation FOLDER] [--hide-triton]
                                  [--deprecations-are-errors]

``--hub-repo`` names the same folder in the Hugging Face cache (``HF_HUB_CACHE``), so the Hub's code path runs
too (code files fetched one by one, each checked for its imports). ``--hide-triton`` makes ``import triton``
fail as on a machine without it (CPU-only torch builds, macOS). Where a version lacks a step's usual entry
point (``AutoBackbone.from_pretrained`` on a local folder from 5.1), the fallback taken is recorded.
``--segmentation`` names a converted segmentation folder, used as users do too (``run_segmentation``).
"""

import argparse
import copy
import pickle
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SIZES = [(40, 30), (23, 57), (64, 64)]  # (width, height)
OUT_INDICES = [0, 2, 4]


def sample_images(sizes=IMAGE_SIZES):
    """Noise over a colour gradient at each (width, height): resampling differences show."""
    rng = np.random.default_rng(0)
    images = []
    for width, height in sizes:
        gradient = np.linspace(0, 255, width)[None, :, None] * np.array([1.0, 0.5, 0.2])
        images.append(Image.fromarray(np.clip(gradient + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)))
    return images


def image_inputs(picture):
    """The 8-bit RGB ``picture`` as each kind of input the processor takes -> (input, the RGB picture it shows):
    every PIL mode (16-bit at 0..65535, float at 0..1), numpy uint8/uint16/float and a float tensor."""
    grey = picture.convert("L")
    grey_levels = np.asarray(grey)
    array = np.asarray(picture)
    inputs = {mode: (picture.convert(mode), picture) for mode in ("RGBA", "CMYK")}
    inputs.update({mode: (picture.convert(mode), grey.convert("RGB")) for mode in ("L", "LA")})
    inputs.update({mode: (picture.convert(mode), picture.convert(mode).convert("RGB")) for mode in ("P", "1")})
    inputs["I;16"] = (Image.fromarray(grey_levels.astype(np.uint16) * 257), grey.convert("RGB"))
    inputs["I"] = (Image.fromarray(grey_levels.astype(np.int32) * 257), grey.convert("RGB"))
    inputs["F"] = (Image.fromarray(grey_levels.astype(np.float32) / 255), grey.convert("RGB"))
    inputs["uint8"] = (array, picture)
    inputs["uint16"] = (array.astype(np.uint16) * 257, picture)
    inputs["float64"] = (array / 255.0, picture)
    inputs["tensor"] = (torch.tensor(array).permute(2, 0, 1) / 255, picture)
    return inputs


def flat(output):
    """The tensors of a model output (a ModelOutput, tuple or tensor), flattened in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [t for item in output for t in flat(item)]


def output_contract(model, pixels, scratch):
    """``MambaVisionModel``'s output read every way users and libraries read it -> ``{"tensors": {way: the pooled
    features then the four stage maps, as that way gives them}, "facts": {way: what else it must keep}}``.

    NVIDIA's card unpacks it (``out_avg_pool, features = model(inputs)``); transformers' users read attributes,
    keys, indices and tuples; accelerate, the Trainer, pytree (torch.export, torch.compile) read it as a mapping.
    """
    import torch.utils._pytree as pytree
    from accelerate.utils import recursively_apply, send_to_device

    try:  # the main environment's datasets, which the Trainer imports when it can, needs the newest huggingface_hub
        import datasets  # noqa: F401
    except ImportError:  # the Trainer runs without it, as where it is not installed (transformers reads its flag)
        from transformers.utils import import_utils

        sys.modules["datasets"] = None
        import_utils._datasets_available = False
    from transformers import Trainer, TrainingArguments

    model.eval()
    with torch.no_grad():
        out = model(pixels)
        out_avg_pool, features = out  # NVIDIA's card, as written
        as_tuple = model(pixels, return_dict=False)
        with_hidden = model(pixels, output_hidden_states=True)
        pooled_h, maps_h, hidden = with_hidden
        exported = torch.export.export(model, (pixels,)).module()(pixels)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)(pixels)
    copied, pickled = copy.deepcopy(out), pickle.loads(pickle.dumps(out))
    moved = send_to_device(out, "cpu")
    doubled = recursively_apply(lambda t: t * 2, out)
    leaves, spec = pytree.tree_flatten(out)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    trainer = Trainer(model=model, args=TrainingArguments(str(scratch), report_to=[]))
    _, predicted, _ = trainer.prediction_step(model, {"pixel_values": pixels}, prediction_loss_only=False)
    tensors = {
        "unpacked": [out_avg_pool, *features],
        "attributes": [out.pooler_output, *out.stage_maps],
        "keys": [out["pooler_output"], *out["stage_maps"]],
        "indices": [out[0], *out[1]],
        "to_tuple": flat(out.to_tuple()),
        "items": [t for _, value in out.items() for t in flat(value)],
        "values": [t for value in out.values() for t in flat(value)],
        "return_dict_false": flat(as_tuple),
        "hidden_states_unpacked": [pooled_h, *maps_h],
        "hidden_states": list(hidden),
        "deepcopy": flat(copied),
        "pickle": flat(pickled),
        "send_to_device": flat(moved),
        "recursively_apply": [t / 2 for t in flat(doubled)],
        "pytree": flat(rebuilt),
        "torch_export": flat(exported),
        "torch_compile": flat(compiled),
        "trainer_prediction_step": flat(predicted),
    }
    outputs = {"deepcopy": copied, "pickle": pickled, "send_to_device": moved, "recursively_apply": doubled, "pytree": rebuilt, "torch_export": exported,
               "torch_compile": compiled, "model": out}
    facts = {way: [type(value).__name__, list(value.keys())] for way, value in outputs.items()}
    facts["return_dict_false"] = [type(as_tuple).__name__, len(as_tuple)]
    facts["hidden_states_keys"] = list(with_hidden.keys())
    facts["pytree_leaves"] = len(leaves)
    return {"tensors": tensors, "facts": facts}


def run(folder, hub_repo_id=None):
    """Everything, on the transformers imported here; returns the results (tensors, lists, strings)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = str(folder)
    results = {"versions": {"transformers": transformers.__version__, "torch": str(torch.__version__)}}
    images = sample_images()

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    results["config"] = {"class": type(config).__name__, "depths": config.depths, "dim": config.dim,
                         "id2label": {int(k): v for k, v in config.id2label.items()}}

    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with tempfile.TemporaryDirectory() as scratch:
        processor.save_pretrained(scratch)
        reloaded = AutoImageProcessor.from_pretrained(scratch, trust_remote_code=True)
    torch.testing.assert_close(reloaded(images)["pixel_values"], pixels, rtol=0, atol=0)
    results["pixel_values"] = pixels
    picture = images[0]
    results["modes"] = {name: processor(image)["pixel_values"] for name, (image, _) in image_inputs(picture).items()}

    classifier, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True,
                                                                       output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    classifier.eval()
    labels = torch.arange(len(pixels)) % config.num_labels
    with torch.no_grad():
        out = classifier(pixels, labels=labels, output_hidden_states=True)
    results["classifier"] = flat(out)

    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        results["model"] = flat(model.eval()(pixels))
    with tempfile.TemporaryDirectory() as scratch:
        results["contract"] = output_contract(model, pixels, scratch)
    results["attention"] = {}
    for implementation in ("sdpa", "eager"):  # attn_implementation as from_pretrained takes it on this release
        chosen = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True,
                                                                 attn_implementation=implementation).eval()
        with torch.no_grad():  # sdpa: the logits; eager: the logits and each attention block's weights
            outputs = chosen(pixels, output_attentions=implementation == "eager")
        results["attention"][implementation] = [chosen.config._attn_implementation, flat(outputs)]

    results["backbone_loader"] = "AutoBackbone"
    try:
        from transformers import AutoBackbone

        backbone = AutoBackbone.from_pretrained(folder, trust_remote_code=True, out_indices=OUT_INDICES)
    except Exception as error:  # 5.1+: AutoBackbone asks the Hub whether a name is a repo first (README: Compatibility)
        results["backbone_loader"] = f"class from the folder (AutoBackbone: {type(error).__name__})"
        backbone_class = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], folder)
        backbone = backbone_class.from_pretrained(folder, out_indices=OUT_INDICES)
    results["backbone_channels"] = list(backbone.channels)
    with torch.no_grad():
        results["backbone"] = list(backbone.eval()(pixels).feature_maps)

    classify = pipeline("image-classification", model=folder, trust_remote_code=True)
    sixteen_bit = Image.fromarray(np.asarray(picture.convert("L")).astype(np.uint16) * 257)
    results["classification"] = [classify(image, top_k=3) for image in (picture, picture.convert("L"), sixteen_bit)]
    extract = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
    results["features"] = torch.as_tensor(np.asarray(extract(picture)))
    results["pipelines"] = [type(classify).__name__, type(extract).__name__]

    # fine-tuning: a training step with activation checkpointing, then save and reload
    trainable = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    enable = getattr(trainable, "activation_checkpointing_enable", None) or trainable.gradient_checkpointing_enable
    enable()
    trainable.train()
    loss = trainable(pixels, labels=labels).loss
    loss.backward()
    results["train_loss"] = loss.detach()
    results["grads"] = [p.grad for _, p in sorted(trainable.named_parameters())]
    with tempfile.TemporaryDirectory() as scratch:
        classifier.save_pretrained(scratch)
        reloaded = AutoModelForImageClassification.from_pretrained(scratch, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(pixels).logits, out.logits, rtol=0, atol=0)

    if hub_repo_id is not None:  # the Hub's code path: files fetched one by one from the cache, imports checked
        hub = AutoModelForImageClassification.from_pretrained(hub_repo_id, trust_remote_code=True).eval()
        with torch.no_grad():
            results["hub_logits"] = hub(pixels).logits
        modules = Path(sys.modules[type(hub).__module__].__file__).parent
        results["hub_code_files"] = sorted(path.name for path in modules.glob("*.py") if path.name != "__init__.py")
    modules = Path(sys.modules[type(classifier).__module__].__file__).parent
    results["local_code_files"] = sorted(path.name for path in modules.glob("*.py") if path.name != "__init__.py")
    return results


def run_segmentation(folder):
    """A segmentation folder through the Auto classes and the pipeline: its processor's pixels, the model's loss,
    whole and sliding-window logits, and the pipeline's masks (label, mask) on a picture."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    folder = str(folder)
    picture = sample_images([SEGMENTATION_IMAGE])[0]
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    pixels = processor(picture)["pixel_values"]
    model, info = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True,
                                                                   output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    with torch.no_grad():
        output = model(pixels, labels=segmentation_labels(pixels, model.config.num_labels))
        slide = model(pixels, inference_mode="slide", crop_size=(16, 16), stride=(8, 8)).logits
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    masks = [[mask["label"], torch.as_tensor(np.asarray(mask["mask"]))] for mask in segmenter(picture)]
    return {"classes": [type(model).__name__, type(processor).__name__, type(segmenter).__name__],
            "pixel_values": pixels, "loss": output.loss, "logits": output.logits, "slide_logits": slide,
            "masks": masks}


SEGMENTATION_IMAGE = (40, 30)  # (width, height)


def segmentation_labels(pixels, num_labels):
    """Labels for the loss: stripes of every class, with a band of ignored pixels (255)."""
    height, width = pixels.shape[-2:]
    labels = (torch.arange(width) // 4 % num_labels).expand(len(pixels), height, width).clone()
    labels[:, :3] = 255
    return labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a converted model folder")
    parser.add_argument("out", help="where to write the results (torch.save)")
    parser.add_argument("--hub-repo", help="the same folder's repo id in the Hugging Face cache (HF_HUB_CACHE)")
    parser.add_argument("--segmentation", help="a converted segmentation folder to use as well")
    parser.add_argument("--hide-triton", action="store_true", help="`import triton` fails, as where it is missing")
    parser.add_argument("--deprecations-are-errors", action="store_true",
                        help="DeprecationWarning and FutureWarning raise (for the newest transformers)")
    args = parser.parse_args(argv)
    if args.hide_triton:  # importlib.util.find_spec("triton") is None and `import triton` raises ModuleNotFoundError
        sys.modules["triton"] = None
    if args.deprecations_are_errors:
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
    results = run(args.folder, args.hub_repo)
    if args.segmentation:
        results["segmentation"] = run_segmentation(args.segmentation)
    torch.save(results, args.out)


if __name__ == "__main__":
    main()

"""Object detection: MambaVisionForObjectDetection (transformers' Deformable DETR on MambaVisionBackbone), its
folder reloaded in fresh processes on every transformers release of the matrix, its pipeline, and the backbone it
feeds the head checked against NVIDIA's mmdet/mmseg backbone (../shared/fixtures/seg_tiny_upernet: the same
``MM_mamba_vision`` with per-output norms)."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import pytest
import torch
import torch._inductor.config
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision
from transformers import AutoModelForObjectDetection, DeformableDetrImageProcessor, pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import detection_worker
import finetune_detection
import shapes
from conftest import (FIXTURES, TINY_ARCHITECTURE, assert_close_relative, configuration, model_code, modeling,
                      needs_shared)
from convert_checkpoint import main as convert_main
from kill_and_resume import assert_resumes_as_if_uninterrupted, run_script
from mambavision_tools import variants
from mambavision_tools.configs import build_config, config_from_architecture
from mambavision_tools.hub_folder import save_head_folder, save_model_folder
from mambavision_tools.mmlab import split_backbone
from test_compat import VERSIONS, site
from mambavision_tools.variants import Variant
from test_segmentation import SEG_SIZES, load_seg_fixture

detection = model_code.load("modeling_mambavision_detection")
LABELS = {0: "square", 1: "disc"}
HEAD = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
            encoder_attention_heads=2, decoder_attention_heads=2)


def tiny_detector(**backbone_fields):
    backbone = configuration.MambaVisionConfig(**{**TINY_ARCHITECTURE, "layer_scale": 0.3, "out_norm": True,
                                                  "out_features": detection.DETECTION_OUT_FEATURES, **backbone_fields})
    config = detection.MambaVisionDetectionConfig(backbone_config=backbone, id2label=LABELS, **HEAD)
    torch.manual_seed(0)
    model = detection.MambaVisionForObjectDetection(config)
    with torch.no_grad():  # trained-looking BatchNorm statistics and layer scales, so that a lost one shows
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for name, parameter in model.backbone.named_parameters():
            if "gamma" in name:
                parameter.uniform_(-1, 1)
    return model.eval()


@needs_shared
def test_the_head_receives_nvidia_backbone_maps():
    """The maps transformers' Deformable DETR reads (its conv encoder's output) are NVIDIA's backbone's, with the
    backbone's own BatchNorms (stem eps 1e-4), not transformers' frozen ones (eps 1e-5)."""
    architecture, state_dict, expected = load_seg_fixture()
    backbone_config = config_from_architecture(architecture["backbone"], out_norm=True,
                                               out_features=detection.DETECTION_OUT_FEATURES)
    config = detection.MambaVisionDetectionConfig(backbone_config=backbone_config, id2label=LABELS, **HEAD)
    model = detection.MambaVisionForObjectDetection(config).eval()
    model.backbone.load_state_dict(split_backbone(state_dict)[0], strict=True)
    conv_encoder = next(module for module in model.modules() if type(module).__name__ == "DeformableDetrConvEncoder")
    for size in SEG_SIZES:
        pixels = expected[f"input_{size}"]
        with torch.no_grad():
            maps = conv_encoder(pixels, torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long))
        for level, (feature, mask) in zip((1, 2, 3), maps):
            assert_close_relative(feature, expected[f"feature{level}_{size}"], what=f"feature{level} at {size}")
            assert mask.all()


def test_training_keeps_the_backbone_batchnorm_statistics():
    model = tiny_detector().train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
              {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    outputs = model(pixel_values=torch.randn(2, 3, 64, 80), labels=labels)
    outputs.loss.backward()
    assert torch.isfinite(outputs.loss) and set(outputs.loss_dict) >= {"loss_ce", "loss_bbox", "loss_giou"}
    assert model.backbone.model.levels[0].blocks[0].conv1.weight.grad.abs().sum() > 0  # the backbone learns too
    after = model.backbone.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny detector's folder, the pixels the rows run it on, and what it computes in this process."""
    model = tiny_detector()
    root = tmp_path_factory.mktemp("detector")
    folder = root / "MambaVision-detector"
    processor = DeformableDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    save_head_folder(model, processor, folder)
    pixels = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, root / "pixels.pt")
    with torch.no_grad():
        outputs = model(pixel_values=pixels)
        picture = processor(detection_worker.picture(), return_tensors="pt")
        picture_outputs = model(**picture)
    size = detection_worker.picture().size[::-1]
    detections = processor.post_process_object_detection(picture_outputs, threshold=0.0, target_sizes=[size])[0]
    return folder, outputs, picture["pixel_values"], detections


def start_row(worker, folder, out, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(out.with_suffix(".hf")), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    command = [sys.executable, str(Path(worker.__file__)), str(folder), str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def run_rows(worker, folder, scratch):
    """``worker`` (a module run as a script: FOLDER OUT.pt) on the main environment and on each installed release,
    two at a time: row name -> (CompletedProcess, OUT.pt)."""
    jobs = {"main": None, **{version: site(version) for version in VERSIONS if site(version).is_dir()}}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(start_row, worker, folder, scratch / f"{name}.pt", path)
                   for name, path in jobs.items()}
        return {name: (future.result(), scratch / f"{name}.pt") for name, future in futures.items()}


@pytest.fixture(scope="module")
def rows(saved, tmp_path_factory):
    return run_rows(detection_worker, saved[0], tmp_path_factory.mktemp("detection-rows"))


@pytest.mark.parametrize("row", ["main", *VERSIONS])
def test_fresh_process_reload_and_pipeline(row, saved, rows):
    """AutoModelForObjectDetection and pipeline("object-detection") from the folder, trust_remote_code, in a fresh
    process: the saved model's outputs, and boxes with label names that are the model's post-processed ones."""
    if row not in rows:
        pytest.fail(f"transformers {row} is not installed in {site(row)}: run scripts/install.sh")
    process, out = rows[row]
    assert process.returncode == 0, process.stderr[-4000:]
    folder, outputs, pixels, detections = saved
    got = torch.load(out, weights_only=False)
    if row != "main":
        assert got["transformers"] == row
    assert got["loading_problems"] == "{}" and got["class"] == "MambaVisionForObjectDetection"
    torch.testing.assert_close(got["logits"], outputs.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got["pred_boxes"], outputs.pred_boxes, rtol=0, atol=1e-5)
    assert got["processor"] == "DeformableDetrImageProcessor"  # or its fast twin, where the release defaults to it
    assert got["processed"].shape == pixels.shape
    assert got["pipeline"] == "MambaVisionObjectDetectionPipeline"
    # threshold 0: every query and class, i.e. all post-processed detections, in order of score
    found = got["detections"]
    assert len(found) == len(detections["scores"]) == HEAD["num_queries"] * len(LABELS)
    assert {d["label"] for d in found} <= set(LABELS.values())
    expected = sorted(zip(detections["scores"].tolist(), (LABELS[i] for i in detections["labels"].tolist())))
    scores = sorted((d["score"], d["label"]) for d in found)
    tolerance = 1e-5 if got["processed"].equal(pixels) else 2e-2  # a fast processor resizes with torchvision
    assert all(abs(a - b) <= tolerance and la == lb for (a, la), (b, lb) in zip(scores, expected))
    assert all(0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= 90 and 0 <= d["box"]["ymin"] <= d["box"]["ymax"] <= 70
               for d in found)


# --- converter: NVIDIA's COCO Cascade Mask R-CNN checkpoints -> MambaVisionBackbone folders ---------------------

TINY_COCO_NAME = "Tiny-COCO-backbone"
CONFIG_FIELDS = ("dim", "in_dim", "depths", "num_heads", "window_size", "mlp_ratio", "layer_scale")


def tiny_coco_variant():
    """A COCO-backbone table entry with the fixture's architecture (what the real ones are, at tiny size)."""
    architecture, _, _ = load_seg_fixture()
    fields = {key: architecture["backbone"][key] for key in CONFIG_FIELDS}
    real = variants.DETECTION_VARIANTS["MambaVision-T-COCO-backbone"]
    return Variant(TINY_COCO_NAME, "tests/tiny-coco", None,
                   {**fields, **{k: real.architecture[k] for k in ("out_norm", "out_features")}},
                   imagenet_labels=False, datasets=real.datasets, license=real.license, task="detection-backbone",
                   description=real.description)


def write_mmdet_checkpoint(path):
    """The fixture's backbone tensors with Cascade Mask R-CNN-like neck and head tensors, in mmdet's layout."""
    _, state_dict, _ = load_seg_fixture()
    detector = {key: tensor for key, tensor in state_dict.items() if key.startswith("backbone.")}
    detector.update({"neck.lateral_convs.0.conv.weight": torch.randn(16, 8, 1, 1),
                     "rpn_head.rpn_conv.weight": torch.randn(16, 16, 3, 3),
                     "roi_head.bbox_head.0.fc_cls.weight": torch.randn(81, 32)})
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": detector}, path)
    return path


@pytest.fixture
def coco_variant(monkeypatch):
    variant = tiny_coco_variant()
    monkeypatch.setattr(variants, "DETECTION_VARIANTS", {TINY_COCO_NAME: variant})
    return variant


@needs_shared
def test_coco_backbone_conversion_matches_nvidia_backbone(coco_variant, tmp_path, capsys):
    checkpoint = write_mmdet_checkpoint(tmp_path / "cascade.pth")
    status = convert_main(["--variant", TINY_COCO_NAME, "--checkpoint", str(checkpoint), "--output-dir",
                           str(tmp_path / "out"), "--verify"])
    assert status == 0, capsys.readouterr().err
    folder = tmp_path / "out"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MambaVisionBackbone"] and config["out_norm"] is True
    backbone_class = get_class_from_dynamic_module(config["auto_map"]["AutoBackbone"], str(folder))
    backbone, info = backbone_class.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    _, _, expected = load_seg_fixture()
    for size in SEG_SIZES:
        with torch.no_grad():
            maps = backbone.eval()(expected[f"input_{size}"]).feature_maps
        assert len(maps) == 4
        for level, feature in enumerate(maps):
            assert_close_relative(feature, expected[f"feature{level}_{size}"], what=f"feature{level} at {size}")
    card = (folder / "README.md").read_text()
    assert "license: cc-by-nc-sa-4.0" in card and "Cascade Mask R-CNN" in card and "finetune_detection.py" in card


def test_coco_variants_are_nvidia_detection_configs():
    """NVIDIA's three configs: the classifiers' architectures, windows (8, 8, 112, 56), per-output norms."""
    for name, base in (("T", "MambaVision-T-1K"), ("S", "MambaVision-S-1K"), ("B", "MambaVision-B-1K")):
        variant = variants.DETECTION_VARIANTS[f"MambaVision-{name}-COCO-backbone"]
        config = build_config(variant)
        classifier = variants.VARIANTS[base].architecture
        assert {k: getattr(config, k) for k in CONFIG_FIELDS} == {**{k: classifier[k] for k in CONFIG_FIELDS},
                                                                   "window_size": [8, 8, 112, 56]}
        assert config.out_norm and config.out_features == ["stage1", "stage2", "stage3", "stage4"]
        assert variant.checkpoint_url.startswith("https://huggingface.co/nvidia/cascade_mask_rcnn_mamba_vision_")


@needs_shared
@pytest.mark.parametrize("given, fragments", [
    ("classification", ["holds no mmdetection backbone.* tensors", "classifier's head"]),
    ("segmentation", ["no part of an mmdetection detector", "mmsegmentation", "auxiliary_head."]),
    ("truncated", ["damaged or truncated"]),
])
def test_coco_variant_refuses_other_checkpoints(given, fragments, coco_variant, tmp_path, capsys):
    if given == "classification":
        checkpoint = FIXTURES / "tiny_plain" / "original_checkpoint.pth.tar"
    elif given == "segmentation":
        checkpoint = FIXTURES / "seg_tiny_upernet" / "original_checkpoint.pth"
    else:
        whole = write_mmdet_checkpoint(tmp_path / "whole.pth").read_bytes()
        checkpoint = tmp_path / "truncated.pth"
        checkpoint.write_bytes(whole[: len(whole) // 2])
    (tmp_path / "out").mkdir()
    status = convert_main(["--variant", TINY_COCO_NAME, "--checkpoint", str(checkpoint), "--output-dir",
                           str(tmp_path / "out" / "folder")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(fragment in err[0] for fragment in fragments), err[0]
    assert not any((tmp_path / "out").iterdir())  # nothing written


# --- fine-tuning: examples/finetune_detection.py ---------------------------------------------------------------

# The learning run (generated squares and discs, 64x64, a random tiny backbone under a small head, 200 steps):
# measured 0.051 held-out mAP@0.5 (0.019 mAP) and a training loss from 6.0 to 3.4; an untrained head scores ~0.
# A modest bar: DETR-style heads need far more steps than CI affords to place boxes well.
MIN_HELD_OUT_MAP50 = 0.03
LEARNING_RUN = ["--image-size", "64", "--max-size", "64", "--d-model", "32", "--layers", "2", "--queries", "8",
                "--max-steps", "200", "--batch-size", "4", "--learning-rate", "1e-3", "--backbone-learning-rate",
                "1e-3", "--num-workers", "0", "--logging-steps", "20", "--cpu"]


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory):
    """A tiny random MambaVision folder with per-output norms (what a converted COCO backbone is, at tiny size)."""
    config = configuration.MambaVisionConfig(depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 4], window_size=[8, 8, 8, 4],
                                             dim=16, in_dim=16, mlp_ratio=2.0, drop_path_rate=0.0, out_norm=True,
                                             num_labels=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("backbone") / "tiny-backbone"
    save_model_folder(modeling.MambaVisionModelForImageClassification(config).eval(), folder)
    return folder


def test_finetune_detection_learns_generated_shapes(backbone_folder, tmp_path):
    """Held-out box mAP@0.5 above MIN_HELD_OUT_MAP50 after 200 steps; the folder reloads as a detector."""
    train = shapes.write_coco_folder(tmp_path / "train", 160, size=64, seed=0)
    held_out = shapes.write_coco_folder(tmp_path / "held_out", 40, size=64, seed=1)
    output = tmp_path / "detector"
    finetune_detection.main(["--backbone", str(backbone_folder), "--train-images", str(train / "images"),
                             "--train-annotations", str(train / "annotations.json"),
                             "--eval-images", str(held_out / "images"),
                             "--eval-annotations", str(held_out / "annotations.json"),
                             "--output-dir", str(output), *LEARNING_RUN])
    metrics = json.loads((output / "all_results.json").read_text())
    assert metrics["eval_map_50"] > MIN_HELD_OUT_MAP50, metrics
    losses = [entry["loss"] for entry in json.loads((output / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0], losses
    model = AutoModelForObjectDetection.from_pretrained(output, trust_remote_code=True)
    assert model.config.id2label == dict(enumerate(shapes.CATEGORIES))
    assert "object-detection" in (output / "README.md").read_text()


def test_finetune_detection_on_a_datasets_dataset(backbone_folder, tmp_path):
    """A `datasets` dataset with image and objects (bbox, category ClassLabel) columns, as cppe-5 has them."""
    folder = shapes.write_coco_folder(tmp_path / "coco", 8, size=64, seed=2)
    coco = json.loads((folder / "annotations.json").read_text())
    rows = {"image": [], "objects": []}
    for image in coco["images"]:
        objects = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        rows["image"].append(str(folder / "images" / image["file_name"]))
        rows["objects"].append({"bbox": [a["bbox"] for a in objects], "category": [a["category_id"] - 1 for a in objects]})
    features = datasets.Features({"image": datasets.Image(), "objects": datasets.Sequence(
        {"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
         "category": datasets.ClassLabel(names=shapes.CATEGORIES)})})
    dataset = datasets.Dataset.from_dict(rows).cast(features)
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(4))}).save_to_disk(tmp_path / "dataset")
    output = tmp_path / "detector"
    finetune_detection.main(["--backbone", str(backbone_folder), "--dataset", str(tmp_path / "dataset"),
                             "--eval-split", "test", "--output-dir", str(output),
                             "--image-size", "64", "--max-size", "128", "--d-model", "32", "--layers", "2",
                             "--queries", "8", "--max-steps", "2", "--batch-size", "4", "--num-workers", "0", "--cpu"])
    metrics = json.loads((output / "all_results.json").read_text())
    assert 0.0 <= metrics["eval_map_50"] <= 1.0
    assert (output / "handler.py").is_file()  # the folder serves itself on Inference Endpoints
    detector = pipeline("object-detection", model=str(output), trust_remote_code=True)
    # not a 64x64 image: with d_model 32, GroupNorm's one channel per group would see a single value at stride 64
    assert {d["label"] for d in detector(detection_worker.picture(), threshold=0.0)} <= set(shapes.CATEGORIES)


def test_finetune_detection_killed_resumes_with_the_same_command(backbone_folder, tmp_path, capsys):
    """Killed while writing its second checkpoint, then while writing the output folder: each rerun of the same
    command resumes from the newest complete checkpoint and takes only the steps after it, across an epoch's end;
    the output folder never appears half-written; the end is the uninterrupted run's, step by step (the head's
    dropout draws from the RNG state the checkpoint restores)."""
    data = shapes.write_coco_folder(tmp_path / "coco", 6, size=64, seed=3)

    def arguments(output):  # 4 steps of 2 images, 3 steps an epoch, a checkpoint every 2
        return [str(arg) for arg in ["--backbone", backbone_folder, "--train-images", data / "images",
                                     "--train-annotations", data / "annotations.json", "--output-dir", output,
                                     "--image-size", 64, "--max-size", 64, "--d-model", 32, "--layers", 2,
                                     "--queries", 8, "--max-steps", 4, "--save-steps", 2, "--batch-size", 2,
                                     "--learning-rate", 1e-3, "--cpu", "--num-workers", 0, "--logging-steps", 1]]

    output = assert_resumes_as_if_uninterrupted("finetune_detection", arguments, tmp_path, "shapes-detector",
                                                steps_per_epoch=3, capsys=capsys)
    assert AutoModelForObjectDetection.from_pretrained(output, trust_remote_code=True).config.id2label == \
        dict(enumerate(shapes.CATEGORIES))


def widen_every_other_image(folder, width):
    """Paste every other image of a generated COCO folder on a wider canvas (its boxes stay where they were)."""
    coco = json.loads((folder / "annotations.json").read_text())
    for record in coco["images"][1::2]:
        path = folder / "images" / record["file_name"]
        image = Image.open(path).convert("RGB")
        canvas = Image.new("RGB", (width, image.height), image.getpixel((0, 0)))
        canvas.paste(image, (0, 0))
        canvas.save(path)
        record["width"] = width
    (folder / "annotations.json").write_text(json.dumps(coco))


def test_finetune_detection_evaluates_on_two_processes(backbone_folder, tmp_path):
    """2 processes (torchrun, gloo) evaluate 7 held-out images of two sizes one at a time (``--eval-batch-size 1``;
    accelerate repeats an image to fill the last round): the box mAP of the saved detector's detections, image by
    image in this process, at each image's size (Trainer gathered each process's per-image labels into an abort
    before). In batches, padding to the wider images changed the narrower ones' features and so the mAP."""
    data = shapes.write_coco_folder(tmp_path / "coco", 4, size=96, seed=3)
    held_out = shapes.write_coco_folder(tmp_path / "held_out", 7, size=96, seed=4)
    widen_every_other_image(held_out, 112)
    output = tmp_path / "detector"
    run_script("finetune_detection", [str(arg) for arg in [
        "--backbone", backbone_folder, "--train-images", data / "images", "--train-annotations",
        data / "annotations.json", "--eval-images", held_out / "images", "--eval-annotations",
        held_out / "annotations.json", "--output-dir", output, "--image-size", 96, "--max-size", 112, "--d-model", 32,
        "--layers", 2, "--queries", 8, "--max-steps", 2, "--batch-size", 2, "--eval-batch-size", 1, "--cpu",
        "--num-workers", 0]], 2, tmp_path / "run")
    model = AutoModelForObjectDetection.from_pretrained(output, trust_remote_code=True).eval()
    processor = DeformableDetrImageProcessor.from_pretrained(output)
    coco = json.loads((held_out / "annotations.json").read_text())
    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    for record in coco["images"]:
        image = Image.open(held_out / "images" / record["file_name"]).convert("RGB")
        with torch.no_grad():
            outputs = model(**processor(image, return_tensors="pt"))
        found = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[image.size[::-1]])
        objects = [a for a in coco["annotations"] if a["image_id"] == record["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)], dtype=torch.float32)
        metric.update(found, [{"boxes": boxes, "labels": torch.tensor([a["category_id"] - 1 for a in objects])}])
    expected = {f"eval_{name}": float(value) for name, value in metric.compute().items()
                if name in ("map", "map_50", "map_75")}
    metrics = json.loads((output / "all_results.json").read_text())
    assert expected["eval_map"] > 0
    assert {name: metrics[name] for name in expected} == pytest.approx(expected, rel=1e-6)


def test_tied_heads_compile_with_frozen_and_discarded_parameters():
    """The README's inference recipe (inductor freezing, parameters discarded) on the detector's repeated heads:
    transformers 5.x ties them as distinct modules sharing parameters, which the discarding erased one module at a
    time, failing TorchDynamo's aliasing guard in the compiling call ("Guard failed on the same frame it was
    created"). The heads' frame alone, compiled: the eager values."""
    model = tiny_detector()
    hidden = torch.randn(2, 3, model.config.d_model)

    def heads(h):
        return torch.stack([c(h).sum() + b(h).sum() for c, b in zip(model.class_embed, model.bbox_embed)])

    with torch.no_grad(), torch._inductor.config.patch(freezing=True, freezing_discard_parameters=True):
        expected = heads(hidden)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(heads)(hidden), expected)
    torch._dynamo.reset()


@pytest.mark.parametrize("option", ["--batch-size", "--eval-batch-size"])
def test_finetune_detection_refuses_batches_of_no_images(option, tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune_detection.parse_arguments(["--backbone", "b", "--train-images", "i", "--train-annotations", "a.json",
                                            "--output-dir", str(tmp_path / "out"), option, "0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: {option} must be at least 1, got 0"), err


def test_finetune_detection_loss_does_not_grow_with_processes(backbone_folder, tmp_path):
    """transformers' DETR-family losses average the processes' object counts (accelerate's ``reduce``, a mean) and
    then divide by the world size again: N times the loss on N processes. With the weights held (learning rates 0),
    2 processes evaluating one image each must report the eval loss of 1 process evaluating the same pairs."""
    data = shapes.write_coco_folder(tmp_path / "coco", 4, size=96, seed=3)
    held_out = shapes.write_coco_folder(tmp_path / "held_out", 6, size=96, seed=4)
    results = {}
    for processes, eval_batch in ((1, 2), (2, 1)):
        output = tmp_path / f"detector_{processes}"
        run_script("finetune_detection", [str(arg) for arg in [
            "--backbone", backbone_folder, "--train-images", data / "images", "--train-annotations",
            data / "annotations.json", "--eval-images", held_out / "images", "--eval-annotations",
            held_out / "annotations.json", "--output-dir", output, "--image-size", 96, "--max-size", 96,
            "--d-model", 32, "--layers", 2, "--queries", 8, "--max-steps", 1, "--batch-size", 2, "--eval-batch-size",
            eval_batch, "--learning-rate", 0, "--backbone-learning-rate", 0, "--cpu", "--num-workers", 0]],
            processes, tmp_path / f"run_{processes}")
        results[processes] = json.loads((output / "all_results.json").read_text())
    assert results[2]["eval_loss"] == pytest.approx(results[1]["eval_loss"], rel=1e-5)
    assert results[2]["eval_map"] == pytest.approx(results[1]["eval_map"], rel=1e-6)

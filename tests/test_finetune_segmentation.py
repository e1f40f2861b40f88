"""examples/finetune_segmentation.py learns: a tiny random MambaVision + UPerNet, trained on the CPU on generated
pictures (squares and discs of random colours on textured backgrounds), segments held-out pictures, and its output
folder reloads through AutoModelForSemanticSegmentation."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

import finetune_segmentation
from conftest import model_code, tiny_config
from kill_and_resume import assert_resumes_as_if_uninterrupted, run_script
from mambavision_tools.hub_folder import save_model_folder

CLASSES = ["background", "square", "disc"]
SIZE = 64
# held-out mean IoU over the three classes: 0.51 measured (12 epochs, ~107 CPU-seconds); after one epoch about 0.3
MIN_MEAN_IOU = 0.45


def shapes_picture(rng):
    """(RGB picture, class map): a grey textured background (stripes and noise), a square and a disc, each of a
    random saturated colour, at random places and sizes."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    texture = np.sin(xx / rng.uniform(2, 6) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(2, 6))
    image = np.repeat((rng.uniform(70, 130) + 35 * texture)[..., None], 3, axis=2) + rng.normal(0, 10, (SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    side = rng.integers(18, 30)
    top, left = rng.integers(0, SIZE - side, 2)
    square = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
    radius = rng.integers(9, 15)
    cy, cx = rng.integers(radius, SIZE - radius, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    for shape, label in ((square, 1), (disc, 2)):
        colour = rng.uniform(0, 90, 3)
        colour[rng.integers(3)] = rng.uniform(200, 255)  # one strong channel: a saturated colour
        image[shape] = colour + rng.normal(0, 10, (shape.sum(), 3))
        mask[shape] = label
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), Image.fromarray(mask)


def write_shapes(folder, count, seed):
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for index in range(count):
        image, mask = shapes_picture(rng)
        image.save(folder / "images" / f"{index:03d}.png")
        mask.save(folder / "masks" / f"{index:03d}.png")
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    return folder


@pytest.fixture
def tiny_segmenter(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(dim=16, in_dim=16, out_norm=True, image_size=SIZE, num_labels=len(CLASSES),
                         upernet={"hidden_size": 32, "auxiliary_channels": 16})
    model = model_code.load("modeling_mambavision_segmentation").MambaVisionForSemanticSegmentation(config)
    save_model_folder(model.eval(), tmp_path / "random")
    return tmp_path / "random"


def test_finetuning_learns_to_segment_shapes(tiny_segmenter, tmp_path):
    train, held_out = write_shapes(tmp_path / "train", 96, seed=1), write_shapes(tmp_path / "val", 24, seed=2)
    out = tmp_path / "finetuned"
    finetune_segmentation.main(["--model", str(tiny_segmenter), "--train-dir", str(train), "--eval-dir",
                                str(held_out), "--output-dir", str(out), "--epochs", "12", "--batch-size", "8",
                                "--learning-rate", "3e-3", "--cpu", "--num-workers", "0", "--logging-steps", "50"])
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["eval_mean_iou"] > MIN_MEAN_IOU, metrics
    model = AutoModelForSemanticSegmentation.from_pretrained(out, trust_remote_code=True).eval()
    assert [model.config.id2label[i] for i in range(3)] == CLASSES
    assert "image-segmentation" in (out / "README.md").read_text()


def test_finetuning_killed_resumes_with_the_same_command(tiny_segmenter, tmp_path, capsys):
    """Killed while writing its second checkpoint, then while writing the output folder: each rerun of the same
    command resumes from the newest complete checkpoint and takes only the steps after it, across an epoch's end;
    the output folder never appears half-written; the end is the uninterrupted run's, step by step."""
    train, held_out = write_shapes(tmp_path / "train", 6, seed=1), write_shapes(tmp_path / "val", 2, seed=2)

    def arguments(output):  # 4 steps of 2 fixed 32x32 crops, 3 steps an epoch, a checkpoint every 2
        return [str(arg) for arg in ["--model", tiny_segmenter, "--train-dir", train, "--eval-dir", held_out,
                                     "--output-dir", output, "--max-steps", 4, "--save-steps", 2, "--batch-size", 2,
                                     "--crop-size", 32, "--no-augment", "--learning-rate", 1e-3, "--cpu",
                                     "--num-workers", 0, "--logging-steps", 1]]

    output = assert_resumes_as_if_uninterrupted("finetune_segmentation", arguments, tmp_path, "shapes-model",
                                                steps_per_epoch=3, capsys=capsys)
    model = AutoModelForSemanticSegmentation.from_pretrained(output, trust_remote_code=True)
    assert [model.config.id2label[i] for i in range(3)] == CLASSES


def test_a_warm_up_as_long_as_the_training_finishes(tiny_segmenter, tmp_path):
    """--warmup-steps equal to the training's steps: transformers' polynomial schedule divided by the steps after the
    warm-up (ZeroDivisionError after the last step); the run writes its folder, its steps at the warm-up's rates."""
    train = write_shapes(tmp_path / "train", 4, seed=1)
    out = tmp_path / "finetuned"
    finetune_segmentation.main([str(arg) for arg in [
        "--model", tiny_segmenter, "--train-dir", train, "--output-dir", out, "--max-steps", 2, "--warmup-steps", 2,
        "--batch-size", 2, "--crop-size", 32, "--learning-rate", 1e-3, "--cpu", "--num-workers", 0,
        "--logging-steps", 1]])
    rates = [entry["learning_rate"] for entry in json.loads((out / "trainer_state.json").read_text())["log_history"]
             if "learning_rate" in entry]
    assert rates == pytest.approx([0.0, 0.5e-3]), rates  # each step's: 0, then half-way up


@pytest.mark.parametrize("images, batch, message", [
    (3, 1, "--batch-size must be at least 2, got 1"),
    (1, 2, r"1 training images are fewer than one batch \(--batch-size 2 on 1 process\(es\)\)")])
def test_batches_of_one_crop_are_refused(tiny_segmenter, tmp_path, capsys, images, batch, message):
    train = write_shapes(tmp_path / "train", images, seed=1)
    with pytest.raises(SystemExit) as stopped:
        finetune_segmentation.main([str(arg) for arg in [
            "--model", tiny_segmenter, "--train-dir", train, "--output-dir", tmp_path / "out", "--max-steps", 1,
            "--batch-size", batch, "--crop-size", 32, "--cpu", "--num-workers", 0]])
    assert re.search(message, f"{stopped.value.code} {capsys.readouterr().err}")
    assert not (tmp_path / "out").exists()


def test_a_last_batch_of_one_crop_is_left_out_of_training(tiny_segmenter, tmp_path):
    """3 images at batch 2: one whole batch an epoch (a batch of one crop stopped UPerNet's pooling BatchNorm with a
    traceback at the end of the first epoch)."""
    train = write_shapes(tmp_path / "train", 3, seed=1)
    out = tmp_path / "finetuned"
    finetune_segmentation.main([str(arg) for arg in [
        "--model", tiny_segmenter, "--train-dir", train, "--output-dir", out, "--epochs", 2, "--batch-size", 2,
        "--crop-size", 32, "--cpu", "--num-workers", 0]])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def write_sizes(folder, count, seed):
    """``write_shapes``' pictures cut to a different size each (height 40-56, width 64-40)."""
    write_shapes(folder, count, seed)
    for index in range(count):
        for sub in ("images", "masks"):
            path = folder / sub / f"{index:03d}.png"
            Image.open(path).crop((0, 0, 64 - 6 * index, 40 + 4 * index)).save(path)
    return folder


def test_evaluation_on_two_processes_of_images_of_other_sizes(tiny_segmenter, tmp_path):
    """2 processes (torchrun, gloo) evaluate 5 held-out images of 5 sizes: the mean IoU of the saved model's class
    maps, image by image in this process, at the processor's size against the masks resized (nearest) to it.
    Before: Trainer's gather of the class maps aborted; each process evaluated with its own BatchNorm statistics."""
    train, held_out = write_shapes(tmp_path / "train", 4, seed=1), write_sizes(tmp_path / "val", 5, seed=2)
    output = tmp_path / "finetuned"
    run_script("finetune_segmentation", [str(arg) for arg in [
        "--model", tiny_segmenter, "--train-dir", train, "--eval-dir", held_out, "--output-dir", output,
        "--max-steps", 1, "--batch-size", 2, "--crop-size", 32, "--no-augment", "--cpu", "--num-workers", 0]],
        2, tmp_path / "run")
    model = AutoModelForSemanticSegmentation.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(output, trust_remote_code=True)
    metric = MulticlassJaccardIndex(len(CLASSES), average="macro", ignore_index=255)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun's processes' (OMP_NUM_THREADS=1): the same sums, the same arg max
    try:
        for index in range(5):
            image = Image.open(held_out / "images" / f"{index:03d}.png")
            mask = torch.from_numpy(np.array(Image.open(held_out / "masks" / f"{index:03d}.png"), dtype=np.int64))
            with torch.no_grad():
                logits = model(**processor(image, return_tensors="pt")).logits  # (1, classes, height, width)
            mask = F.interpolate(mask[None, None].float(), size=logits.shape[2:], mode="nearest")[0].long()
            metric.update(logits.argmax(dim=1), mask)
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((output / "all_results.json").read_text())
    assert metrics["eval_mean_iou"] == metric.compute().item()

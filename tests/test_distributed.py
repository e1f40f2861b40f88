"""examples/finetune.py and examples/extract_features.py on 2 processes (torchrun, gloo on the CPU) against 1.

Fine-tuning: the per-step losses of 2 processes x batch 4 equal those of 1 process x batch 4 x 2 accumulated
micro-batches (the same global batch of 8, in the same order; BatchNorm normalises each micro-batch of 4 either
way) to LOSS_RTOL; the written folder loads with the Auto classes and classifies through the pipeline. A fine-tune
SIGKILLed while writing a checkpoint (1 and 2 processes) or its output folder resumes when run again with the same
command: from the newest complete checkpoint, taking only the steps after it, to the uninterrupted run's losses
(bit for bit on 1 process); the output folder never appears half-written.
Feature extraction: 2 ranks give the features of 1 process to FEATURE_TOL, every image once, the same as the
model itself gives per image; a run SIGKILLed midway (mid-write) completes when run again, with the same features.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

import extract_features
import finetune
import scale_utils
from conftest import ROOT, modeling, randomize_batchnorm, tiny_config
from kill_and_resume import (RESUME_RTOL, assert_same_training, kill_twice_then_finish, kill_when, logged_losses,
                             run_script)
from mambavision_tools import publishing
from mambavision_tools.hub_folder import save_model_folder
from test_serving import load_handler_module

LOSS_RTOL = 1e-5  # float32 on the CPU; gradients summed in another order (all-reduce vs accumulation)
FEATURE_TOL = 1e-5  # float32 on the CPU; batches of other sizes
CLASSES = ("blue", "green", "red")
BASE_CARD = "---\nlicense: other\nlicense_name: nvclv1\nlicense_link: https://example.com/license\n---\n# base\n"


def torchrun(script, *args, **popen_kwargs):
    """``torchrun --standalone --nproc_per_node 2 examples/<script> args`` (``script`` may be a path of its own);
    standalone: a free port, as tests may run side by side. A Popen when ``popen_kwargs`` are given, else the
    finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "examples" / script), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if popen_kwargs:
        return subprocess.Popen(command, env=env, **popen_kwargs)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny converted classifier (32x32 inputs) whose card names a license."""
    config = tiny_config(image_size=32, crop_pct=0.875)
    torch.manual_seed(0)
    model = randomize_batchnorm(modeling.MambaVisionModelForImageClassification(config).eval())
    folder = tmp_path_factory.mktemp("model") / "MambaVision-tiny"
    save_model_folder(model, folder)
    (folder / "README.md").write_text(BASE_CARD)
    return folder


def noisy_image(rng, colour, width, height):
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    """ImageFolder trees train/ (8 images a class) and val/ (2 a class) of noisy single-colour images."""
    root, rng = tmp_path_factory.mktemp("pets"), np.random.default_rng(0)
    colours = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}
    for split, count in (("train", 8), ("val", 2)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noisy_image(rng, colours[name], 40, 36).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """40 images of various sizes and formats in nested folders, one unreadable .jpg and a text file."""
    root, rng = tmp_path_factory.mktemp("photos"), np.random.default_rng(1)
    for i in range(40):
        folder = root / f"album{i % 3}" / ("nested" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        width, height = rng.integers(20, 70, 2)
        noisy_image(rng, rng.integers(0, 255, 3), width, height).save(folder / f"{i:02d}.{'jpg' if i % 4 else 'png'}")
    (root / "album1" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (root / "README.txt").write_text("not an image")
    return root


def finetune_arguments(model_folder, class_tree, output):
    """A 4-step fine-tune, checkpointed every 2 steps: 24 images in global batches of 8 (3 steps an epoch); the 6
    evaluation images in batches of 3 (one a process on 2: Trainer's eval_loss is then their mean)."""
    return [str(arg) for arg in ["--model", model_folder, "--train-dir", class_tree / "train", "--eval-dir",
                                 class_tree / "val", "--max-steps", 4, "--batch-size", 4, "--eval-batch-size", 3,
                                 "--no-augment", "--learning-rate", 1e-3, "--num-workers", 0, "--logging-steps", 1,
                                 "--timing-warmup", 1, "--save-steps", 2, "--output-dir", output]]


class FakeHub:  # --push-to-hub without a network: record what would be uploaded
    uploads = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.uploads.append(("create", repo_id))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.uploads.append(("upload", repo_id, sorted(path.name for path in folder_path.iterdir())))


@pytest.fixture(scope="module")
def uninterrupted(model_folder, class_tree, tmp_path_factory):
    """The fine-tune run through in this process, on 1 process with 2 micro-batches of 4 a step, and pushed to a
    (fake) Hub: its output folder and what was uploaded."""
    output = tmp_path_factory.mktemp("uninterrupted") / "pets-model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publishing, "HfApi", FakeHub)
        patch.setattr(FakeHub, "uploads", [])
        finetune.main(finetune_arguments(model_folder, class_tree, output) + [
            "--gradient-accumulation", "2", "--push-to-hub", "someone/tiny-pets"])
        return output, FakeHub.uploads


def test_finetune_killed_resumes_with_the_same_command(model_folder, class_tree, uninterrupted, tmp_path, capsys):
    """Killed while writing its second checkpoint, then while writing the output folder: each rerun of the same
    command resumes from the newest complete checkpoint and takes only the steps after it; the output folder
    never appears half-written; the end is the uninterrupted run's, step by step."""
    output = tmp_path / "pets-model"
    arguments = finetune_arguments(model_folder, class_tree, output) + ["--gradient-accumulation", "2"]
    kill_twice_then_finish("finetune", arguments, output, steps_per_epoch=3, capsys=capsys)
    assert_same_training(output, uninterrupted[0], RESUME_RTOL)


def test_finetune_two_processes_resume_and_match_one(model_folder, class_tree, uninterrupted, tmp_path):
    """2 processes x batch 4 killed while writing their second checkpoint resume with the same command, and
    compute what 1 process x batch 4 x 2 accumulated micro-batches computes uninterrupted (the same global batch
    of 8, in the same order; BatchNorm normalises each micro-batch of 4 either way); both processes evaluate the
    model saved (its loss and accuracy computed here; before, each process evaluated its own BatchNorm statistics)."""
    two, checkpoints = tmp_path / "two", tmp_path / "two-checkpoints"
    arguments = finetune_arguments(model_folder, class_tree, two)
    _, steps = run_script("finetune", arguments, 2, tmp_path / "killed", stall_in="checkpoint")
    assert steps == [1, 2, 3, 4] and not two.exists()
    assert (checkpoints / "checkpoint-2" / scale_utils.COMPLETE).is_file()
    assert not (checkpoints / "checkpoint-4" / scale_utils.COMPLETE).exists()

    log, steps = run_script("finetune", arguments, 2, tmp_path / "resumed")
    assert log.count("resuming from") == 1 and f"resuming from {checkpoints / 'checkpoint-2'} (step 2, " in log
    assert steps == [3, 4] and "throughput: train" in log and "2 processes" in log
    assert not checkpoints.exists()
    # the same losses at every step; not the same weights: each process keeps its own BatchNorm statistics, and
    # Adam turns the rounding noise of gradients that are 0 (biases before BatchNorm) into steps of any sign
    one, uploads = uninterrupted
    losses, expected = logged_losses(two), logged_losses(one)
    assert len(losses) == len(expected) == 4 and expected[0] != expected[-1]
    np.testing.assert_allclose(losses, expected, rtol=LOSS_RTOL)
    assert uploads[0] == ("create", "someone/tiny-pets") and uploads[1][:2] == ("upload", "someone/tiny-pets")
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(uploads[1][2])

    # the 2-process folder: the new labels, code and processor; no pickle; the base model's license in the card
    assert not (two / "training_args.bin").exists()
    model = AutoModelForImageClassification.from_pretrained(two, trust_remote_code=True).eval()
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.label2id["red"] == 2
    card = (two / "README.md").read_text()
    assert "license_name: nvclv1" in card and "pipeline_tag: image-classification" in card
    processor = AutoImageProcessor.from_pretrained(two, trust_remote_code=True)
    classifier = pipeline("image-classification", model=str(two), trust_remote_code=True)
    images = [Image.open(path).convert("RGB") for path in sorted((class_tree / "val").rglob("*.png"))]
    predictions = classifier(images, top_k=1)
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    assert [top["label"] for top, in predictions] == [CLASSES[i] for i in logits.argmax(-1).tolist()]

    # both processes evaluated the model saved (process 0's BatchNorm statistics): its accuracy and loss here
    labels = torch.tensor([CLASSES.index(path.parent.name) for path in sorted((class_tree / "val").rglob("*.png"))])
    results = json.loads((two / "all_results.json").read_text())
    assert results["eval_accuracy"] == (logits.argmax(-1) == labels).double().mean().item()
    np.testing.assert_allclose(results["eval_loss"], F.cross_entropy(logits, labels).item(), rtol=LOSS_RTOL)

    # it serves itself: handler.py answers as the pipeline does; the widget shows the first evaluation image
    answers = load_handler_module(two).EndpointHandler(str(two))({"inputs": images, "parameters": {"top_k": 1}})
    assert [top["label"] for top, in answers] == [top["label"] for top, in predictions]
    assert (two / "handler.py").read_bytes() == (ROOT / "handler.py").read_bytes()
    assert Image.open(two / "example.jpg").size == Image.open(class_tree / "val" / "blue" / "0.png").size
    assert "src: https://huggingface.co/two/resolve/main/example.jpg" in card and "## Deploy" in card


def test_finetune_on_a_datasets_dataset(model_folder, class_tree, tmp_path, capsys):
    """Also: --no-resume starts over (an earlier run's complete checkpoint is removed, not loaded: it holds no
    weights); --save-total-limit 1 keeps the newest; --keep-checkpoints keeps it once the output is written."""
    output, checkpoints = tmp_path / "from-datasets", tmp_path / "elsewhere"
    earlier = checkpoints / "checkpoint-7"
    earlier.mkdir(parents=True)
    (earlier / scale_utils.COMPLETE).touch()
    finetune.main(["--model", str(model_folder), "--dataset", str(class_tree), "--eval-split", "validation",
                   "--max-steps", "2", "--batch-size", "4", "--num-workers", "0", "--output-dir", str(output),
                   "--checkpoint-dir", str(checkpoints), "--save-steps", "1", "--save-total-limit", "1",
                   "--keep-checkpoints", "--no-resume"])
    assert f"starting from step 0; removed checkpoint-7 from {checkpoints} (--no-resume)\n" in capsys.readouterr().out
    model = AutoModelForImageClassification.from_pretrained(output, trust_remote_code=True)
    assert model.config.id2label == dict(enumerate(CLASSES))
    assert json.loads((output / "all_results.json").read_text())["eval_samples_per_second"] > 0
    assert scale_utils.checkpoints(checkpoints) == scale_utils.complete_checkpoints(checkpoints) == [
        checkpoints / "checkpoint-2"]


@pytest.mark.parametrize("arguments, message", [
    ([], "empty is not an image folder tree"),
    (["--checkpoint-dir", "out/checkpoints"], "checkpoints lies in --output-dir, which is written whole at the end"),
])
def test_finetune_bad_data_is_one_line(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    Path("empty").mkdir()
    with pytest.raises(SystemExit) as error:
        finetune.main(["--variant", "MambaVision-Digits", "--train-dir", "empty", "--output-dir", "out", *arguments])
    assert str(error.value).startswith("error: ") and message in str(error.value) and "\n" not in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]  # nothing written


def test_finetune_refuses_a_checkpoint_of_another_model(model_folder, class_tree, tmp_path):
    """A complete checkpoint that the same command did not write (here: another model's, its head for 5 classes
    where the data has 3) is refused in one line, before any training; nothing is written."""
    output, checkpoint = tmp_path / "pets-model", tmp_path / "pets-model-checkpoints" / "checkpoint-2"
    shutil.copytree(model_folder, checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4, "epoch": 0.67}))
    (checkpoint / scale_utils.COMPLETE).touch()
    with pytest.raises(SystemExit) as error:
        finetune.main(finetune_arguments(model_folder, class_tree, output))
    assert str(error.value).startswith(f"error: cannot resume from {checkpoint}: its weights do not fit the model (2 "
                                       "of another shape, e.g. model.head.bias); --no-resume starts over")
    assert "\n" not in str(error.value) and not output.exists() and (checkpoint / scale_utils.COMPLETE).is_file()


def read_features(folder):
    """{path: {name: features}} and {path: error} of an extraction's shards; every image in one shard once."""
    features, failed = {}, {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        tensors = load_file(shard)
        with safe_open(shard, "pt") as file:
            metadata = file.metadata()
        paths = json.loads(metadata["paths"])
        assert len(paths) == len(tensors["index"])
        for row, path in enumerate(paths):
            assert path not in features, f"{path} twice"
            features[path] = {name: values[row] for name, values in tensors.items()}
        failed.update(json.loads(metadata["failed"]))
    assert not features.keys() & failed.keys()
    return features, failed


def assert_same_features(actual, expected):
    assert actual.keys() == expected.keys()
    for path in expected:
        for name in expected[path]:
            torch.testing.assert_close(actual[path][name], expected[path][name], rtol=0, atol=FEATURE_TOL,
                                       msg=lambda message, what=f"{path} {name}": f"{what}: {message}")


@pytest.fixture(scope="module")
def one_process(model_folder, image_tree, tmp_path_factory):
    """The 1-process extraction, in this process: batches of 5, shards of 4, stage maps."""
    output = tmp_path_factory.mktemp("features") / "one"
    extract_features.main(["--model", str(model_folder), "--images", str(image_tree), "--output-dir", str(output),
                           "--stage-maps", "--batch-size", "5", "--shard-size", "4", "--num-workers", "0"])
    return output, read_features(output)


def test_extract_two_ranks_match_one_process_and_the_model(model_folder, image_tree, one_process, tmp_path):
    listed = {path.relative_to(image_tree).as_posix() for path in image_tree.rglob("*.[jp][pn]g")}
    one_folder, (expected, failed) = one_process
    assert set(expected) | set(failed) == listed and list(failed) == ["album1/broken.jpg"]

    two = tmp_path / "two"
    result = torchrun("extract_features.py", "--model", model_folder, "--images", image_tree, "--output-dir", two,
                      "--stage-maps", "--batch-size", 3, "--shard-size", 4, "--num-workers", 1)
    assert "warning: skipped album1/broken.jpg: UnidentifiedImageError" in result.stderr
    assert "throughput: extract" in result.stdout and "2 processes" in result.stdout
    assert f"({len(listed) - 1} images in" in result.stdout  # the ranks' counts add up: none did another's share
    features, failed_two = read_features(two)
    assert failed_two.keys() == failed.keys()
    assert_same_features(features, expected)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["features"] == len(listed) - 1 and list(manifest["failed"]) == ["album1/broken.jpg"]
    assert len(manifest["shards"]) == 11  # 41 files in shards of 4

    # the rows belong to their paths: the model itself, image by image
    model = AutoModel.from_pretrained(model_folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_folder, trust_remote_code=True)
    for path in ["album0/00.png", "album1/nested/07.jpg", "album2/nested/29.jpg"]:
        with torch.no_grad():
            output = model(**processor(Image.open(image_tree / path).convert("RGB"), return_tensors="pt"),
                           output_hidden_states=True)
        torch.testing.assert_close(features[path]["pooler_output"], output.pooler_output[0], rtol=0, atol=FEATURE_TOL)
        torch.testing.assert_close(features[path]["stage_2"], output.hidden_states[-3][0].mean(dim=(1, 2)),
                                   rtol=0, atol=FEATURE_TOL)


# extract_features.py whose ranks stall while writing their second shard: its temporary file is on disk, not
# yet renamed, when the test kills the run (the kill lands there for sure, not before the first shard or after
# the last)
STALLING_EXTRACTION = """
import sys, time
sys.path.insert(0, {examples!r})
import extract_features

save, saved = extract_features.save_file, []

def save_then_stall(*args, **kwargs):
    save(*args, **kwargs)
    saved.append(1)
    if len(saved) == 2:
        time.sleep(600)

extract_features.save_file = save_then_stall
sys.exit(extract_features.main())
"""


def test_extract_resumes_after_kill(model_folder, image_tree, one_process, tmp_path):
    script = tmp_path / "stalling_extract_features.py"
    script.write_text(STALLING_EXTRACTION.format(examples=str(ROOT / "examples")))
    output = tmp_path / "killed"
    arguments = ["--model", model_folder, "--images", image_tree, "--output-dir", output, "--stage-maps",
                 "--batch-size", 1, "--num-workers", 0, "--shard-size", 2]
    log = tmp_path / "killed.log"
    with open(log, "w") as log_file:
        run = torchrun(script, *arguments, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)

    def stalled():  # each rank's first shard renamed into place, its second written and stalling
        return len(list(output.glob("shard-*.safetensors"))) == 2 and len(list(output.glob(".shard-*.tmp"))) == 2

    kill_when(run, stalled, log)  # the launcher and both ranks, each in the middle of writing a shard
    finished = {path: path.stat().st_mtime_ns for path in output.glob("shard-*.safetensors")}
    assert len(finished) == 2 and not (output / "manifest.json").exists()

    extract_features.main([str(arg) for arg in arguments])  # again, on 1 process
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # kept, not redone
    features, failed = read_features(output)
    expected, expected_failed = one_process[1]
    assert failed.keys() == expected_failed.keys()
    assert_same_features(features, expected)
    assert len(list(output.glob("shard-*"))) == 21 and not list(output.glob(".*"))
    assert json.loads((output / "manifest.json").read_text())["features"] == len(expected)

    with pytest.raises(SystemExit) as error:  # other settings on the same folder: refused
        extract_features.main([str(arg) for arg in arguments[:-1]] + ["7"])
    assert "shard_size" in str(error.value) and "--overwrite" in str(error.value)

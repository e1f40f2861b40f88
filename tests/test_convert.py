"""convert_checkpoint.py: original checkpoints to Hub-ready folders, refusal of bad input, model card, push."""

import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from unittest import mock

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo
from transformers import AutoModel, AutoModelForImageClassification
from transformers import modeling_utils

from mambavision_tools import conversion, model_code, publishing, variants
from conftest import (FIXTURE_NAMES, FIXTURE_SIZES, FIXTURES, REFERENCE, ROOT, TINY_ARCHITECTURE, assert_close_relative, modeling,
                      needs_reference, needs_shared, tiny_config)
from convert_checkpoint import main
from mambavision_tools.configs import MAX_PARAMETERS, build_config, read_config_file
from mambavision_tools.hub_folder import CONFIG_AUTO_MAP
from mambavision_tools.variants import DETECTION_VARIANTS, PROJECT_VARIANTS, SEGMENTATION_VARIANTS, VARIANTS, Variant

LAYER_SCALED = {**TINY_ARCHITECTURE, "layer_scale": 0.5}  # the tiny architecture, as a --config file holds it
# end to end in CI (random weights, reloaded strictly and verified): T with sharding, B, a 512-pixel 21K variant
END_TO_END = {"MambaVision-T-1K": ["--verify", "--max-shard-size", "50MB"], "MambaVision-B-1K": ["--verify"],
              "MambaVision-L2-512-21K": ["--verify"]}


def random_original_state_dict(config, seed=0):
    """Random tensors in the original checkpoint layout (no ``model.`` prefix), finite through a forward pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in modeling.MambaVisionModelForImageClassification(config).state_dict().items()}
    state_dict = {}
    for key, shape in shapes.items():
        original = key.removeprefix("model.")
        if key.endswith("num_batches_tracked"):
            state_dict[original] = torch.tensor(7)
        elif key.endswith("running_var"):
            state_dict[original] = torch.rand(shape, generator=generator) + 0.5
        else:
            state_dict[original] = torch.randn(shape, generator=generator) * 0.05
    return state_dict


def run(argv, capsys):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(status, err, parent, before, *fragments):
    """A clean failure: non-zero status, one `error:` line naming the problem, nothing left in ``parent``."""
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert sorted(p.name for p in parent.iterdir()) == before


@pytest.fixture
def tiny(tmp_path):
    """A tiny custom architecture (--config) and its original-format checkpoint; ``out`` is an empty parent."""
    config = tiny_config(num_labels=5, layer_scale=0.5)
    state_dict = random_original_state_dict(config)
    config_file = tmp_path / "architecture.json"
    config_file.write_text(json.dumps({**LAYER_SCALED, "num_classes": 5}))
    checkpoint = tmp_path / "original.pth.tar"
    torch.save({"state_dict": state_dict, "epoch": 3}, checkpoint)
    out = tmp_path / "out"
    out.mkdir()

    def argv(checkpoint_path=checkpoint, *extra):
        return ["--config", config_file, "--checkpoint", checkpoint_path, "--output-dir", out / "model", *extra]

    return dict(state_dict=state_dict, config=config_file, checkpoint=checkpoint, out=out, argv=argv)


def _layout_name(variant):
    """The ../shared/reference name of a Hub variant, matched through the original checkpoint URL."""
    reference = json.loads((REFERENCE / "variants.json").read_text())
    return next(name for name, spec in reference.items() if spec["pretrained_cfg"]["url"] == variant.checkpoint_url)


# --- acceptance: fixtures and variants ---------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_converts_and_reproduces_original_outputs(name, tmp_path, capsys):
    folder = tmp_path / name
    status, out, err = run(["--config", FIXTURES / name / "architecture.json", "--checkpoint",
                            FIXTURES / name / "original_checkpoint.pth.tar", "--output-dir", folder, "--verify"], capsys)
    assert status == 0, err
    assert "verified" in out
    classifier, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True,
                                                                       output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    backbone, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"], info
    expected = load_file(FIXTURES / name / "expected_outputs.safetensors")
    for size in FIXTURE_SIZES:
        pixels = expected[f"input_{size}"]
        with torch.no_grad():
            logits = classifier.eval()(pixels).logits
            pooled, stage_maps = backbone.eval()(pixels, return_dict=False)
        assert_close_relative(logits, expected[f"logits_{size}"], what=f"{name} logits {size}")
        assert_close_relative(pooled, expected[f"pooled_{size}"], what=f"{name} pooled {size}")
        for i, stage_map in enumerate(stage_maps, start=1):
            assert_close_relative(stage_map, expected[f"stage{i}_{size}"], what=f"{name} stage{i} {size}")


@needs_reference
def test_variant_table_has_every_published_url():
    reference = json.loads((REFERENCE / "variants.json").read_text())
    urls = sorted(spec["pretrained_cfg"]["url"] for spec in reference.values())
    assert sorted(variant.checkpoint_url for variant in VARIANTS.values()) == urls
    assert all(variant.repo_id == f"nvidia/{name}" for name, variant in VARIANTS.items())  # keyed by Hub name


@needs_reference
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_table_matches_reference(name):
    variant = VARIANTS[name]
    spec = json.loads((REFERENCE / "variants.json").read_text())[_layout_name(variant)]
    architecture, preprocessing = spec["architecture"], spec["pretrained_cfg"]
    for field in ("dim", "in_dim", "depths", "window_size", "mlp_ratio", "layer_scale_conv"):
        assert variant.architecture[field] == architecture[field], field
    layer_scale = architecture["layer_scale"]  # float32 1e-5 there
    assert variant.architecture["layer_scale"] == (layer_scale and pytest.approx(layer_scale, rel=1e-6))
    assert variant.architecture["num_heads"][2:] == architecture["num_heads"][2:]  # levels 0-1 use no heads
    assert variant.imagenet_labels and architecture["num_classes"] == 1000
    assert [3, variant.image_size, variant.image_size] == preprocessing["input_size"]
    for field in ("crop_pct", "crop_mode", "interpolation"):
        assert getattr(variant, field) == preprocessing[field], field
    assert list(variant.mean) == pytest.approx(preprocessing["mean"]) and list(variant.std) == pytest.approx(preprocessing["std"])
    config = build_config(variant)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in modeling.MambaVisionModelForImageClassification(config).parameters())
    assert num_params == spec["num_params"]
    assert abs(variant.results["params_m"] * 1e6 - num_params) < 0.1e6  # the published count is this model's


@needs_reference
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_accepts_its_original_layout(name):
    """Key/shape level for all variants: the original layout checks and loads strictly."""
    variant = VARIANTS[name]
    config = build_config(variant)
    layout = json.loads((REFERENCE / "checkpoint_layout" / f"{_layout_name(variant)}.json").read_text())
    shapes = {key: shape for key, (_, shape) in layout.items()}
    state_dict = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    model = conversion.build_model(config, state_dict, name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {f"model.{k}": tuple(s) for k, s in shapes.items()}
    assert config.num_labels == 1000 and config.id2label[0] == ImageNetInfo("imagenet-1k").label_descriptions()[0]


@pytest.mark.parametrize("name", END_TO_END)
def test_variant_converts_end_to_end(name, tmp_path, capsys):
    variant = VARIANTS[name]
    source = random_original_state_dict(build_config(variant))
    checkpoint = tmp_path / variant.checkpoint
    torch.save({"state_dict": source, "epoch": 3}, checkpoint)
    folder = tmp_path / name
    extra = END_TO_END[name]
    status, out, err = run(["--variant", name, "--checkpoint", checkpoint, "--output-dir", folder, *extra], capsys)
    checkpoint.unlink()
    assert status == 0, err
    assert "verified: outputs at" in out
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MambaVisionModelForImageClassification"]
    assert config["auto_map"] == CONFIG_AUTO_MAP  # the recipe's config and model entries
    processor_auto_map = json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]
    assert processor_auto_map == {"AutoImageProcessor": modeling.AUTO_MAP["AutoImageProcessor"]}
    labels = ImageNetInfo("imagenet-1k").label_descriptions()
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    assert config["label2id"] == {label: i for i, label in enumerate(labels)}
    for field, value in variant.preprocessing.items():
        assert config[field] == value, field
    for file in modeling.HUB_FILES:
        assert (folder / file).read_text() == (ROOT / file).read_text()
    if "--max-shard-size" in extra:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    model, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True,
                                                                  output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reloaded = model.state_dict()
    assert set(reloaded) == {f"model.{key}" for key in source}
    for key, tensor in source.items():
        assert torch.equal(reloaded[f"model.{key}"], tensor), key
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == name and f'AutoModel.from_pretrained("{variant.repo_id}"' in card.text
    assert f'AutoImageProcessor.from_pretrained("{variant.repo_id}"' in card.text  # the saved processor
    shutil.rmtree(folder)  # up to 1 GB; pytest keeps the last runs' folders


# --- reading -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix", "legacy_pickle",
                                    "safetensors", "hub_safetensors"])
def test_reads_checkpoint_layouts(layout, tiny, capsys):
    source = tiny["state_dict"]
    path = tiny["checkpoint"].with_suffix(".safetensors" if "safetensors" in layout else ".bin")
    if layout == "bare":
        torch.save(source, path)
    elif layout == "state_dict":
        torch.save({"state_dict": source, "optimizer": {"lr": 0.1}}, path)
    elif layout == "model":
        torch.save({"model": source, "epoch": 300}, path)
    elif layout == "module_prefix":
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    elif layout == "legacy_pickle":
        torch.save({"state_dict": source}, path, _use_new_zipfile_serialization=False)
    elif layout == "safetensors":
        save_file(source, path)
    else:  # NVIDIA's Hub repos: the same tensors under `model.`
        save_file({f"model.{k}": v for k, v in source.items()}, path)
    status, out, err = run(tiny["argv"](path), capsys)
    assert status == 0, err
    written = load_file(tiny["out"] / "model" / "model.safetensors")
    assert written.keys() == {f"model.{k}" for k in source}
    for key, tensor in source.items():
        assert torch.equal(written[f"model.{key}"], tensor), key


# --- bad input: one clear line, non-zero status, nothing left behind -----------------------------------------


def test_refuses_truncated_file(tiny, capsys):
    data = tiny["checkpoint"].read_bytes()
    tiny["checkpoint"].write_bytes(data[: len(data) // 2])
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "damaged or truncated")


def test_refuses_text_file(tiny, capsys):
    tiny["checkpoint"].write_text("not a checkpoint\n")
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "is not a PyTorch checkpoint")


def test_refuses_missing_key(tiny, capsys):
    state_dict = dict(tiny["state_dict"])
    del state_dict["head.weight"]
    torch.save({"state_dict": state_dict}, tiny["checkpoint"])
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "missing 1: head.weight")


def test_refuses_unexpected_key(tiny, capsys):
    torch.save({"state_dict": {**tiny["state_dict"], "levels.9.extra": torch.zeros(2)}}, tiny["checkpoint"])
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "unexpected 1: levels.9.extra")


def test_refuses_wrong_shape(tiny, capsys):
    torch.save({"state_dict": {**tiny["state_dict"], "norm.weight": torch.ones(3)}}, tiny["checkpoint"])
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "wrong shape 1: norm.weight (3,) instead of (64,)")


def test_refuses_integer_weights(tiny, capsys):
    torch.save({"state_dict": {**tiny["state_dict"], "norm.weight": torch.ones(64, dtype=torch.int64)}},
               tiny["checkpoint"])
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "not floating point 1: norm.weight")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch_save", "raw_pickle"])
def test_refuses_pickle_that_runs_code(container, tiny, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    payload = {"hook": RunsCode(marker), "state_dict": tiny["state_dict"]}
    if container == "torch_save":
        torch.save(payload, tiny["checkpoint"])
    else:
        tiny["checkpoint"].write_bytes(pickle.dumps(payload, protocol=2))
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "refusing to load", "system")
    assert not marker.exists()


def test_cli_refuses_pickle_that_runs_code_without_traceback(tiny, tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"hook": RunsCode(marker), "state_dict": tiny["state_dict"]}, tiny["checkpoint"])
    result = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), *map(str, tiny["argv"]())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: refusing to load"), result.stderr
    assert not marker.exists() and not any(tiny["out"].iterdir())


def test_refuses_unknown_variant(tmp_path, capsys):
    status, out, err = run(["--variant", "MambaVision-T-1k", "--output-dir", tmp_path / "model"], capsys)
    assert_refused(status, err, tmp_path, [], "unknown variant 'MambaVision-T-1k'", "MambaVision-T-1K")


def test_refuses_missing_file(tiny, capsys):
    assert_refused(*run(tiny["argv"](tiny["out"] / "nowhere.pth.tar"), capsys)[::2], tiny["out"], [], "not found")


def test_refuses_non_empty_output_dir_unless_overwrite(tiny, capsys):
    existing = tiny["out"] / "model"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], ["model"], "not empty", "--overwrite")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    # --overwrite replaces converted folders only; --force-overwrite replaces anything
    assert_refused(*run(tiny["argv"](tiny["checkpoint"], "--overwrite"), capsys)[::2], tiny["out"], ["model"],
                   "holds no MambaVision config.json", "--force-overwrite")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    status, out, err = run(tiny["argv"](tiny["checkpoint"], "--force-overwrite"), capsys)
    assert status == 0, err
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()
    assert sorted(p.name for p in tiny["out"].iterdir()) == ["model"]


def test_converts_into_an_existing_empty_folder(tiny, capsys):
    (tiny["out"] / "model").mkdir()
    status, out, err = run(tiny["argv"](), capsys)
    assert status == 0, err
    assert names(tiny["out"]) == ["model"] and (tiny["out"] / "model" / "model.safetensors").is_file()


def test_converted_files_follow_the_umask(tiny, capsys):
    """Every file of the folder, the weights too (transformers writes them through a private temporary file),
    gets the permissions the umask gives new files: who may read the folder may load the model."""
    previous = os.umask(0o022)
    try:
        status, out, err = run(tiny["argv"](), capsys)
    finally:
        os.umask(previous)
    assert status == 0, err
    folder = tiny["out"] / "model"
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in folder.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    assert oct(folder.stat().st_mode & 0o777) == "0o755"


def test_overwrite_replaces_a_converted_folder(tiny, capsys):
    folder = tiny["out"] / "model"
    assert run(tiny["argv"](), capsys)[0] == 0
    torch.save({"state_dict": random_original_state_dict(tiny_config(num_labels=5, layer_scale=0.5), seed=1)},
               tiny["checkpoint"])
    status, out, err = run(tiny["argv"](tiny["checkpoint"], "--overwrite"), capsys)
    assert status == 0, err
    assert sorted(p.name for p in tiny["out"].iterdir()) == ["model"]
    written = load_file(folder / "model.safetensors")
    assert torch.equal(written["model.head.weight"], torch.load(tiny["checkpoint"])["state_dict"]["head.weight"])


@pytest.mark.parametrize("intruder", ["notes.txt", "original.pth.tar", "data/"])
def test_overwrite_refuses_to_delete_what_it_did_not_write(intruder, tiny, capsys):
    folder = tiny["out"] / "model"
    assert run(tiny["argv"](), capsys)[0] == 0
    if intruder.endswith("/"):
        (folder / intruder).mkdir()
    else:
        (folder / intruder).write_bytes(tiny["checkpoint"].read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    checkpoint = folder / intruder if intruder.endswith(".pth.tar") else tiny["checkpoint"]
    status, out, err = run(tiny["argv"](checkpoint, "--overwrite"), capsys)
    reason = "holds the input checkpoint" if checkpoint.parent == folder else f"does not write: {intruder}"
    assert_refused(status, err, tiny["out"], ["model"], reason, "--force-overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # untouched
    status, out, err = run(tiny["argv"](checkpoint, "--force-overwrite"), capsys)
    assert status == 0, err
    assert not (folder / intruder.rstrip("/")).exists() and (folder / "model.safetensors").is_file()


def test_refuses_unknown_config_field(tiny, capsys):
    tiny["config"].write_text(json.dumps({**LAYER_SCALED, "depth": [1, 1, 1, 1]}))
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "unknown field(s)", "depth")


def test_usage_errors_are_one_line(tiny, capsys):
    status, out, err = run(["--config", tiny["config"], "--output-dir", tiny["out"] / "model"], capsys)
    assert_refused(status, err, tiny["out"], [], "--config needs --checkpoint")
    assert status == 2
    status, out, err = run(["--variant", "MambaVision-T-1K", "--all", "--output-dir", tiny["out"]], capsys)
    assert_refused(status, err, tiny["out"], [], "not allowed with argument")
    status, out, err = run([*tiny["argv"](), "--max-shard-size", "1.5GB"], capsys)
    assert_refused(status, err, tiny["out"], [], "invalid size '1.5GB'")
    status, out, err = run(["--output-dir", tiny["out"]], capsys)
    assert_refused(status, err, tiny["out"], [], "one of --variant, --config, --all or --list-variants is required")
    assert status == 2


def test_failed_write_leaves_nothing(tiny, monkeypatch, capsys):
    def fail_midway(model, folder, **options):
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conversion, "save_model_folder", fail_midway)
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "No space left on device")


def test_unexpected_failure_is_one_line_too(tiny, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("something no check foresaw\nwith details")

    monkeypatch.setattr(conversion, "build_model", broken)
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [],
                   "unexpected RuntimeError: something no check foresaw")


def test_verify_catches_a_folder_that_does_not_reproduce(tiny, monkeypatch, capsys):
    save = conversion.save_model_folder

    def save_then_corrupt(model, folder, **options):
        save(model, folder, **options)
        weights = load_file(folder / "model.safetensors")
        weights["model.head.bias"] = weights["model.head.bias"] + 1.0
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(conversion, "save_model_folder", save_then_corrupt)
    assert_refused(*run(tiny["argv"](tiny["checkpoint"], "--verify"), capsys)[::2], tiny["out"], [],
                   "verification failed: the reloaded folder's logits differ by")


def test_verify_names_non_finite_outputs_as_such(tiny, capsys):
    huge = {"norm.bias": torch.full((64,), 1e30), "head.weight": torch.full((5, 64), 1e30)}  # finite; logits are not
    state_dict = {**tiny["state_dict"], **huge}
    torch.save({"state_dict": state_dict}, tiny["checkpoint"])
    status, out, err = run(tiny["argv"](tiny["checkpoint"], "--verify"), capsys)
    assert_refused(status, err, tiny["out"], [],
                   "verification failed: the converted model's logits hold NaN or infinite values")
    assert "differ by nan" not in err


# --- tampered and non-finite checkpoints ------------------------------------------------------------------------


def _largest_record(archive):
    return max(archive.infolist(), key=lambda info: info.file_size)


def cut_largest_record_in_half(path):
    """Rewrite the zip with its largest record halved: every CRC matches, only the record's size is wrong."""
    with zipfile.ZipFile(path) as archive:
        largest = _largest_record(archive).filename
        records = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in records:
            archive.writestr(info, data[: len(data) // 2] if info.filename == largest else data)
    return largest


def flip_bytes_in_largest_record(path, count=64):
    """Invert ``count`` bytes inside the largest record, in place (its CRC-32 no longer matches)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = _largest_record(archive)
    header = info.header_offset  # local header: 30 bytes, then the name and the extra field
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + int.from_bytes(
        data[header + 28:header + 30], "little") + info.file_size // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))
    return info.filename


@pytest.mark.parametrize("damage", ["cut_in_half", "bytes_flipped"])
def test_refuses_tampered_checkpoint(damage, tiny, capsys):
    path = tiny["checkpoint"]
    if damage == "cut_in_half":
        cut_largest_record_in_half(path)
        fragments = ["the file is damaged or truncated", "record size"]
    else:
        record = flip_bytes_in_largest_record(path)
        fragments = [f"record '{record}' fails its CRC-32 check"]
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], f"cannot read {path}", *fragments)


@pytest.mark.parametrize("value", ["nan", "inf", "all_nan", "beyond_float32"])
def test_refuses_non_finite_weights(value, tiny, capsys):
    name = "levels.2.blocks.0.mlp.fc1.weight"
    weight = tiny["state_dict"][name].clone()  # (64, 32)
    if value == "all_nan":
        weight.fill_(math.nan)
    elif value == "beyond_float32":  # finite in float64, infinite once written as float32
        weight = weight.double()
        weight[0, 0] = 1e300
    else:
        weight[0, 0] = float(value)
    torch.save({"state_dict": {**tiny["state_dict"], name: weight}}, tiny["checkpoint"])
    count = "2,048 NaN" if value == "all_nan" else ("1 NaN" if value == "nan" else "1 infinite")
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], str(tiny["checkpoint"]), "non-finite",
                   f"{name} ({count} of 2,048)")


# --- atomic folders: signals, killed runs, a second converter, full disks ------------------------------------

# The converter's command line in a child process that pauses at a chosen moment (printing PAUSED), so that a test
# can signal it there: "writing" (the folder half-written) or "renaming" (an old folder moved aside, the new one
# not yet in its place).
PAUSING_CONVERTER = """
import sys, time
from pathlib import Path
import convert_checkpoint
from mambavision_tools import conversion

moment, argv = sys.argv[1], sys.argv[2:]

def pause(seconds):
    print("PAUSED", flush=True)
    time.sleep(seconds)

if moment == "writing":
    save = conversion.save_model_folder
    def save_and_pause(model, folder, **kwargs):
        save(model, folder, **kwargs)
        pause(120)
    conversion.save_model_folder = save_and_pause
else:
    rename = Path.rename
    def rename_and_pause(self, target):
        moved = rename(self, target)
        if str(target).endswith(".replaced"):
            pause(5)  # SIGINT and SIGTERM wait for the renames; SIGKILL does not
        return moved
    Path.rename = rename_and_pause
sys.exit(convert_checkpoint.main(argv))
"""


def start_paused(argv, moment):
    child = subprocess.Popen([sys.executable, "-c", PAUSING_CONVERTER, moment, *map(str, argv)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.strip() == "PAUSED":
            return child
    child.wait()
    raise AssertionError(f"the converter never paused: {child.stderr.read()}")


def names(folder):
    return sorted(path.name for path in folder.iterdir())


def contents(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture
def converted(tiny, capsys):
    """``tiny`` with its folder converted once (``before``: its files), and a different checkpoint to replace it."""
    assert run(tiny["argv"](), capsys)[0] == 0
    before = contents(tiny["out"] / "model")
    replacement = random_original_state_dict(tiny_config(num_labels=5, layer_scale=0.5), seed=1)
    torch.save({"state_dict": replacement}, tiny["checkpoint"])
    return {**tiny, "before": before, "replacement": replacement}


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_writing_keeps_the_old_folder_and_leaves_nothing(signal_number, converted):
    child = start_paused(converted["argv"](converted["checkpoint"], "--overwrite"), "writing")
    assert set(names(converted["out"])) == {".model.lock", f".model.{child.pid}.partial", "model"}
    child.send_signal(signal_number)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal_number
    assert err == f"error: interrupted by {signal.Signals(signal_number).name}\n"
    assert names(converted["out"]) == ["model"]
    assert contents(converted["out"] / "model") == converted["before"]


def test_next_run_removes_what_a_killed_run_left(tiny, capsys):
    child = start_paused(tiny["argv"](), "writing")
    child.kill()  # SIGKILL: no cleanup at all
    child.communicate(timeout=60)
    staging = f".model.{child.pid}.partial"
    assert set(names(tiny["out"])) == {".model.lock", staging}
    status, out, err = run(tiny["argv"](), capsys)
    assert status == 0, err
    assert f"removed {staging}, left by an interrupted conversion" in out
    assert names(tiny["out"]) == ["model"]


def test_staging_of_another_folder_is_not_taken_for_a_stale_one(tiny, capsys):
    other = tiny["out"] / f".model.v2.{os.getpid()}.partial"  # a live conversion into out/model.v2
    other.mkdir()
    assert run(tiny["argv"](), capsys)[0] == 0
    assert set(names(tiny["out"])) == {"model", other.name}


def test_kill_between_the_final_renames_loses_no_folder(converted, capsys):
    child = start_paused(converted["argv"](converted["checkpoint"], "--overwrite"), "renaming")
    child.kill()
    child.communicate(timeout=60)
    assert "model" not in names(converted["out"])  # moved aside, the new one not yet in place
    status, out, err = run(converted["argv"](), capsys)  # the next run puts the old one back, then refuses
    assert_refused(status, err, converted["out"], ["model"], "is not empty")
    assert "restored model from" in out
    assert contents(converted["out"] / "model") == converted["before"]


def test_sigterm_between_the_final_renames_waits_for_them(converted):
    child = start_paused(converted["argv"](converted["checkpoint"], "--overwrite"), "renaming")
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM and err == "error: interrupted by SIGTERM\n"
    assert names(converted["out"]) == ["model"]  # the replacement completed, then the run stopped
    written = load_file(converted["out"] / "model" / "model.safetensors")
    assert torch.equal(written["model.head.weight"], converted["replacement"]["head.weight"])


def test_second_converter_on_the_same_folder_refuses(tiny, monkeypatch, capsys):
    save = conversion.save_model_folder
    second = []

    def save_and_start_another(model, folder, **kwargs):
        save(model, folder, **kwargs)
        second.append(main([str(a) for a in tiny["argv"]()]))  # while the first holds the lock

    monkeypatch.setattr(conversion, "save_model_folder", save_and_start_another)
    status, out, err = run(tiny["argv"](), capsys)
    assert status == 0 and second == [1]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: another conversion (pid {os.getpid()}) is writing")
    assert names(tiny["out"]) == ["model"]


def test_disk_full_while_writing_weights_is_one_line(tiny, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full)
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], "cannot write the model folder",
                   "No space left on device")


def test_a_write_the_system_refuses_is_one_line(tiny):
    """A real failing write: the child may not write files over 64 KiB (the weights are larger)."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = subprocess.run([sys.executable, "convert_checkpoint.py", *map(str, tiny["argv"]())], cwd=ROOT,
                            preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert re.fullmatch(r"error: cannot write the model folder: .*File too large.*\n", result.stderr), result.stderr
    assert names(tiny["out"]) == []


# --- config validation ----------------------------------------------------------------------------------------


BOUND = f"more than the converter's bound of {MAX_PARAMETERS:,} parameters"
# Every refusal of a --config file: the config's own checks (as from_pretrained makes them), then the converter's
# class-name checks and bounds; each is one line naming the file.
INVALID_CONFIGS = {
    "depths length": (dict(depths=[1, 1, 3]), "`depths` needs 4 entries"),
    "depths negative": (dict(depths=[1, -1, 3, 2]), "`depths` must be non-negative integers"),
    "depths not a list": (dict(depths=4), "invalid configuration in"),  # a TypeError in the config
    "dim zero": (dict(dim=0), "`dim` must be a positive integer"),
    "dim odd": (dict(dim=9), "`dim` must be even"),
    "d_conv string": (dict(d_conv="3"), "`d_conv` must be a positive integer"),
    "image_size zero": (dict(image_size=0), "`image_size` must be a positive integer"),
    "window zero": (dict(window_size=[4, 4, 0, 2]), "window_size[2] must be a positive integer"),
    "window of a conv level": (dict(window_size=[None, 4, 4, 2]), "window_size[0] must be a positive integer"),
    "heads": (dict(num_heads=[1, 1, 3, 4]), "num_heads[2]=3 must be a positive divisor"),
    "mlp_ratio string": (dict(mlp_ratio="4"), "`mlp_ratio` must be a positive number"),
    "drop_path_rate": (dict(drop_path_rate=1.0), "`drop_path_rate` must be in [0, 1)"),
    "layer_scale NaN": (dict(layer_scale=math.nan), "`layer_scale` must be a finite number or None"),
    "layer_scale_conv infinite": (dict(layer_scale_conv=math.inf), "`layer_scale_conv` must be a finite number"),
    "scan_backend": (dict(scan_backend="cuda"), "unknown scan backend 'cuda'"),
    "mean length": (dict(mean=[0.5, 0.5]), "`mean` needs one finite number per input channel (num_channels=3)"),
    "std NaN": (dict(std=[0.2, math.nan, 0.2]), "`std` needs one finite number per input channel"),
    "std zero": (dict(std=[0, 0.2, 0.2]), "`std` must be positive"),
    "crop_pct negative": (dict(crop_pct=-0.5), "`crop_pct` must be in (0, 1]"),
    "crop_pct above 1": (dict(crop_pct=1.5), "`crop_pct` must be in (0, 1]"),
    "crop_mode": (dict(crop_mode="zoom"), "`crop_mode` must be one of"),
    "interpolation": (dict(interpolation="cubic"), "`interpolation` must be one of"),
    "out_features": (dict(out_features=["stage9"]), "out_features must be a subset of stage_names"),
    "num_classes": (dict(num_classes=10**9), "invalid num_labels"),
    "id2label gap": (dict(id2label={"0": "a", "2": "b"}, num_classes=2), "invalid id2label"),
    "id2label count": (dict(id2label={"0": "a", "1": "b"}), "invalid num_labels in"),  # num_classes is 5
    "label2id": (dict(id2label={"0": "a", "1": "b"}, label2id={"a": 1, "b": 0}, num_classes=2),
                 "not the inverse of id2label"),
    "depths bound": (dict(depths=[1, 1, 10**7, 2]), "invalid depths"),
    "window bound": (dict(window_size=[4, 4, 4, 1000]), "invalid window_size"),
    "image_size bound": (dict(image_size=10**9), "invalid image_size"),
    "parameters": (dict(dim=10**5), f"parameters, {BOUND}"),
    "parameters beyond int64": (dict(dim=10**9), "describes a model too large to build (Storage size"),
}


@pytest.mark.parametrize("fields, fragment", INVALID_CONFIGS.values(), ids=INVALID_CONFIGS)
def test_refuses_invalid_config_values(fields, fragment, tiny, capsys):
    tiny["config"].write_text(json.dumps({**LAYER_SCALED, "num_classes": 5, **fields}))
    tiny["checkpoint"].unlink()  # refused before any checkpoint is read
    assert_refused(*run(tiny["argv"](), capsys)[::2], tiny["out"], [], fragment, str(tiny["config"]))


def test_loading_a_config_applies_its_checks(tmp_path):
    """The config's checks run on from_pretrained too: a hand-edited or fine-tuned folder's config.json."""
    config = tiny_config()
    config.save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    for field, value in (("crop_pct", 1.5), ("std", [0.2, -0.2, 0.2]), ("interpolation", "lanczos"), ("mean", [0.5])):
        (tmp_path / "config.json").write_text(json.dumps({**fields, field: value}))
        with pytest.raises(ValueError, match=f"MambaVisionConfig: `{field}`"):
            type(config).from_pretrained(tmp_path)


@pytest.mark.parametrize("name", [*VARIANTS, *PROJECT_VARIANTS])
def test_every_table_entry_is_accepted(name):
    variant = {**VARIANTS, **PROJECT_VARIANTS}[name]
    config = build_config(variant)
    assert {field: getattr(config, field) for field in variant.preprocessing} == variant.preprocessing


@pytest.mark.parametrize("num_classes, first_label", [(1000, ImageNetInfo("imagenet-1k").label_descriptions()[0]),
                                                      (5, "LABEL_0")])
def test_config_file_gives_the_config_of_its_variant(num_classes, first_label, tmp_path):
    """--config converts with the config read with the file; the variant builds the same one (a 1000-class head
    without names gets ImageNet-1k's)."""
    path = tmp_path / "architecture.json"
    path.write_text(json.dumps({**LAYER_SCALED, "num_classes": num_classes, "crop_pct": 0.9}))
    variant, config = read_config_file(path, "custom")
    assert config.to_dict() == build_config(variant).to_dict()
    assert config.num_labels == num_classes and config.id2label[0] == first_label and config.crop_pct == 0.9


# --- the library: the Hub folder's recipe -------------------------------------------------------------------


def test_hub_files_hold_every_module_they_import():
    for name in modeling.HUB_FILES:
        imported = re.findall(r"^\s*from \.(\w+) import", (ROOT / name).read_text(), flags=re.MULTILINE)
        assert {f"{module}.py" for module in imported} <= set(modeling.HUB_FILES), name
    for entry in [*modeling.AUTO_MAP.values(), *(e for m in modeling.HEAD_AUTO_MAPS.values() for e in m.values())]:
        module, cls = entry.split(".")
        assert f"{module}.py" in modeling.HUB_FILES and hasattr(model_code.load(module), cls), entry


def relative_imports(name):
    """The model files that model file ``name`` imports, found as transformers' remote-code loader finds them
    (its two patterns, anywhere in the text: inside ``try`` and functions too)."""
    text = (ROOT / name).read_text()
    found = re.findall(r"^\s*import\s+\.(\S+)\s*$", text, flags=re.MULTILINE)
    found += re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE)
    return {f"{module}.py" for module in found}


def test_model_files_import_without_a_cycle_and_name_every_file_they_need():
    """transformers up to 4.53 follows relative imports in a loop that never ends on a cycle (a folder's model then
    hangs in save_pretrained), and before 5.10 it copies from a local folder only the files that the loaded file
    imports itself: so no cycle, and each file a class or processor is loaded from imports all that it needs."""
    graph = {name: relative_imports(name) for name in modeling.HUB_FILES}

    def needed(name, path=()):
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        return set().union(*(needed(module, (*path, name)) | {module} for module in graph[name]))

    for entry in {*modeling.AUTO_MAP.values(), *(e for m in modeling.HEAD_AUTO_MAPS.values() for e in m.values())}:
        module = entry.split(".")[0] + ".py"
        assert needed(module) <= graph[module], f"{module} imports {sorted(graph[module])}, needs {sorted(needed(module))}"


# --- download, --all, listing ---------------------------------------------------------------------------------


def tiny_variants(tmp_path):
    """Two small table entries with original-format files in ``tmp_path / "originals"``."""
    originals = tmp_path / "originals"
    originals.mkdir()
    entries = {}
    for i, (name, layer_scale) in enumerate((("Tiny-A", None), ("Tiny-B", 0.5))):
        architecture = {**LAYER_SCALED, "layer_scale": layer_scale, "num_labels": 3}
        variant = Variant(name, f"someone/{name}", f"{name.lower()}.pth.tar", architecture, imagenet_labels=False)
        config = build_config(variant)
        torch.save({"state_dict": random_original_state_dict(config, seed=i)}, originals / variant.checkpoint)
        entries[name] = variant
    return entries, originals


def test_downloads_the_original_file_when_no_checkpoint_given(tmp_path, monkeypatch, capsys):
    entries, originals = tiny_variants(tmp_path)
    calls = []

    def fake_download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(originals / filename)

    monkeypatch.setattr(variants, "VARIANTS", entries)
    monkeypatch.setattr(conversion, "hf_hub_download", fake_download)
    status, out, err = run(["--variant", "Tiny-B", "--output-dir", tmp_path / "out"], capsys)
    assert status == 0, err
    assert calls == [("someone/Tiny-B", "tiny-b.pth.tar")]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_download_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    def offline(repo_id, filename):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.\nCheck your connection.")

    monkeypatch.setattr(conversion, "hf_hub_download", offline)
    status, out, err = run(["--variant", "MambaVision-T-1K", "--output-dir", tmp_path / "out"], capsys)
    assert_refused(status, err, tmp_path, [], "could not download mambavision_tiny_1k.pth.tar",
                   "nvidia/MambaVision-T-1K", "--checkpoint")


def test_all_converts_every_entry(tmp_path, monkeypatch, capsys):
    entries, originals = tiny_variants(tmp_path)
    monkeypatch.setattr(variants, "VARIANTS", entries)
    status, out, err = run(["--all", "--checkpoint-dir", originals, "--output-dir", tmp_path / "hub"], capsys)
    assert status == 0, err
    assert "[1/2] Tiny-A" in out and "[2/2] Tiny-B" in out
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["Tiny-A", "Tiny-B"]
    for name, variant in entries.items():
        source = torch.load(originals / variant.checkpoint, weights_only=True)["state_dict"]
        written = load_file(tmp_path / "hub" / name / "model.safetensors")
        assert all(torch.equal(written[f"model.{k}"], v) for k, v in source.items())
        assert ModelCard.load(tmp_path / "hub" / name / "README.md").data.model_name == name


def test_all_checks_every_file_before_converting(tmp_path, monkeypatch, capsys):
    entries, originals = tiny_variants(tmp_path)
    (originals / "tiny-b.pth.tar").unlink()
    monkeypatch.setattr(variants, "VARIANTS", entries)
    (tmp_path / "hub").mkdir()
    status, out, err = run(["--all", "--checkpoint-dir", originals, "--output-dir", tmp_path / "hub"], capsys)
    assert_refused(status, err, tmp_path / "hub", [], "tiny-b.pth.tar")


def test_all_names_the_variant_that_fails(tmp_path, monkeypatch, capsys):
    entries, originals = tiny_variants(tmp_path)
    (originals / "tiny-b.pth.tar").write_bytes((originals / "tiny-a.pth.tar").read_bytes())  # lacks the gammas
    monkeypatch.setattr(variants, "VARIANTS", entries)
    (tmp_path / "hub").mkdir()
    status, out, err = run(["--all", "--checkpoint-dir", originals, "--output-dir", tmp_path / "hub"], capsys)
    assert_refused(status, err, tmp_path / "hub", ["Tiny-A"], "Tiny-B: the checkpoint does not fit Tiny-B", "missing")


def test_list_variants(capsys):
    status, out, err = run(["--list-variants"], capsys)
    assert status == 0
    lines = out.splitlines()
    # every name --variant takes
    assert [line.split()[0] for line in lines] == [*VARIANTS, *SEGMENTATION_VARIANTS, *DETECTION_VARIANTS,
                                                       *PROJECT_VARIANTS]
    assert len(VARIANTS) == 11
    assert "trained in this repository" in lines[-1] and "not part of --all" in lines[-1]


# --- model card ----------------------------------------------------------------------------------------------


def _render(variant, repo_id):
    config = build_config(variant)
    with torch.device("meta"):
        model = modeling.MambaVisionModelForImageClassification(config)
    return ModelCard(str(publishing.render_model_card(variant, model, repo_id))), model


@pytest.mark.parametrize("name", ["MambaVision-T-1K", "MambaVision-L3-512-21K"])
def test_card_metadata_parses_back(name):
    variant = VARIANTS[name]
    card, model = _render(variant, "someone/converted")
    front_matter = yaml.safe_load(str(card).split("---")[1])  # the YAML header the Hub reads
    fields = ("license", "license_name", "license_link", "library_name", "pipeline_tag", "datasets", "tags")
    assert {field: front_matter.get(field) for field in fields} == {
        "license": "other", "license_name": "nvclv1", "license_link": variant.license["license_link"],
        "library_name": "transformers", "pipeline_tag": "image-classification", "datasets": list(variant.datasets),
        "tags": ["vision", "image-classification", "image-feature-extraction", "mambavision", "mamba"],
    }
    eval_results = card.data.eval_results  # the model-index, as huggingface_hub parses it
    metrics = {result.metric_type: result.metric_value for result in eval_results}
    assert metrics == {"accuracy": variant.results["top1"], "top_5_accuracy": variant.results["top5"]}
    assert all(r.dataset_type == "ILSVRC/imagenet-1k" and r.dataset_split == "validation" for r in eval_results)
    assert {r.source_url for r in eval_results} == {"https://github.com/NVlabs/MambaVision"}
    assert card.text.count('from_pretrained("someone/converted"') == 3  # processor, classifier, features
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card.text
    for number in (variant.results["top1"], variant.results["flops_g"], variant.results["params_m"]):
        assert f"| {number} |" in card.text
    assert variant.license["license_link"] in card.text


def test_card_takes_license_and_description_from_the_entry():
    variant = Variant("Our-Demo", "us/Our-Demo", None, dict(LAYER_SCALED, num_labels=3), imagenet_labels=False,
                      datasets=("us/flowers",), description="A demo trained by us on flowers.",
                      license={"license": "apache-2.0", "title": "Apache License 2.0", "terms": "Use it freely."})
    card, _ = _render(variant, "us/Our-Demo")
    assert card.data.license == "apache-2.0" and card.data.license_name is None and card.data.eval_results is None
    assert "model-index" not in str(card)
    assert "A demo trained by us on flowers." in card.text and "Apache License 2.0. Use it freely." in card.text
    assert "NVIDIA Source Code License" not in card.text


# --- publishing ----------------------------------------------------------------------------------------------


class FakeHfApi:
    """Records what the converter asks of huggingface_hub; the folder's files are listed at upload time."""

    calls = []
    fail = None

    def __init__(self, token=None):
        self.calls.append(("HfApi", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise self.fail
        files = sorted(p.relative_to(kwargs["folder_path"]).as_posix()
                       for p in kwargs["folder_path"].rglob("*") if p.is_file())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(publishing, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_creates_repo_and_uploads_the_folder(tiny, fake_hub, capsys):
    folder = tiny["out"] / "model"
    status, out, err = run(tiny["argv"](tiny["checkpoint"], "--push-to-hub", "someone/tiny-mv", "--private",
                                        "--token", "hf_secret", "--commit-message", "Add tiny", "--revision", "v1"), capsys)
    assert status == 0, err
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {"config.json", "model.safetensors", "README.md", *modeling.HUB_FILES} <= set(files)
    assert fake_hub.calls == [
        ("HfApi", {"token": "hf_secret"}),
        ("create_repo", {"repo_id": "someone/tiny-mv", "repo_type": "model", "private": True, "exist_ok": True}),
        ("create_branch", {"repo_id": "someone/tiny-mv", "repo_type": "model", "branch": "v1", "exist_ok": True}),
        ("upload_folder", {"repo_id": "someone/tiny-mv", "repo_type": "model", "folder_path": folder,
                           "commit_message": "Add tiny", "revision": "v1", "files": files}),
    ]
    assert 'from_pretrained("someone/tiny-mv"' in (folder / "README.md").read_text()


def test_push_defaults(tiny, fake_hub, capsys):
    status, out, err = run(tiny["argv"](tiny["checkpoint"], "--push-to-hub", "someone/tiny-mv"), capsys)
    assert status == 0, err
    (_, api), (_, create), (_, upload) = fake_hub.calls
    assert api == {"token": None} and create["private"] is False
    assert upload["revision"] is None and upload["commit_message"] == "Upload tiny-mv (converted from original.pth.tar)"


def test_push_failure_is_one_line(tiny, fake_hub, monkeypatch, capsys):
    error = HfHubHTTPError("401 Client Error: Unauthorized for url", response=mock.Mock())
    monkeypatch.setattr(FakeHfApi, "fail", error)
    status, out, err = run(tiny["argv"](tiny["checkpoint"], "--push-to-hub", "someone/tiny-mv"), capsys)
    assert status == 1 and err == "error: could not push to someone/tiny-mv: 401 Client Error: Unauthorized for url\n"
    assert (tiny["out"] / "model" / "model.safetensors").is_file()  # the converted folder stays


def test_dry_run_lists_files_and_calls_nothing(tiny, fake_hub, capsys):
    status, out, err = run(tiny["argv"](tiny["checkpoint"], "--push-to-hub", "someone/tiny-mv", "--dry-run",
                                        "--private"), capsys)
    assert status == 0, err
    assert fake_hub.calls == []
    folder = tiny["out"] / "model"
    dry = out[out.index("dry run"):].splitlines()
    assert "private model repo someone/tiny-mv" in dry[0] and "'Upload tiny-mv (converted" in dry[0]
    listed = [line.split()[0] for line in dry[1:]]
    assert listed == sorted(p.name for p in folder.iterdir())


def test_push_publishes_an_existing_folder(tiny, fake_hub, capsys):
    folder = tiny["out"] / "model"
    assert run(tiny["argv"](), capsys)[0] == 0
    status, out, err = run(["--output-dir", folder, "--push-to-hub", "someone/tiny-mv"], capsys)
    assert status == 0, err
    (_, upload), = [call for call in fake_hub.calls if call[0] == "upload_folder"]
    assert upload["folder_path"] == folder and upload["commit_message"] == "Upload model"
    status, out, err = run(["--output-dir", tiny["out"] / "nothing", "--push-to-hub", "someone/tiny-mv"], capsys)
    assert_refused(status, err, tiny["out"], ["model"], "holds no converted model")


def test_all_pushes_each_variant_under_the_owner(tmp_path, monkeypatch, fake_hub, capsys):
    entries, originals = tiny_variants(tmp_path)
    monkeypatch.setattr(variants, "VARIANTS", entries)
    status, out, err = run(["--all", "--checkpoint-dir", originals, "--output-dir", tmp_path / "hub",
                            "--push-to-hub", "someone"], capsys)
    assert status == 0, err
    uploads = [kwargs for call, kwargs in fake_hub.calls if call == "upload_folder"]
    assert [(u["repo_id"], u["folder_path"].name) for u in uploads] == [("someone/Tiny-A", "Tiny-A"),
                                                                        ("someone/Tiny-B", "Tiny-B")]


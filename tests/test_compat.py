"""The compatibility matrix: a converted folder used as users do (Auto classes, image processor, backbone, both
pipelines, a training step, save and reload, the Hub's code path) on every transformers release listed in
requirements-compat.txt and on the main environment's, each in its own process, offline and without triton.

Every row's results must equal the main environment's (1e-6); the main environment's are checked against
timm's own transform and the model that wrote the folder. scripts/install.sh installs each release into
.tf<version> (pip --target), once. After ``scripts/install.sh --no-matrix`` the rows skip, saying so; a folder
missing otherwise fails.
"""

import ast
import copy
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import compat_worker
from conftest import ROOT, model_code, modeling, randomize_batchnorm, timm_transform, tiny_config
from mambavision_tools.hub_folder import save_model_folder

MATRIX_FILE = ROOT / "requirements-compat.txt"
VERSIONS = [line.split()[0].split("==")[1] for line in MATRIX_FILE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
HUB_REPO = "mambavision-compat/tiny"
LEFT_OUT_MARK = ROOT / ".venv" / "no-compat-matrix"  # written by scripts/install.sh --no-matrix
PARALLEL = 2  # rows run two at a time (CI has 2 cores)
TOLERANCE = dict(rtol=0, atol=1e-6)
segmentation = model_code.load("modeling_mambavision_segmentation")


def site(version):
    """The folder that scripts/install.sh installs ``transformers==version`` into."""
    return ROOT / f".tf{version}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny converted folder with trained-looking layer scales (random gammas) and BatchNorm statistics."""
    torch.manual_seed(0)
    model = modeling.MambaVisionModelForImageClassification(
        tiny_config(layer_scale=0.3, layer_scale_conv=0.2, image_size=32, crop_pct=0.875))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "gamma" in name:
                parameter.uniform_(-1, 1)
    randomize_batchnorm(model.eval())
    path = tmp_path_factory.mktemp("compat") / "MambaVision-compat"
    save_model_folder(model, path)
    return path, model


@pytest.fixture(scope="module")
def segmentation_folder(tmp_path_factory):
    """A tiny converted segmentation folder (UPerNet heads, per-output norms) with random BatchNorm statistics."""
    torch.manual_seed(0)
    config = tiny_config(out_norm=True, image_size=32, upernet={"hidden_size": 16, "auxiliary_channels": 8})
    model = randomize_batchnorm(segmentation.MambaVisionForSemanticSegmentation(config).eval())
    path = tmp_path_factory.mktemp("compat") / "MambaVision-compat-segmentation"
    save_model_folder(model, path)
    return path, model


@pytest.fixture(scope="module")
def hub_cache(folder, tmp_path_factory):
    """The same folder as the Hub repo ``HUB_REPO`` in a Hugging Face cache (what a download leaves)."""
    cache = tmp_path_factory.mktemp("hub")
    commit = "0" * 40
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    shutil.copytree(folder[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def start_row(folder, segmentation_folder, hub_cache, out, pythonpath=None, deprecations_are_errors=False):
    """Run compat_worker.py in a fresh process (offline, triton hidden); returns the CompletedProcess."""
    home = out.with_suffix(".hf")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    command = [sys.executable, str(Path(compat_worker.__file__)), str(folder), str(out), "--hub-repo", HUB_REPO,
               "--segmentation", str(segmentation_folder), "--hide-triton", *(["--deprecations-are-errors"] if deprecations_are_errors else [])]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def rows(folder, segmentation_folder, hub_cache, tmp_path_factory):
    """Every row, started at once (PARALLEL at a time): ``"main"`` and each installed version -> (process, out)."""
    scratch = tmp_path_factory.mktemp("rows")
    jobs = {"main": dict(deprecations_are_errors=True)}
    jobs.update({version: dict(pythonpath=site(version)) for version in VERSIONS if site(version).is_dir()})
    pool = ThreadPoolExecutor(PARALLEL)
    futures = {name: pool.submit(start_row, folder[0], segmentation_folder[0], hub_cache, scratch / f"{name}.pt", **kwargs)
               for name, kwargs in jobs.items()}
    yield {name: (future, scratch / f"{name}.pt") for name, future in futures.items()}
    pool.shutdown(cancel_futures=True)


def results_of(rows, name):
    future, out = rows[name]
    process = future.result()
    assert process.returncode == 0, f"{name}: {process.stderr[-4000:]}"
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def main(rows):
    return results_of(rows, "main")


def assert_same(got, want, where):
    """Recursively equal: tensors to 1e-6, floats to 1e-6, everything else exactly."""
    if isinstance(want, torch.Tensor):
        assert got is not None and got.shape == want.shape, f"{where}: shape {getattr(got, 'shape', None)} != {want.shape}"
        torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{where}: {m}")
    elif isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: {len(got)} items != {len(want)}"
        for index, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(want, float):
        assert abs(got - want) <= 1e-6, f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def expected_segmentation(path, model):
    """What the segmentation row must compute, here: the mmseg resize written out (keep the ratio within
    (4 * 32, 32), bilinear) and the model that wrote the folder; masks from the arg max at the picture's size."""
    picture = compat_worker.sample_images([compat_worker.SEGMENTATION_IMAGE])[0]
    rgb = torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float()  # (1, 3, 30, 40)
    resized = torch.nn.functional.interpolate(rgb, size=(32, 43), mode="bilinear", align_corners=False).round()
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    pixels = (resized - mean) / std
    with torch.no_grad():
        output = model(pixels, labels=compat_worker.segmentation_labels(pixels, model.config.num_labels))
        slide = model(pixels, inference_mode="slide", crop_size=(16, 16), stride=(8, 8)).logits
    scores = torch.nn.functional.interpolate(output.logits, size=(30, 40), mode="bilinear", align_corners=False)
    classes = scores[0].argmax(0)
    masks = [[model.config.id2label[int(c)], (classes == c).to(torch.uint8) * 255] for c in classes.unique()]
    return {"classes": ["MambaVisionForSemanticSegmentation", "MambaVisionSegmentationImageProcessor",
                        "MambaVisionImageSegmentationPipeline"],
            "pixel_values": pixels, "loss": output.loss, "logits": output.logits, "slide_logits": slide,
            "masks": masks}


def test_main_environment_matches_timm_and_the_saved_model(folder, segmentation_folder, main):
    """The reference row is right: every result it computed equals what timm's eval transform and the model that
    wrote the folder compute here, in this process (no Auto class, pipeline or image processor involved)."""
    _, model = folder
    config = model.config
    transform = timm_transform(config)
    images = compat_worker.sample_images()
    picture = images[0]
    pixels = torch.stack([transform(image.convert("RGB")) for image in images])
    labels = torch.arange(len(pixels)) % config.num_labels  # the worker's
    with torch.no_grad():
        classified = model(pixels, labels=labels, output_hidden_states=True)
        maps = classified.hidden_states  # the stem's output, then the four stage maps
        pooled = model.model.pool(maps[-1])
        grey_logits = model(transform(picture.convert("L").convert("RGB"))[None]).logits
    trainable = copy.deepcopy(model).train()  # a copy: a training step updates the BatchNorm statistics
    loss = trainable(pixels, labels=labels).loss  # without the worker's activation checkpointing: same values
    loss.backward()
    # the classifier's modules: not the processors, nor the segmentation models, nor the detector
    model_files = sorted(set(modeling.HUB_FILES) - {"image_processing_mambavision.py", "modeling_mambavision_segmentation.py",
                                                     "image_processing_mambavision_segmentation.py",
                                                     "modeling_mambavision_detection.py",
                                                     "modeling_mambavision_instance_segmentation.py"})

    mappings = ("deepcopy", "pickle", "send_to_device", "recursively_apply", "pytree", "torch_export", "torch_compile")
    ways = ("unpacked", "attributes", "keys", "indices", "to_tuple", "items", "values", "return_dict_false",
            "hidden_states_unpacked", *mappings, "trainer_prediction_step")
    mapping = ["MambaVisionModelOutput", ["pooler_output", "stage_maps"]]
    contract = {  # every way of reading MambaVisionModel's output gives the pooled features and stage maps
        "tensors": {**{way: [pooled, *maps[1:]] for way in ways}, "hidden_states": list(maps)},
        "facts": {**{way: mapping for way in (*mappings, "model")},
                  "return_dict_false": ["tuple", 2], "hidden_states_keys": ["pooler_output", "stage_maps", "hidden_states"],
                  "pytree_leaves": 1 + len(maps[1:])},
    }

    with torch.no_grad():
        fused = [model(pixels).logits]  # the default, sdpa
        attended = compat_worker.flat(model(pixels, output_attentions=True))  # eager: logits, each block's weights
    assert len(attended) > 1 and all(torch.allclose(w.sum(-1), torch.ones(())) for w in attended[1:])

    def top3(logits):
        top = logits.softmax(-1).topk(3)
        return [{"label": config.id2label[i], "score": p} for p, i in zip(top.values.tolist(), top.indices.tolist())]

    expected = {
        "versions": {"transformers": transformers.__version__, "torch": str(torch.__version__)},
        "config": {"class": "MambaVisionConfig", "depths": config.depths, "dim": config.dim, "id2label": config.id2label},
        "pixel_values": pixels,
        "modes": {kind: transform(rgb)[None] for kind, (_, rgb) in compat_worker.image_inputs(picture).items()},
        "classifier": compat_worker.flat(classified),  # loss, logits, hidden states
        "model": [pooled, *maps[1:]],
        "contract": contract,
        "attention": {"sdpa": ["sdpa", fused], "eager": ["eager", attended]},
        "backbone_channels": [maps[index].shape[1] for index in compat_worker.OUT_INDICES],
        "backbone": [maps[index] for index in compat_worker.OUT_INDICES],
        # the picture, its grey version, and that as a 16-bit image: its 8-bit picture, not a white one
        "classification": [top3(classified.logits[0]), top3(grey_logits[0]), top3(grey_logits[0])],
        "features": pooled[:1].double(),  # the pipeline's floats, as a tensor
        "pipelines": ["MambaVisionImageClassificationPipeline", "MambaVisionImageFeatureExtractionPipeline"],
        "train_loss": loss.detach(),
        "grads": [parameter.grad for _, parameter in sorted(trainable.named_parameters())],
        "hub_logits": classified.logits,
        "hub_code_files": model_files,
        "local_code_files": model_files,
    }
    expected["segmentation"] = expected_segmentation(*segmentation_folder)
    assert set(main) == {*expected, "backbone_loader"}, "a result without its reference here"  # loader: a fact
    for key, value in expected.items():
        assert_same(main[key], value, f"main environment: {key}")


@pytest.mark.parametrize("version", VERSIONS)
def test_row_equals_main_environment(version, rows, main):
    if not site(version).is_dir():
        if LEFT_OUT_MARK.exists():  # the user chose it; CI's plain install never writes the mark
            pytest.skip(f"transformers {version}: the compatibility matrix was left out (scripts/install.sh "
                        "--no-matrix); run scripts/install.sh to install it")
        pytest.fail(f"transformers {version} is not installed in {site(version)}: run scripts/install.sh")
    results = results_of(rows, version)
    assert results["versions"]["transformers"] == version
    if tuple(int(part) for part in version.split(".")[:2]) < (5, 1):  # later, it asks the Hub first (README)
        assert results["backbone_loader"] == "AutoBackbone"
    assert results["pipelines"] == main["pipelines"]
    assert "selective_scan_triton.py" in results["local_code_files"], results["local_code_files"]
    assert "selective_scan_triton.py" in results["hub_code_files"], results["hub_code_files"]
    for key in main:
        if key not in ("versions", "backbone_loader", "local_code_files", "hub_code_files"):
            assert_same(results[key], main[key], f"transformers {version}: {key}")


def test_requirements_keep_the_installed_torch():
    """requirements.txt's ranges admit the environment as installed (CI's exact versions, constraints.txt): pip
    installs nothing, so a user's torch that fits stays. Offline (--no-index): pip can only keep what is there."""
    report = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
                             "--disable-pip-version-check", "--report", "-", "-r", str(ROOT / "requirements.txt")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert json.loads(report.stdout)["install"] == []
    requirements = (ROOT / "requirements.txt").read_text()
    assert "torch>=" in requirements and "torch==" not in requirements


NEWER_TORCH_APIS = {  # what the model files must import with a fallback (oldest supported: torch 2.1)
    "torch.compiler.is_compiling": "2.3", "torch.compiler.is_exporting": "2.4", "torch.library.custom_op": "2.4",
    "torch.library.register_fake": "2.4", "torch.library.triton_op": "2.6", "torch.library.wrap_triton": "2.6",
    "torch.nn.attention": "2.2", "torch.compiler.set_stance": "2.6",
}
IMPORT_ERROR_HANDLERS = {"ImportError", "Exception", "BaseException"}  # a missing name raises ImportError itself


def catches_import_error(handler):
    """Whether an ``except`` clause catches ImportError: bare, or naming it or one of its bases."""
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(t is None or (isinstance(t, ast.Name) and t.id in IMPORT_ERROR_HANDLERS) for t in types)


def newer_torch_apis(source):
    """(line, name) for each use of a ``NEWER_TORCH_APIS`` name in ``source``: an attribute chain
    (``torch.library.custom_op``) anywhere; an import (``from torch.library import custom_op``, ``import
    torch.nn.attention``) unless in the body of a ``try`` whose handler catches ImportError."""
    tree = ast.parse(source)
    guarded = {id(inner) for node in ast.walk(tree)
               if isinstance(node, ast.Try) and any(map(catches_import_error, node.handlers))
               for statement in node.body for inner in ast.walk(statement)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):  # inner chains are walked too: match the whole one only
                chain.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and ".".join([inner.id, *chain]) in NEWER_TORCH_APIS:
                found.append((node.lineno, ".".join([inner.id, *chain])))
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded:
            if isinstance(node, ast.ImportFrom) and (node.level or not node.module):
                continue  # relative: this repository's own files
            prefix = f"{node.module}." if isinstance(node, ast.ImportFrom) else ""
            for alias in node.names:
                parts = (prefix + alias.name).split(".")  # torch.nn.attention.sdpa_kernel is torch.nn.attention's
                names = (".".join(parts[:end]) for end in range(1, len(parts) + 1))
                listed = next((name for name in names if name in NEWER_TORCH_APIS), None)
                if listed:
                    found.append((node.lineno, listed))
    return found


@pytest.mark.parametrize("source, found", [
    ("from torch.library import custom_op\n", [(1, "torch.library.custom_op")]),
    ("from torch.nn.attention import SDPBackend, sdpa_kernel\n", [(1, "torch.nn.attention")] * 2),
    ("import torch.nn.attention\n", [(1, "torch.nn.attention")]),
    ("import torch\nop = torch.library.custom_op\n", [(2, "torch.library.custom_op")]),
    ("try:\n    from torch.library import custom_op\nexcept ImportError:\n    custom_op = None\n", []),
    ("try:\n    from torch.library import custom_op\nexcept (AttributeError, Exception):\n    pass\n", []),
    ("try:\n    from torch.library import custom_op\nexcept AttributeError:\n    pass\n", [(2, "torch.library.custom_op")]),
    ("try:\n    from torch.library import custom_op\nexcept ModuleNotFoundError:\n    pass\n",
     [(2, "torch.library.custom_op")]),
    ("try:\n    pass\nexcept ImportError:\n    from torch.library import custom_op\n", [(4, "torch.library.custom_op")]),
    ("from torch.library import Library\nfrom .selective_scan import selective_scan\n", []),
])
def test_newer_torch_api_finder(source, found):
    assert newer_torch_apis(source) == found


def test_model_files_use_no_torch_api_newer_than_2_1():
    """What torch 2.1 lacks is imported with a fallback (``is_compiling``) or kept in the Triton files, which
    refuse to import on such a torch (the scan falls back); found by name, the rest by tests run on torch 2.1."""
    for name in modeling.HUB_FILES:
        if not name.endswith("_triton.py"):
            uses = [f"{name}:{line} uses {api} (torch {NEWER_TORCH_APIS[api]})"
                    for line, api in newer_torch_apis((ROOT / name).read_text())]
            assert not uses, f"{uses}: import it in a try/except ImportError with a fallback, as is_compiling is"

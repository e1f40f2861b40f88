"""handler.py: a converted folder serves itself on Inference Endpoints. The handler is loaded as the inference
toolkit loads it and called with each payload form the toolkit passes; its answers equal the folder's pipeline
(and the model, for features), bad payloads get one-line errors, and the folders carry it with widget metadata."""

import base64
import gc
import http.server
import importlib.util
import io
import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import (AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, DeformableDetrImageProcessor,
                          Mask2FormerImageProcessor, pipeline)

from conftest import ROOT, TINY_ARCHITECTURE, model_code, modeling, randomize_batchnorm, tiny_config
from convert_checkpoint import main
from mambavision_tools import hub_folder, publishing
from mambavision_tools.configs import build_config
from mambavision_tools.variants import Variant
from test_convert import random_original_state_dict
from test_detection import tiny_detector
from test_instance_segmentation import tiny_model

segmentation = model_code.load("modeling_mambavision_segmentation")
REPO_ID = "someone/MambaVision-tiny"
TOP_K = 3
RSS_GROWTH_MIB = 48  # the bound on memory growth over the load test's measured requests (see test_load)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny ImageNet-1k classifier (64x64 inputs) converted by convert_checkpoint.py, as the Hub gets it."""
    root = tmp_path_factory.mktemp("serving")
    config = tiny_config(num_labels=1000, image_size=64)
    (root / "architecture.json").write_text(json.dumps({**TINY_ARCHITECTURE, "num_classes": 1000, "image_size": 64}))
    torch.save({"state_dict": random_original_state_dict(config)}, root / "original.pth.tar")
    status = main(["--config", str(root / "architecture.json"), "--checkpoint", str(root / "original.pth.tar"),
                   "--output-dir", str(root / "model"), "--push-to-hub", REPO_ID, "--dry-run"])
    assert status == 0
    return root / "model"


def load_handler_module(folder):
    """handler.py imported the way the inference toolkit imports it: by file, with the folder on sys.path."""
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


@pytest.fixture(scope="module")
def handler_module(folder):
    return load_handler_module(folder)


@pytest.fixture(scope="module")
def classifier(handler_module, folder):
    return handler_module.EndpointHandler(str(folder))


@pytest.fixture(scope="module")
def reference(folder):
    """The folder's own classification pipeline, what the handler's answers must equal."""
    return pipeline("image-classification", model=str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def extractor(handler_module, folder):
    return handler_module.EndpointHandler(str(folder), task="image-feature-extraction")


def encoded(image, format="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures():
    """Three different images as file bytes: a PNG photo-like RGB, a grey PNG, an RGBA JPEG-less PNG."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 255, (64, 48), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (50, 50, 4), dtype=np.uint8))
    return [encoded(rgb), encoded(grey), encoded(rgba)]


def opened(data):
    return Image.open(io.BytesIO(data))


def toolkit_image_body(data):
    """What the toolkit makes of an image request body (Content-Type image/*): ``Imager.deserialize``."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def assert_same_classes(actual, expected):
    assert [entry["label"] for entry in actual] == [entry["label"] for entry in expected]
    np.testing.assert_allclose([entry["score"] for entry in actual], [entry["score"] for entry in expected],
                               rtol=1e-5, atol=1e-7)


# --- the folders carry the handler and the widget metadata ---------------------------------------------------


def test_converted_folder_carries_handler_example_and_widget(folder):
    assert (folder / "handler.py").read_bytes() == (ROOT / "handler.py").read_bytes()
    example = Image.open(folder / hub_folder.EXAMPLE_IMAGE)
    assert example.format == "JPEG" and max(example.size) <= hub_folder.EXAMPLE_IMAGE_SIDE
    front_matter = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert front_matter["pipeline_tag"] == "image-classification" and front_matter["library_name"] == "transformers"
    assert front_matter["widget"] == [{"src": f"https://huggingface.co/{REPO_ID}/resolve/main/example.jpg",
                                       "example_title": "Flower"}]


def test_card_of_a_head_of_other_classes_names_no_widget_image():
    """No example suits a head of unknown classes: no widget entry, and the Deploy snippet reads the user's image."""
    variant = Variant("Ours", "us/Ours", None, dict(TINY_ARCHITECTURE, num_labels=3), imagenet_labels=False)
    with torch.device("meta"):
        model = modeling.MambaVisionModelForImageClassification(build_config(variant))
    card = publishing.render_model_card(variant, model, "us/Ours")
    assert "widget" not in card.data.to_dict() and card.data.pipeline_tag == "image-classification"
    assert 'with open("image.png", "rb") as file:' in card.text.split("## Deploy")[1]


def test_overwrite_replaces_a_folder_with_handler_and_example(folder):
    assert hub_folder.is_model_folder(folder) and hub_folder.files_not_written_here(folder) == []


def test_card_deploy_block_runs_offline_on_the_folder(folder, offline, capsys):
    """The card's Deploy snippet, with the repository id replaced by the folder (as the card test does)."""
    card = (folder / "README.md").read_text()
    block = re.search(r"## Deploy\n.*?```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    exec(compile(block.replace(REPO_ID, str(folder)), "Deploy", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[1] == "2" and printed[2] == "64 [8, 16, 32, 64]"
    assert len(eval(printed[0])) == TOP_K


# --- classification ---------------------------------------------------------------------------------------------


def test_classification_payload_forms_equal_the_pipeline(classifier, reference, pictures):
    first = pictures[0]
    expected = reference(toolkit_image_body(first), top_k=5)
    assert_same_classes(classifier({"inputs": toolkit_image_body(first)}), expected)  # image body, top_k 5
    expected = reference(opened(first), top_k=TOP_K)
    as_base64 = base64.b64encode(first).decode()
    for inputs in (first, as_base64, "data:image/png;base64," + as_base64):
        assert_same_classes(classifier({"inputs": inputs, "parameters": {"top_k": TOP_K}}), expected)
    # a list is one batch, answered per image in order, whatever form each image takes
    batch = classifier({"inputs": [pictures[0], base64.b64encode(pictures[1]).decode(), pictures[2]],
                        "parameters": {"top_k": TOP_K}})
    expected = reference([opened(data) for data in pictures], top_k=TOP_K)
    assert len(batch) == 3
    for answer, reference_answer in zip(batch, expected):
        assert_same_classes(answer, reference_answer)
    assert batch[0] != batch[1]  # different images, different answers


def test_url_inputs_are_fetched(classifier, pictures):
    """An http(s) URL is fetched (transformers' loader, as the toolkit's default handler fetches through the
    pipeline); a URL that cannot be reached is a one-line error."""
    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(pictures[1])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/grey.png"
        assert classifier({"inputs": url}) == classifier({"inputs": pictures[1]})
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match=r"could not fetch an image from http://127\.0\.0\.1:") as error:
        classifier({"inputs": f"http://127.0.0.1:{server.server_port}/gone.png"})  # the server is down: refused
    assert "\n" not in str(error.value)


BAD_PAYLOADS = {
    "no inputs": ({"image": "x"}, "must be an object with 'inputs'"),
    "not an object": ([1, 2], "must be an object with 'inputs'"),
    "extra field": ({"inputs": "x", "options": {}}, "unknown request field 'options'"),
    "empty list": ({"inputs": []}, "'inputs' is an empty list"),
    "too many": ({"inputs": ["x"] * 65}, "at most 64 per request"),
    "not base64": ({"inputs": "hello there"}, "must be a base64-encoded image or an http(s) URL"),
    "local path": ({"inputs": str(ROOT / "README.md")}, "must be a base64-encoded image or an http(s) URL"),
    "base64 of text": ({"inputs": base64.b64encode(b"not an image at all").decode()}, "not an image PIL can read"),
    "bytes of text": ({"inputs": b"GIF89a but not really"}, "not an image PIL can read"),
    "a number": ({"inputs": 7}, "expected an image"),
    "nested list": ({"inputs": [[b"x"]]}, "inputs[0]: expected an image"),
    "bad item in a batch": ({"inputs": ["iVBORw0KGgo=", "hello there"]}, "inputs[0]: not an image"),
    "unknown parameter": ({"inputs": "x", "parameters": {"threshold": 0.5}}, "unknown parameter 'threshold'"),
    "parameters not an object": ({"inputs": "x", "parameters": [3]}, "'parameters' must be an object"),
    "top_k zero": ({"inputs": "x", "parameters": {"top_k": 0}}, "'top_k' must be a positive integer"),
    "top_k text": ({"inputs": "x", "parameters": {"top_k": "3"}}, "'top_k' must be a positive integer"),
    "top_k bool": ({"inputs": "x", "parameters": {"top_k": True}}, "'top_k' must be a positive integer"),
}


@pytest.mark.parametrize("payload, fragment", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS)
def test_bad_payload_is_one_line(payload, fragment, classifier):
    """A ValueError of one line: the toolkit answers it with status 400 and {"error": str(error)}."""
    with pytest.raises(ValueError) as error:
        classifier(payload)
    message = str(error.value)
    assert fragment in message and "\n" not in message and len(message) < 300, message


def test_feature_parameter_is_refused_by_the_classifier(classifier, pictures):
    with pytest.raises(ValueError, match=r"unknown parameter 'stages' for image-classification \(accepted: top_k\)"):
        classifier({"inputs": pictures[0], "parameters": {"stages": True}})


# --- feature extraction -----------------------------------------------------------------------------------------


def test_features_equal_the_model_and_the_pipeline(extractor, folder, pictures):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [opened(data) for data in pictures]
    with torch.no_grad():
        output = model(**processor(images, return_tensors="pt"))
    single = extractor({"inputs": base64.b64encode(pictures[0]).decode()})
    torch.testing.assert_close(torch.tensor(single), output.pooler_output[:1], rtol=1e-5, atol=1e-6)
    reference = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True)
    assert np.allclose(single, reference(images[0], pool=True), rtol=1e-6, atol=1e-7)

    batch = extractor({"inputs": pictures, "parameters": {"stages": True}})
    assert len(batch) == 3
    for i, answer in enumerate(batch):
        torch.testing.assert_close(torch.tensor(answer["features"]), output.pooler_output[i : i + 1], rtol=1e-5,
                                   atol=1e-6)
        for stage_map, pooled in zip(output.stage_maps, answer["stages"]):  # (batch, C, H, W) -> (1, C)
            torch.testing.assert_close(torch.tensor(pooled), stage_map[i : i + 1].mean(dim=(2, 3)), rtol=1e-5,
                                       atol=1e-6)
    with pytest.raises(ValueError, match="'stages' must be true or false"):
        extractor({"inputs": pictures[0], "parameters": {"stages": "yes"}})
    with pytest.raises(ValueError, match="unknown parameter 'top_k' for image-feature-extraction"):
        extractor({"inputs": pictures[0], "parameters": {"top_k": 2}})


# --- the task, the dtype -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hf_task, served", [("image-feature-extraction", "image-feature-extraction"),
                                             ("custom", "image-classification"), ("", "image-classification")])
def test_task_from_the_endpoint_environment(hf_task, served, handler_module, folder, monkeypatch):
    monkeypatch.setenv("HF_TASK", hf_task)
    assert handler_module.EndpointHandler(str(folder)).task == served


@pytest.mark.parametrize("hf_task, fragment", [
    ("text-generation", "task 'text-generation' is not served by this handler; use one of"),
    ("object-detection", "task 'object-detection' is not served by a model saved as "
                         "['MambaVisionModelForImageClassification']; this folder serves ['image-classification', "
                         "'image-feature-extraction']"),
])
def test_unserved_task_is_refused_at_start(hf_task, fragment, handler_module, folder, monkeypatch):
    monkeypatch.setenv("HF_TASK", hf_task)
    with pytest.raises(ValueError) as error:
        handler_module.EndpointHandler(str(folder))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_bf16_weights_agree_with_float32(handler_module, folder, pictures, classifier, extractor):
    """The GPU's dtype (run on the CPU here): scores and features within bf16's precision of float32's."""
    bf16 = handler_module.EndpointHandler(str(folder), dtype=torch.bfloat16)
    assert bf16.pipeline.model.dtype == torch.bfloat16
    answer = bf16({"inputs": pictures[0], "parameters": {"top_k": 1000}})
    expected = classifier({"inputs": pictures[0], "parameters": {"top_k": 1000}})
    scores = {entry["label"]: entry["score"] for entry in answer}
    log_ratios = np.log([scores[e["label"]] for e in expected]) - np.log([e["score"] for e in expected])
    assert np.abs(log_ratios).max() < 0.25  # logits within bf16's precision of float32's
    features = handler_module.EndpointHandler(str(folder), task="image-feature-extraction", dtype=torch.bfloat16)
    np.testing.assert_allclose(features({"inputs": pictures[0]}), extractor({"inputs": pictures[0]}), atol=0.05)


# --- segmentation and detection ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_folders(tmp_path_factory):
    """Tiny folders as the converter and the fine-tuning scripts write them: semantic segmentation (UPerNet,
    ``save_model_folder``), instance segmentation (Mask2Former) and detection (Deformable DETR, ``save_head_folder``)."""
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    labels = dict(enumerate(["background", "square", "disc", "triangle", "star"]))  # tiny_config's 5 classes
    semantic = segmentation.MambaVisionForSemanticSegmentation(
        tiny_config(out_norm=True, image_size=64, id2label=labels, upernet={"hidden_size": 16, "auxiliary_channels": 8}))
    randomize_batchnorm(semantic)
    with torch.no_grad():  # several classes per image (the initialised classifier gives one class everywhere)
        semantic.decode_head.classifier.weight.normal_()
    hub_folder.save_model_folder(semantic.eval(), root / "semantic")
    hub_folder.save_head_folder(tiny_model(), Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                                root / "instance")
    hub_folder.save_head_folder(tiny_detector(), DeformableDetrImageProcessor(size={"shortest_edge": 64,
                                                                                   "longest_edge": 96}),
                                root / "detection")
    return {name: root / name for name in ("semantic", "instance", "detection")}


@pytest.fixture(scope="module")
def head_handlers(head_folders):
    """Each folder's own handler.py, loaded as the toolkit loads it, serving the folder's task."""
    return {name: load_handler_module(folder).EndpointHandler(str(folder)) for name, folder in head_folders.items()}


def png_mask(encoded_png):
    image = Image.open(io.BytesIO(base64.b64decode(encoded_png, validate=True)))
    assert image.format == "PNG" and image.mode == "L"
    return np.array(image)


@pytest.mark.parametrize("name, parameters", [("semantic", {}), ("instance", {"threshold": 0.0})])
def test_segmentation_answers_are_the_pipeline_with_png_masks(name, parameters, head_folders, head_handlers,
                                                              pictures):
    """Both segmentation folders serve image-segmentation: the pipeline's segments (label, score), each mask a
    base64 PNG of the pipeline's mask; a list of images of different sizes is answered image by image."""
    folder, handler = head_folders[name], head_handlers[name]
    assert (folder / "handler.py").read_bytes() == (ROOT / "handler.py").read_bytes()
    assert handler.task == "image-segmentation"
    reference_pipeline = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    answers = handler({"inputs": [base64.b64encode(data).decode() for data in pictures[:2]],
                       "parameters": parameters})
    assert len(answers) == 2
    for data, answer in zip(pictures[:2], answers):
        expected = reference_pipeline(opened(data), **parameters)
        assert len(answer) == len(expected) > 0
        json.dumps(answer)  # plain JSON types
        for segment, reference_segment in zip(answer, expected):
            assert segment["label"] == reference_segment["label"]
            assert segment["score"] == reference_segment["score"]
            mask = png_mask(segment["mask"])
            assert mask.shape == opened(data).size[::-1]
            np.testing.assert_array_equal(mask, np.array(reference_segment["mask"]))


def test_segmentation_parameters_are_checked(head_handlers, pictures):
    semantic, instance = head_handlers["semantic"], head_handlers["instance"]
    with pytest.raises(ValueError, match="Subtask instance is not supported"):  # a semantic model has no instances
        semantic({"inputs": pictures[0], "parameters": {"subtask": "instance"}})
    for parameters, fragment in (({"threshold": 1.5}, "'threshold' must be a number from 0 to 1, got 1.5"),
                                 ({"mask_threshold": "high"}, "'mask_threshold' must be a number from 0 to 1"),
                                 ({"subtask": "everything"}, "'subtask' must be one of instance, panoptic, semantic"),
                                 ({"top_k": 3}, "unknown parameter 'top_k' for image-segmentation")):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            instance({"inputs": pictures[0], "parameters": parameters})
    # Mask2Former's semantic answer: one mask per class present, without scores
    assert {segment["score"] for segment in instance({"inputs": pictures[0], "parameters": {"subtask": "semantic"}})} \
        == {None}


SLIDE = {"inference_mode": "slide", "crop_size": [48, 48], "stride": [32, 32]}  # 2x2 crops of the 64x82 image


def test_semantic_slide_inference_is_the_models(head_folders, head_handlers, pictures):
    """``inference_mode: "slide"`` (with ``crop_size`` and ``stride``): the masks of the class map that the folder's
    processor and model compute in slide mode, scaled back to the image; not the whole-image masks."""
    folder, handler = head_folders["semantic"], head_handlers["semantic"]
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    image = opened(pictures[0])
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape[2:] == (64, 82)
    maps = {}
    for mode, arguments in (("slide", {"crop_size": (48, 48), "stride": (32, 32)}), ("whole", {})):
        with torch.no_grad():
            outputs = model(pixel_values=pixels, inference_mode=mode, **arguments)
        maps[mode] = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    assert not torch.equal(maps["slide"], maps["whole"])  # the request's mode shows in the answer
    answer = handler({"inputs": pictures[0], "parameters": SLIDE})
    classes = maps["slide"].unique().tolist()
    assert [segment["label"] for segment in answer] == [model.config.id2label[c] for c in classes]
    for segment, label in zip(answer, classes):
        np.testing.assert_array_equal(png_mask(segment["mask"]), (maps["slide"] == label).numpy() * 255)
    assert handler({"inputs": pictures[0], "parameters": {"inference_mode": "whole"}}) == handler(
        {"inputs": pictures[0]})


@pytest.mark.parametrize("parameters, fragment", [
    ({"inference_mode": "sliding"}, "parameter 'inference_mode' must be one of whole, slide, got 'sliding'"),
    ({**SLIDE, "crop_size": 48}, "parameter 'crop_size' must be [height, width], two positive integers, got 48"),
    ({**SLIDE, "stride": [0, 32]}, "parameter 'stride' must be [height, width], two positive integers, got [0, 32]"),
    ({**SLIDE, "stride": [32, True]}, "parameter 'stride' must be [height, width], two positive integers"),
    ({"crop_size": [48, 48]}, "parameter 'crop_size' goes with 'inference_mode': 'slide'"),
    ({"inference_mode": "whole", "stride": [32, 32]}, "parameter 'stride' goes with 'inference_mode': 'slide'"),
    ({"inference_mode": "slide", "crop_size": [16, 16], "stride": [40, 40]},
     "stride (40, 40) leaves pixels out of every (16, 16) crop; use a stride no longer than crop_size"),
])
def test_slide_parameters_are_checked(parameters, fragment, head_handlers, pictures):
    with pytest.raises(ValueError) as error:
        head_handlers["semantic"]({"inputs": pictures[0], "parameters": parameters})
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_slide_crops_are_bounded_before_any_runs(head_handlers, pictures):
    """Each crop is a forward pass, so a request may not slide a tiny stride over an image: at most 32 crops an
    image, counted on its size after resizing (64x82 here) before the model runs; 32 are served."""
    handler = head_handlers["semantic"]
    runs = []
    hook = handler.pipeline.model.model.register_forward_pre_hook(lambda module, args: runs.append(1))
    try:
        # rows of 48 every 6 over 64: 0, 6, 12, 16 (flush); columns every 5 over 82: 0, 5, ..., 30, 34: 4 x 8
        assert handler({"inputs": pictures[0], "parameters": {**SLIDE, "stride": [6, 5]}})
        assert len(runs) == 32
        runs.clear()
        for inputs, stride, where, crops in ((pictures[0], [6, 4], "inputs", 40),
                                             (pictures[:2], [1, 1], "inputs[0]", 595)):
            with pytest.raises(ValueError) as error:
                handler({"inputs": inputs, "parameters": {**SLIDE, "stride": stride}})
            assert str(error.value) == (f"{where}: sliding crop_size [48, 48], stride {stride} over it (64x82 after "
                                        f"resizing) runs {crops} crops; at most 32 an image: use a longer 'stride' or "
                                        "a larger 'crop_size'")
        with pytest.raises(ValueError, match="leaves pixels out of every"):
            handler({"inputs": pictures[0], "parameters": {**SLIDE, "crop_size": [16, 16], "stride": [40, 40]}})
        assert runs == []  # refused before the first crop
    finally:
        hook.remove()


def test_slide_parameters_are_the_semantic_models_only(head_handlers, pictures):
    """Mask2Former's pipeline has no sliding window: refused as the other unknown parameters."""
    with pytest.raises(ValueError, match=re.escape("unknown parameter 'crop_size' for image-segmentation "
                                                   "(accepted: threshold, mask_threshold, overlap_mask_area_threshold,"
                                                   " subtask)")):
        head_handlers["instance"]({"inputs": pictures[0], "parameters": SLIDE})


def test_detection_answers_are_the_pipeline(head_folders, head_handlers, pictures):
    """A detector folder serves object-detection: the pipeline's boxes, labels and scores at ``threshold``."""
    folder, handler = head_folders["detection"], head_handlers["detection"]
    assert (folder / "handler.py").read_bytes() == (ROOT / "handler.py").read_bytes()
    assert handler.task == "object-detection"
    reference_pipeline = pipeline("object-detection", model=str(folder), trust_remote_code=True)
    answers = handler({"inputs": pictures[:2], "parameters": {"threshold": 0.0}})
    for data, answer in zip(pictures[:2], answers):
        assert answer == reference_pipeline(opened(data), threshold=0.0) and len(answer) > 0
        json.dumps(answer)
    scores = sorted(detection["score"] for detection in answers[0])
    threshold = (scores[-3] + scores[-4]) / 2  # the three best pass
    assert len(handler({"inputs": pictures[0], "parameters": {"threshold": threshold}})) == 3
    with pytest.raises(ValueError, match="'threshold' must be a number from 0 to 1, got -1"):
        handler({"inputs": pictures[0], "parameters": {"threshold": -1}})


@pytest.mark.parametrize("name", ["instance", "detection"])
def test_head_tasks_in_bf16_agree_with_float32(name, head_folders, head_handlers, pictures):
    """The GPU's dtype (run on the CPU here): the same answers within bf16's precision of the scores."""
    bf16 = load_handler_module(head_folders[name]).EndpointHandler(str(head_folders[name]), dtype=torch.bfloat16)
    assert bf16.pipeline.model.dtype == torch.bfloat16
    request = {"inputs": pictures[0], "parameters": {"threshold": 0.0}}
    answer, expected = bf16(request), head_handlers[name](request)
    assert len(answer) == len(expected) > 0
    np.testing.assert_allclose(sorted(a["score"] for a in answer), sorted(e["score"] for e in expected), atol=0.02)


def test_head_folders_serve_their_task_only(head_folders, monkeypatch):
    """A detector is no classifier: HF_TASK naming another task is refused at start, in one line."""
    monkeypatch.setenv("HF_TASK", "image-classification")
    with pytest.raises(ValueError, match=re.escape("is not served by a model saved as "
                                                   "['MambaVisionForObjectDetection']; this folder serves "
                                                   "['object-detection']")):
        load_handler_module(head_folders["detection"]).EndpointHandler(str(head_folders["detection"]))


# --- load ----------------------------------------------------------------------------------------------------------


def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc (Linux)")
def test_load_from_threads_is_stable_and_correct(classifier, reference):
    """60 requests (a third of them batches of 4, from 4 threads) after 20 of warm-up: the answers equal the
    pipeline's, and the resident memory grows by less than RSS_GROWTH_MIB. The images are 512x384, so that
    requests that leaked their decoded images (0.6 MiB each, 96 in all) would pass the bound."""
    rng = np.random.default_rng(1)
    images = [encoded(Image.fromarray(rng.integers(0, 255, (384, 512, 3), dtype=np.uint8)), "JPEG") for _ in range(4)]
    expected = reference([opened(data) for data in images], top_k=TOP_K)
    requests = [({"inputs": images, "parameters": {"top_k": TOP_K}}, expected) if i % 3 == 0 else
                ({"inputs": base64.b64encode(images[i % 4]).decode(), "parameters": {"top_k": TOP_K}},
                 expected[i % 4]) for i in range(80)]

    def answer(request):
        return classifier(dict(request))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(answer, [request for request, _ in requests[:20]]))
        gc.collect()
        before = resident_mib()
        answers = list(pool.map(answer, [request for request, _ in requests[20:]]))
    gc.collect()
    growth = resident_mib() - before
    for (request, reference_answer), actual in zip(requests[20:], answers):
        pairs = zip(actual, reference_answer) if isinstance(request["inputs"], list) else [(actual, reference_answer)]
        for one, other in pairs:
            assert_same_classes(one, other)
    assert growth < RSS_GROWTH_MIB, f"resident memory grew by {growth:.1f} MiB over 60 requests"

"""The model against the original's outputs, the checkpoint layout of every variant, and its contracts."""

import json

import pytest
import torch

from conftest import (FIXTURE_NAMES, FIXTURE_SIZES, REFERENCE, assert_close_relative, configuration,
                      load_fixture, modeling, needs_reference, needs_shared, randomize_batchnorm, tiny_config)
from mambavision_tools.configs import config_from_architecture


@needs_shared
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_matches_original_outputs(name):
    config, state_dict, expected = load_fixture(name)
    classifier = modeling.MambaVisionModelForImageClassification(config).eval()
    classifier.load_state_dict(state_dict, strict=True)
    backbone = modeling.MambaVisionModel(config).eval()
    backbone.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("model.head.")}, strict=True)
    for size in FIXTURE_SIZES:
        pixels = expected[f"input_{size}"]
        with torch.no_grad():
            logits = classifier(pixels).logits
            pooled, stage_maps = backbone(pixels, return_dict=False)
        assert_close_relative(logits, expected[f"logits_{size}"], what=f"{name} logits {size}")
        assert_close_relative(pooled, expected[f"pooled_{size}"], what=f"{name} pooled {size}")
        assert len(stage_maps) == 4
        for i, stage_map in enumerate(stage_maps, start=1):
            assert_close_relative(stage_map, expected[f"stage{i}_{size}"], what=f"{name} stage{i} {size}")


def _variants():
    return json.loads((REFERENCE / "variants.json").read_text()) if REFERENCE.is_dir() else {}


@needs_reference
@pytest.mark.parametrize("variant", sorted(_variants()) or ["<no ../shared>"])
def test_variant_layout_matches_original_checkpoint(variant):
    spec = _variants()[variant]
    layout = json.loads((REFERENCE / "checkpoint_layout" / f"{variant}.json").read_text())
    expected = {f"model.{key}": tuple(shape) for key, (_, shape) in layout.items()}
    config = config_from_architecture(spec["architecture"])
    with torch.device("meta"):
        classifier = modeling.MambaVisionModelForImageClassification(config)
        backbone = modeling.MambaVisionModel(config)
    assert {k: tuple(v.shape) for k, v in classifier.state_dict().items()} == expected
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == {
        k: v for k, v in expected.items() if not k.startswith("model.head.")
    }
    assert sum(p.numel() for p in classifier.parameters()) == spec["num_params"]


def test_attention_blocks_follow_the_split_rule():
    assert list(modeling.attention_block_indices(8)) == [4, 5, 6, 7]
    assert list(modeling.attention_block_indices(5)) == [3, 4]
    assert list(modeling.attention_block_indices(1)) == []
    model = modeling.MambaVisionModel(tiny_config(depths=[1, 1, 3, 2]))
    kinds = [[type(b.mixer).__name__ for b in model.model.levels[i].blocks] for i in (2, 3)]
    assert kinds == [["MambaVisionMixer", "MambaVisionMixer", "MambaVisionAttention"],
                     ["MambaVisionMixer", "MambaVisionAttention"]]


def test_model_output_is_a_mapping_and_unpacks_as_a_tuple():
    model = modeling.MambaVisionModel(tiny_config()).eval()
    pixels = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = model(pixels)
        pooled, stage_maps = model(pixels)  # NVIDIA's usage, as written
        tuple_pooled, tuple_maps = model(pixels, return_dict=False)
        three = list(model(pixels, output_hidden_states=True))
    assert list(out.keys()) == ["pooler_output", "stage_maps"] and list(dict(out)) == list(out.keys())
    assert [key for key, _ in out.items()] == list(out.keys()) and list({**out}) == list(out.keys())
    assert len(out) == 2 and len(three) == 3 and len(three[2]) == 5  # pooled, maps, hidden states
    assert out.pooler_output.shape == (2, 64)
    assert [tuple(s.shape) for s in out.stage_maps] == [(2, 8, 16, 12), (2, 16, 8, 6), (2, 32, 4, 3), (2, 64, 2, 2)]
    assert out.last_hidden_state is out.stage_maps[-1]
    assert out[0] is out["pooler_output"] is out.pooler_output is out.to_tuple()[0]
    for unpacked in (pooled, tuple_pooled):
        torch.testing.assert_close(unpacked, out.pooler_output, rtol=0, atol=0)
    for maps in (stage_maps, tuple_maps):
        for got, want in zip(maps, out.stage_maps, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hidden_states_are_the_stem_and_stage_maps_in_every_class():
    config = tiny_config()
    pixels = torch.randn(2, 3, 32, 32)
    shapes = [(2, 8, 8, 8), (2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2), (2, 64, 1, 1)]  # stem, stage1..4
    for model_class in (modeling.MambaVisionModel, modeling.MambaVisionModelForImageClassification,
                        modeling.MambaVisionBackbone):
        model = model_class(config).eval()
        with torch.no_grad():
            assert model(pixels).hidden_states is None, model_class.__name__
            hidden_states = model(pixels, output_hidden_states=True).hidden_states
        assert [tuple(h.shape) for h in hidden_states] == shapes, model_class.__name__
    assert modeling.MambaVisionModelForImageClassification(config)(pixels)["logits"].shape == (2, 5)


def test_unknown_forward_arguments_are_refused():
    with pytest.raises(TypeError, match="output_attention"):
        modeling.MambaVisionModel(tiny_config())(torch.randn(1, 3, 32, 32), output_attention=True)


def test_each_class_builds_only_what_it_uses():
    config = tiny_config()
    backbone = modeling.MambaVisionBackbone(config)
    model = modeling.MambaVisionModel(config)
    classifier = modeling.MambaVisionModelForImageClassification(config)
    keys = [{k for k in m.state_dict() if k.startswith(("model.norm.", "model.head."))}
            for m in (backbone, model, classifier)]
    assert keys[0] == set()
    assert {k.split(".")[1] for k in keys[1]} == {"norm"}
    assert {k.split(".")[1] for k in keys[2]} == {"norm", "head"}
    # the classifier's keys are a superset of the others': one checkpoint loads into all three
    assert set(backbone.state_dict()) < set(model.state_dict()) < set(classifier.state_dict())


def test_batch_equivalence():
    torch.manual_seed(0)
    model = modeling.MambaVisionModelForImageClassification(tiny_config()).eval()
    pixels = torch.randn(3, 3, 40, 56)
    with torch.no_grad():
        batched = model(pixels).logits
        single = torch.cat([model(p[None]).logits for p in pixels])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "problem_type,labels",
    [("single_label_classification", torch.tensor([1, 4])),
     ("multi_label_classification", torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])),
     ("regression", None)],
)
def test_loss_follows_problem_type(problem_type, labels):
    num_labels = 1 if problem_type == "regression" else 5
    model = modeling.MambaVisionModelForImageClassification(tiny_config(num_labels=num_labels, problem_type=problem_type))
    labels = torch.tensor([0.5, -1.0]) if labels is None else labels
    out = model(torch.randn(2, 3, 32, 32), labels=labels)
    logits = out.logits.detach()
    reference = {
        "single_label_classification": lambda: torch.nn.functional.cross_entropy(logits, labels),
        "multi_label_classification": lambda: torch.nn.functional.binary_cross_entropy_with_logits(logits, labels),
        "regression": lambda: torch.nn.functional.mse_loss(logits.squeeze(-1), labels),
    }[problem_type]()
    torch.testing.assert_close(out.loss.detach(), reference)


def test_every_parameter_gets_a_gradient():
    model = modeling.MambaVisionModelForImageClassification(tiny_config(layer_scale=0.5, layer_scale_conv=0.5))
    model.train()
    model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 3])).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    torch.manual_seed(0)
    model = modeling.MambaVisionModelForImageClassification(tiny_config()).train()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])

    def loss_and_grads():
        model.zero_grad()
        loss = model(pixels, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # 5.23's name
    enable()
    assert all(stage.gradient_checkpointing for stage in model.model.levels)
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], msg=name)


def test_drop_path_only_in_training():
    model = modeling.MambaVisionModelForImageClassification(tiny_config(drop_path_rate=0.5))
    pixels = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, model(pixels).logits)
    model.train()
    torch.manual_seed(0)
    first = model(pixels).logits
    torch.manual_seed(1)
    assert not torch.allclose(first, model(pixels).logits)


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = modeling.MambaVisionModelForImageClassification(tiny_config(layer_scale=1e-5))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_fresh_init_follows_the_original():
    model = modeling.MambaVisionModelForImageClassification(tiny_config(layer_scale=0.25, layer_scale_conv=0.5))
    mixer = model.model.levels[2].blocks[0].mixer
    torch.testing.assert_close(mixer.A_log[3], torch.log(torch.arange(1.0, 9.0)))
    assert torch.all(mixer.D == 1) and torch.all(mixer.dt_proj.bias == 0)
    assert torch.all(model.model.levels[2].blocks[0].gamma_1 == 0.25)
    assert torch.all(model.model.levels[0].blocks[0].gamma == 0.5)
    assert abs(model.model.head.weight.std().item() - 0.02) < 0.005


@pytest.mark.parametrize(
    "fields,message",
    [(dict(depths=[1, 2, 3]), "depths"), (dict(num_heads=[1, 1, 3, 4]), r"num_heads\[2\]"),
     (dict(dim=9), "dim"), (dict(window_size=[8, 8, 0, 7]), r"window_size\[2\]"),
     (dict(crop_mode="zoom"), "crop_mode"), (dict(scan_backend="cuda"), "scan_backend"),
     (dict(layer_scale="big"), "layer_scale")],
)
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        configuration.MambaVisionConfig(**fields)


def test_nvidia_config_defaults_to_imagenet_head():
    config = configuration.MambaVisionConfig(depths=[1, 3, 8, 4], dim=80)
    assert config.num_labels == 1000 and config.id2label[1].startswith("goldfish")


def test_wrong_channel_count_is_refused():
    model = modeling.MambaVisionModel(tiny_config())
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\), got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_pixel_values_are_refused(dtype):
    model = modeling.MambaVisionModelForImageClassification(tiny_config())
    with pytest.raises(ValueError, match=f"floating-point pixel_values.*got {dtype}"):
        model(torch.zeros(1, 3, 32, 32, dtype=dtype))


@pytest.mark.parametrize("model_dtype,input_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.float16)])
def test_float_inputs_are_cast_to_the_model_dtype(model_dtype, input_dtype):
    torch.manual_seed(0)
    model = randomize_batchnorm(modeling.MambaVisionModelForImageClassification(tiny_config())).eval()
    pixels = torch.randn(2, 3, 32, 32).to(input_dtype)
    with torch.no_grad():
        expected = model.to(model_dtype)(pixels.to(model_dtype)).logits
        logits = model(pixels).logits
    assert logits.dtype == model_dtype
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@needs_shared
def test_fold_batchnorm_keeps_outputs():
    config, state_dict, expected = load_fixture("tiny_layerscale")
    model = modeling.MambaVisionModelForImageClassification(config).eval()
    model.load_state_dict(state_dict)
    model.fold_batchnorm()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.model.levels[:2].modules())
    with torch.no_grad():
        logits = model(expected["input_200x152"]).logits
    assert_close_relative(logits, expected["logits_200x152"], rel=1e-4, what="folded logits")
    with pytest.raises(RuntimeError, match="eval-mode"):
        modeling.MambaVisionModel(config).train().fold_batchnorm()


@needs_shared
def test_fold_batchnorm_is_idempotent_and_guards_train_and_save(tmp_path):
    config, state_dict, expected = load_fixture("tiny_plain")
    model = modeling.MambaVisionModelForImageClassification(config).eval()
    model.load_state_dict(state_dict)
    model.fold_batchnorm().fold_batchnorm()
    with torch.no_grad():
        logits = model(expected["input_64x96"]).logits
    assert_close_relative(logits, expected["logits_64x96"], rel=1e-4, what="folded twice")
    model.eval()  # still allowed
    with pytest.raises(RuntimeError, match="cannot train a model whose BatchNorms were folded"):
        model.train()
    with pytest.raises(RuntimeError, match="cannot save a model whose BatchNorms were folded"):
        model.save_pretrained(tmp_path / "folded")
    assert not (tmp_path / "folded").exists()


def _pad_conv_levels_to(multiple, monkeypatch):
    """Force the conv levels' channel padding (CUDA's, CONV_CHANNEL_MULTIPLE) on any device; returns the list
    of the paddings used."""
    pads = []

    def padding(level, x):
        pads.append(0 if level.training else -x.shape[1] % multiple)
        return pads[-1]

    monkeypatch.setattr(modeling, "conv_channel_padding", padding)
    return pads


@needs_shared
@pytest.mark.parametrize("fold", [False, True], ids=["batchnorm", "folded"])
def test_channel_padded_conv_levels_match_original_outputs(fold, monkeypatch):
    """Conv levels on zero-padded channels (what CUDA does at widths that are not a multiple of 8, such as the
    L variants' 196), forced here at the fixture's widths 24 and 48 (to 32 and 64): the original's outputs."""
    pads = _pad_conv_levels_to(32, monkeypatch)
    config, state_dict, expected = load_fixture("tiny_layerscale")  # layer scales in the conv blocks too
    model = modeling.MambaVisionModelForImageClassification(config).eval()
    model.load_state_dict(state_dict)
    if fold:
        model.fold_batchnorm()
    for size in FIXTURE_SIZES:
        with torch.no_grad():
            out = model(expected[f"input_{size}"], output_hidden_states=True)
        rel = 1e-4 if fold else 1e-5
        assert_close_relative(out.logits, expected[f"logits_{size}"], rel=rel, what=f"logits {size}")
        for i, stage_map in enumerate(out.hidden_states[1:3], start=1):
            assert_close_relative(stage_map, expected[f"stage{i}_{size}"], rel=rel, what=f"stage{i} {size}")
    assert pads[:2] == [8, 16]


def test_channel_padding_keeps_gradients(monkeypatch):
    """Gradients through the padded conv levels (eval mode) reach the unpadded parameters unchanged."""
    torch.manual_seed(0)
    model = randomize_batchnorm(modeling.MambaVisionModelForImageClassification(tiny_config()).eval())
    pixels = torch.randn(2, 3, 64, 64)
    grads = []
    for multiple in (1, 32):
        pads = _pad_conv_levels_to(multiple, monkeypatch)
        model.zero_grad()
        model(pixels).logits.square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert any(pads)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_compiled_depthwise_taps_match_the_conv():
    """The mixer's compiled form of its depthwise conv (shifted taps) equals the eager conv kernel."""
    mixer = modeling.MambaVisionModel(tiny_config()).model.levels[2].blocks[0].mixer
    tokens = torch.randn(3, 17, mixer.half)  # (B, L, C)
    taps = torch.compile(lambda v: mixer._depthwise(mixer.conv1d_x, v), fullgraph=True, backend="eager")
    expected = mixer.conv1d_x(tokens.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(taps(tokens), expected, rtol=1e-5, atol=1e-6)

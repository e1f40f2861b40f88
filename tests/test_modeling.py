"""The model against the original's outputs, the checkpoint layout of every variant, and its contracts."""

import json

import pytest
import torch

from conftest import (FIXTURE_NAMES, FIXTURE_SIZES, REFERENCE, assert_close_relative, configuration,
                      load_fixture, modeling, needs_reference, needs_shared, tiny_config)
from convert_checkpoint import config_from_architecture


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
            pooled, stage_maps = backbone(pixels)
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


def test_outputs_unpack_and_name():
    model = modeling.MambaVisionModel(tiny_config()).eval()
    pixels = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = model(pixels)
        pooled, stage_maps = out
        plain = model(pixels, return_dict=False)
    assert pooled.shape == (2, 64) and out.pooler_output is pooled
    assert [tuple(s.shape) for s in stage_maps] == [(2, 8, 16, 12), (2, 16, 8, 6), (2, 32, 4, 3), (2, 64, 2, 2)]
    assert out.last_hidden_state is stage_maps[-1]
    assert isinstance(plain, tuple) and len(plain) == 2
    torch.testing.assert_close(plain[0], pooled)


def test_classifier_outputs_and_hidden_states():
    model = modeling.MambaVisionModelForImageClassification(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert out["logits"].shape == (2, 5)
    assert len(out.hidden_states) == 4
    assert model(torch.randn(1, 3, 32, 32)).hidden_states is None


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
    model.gradient_checkpointing_enable()
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


def test_compiled_depthwise_taps_match_the_conv():
    """The mixer's compiled form of its depthwise conv (shifted taps) equals the eager conv kernel."""
    mixer = modeling.MambaVisionModel(tiny_config()).model.levels[2].blocks[0].mixer
    tokens = torch.randn(3, 17, mixer.half)  # (B, L, C)
    taps = torch.compile(lambda v: mixer._depthwise(mixer.conv1d_x, v), fullgraph=True, backend="eager")
    expected = mixer.conv1d_x(tokens.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(taps(tokens), expected, rtol=1e-5, atol=1e-6)

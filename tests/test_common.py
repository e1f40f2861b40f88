"""What transformers' common model tests (ModelTesterMixin, BackboneTesterMixin) check for a vision model, written
for MambaVision: save/load round trips, determinism, attention implementations and maps, offloading, dtypes, the
forward signature. Covered elsewhere: batching, hidden states, gradient checkpointing, initialisation, problem types
(test_modeling.py), backbone attributes (test_ecosystem.py), export and compile (test_export.py)."""

import inspect
import math

import accelerate
import pytest
import torch
from transformers import AutoBackbone, AutoModel, AutoModelForImageClassification

from conftest import modeling, randomize_batchnorm, save_tiny_folder, tiny_config

CLASSES = (modeling.MambaVisionModel, modeling.MambaVisionModelForImageClassification, modeling.MambaVisionBackbone)
AUTO_CLASSES = (AutoModel, AutoModelForImageClassification)
# the tiny architecture at 128x96: level 2's 8x6 map padded to 2x2 windows of 4x4 tokens (attention in its block
# 2, 2 heads), level 3's 4x3 map padded to 2x2 windows of 2x2 tokens (attention in block 1, 4 heads); batch 2
ATTENTION_INPUT = (2, 3, 128, 96)
ATTENTION_SHAPES = [(2 * 2 * 2, 2, 16, 16), (2 * 2 * 2, 4, 4, 4)]


def pixels(shape=(2, 3, 64, 48), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tensors_of(output):
    """Every tensor of an output, flattened in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in (output.to_tuple() if hasattr(output, "to_tuple") else output) for t in tensors_of(item)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("common") / "MambaVision-tiny", tiny_config(layer_scale=0.5))


def test_forward_signature_and_main_input():
    for model_class in CLASSES:
        parameters = list(inspect.signature(model_class.forward).parameters)
        assert parameters[:2] == ["self", "pixel_values"] and model_class.main_input_name == "pixel_values"
        assert {"output_hidden_states", "output_attentions", "return_dict"} <= set(parameters), model_class


@pytest.mark.parametrize("model_class", CLASSES, ids=lambda c: c.__name__)
def test_save_load_round_trip_and_determinism(model_class, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(model_class(tiny_config(layer_scale=0.5, layer_scale_conv=0.3))).eval()
    with torch.no_grad():
        first, second = model(pixels()), model(pixels())
    for a, b in zip(tensors_of(first), tensors_of(second), strict=True):  # determinism
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        again = reloaded.eval()(pixels())
    for a, b in zip(tensors_of(first), tensors_of(again), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (name, p), (_, q) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)  # nothing re-initialised on load


def test_classifier_checkpoint_with_another_head_size_loads_with_ignore_mismatched_sizes(folder):
    model, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, num_labels=3,
                                                                  ignore_mismatched_sizes=True, output_loading_info=True)
    assert model.model.head.out_features == 3 and {k for k, *_ in info["mismatched_keys"]} == {
        "model.head.weight", "model.head.bias"}


# --- attention implementations and maps -------------------------------------------------------------------------


def manual_attention_weights(attention, tokens):
    """softmax(q k^T / sqrt(head size)) of ``attention``'s qkv for ``tokens`` (windows, N, C), by hand."""
    windows, n, c = tokens.shape
    heads = attention.num_heads
    q, k, _ = (tokens @ attention.qkv.weight.T + attention.qkv.bias).view(windows, n, 3, heads, c // heads).unbind(2)
    scores = torch.einsum("wihd,wjhd->whij", q, k) / math.sqrt(c // heads)
    return scores.softmax(-1)


@pytest.mark.parametrize("model_class", CLASSES, ids=lambda c: c.__name__)
def test_attentions_are_each_attention_blocks_softmax_weights(model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config()).eval()
    inputs = {}
    attention_modules = [m for m in model.modules() if isinstance(m, modeling.MambaVisionAttention)]
    for module in attention_modules:
        module.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0]))
    with torch.no_grad():
        assert len(model(pixels(), output_attentions=True, return_dict=False)) == len(model(pixels()).to_tuple()) + 1
        assert model(pixels(ATTENTION_INPUT)).attentions is None
        attentions = model(pixels(ATTENTION_INPUT), output_attentions=True).attentions
    assert [tuple(a.shape) for a in attentions] == ATTENTION_SHAPES
    for weights, module in zip(attentions, attention_modules, strict=True):
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=0, atol=1e-6)
        torch.testing.assert_close(weights, manual_attention_weights(module, inputs[module]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_sdpa_and_eager_load_and_agree(folder, device):
    """On CUDA the sdpa path pads the head size (see ATTENTION_HEAD_PADDING): it must agree with eager too."""
    outputs = {}
    for implementation in ("sdpa", "eager"):
        for auto_class in AUTO_CLASSES:
            model = auto_class.from_pretrained(folder, trust_remote_code=True, attn_implementation=implementation)
            assert model.config._attn_implementation == implementation
            model = model.to(device).eval()
            with torch.no_grad():
                outputs[implementation, auto_class] = [t.cpu() for t in tensors_of(model(pixels().to(device)))]
    for auto_class in AUTO_CLASSES:
        for a, b in zip(outputs["sdpa", auto_class], outputs["eager", auto_class], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eager_runs_no_fused_attention_and_sdpa_does(folder, monkeypatch):
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    for implementation, expected in (("eager", 0), ("sdpa", 2)):  # two attention blocks
        calls.clear()
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation=implementation).eval()
        with torch.no_grad():
            model(pixels())
        assert len(calls) == expected, implementation


# --- offloading, dtypes ------------------------------------------------------------------------------------------


def test_disk_and_cpu_offload_match_the_model_in_memory(folder, tmp_path):
    """``device_map="auto"`` with too little memory offloads to disk (weights loaded block by block by accelerate's
    hooks); CPU offload: from_pretrained's with a GPU, else accelerate's cpu_offload (the same hooks). Offloaded
    models compute on the GPU where there is one, so the model in memory does too (TF32 off: exact float32)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    in_memory = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval().to(device)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want = in_memory(pixels().to(device)).logits.cpu()
    # Without a GPU entry in max_memory, transformers places the whole model on the GPU: give it almost nothing.
    tight = {0: 20_000, "cpu": 20_000} if cuda else {"cpu": 20_000}
    disk = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, device_map="auto",
                                                           max_memory=tight, offload_folder=tmp_path).eval()
    assert "disk" in set(disk.hf_device_map.values())
    if cuda:  # room on the GPU for about half the weights: the rest stays on the CPU
        half = sum(p.numel() * p.element_size() for p in in_memory.parameters()) // 2
        cpu = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, device_map="auto",
                                                              max_memory={0: half, "cpu": 10**9}).eval()
        assert "cpu" in set(cpu.hf_device_map.values())
    else:
        cpu = accelerate.cpu_offload(AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
                                     .eval(), execution_device=torch.device("cpu"))
        assert all(p.is_meta for p in cpu.parameters())  # weights live in the hooks' CPU copy
    for offloaded in (disk, cpu):
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            got = offloaded(pixels()).logits
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5 if cuda else 1e-6, atol=1e-5 if cuda else 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_loads_and_runs_in_half_precision(folder, dtype):
    want = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()(pixels()).pooler_output.detach()
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=dtype).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        got = model(pixels()).pooler_output  # float32 pixels are cast to the model's dtype
    assert got.dtype == dtype
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2

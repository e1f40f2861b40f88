"""The Triton selective scan against the float32 reference: in Triton's CPU interpreter here, on a GPU
per dtype (forward and gradients), and the whole model's fast CUDA path against its reference path; the
attention's CUDA-only head padding against the unpadded computation."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, model_code, assert_close_relative, load_fixture, modeling, needs_shared, tiny_config

triton_missing = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")

# ||fast - ref|| / ||ref|| allowed per input dtype; the reference runs in float32 on the same (rounded) inputs
TOLERANCES = {torch.float32: {"out": 1e-5, "grad": 1e-4},
              torch.float16: {"out": 2e-3, "grad": 5e-3},
              torch.bfloat16: {"out": 1e-2, "grad": 3e-2}}
SHAPES = [(8, 160, 196), (4, 320, 49), (2, 80, 256), (1, 96, 1024), (3, 20, 37)]  # (batch, channels, length)


def scan_problem(batch, dim, length, dtype, device, seed, d_state=8):
    """Random scan inputs as the mixer produces them: u and delta views of a (batch, length, dim) layout."""
    gen = torch.Generator().manual_seed(seed)
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)
    u = rand(batch, length, dim).to(dtype).transpose(1, 2)
    delta = rand(batch, length, dim, scale=0.5).to(dtype).transpose(1, 2)
    tensors = dict(u=u, delta=delta, A=-torch.exp(rand(dim, d_state)), B=rand(batch, d_state, length).to(dtype),
                   C=rand(batch, d_state, length).to(dtype), D=rand(dim), delta_bias=rand(dim, scale=0.5))
    return {k: v.detach().requires_grad_() for k, v in tensors.items()}


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def compare_with_reference(batch, dim, length, dtype, device, seed, backend="triton"):
    """Relative errors of a fast backend's output and gradients against the float32 reference scan."""
    scan = model_code.load("selective_scan")
    fast_scan = scan._FAST_BACKENDS[backend]()
    inputs = scan_problem(batch, dim, length, dtype, device, seed)
    order = ("u", "delta", "A", "B", "C", "D")
    kwargs = dict(delta_bias=inputs["delta_bias"], delta_softplus=True)
    fast = fast_scan(*(inputs[k] for k in order), **kwargs)
    ref = scan.selective_scan_sequential(*(inputs[k] for k in order), **kwargs)
    assert fast.dtype == ref.dtype == dtype
    weight = torch.randn(fast.shape, device=device)
    fast_grads = torch.autograd.grad((fast.float() * weight).sum(), list(inputs.values()))
    ref_grads = torch.autograd.grad((ref.float() * weight).sum(), list(inputs.values()))
    errors = {"out": relative_error(fast, ref)}
    errors.update({name: relative_error(f, r) for name, f, r in zip(inputs, fast_grads, ref_grads)})
    return errors


def inference_error(batch, dim, length, dtype, device, seed, config=None):
    """Relative error of the Triton scan without gradients against the reference: through the op (its inference
    launch configs), or launched at ``config`` (block, chunk, warps, splits)."""
    scan = model_code.load("selective_scan")
    inputs = {k: v.detach() for k, v in scan_problem(batch, dim, length, dtype, device, seed).items()}
    order = ("u", "delta", "A", "B", "C", "D")
    with torch.no_grad():
        if config is None:
            fast = scan._FAST_BACKENDS["triton"]()(*(inputs[k] for k in order), delta_bias=inputs["delta_bias"],
                                                   delta_softplus=True)
        else:
            fast = model_code.load("selective_scan_triton").scan_forward(
                *(inputs[k] for k in order), inputs["delta_bias"], config)
        ref = scan.selective_scan_sequential(*(inputs[k] for k in order), delta_bias=inputs["delta_bias"],
                                      delta_softplus=True)
    return relative_error(fast, ref)


INTERPRETER_CHECK = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from test_triton_scan import compare_with_reference
for shape in [(2, 20, 37), (1, 16, 16), (2, 5, 3)]:
    errors = compare_with_reference(*shape, dtype=__import__("torch").float32, device="cpu", seed=sum(shape))
    worst = max(errors.values())
    assert worst < 1e-5, (shape, errors)
# the backward pass writes du and ddelta in the inputs' dtype (bfloat16 here)
errors = compare_with_reference(2, 20, 37, dtype=__import__("torch").bfloat16, device="cpu", seed=3)
assert errors["out"] < 1e-2 and max(errors.values()) < 3e-2, errors
from test_triton_scan import inference_error
for shape in [(2, 20, 37), (1, 2, 1024)]:  # the short and the long-sequence inference configs
    assert inference_error(*shape, dtype=__import__("torch").float32, device="cpu", seed=1) < 1e-5, shape
# the walk (chunks of one token): 20 channels in blocks of 8 (the last block partly masked), in float32 and bfloat16
for dtype, tolerance in [("float32", 1e-5), ("bfloat16", 1e-2)]:
    error = inference_error(2, 20, 37, dtype=getattr(__import__("torch"), dtype), device="cpu", seed=4,
                            config=(8, 1, 1, 1))
    assert error < tolerance, (dtype, error)
# 3 splits of 16, 16 and 5 tokens (the last one ragged, the length no multiple of the chunk); 5 channels in blocks
# of 4 (the last block partly masked)
for shape, dtype, tolerance in [((2, 5, 37), "float32", 1e-5), ((1, 4, 37), "bfloat16", 1e-2)]:
    error = inference_error(*shape, dtype=getattr(__import__("torch"), dtype), device="cpu", seed=2,
                            config=(4, 8, 1, 3))
    assert error < tolerance, (shape, dtype, error)
print("ok")
"""


@triton_missing
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels (tests below)")
def test_triton_kernels_in_interpreter():
    """The kernels' logic (chunking, masking, reverse scan, partial sums) on CPU via TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK, str(ROOT)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@triton_missing
def test_inference_walks_many_short_windows_only():
    """The walk runs where it measured faster (H200): many sequences x channels below 1,024 tokens, the channel block
    the largest giving 2,048 programs; batch 1 and long sequences keep the chunked scan."""
    rule = model_code.load("selective_scan_triton").infer_config
    assert rule(256, 160, 196) == (16, 1, 1, 1)  # T's level 2 at batch 256: 2,560 programs of 16 channels
    assert rule(256, 512, 49) == (64, 1, 1, 1)  # B's level 3: 2,048 of 64
    assert rule(32, 784, 256) == (8, 1, 1, 1)  # L2-512's level 3: 3,136 of 8 (1,568 of 16 are too few)
    assert rule(1, 160, 196)[1] > 1 and rule(64, 160, 196)[1] > 1  # 20 and 1,280 programs at most: chunked
    assert rule(32, 512, 1024)[1] > 1  # 1,024 tokens: chunked


@needs_cuda
@triton_missing
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_scan_matches_reference_on_gpu(shape, dtype):
    errors = compare_with_reference(*shape, dtype=dtype, device="cuda", seed=sum(shape))
    tolerance = TOLERANCES[dtype]
    assert errors["out"] < tolerance["out"], errors
    assert all(e < tolerance["grad"] for name, e in errors.items() if name != "out"), errors


# one per inference launch config: chunked, the walk, long sequences at two channel blocks, split
INFERENCE_SHAPES = [(8, 160, 196), (256, 160, 49), (1, 96, 1024), (8, 512, 1024), (1, 16, 8192)]


@needs_cuda
@triton_missing
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", INFERENCE_SHAPES, ids=str)
def test_triton_inference_configs_match_reference_on_gpu(shape, dtype):
    kernels = model_code.load("selective_scan_triton")
    assert len({kernels.infer_config(*s) for s in INFERENCE_SHAPES}) == len(INFERENCE_SHAPES)
    assert inference_error(*shape, dtype=dtype, device="cuda", seed=sum(shape)) < TOLERANCES[dtype]["out"]


@needs_cuda
@triton_missing
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("length, splits", [(8192, None), (4001, 7)], ids=str)
def test_triton_split_inference_matches_reference_on_gpu(length, splits, dtype):
    """The sequence-split forward at a dense-prediction shape: through the op (its own split count), and launched
    at 7 splits with a short last one (the length no multiple of the chunk)."""
    config = model_code.load("selective_scan_triton").infer_config(2, 64, length)
    assert splits is not None or config[3] > 1  # the op splits 8,192 tokens itself
    forced = None if splits is None else (*config[:3], splits)
    assert inference_error(2, 64, length, dtype=dtype, device="cuda", seed=length,
                           config=forced) < TOLERANCES[dtype]["out"]


@needs_cuda
@triton_missing
def test_split_inference_under_cuda_graphs():
    """The split path (two launches, scratch buffers allocated inside the op) compiles whole and replays in a CUDA
    graph, giving the eager result."""
    scan = model_code.load("selective_scan")
    kernel = scan._FAST_BACKENDS["triton"]()
    inputs = {k: v.detach() for k, v in scan_problem(2, 64, 8192, torch.bfloat16, "cuda", 0).items()}
    order = ("u", "delta", "A", "B", "C", "D")

    def run(u, delta, A, B, C, D, delta_bias):
        return kernel(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)

    compiled = torch.compile(run, mode="reduce-overhead", fullgraph=True)
    args = [inputs[k] for k in (*order, "delta_bias")]
    with torch.no_grad():
        eager = run(*args)
        for _ in range(3):  # warm-up, record, replay
            fast = compiled(*args).clone()
    assert relative_error(fast, eager) < 1e-6


def _mamba_ssm_works():
    scan = model_code.load("selective_scan")
    return torch.cuda.is_available() and scan._mamba_ssm_scan() is not None


needs_mamba_ssm = pytest.mark.skipif(not _mamba_ssm_works(), reason="mamba-ssm's CUDA scan is not importable here")


@needs_mamba_ssm
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_mamba_ssm_scan_matches_reference_on_gpu(dtype):
    """The same contract holds for mamba-ssm's kernel, so the dispatcher may pick it."""
    errors = compare_with_reference(8, 160, 196, dtype=dtype, device="cuda", seed=1, backend="mamba_ssm")
    assert errors["out"] < TOLERANCES[dtype]["out"], errors
    assert all(e < TOLERANCES[dtype]["grad"] for name, e in errors.items() if name != "out"), errors


def _fixture_model(name, backend, monkeypatch):
    monkeypatch.setenv("MAMBAVISION_SCAN_BACKEND", backend)
    config, state_dict, expected = load_fixture(name)
    model = modeling.MambaVisionModelForImageClassification(config).cuda().eval()
    model.load_state_dict(state_dict)
    return model, expected


@needs_cuda
@needs_shared
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_missing),
                                     pytest.param("mamba_ssm", marks=needs_mamba_ssm)])
def test_model_on_fast_backend_matches_original_outputs(backend, monkeypatch):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model, expected = _fixture_model("tiny_layerscale", backend, monkeypatch)
    for size in ("224x224", "64x96", "200x152"):
        with torch.no_grad():
            out = model(expected[f"input_{size}"].cuda(), output_hidden_states=True)
        assert_close_relative(out.logits.cpu(), expected[f"logits_{size}"], rel=1e-5, what=f"logits {size}")
        for i, stage_map in enumerate(out.hidden_states[1:], start=1):  # after the stem's map
            assert_close_relative(stage_map.cpu(), expected[f"stage{i}_{size}"], rel=1e-5, what=f"stage{i} {size}")


@needs_cuda
@triton_missing
@needs_shared
def test_fast_inference_path_matches_reference(monkeypatch):
    """bf16 autocast, channels_last and folded BatchNorm on Triton against the float32 original outputs."""
    model, expected = _fixture_model("tiny_plain", "triton", monkeypatch)
    model.fold_batchnorm().to(memory_format=torch.channels_last)
    pixels = expected["input_224x224"].cuda().to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(pixels).logits.float().cpu()
    assert relative_error(logits, expected["logits_224x224"]) < 3e-2


@needs_cuda
@triton_missing
@needs_shared
def test_training_gradients_match_between_backends(monkeypatch):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    grads = {}
    for backend in ("torch", "triton"):
        model, expected = _fixture_model("tiny_layerscale", backend, monkeypatch)
        model.train()
        torch.manual_seed(0)  # the same drop-path masks for both backends
        loss = model(expected["input_64x96"].cuda(), labels=torch.tensor([1, 7], device="cuda")).loss
        loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    scale = max(g.norm() for g in grads["torch"].values())  # some gradients are ~0 (biases before BatchNorm)
    for name, ref in grads["torch"].items():
        error = ((grads["triton"][name] - ref).norm() / torch.clamp(ref.norm(), min=1e-3 * scale)).item()
        assert error < 1e-4, (name, error)


@needs_cuda
@triton_missing
@needs_shared
def test_compile_fullgraph_with_triton(monkeypatch):
    model, expected = _fixture_model("tiny_plain", "triton", monkeypatch)
    compiled = torch.compile(model, fullgraph=True)
    pixels = expected["input_200x152"].cuda()
    with torch.no_grad():
        eager, fast = model(pixels).logits, compiled(pixels).logits
    assert relative_error(fast, eager) < 1e-4
    model.train()
    compiled(pixels, labels=torch.tensor([0, 1], device="cuda")).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@needs_cuda
@triton_missing
@needs_shared
def test_compiled_bf16_training_step_matches_float32_gradients(monkeypatch):
    """The benchmark's training recipe (compiled with CUDA graphs, bf16 autocast, channels_last) on the Triton scan
    against the PyTorch scan's float32 eager gradients: the compiled backward op, its layouts and its partial sums
    reduced in the traced graph."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    grads = {}
    config, state_dict, expected = load_fixture("tiny_layerscale")
    config.drop_path_rate = 0.0  # compiled code draws other random masks than eager
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MAMBAVISION_SCAN_BACKEND", backend)
        model = modeling.MambaVisionModelForImageClassification(config).cuda()
        model.load_state_dict(state_dict)
        model.train().to(memory_format=torch.channels_last)
        pixels = expected["input_224x224"].cuda().to(memory_format=torch.channels_last)
        forward = model if backend == "torch" else torch.compile(model, mode="reduce-overhead")
        for _ in range(2 if backend == "triton" else 1):  # the second step replays the recorded graphs
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=backend == "triton"):
                forward(pixels, labels=torch.tensor([1, 7], device="cuda")).loss.backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert relative_error(grads["triton"], grads["torch"]) < 3e-2


@needs_cuda
@needs_shared
def test_channel_padded_conv_levels_on_gpu_match_original_outputs(monkeypatch):
    """In eval mode CUDA zero-pads conv levels to CONV_CHANNEL_MULTIPLE channels (raised to 32 here, so that the
    fixture's widths 24 and 48 get padded): float32 outputs stay the original's."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setattr(modeling, "CONV_CHANNEL_MULTIPLE", 32)
    pads = []
    padded_conv = modeling.padded_conv
    monkeypatch.setattr(modeling, "padded_conv", lambda conv, x, *pad: pads.append(pad) or padded_conv(conv, x, *pad))
    model, expected = _fixture_model("tiny_layerscale", "torch", monkeypatch)
    for size in ("224x224", "64x96"):
        with torch.no_grad():
            out = model(expected[f"input_{size}"].cuda(), output_hidden_states=True)
        assert_close_relative(out.logits.cpu(), expected[f"logits_{size}"], rel=1e-5, what=f"logits {size}")
        for i, stage_map in enumerate(out.hidden_states[1:], start=1):
            assert_close_relative(stage_map.cpu(), expected[f"stage{i}_{size}"], rel=1e-5, what=f"stage{i} {size}")
    assert {(8, 8), (8, 0), (16, 16), (16, 0)} <= set(pads)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padded_attention_matches_unpadded_on_gpu(dtype):
    """Head size 49 (the L variants) is zero-padded on CUDA; outputs and gradients equal the float64 CPU
    computation, which takes the unpadded path, within the dtype's tolerance."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = "sdpa"  # the fused path, which pads
    attention = modeling.MambaVisionAttention(config, 98, 2)  # head size 49
    tokens = torch.randn(3, 100, 98)
    errors = {}
    outputs = {}
    for device, run_dtype in (("cpu", torch.float64), ("cuda", dtype)):
        layer = attention.to(device=device, dtype=torch.float64 if device == "cpu" else torch.float32)
        x = tokens.to(device=device, dtype=torch.float64 if device == "cpu" else torch.float32).requires_grad_()
        with torch.autocast("cuda", dtype=run_dtype, enabled=run_dtype == torch.bfloat16):
            out, _ = layer(x)
        grads = torch.autograd.grad(out.float().sum() if device == "cuda" else out.sum(), [x, layer.qkv.weight])
        outputs[device] = [t.detach().double().cpu() for t in (out, *grads)]
    for name, got, want in zip(("out", "d_input", "d_qkv_weight"), outputs["cuda"], outputs["cpu"]):
        errors[name] = relative_error(got, want)
    tolerance = TOLERANCES[dtype]
    assert errors["out"] < tolerance["out"], errors
    assert max(errors["d_input"], errors["d_qkv_weight"]) < tolerance["grad"], errors

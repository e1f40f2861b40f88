"""The PyTorch selective scans (chunked and step-by-step) against a naive float64 loop, and the backend choice."""

import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURE_NAMES, FIXTURE_SIZES, assert_close_relative, load_fixture, modeling, needs_shared
from mambavision_tools import model_code

scan = model_code.load("selective_scan")
SCANS = {"chunked": scan.selective_scan_chunked, "sequential": scan.selective_scan_sequential}
CHUNK = scan.CHUNK


def naive_scan(u, delta, A, B, C, D, delta_bias):
    """The recurrence written out step by step in float64, straight from its definition: (y, last state)."""
    u, delta, A, B, C, D, delta_bias = (t.double() for t in (u, delta, A, B, C, D, delta_bias))
    delta = F.softplus(delta + delta_bias[:, None])
    batch, dim, length = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1), h


def random_problem(batch, dim, d_state, length, seed, delta_scale=0.5, dtype=torch.float32):
    """Inputs as the mixer gives them: u, delta, B, C in ``dtype``, (batch, channels, length) views of
    token-major (batch, length, channels) memory; A (negative), D, delta_bias in float32."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(channels, scale=1.0):
        return (torch.randn(batch, length, channels, generator=gen) * scale).to(dtype).transpose(1, 2)

    tensors = dict(
        u=tokens(dim),
        delta=tokens(dim, delta_scale),
        A=-torch.exp(torch.randn(dim, d_state, generator=gen)),
        B=tokens(d_state),
        C=tokens(d_state),
        D=torch.randn(dim, generator=gen),
        delta_bias=torch.randn(dim, generator=gen) * 0.5,
    )
    return {k: v.requires_grad_() for k, v in tensors.items()}


def run(scan_fn, inputs, **kwargs):
    order = ("u", "delta", "A", "B", "C", "D")
    return scan_fn(*(inputs[k] for k in order), delta_bias=inputs["delta_bias"], delta_softplus=True, **kwargs)


def relative_errors(inputs, got, want):
    """Max error of the output and of each input's gradient, relative to the largest expected value
    (of the output, and of all gradients together: some gradients are exactly zero, e.g. A's at length 1)."""
    weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got_grads = torch.autograd.grad((got.double() * weight).sum(), list(inputs.values()))
    want_grads = torch.autograd.grad((want * weight).sum(), list(inputs.values()))
    errors = {"y": ((got.double() - want).abs().max() / want.abs().max()).item()}
    grad_scale = max(g.abs().max().item() for g in want_grads)
    for name, g, w in zip(inputs, got_grads, want_grads):
        errors[name] = ((g.double() - w).abs().max() / grad_scale).item()
    return errors


@pytest.mark.parametrize("name", sorted(SCANS))
@pytest.mark.parametrize("shape", [(1, 6, 8, 1), (2, 5, 8, 3), (1, 4, 8, CHUNK), (2, 4, 8, CHUNK + 1),
                                   (2, 3, 8, CHUNK**2), (3, 10, 6, 37), (2, 16, 8, 49), (1, 8, 8, 196),
                                   (1, 3, 5, 1024)], ids=str)
def test_scan_matches_naive_float64_loop(name, shape):
    """Values and gradients to float32 precision: lengths around the chunk size and its square (two full
    levels), MambaVision's windows (49, 196, 1,024 tokens at 512 input), d_state 8 and non-powers of two."""
    inputs = random_problem(*shape, seed=sum(shape))
    want, _ = naive_scan(**inputs)
    errors = relative_errors(inputs, run(SCANS[name], inputs), want)
    assert max(errors.values()) < 1e-5, errors
    with torch.no_grad():  # inference takes its own path (the step loop updates in place)
        assert_close_relative(run(SCANS[name], inputs).double(), want.detach(), what="without autograd")


@pytest.mark.parametrize("name", sorted(SCANS))
def test_scan_with_decays_far_beyond_float32_range(name):
    """Steps that forget their state entirely (delta * A down to about -1e3) and steps that keep it (delta
    near 0) over a long sequence: exp of the summed decays would overflow float32 in an unchunked form."""
    inputs = random_problem(2, 8, 8, 300, seed=3, delta_scale=6.0)
    with torch.no_grad():
        inputs["A"].mul_(8.0)
    want, _ = naive_scan(**inputs)
    got = run(SCANS[name], inputs)
    assert torch.isfinite(got).all()
    errors = relative_errors(inputs, got, want)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("name", sorted(SCANS))
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=str)
def test_scan_half_precision_inputs(name, dtype, tolerance):
    """bf16/fp16 inputs compute in float32 and return the input dtype: within the dtype's rounding of the
    naive float64 loop on the same (rounded) inputs, values and gradients."""
    inputs = random_problem(2, 12, 8, 61, seed=7, dtype=dtype)
    got = run(SCANS[name], inputs)
    assert got.dtype == dtype
    want, _ = naive_scan(**inputs)
    errors = relative_errors(inputs, got, want)
    assert max(errors.values()) < tolerance, errors


@pytest.mark.parametrize("name", sorted(SCANS))
def test_scan_returns_last_state_and_gates_with_z(name):
    inputs = {k: v.detach() for k, v in random_problem(2, 4, 6, 11, seed=0).items()}
    y, state = run(SCANS[name], inputs, return_last_state=True)
    want, want_state = naive_scan(**inputs)
    assert state.shape == (2, 4, 6) and state.dtype == torch.float32
    torch.testing.assert_close(state.double(), want_state, rtol=1e-5, atol=1e-5)
    z = torch.randn(2, 4, 11)
    torch.testing.assert_close(run(SCANS[name], inputs, z=z).double(), want * F.silu(z.double()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The backend choice


@pytest.fixture
def fresh_choice(monkeypatch):
    """Empty kernel, self-check and warning caches and no environment override, for one test."""
    monkeypatch.delenv(scan.ENV_BACKEND, raising=False)
    monkeypatch.setattr(scan, "_kernels", {})
    monkeypatch.setattr(scan, "_checked", {})
    monkeypatch.setattr(scan, "_warned", set())


def test_backend_names_are_defined_once():
    configuration = model_code.load("configuration_mambavision")
    assert configuration.check_backend_name is scan.check_backend_name  # the dispatcher checks names with the config's
    assert set(scan._FAST_BACKENDS) | {"torch"} == set(configuration.SCAN_BACKENDS)
    assert list(scan._FAST_BACKENDS) == ["triton", "mamba_ssm"]  # auto's order: the faster kernel first


def test_forced_and_unknown_backends(fresh_choice, monkeypatch):
    cpu = torch.device("cpu")
    assert scan.resolve_backend("auto", cpu, 8, torch.float32) == "torch"
    assert scan.resolve_backend("torch", cpu, 8, torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="'mamba_ssm' was forced but cannot run here: needs a CUDA tensor"):
        scan.resolve_backend("mamba_ssm", cpu, 8, torch.float32)
    monkeypatch.setenv(scan.ENV_BACKEND, "triton")  # the environment wins over the config
    with pytest.raises(RuntimeError, match="'triton' was forced but cannot run here: needs a CUDA tensor"):
        scan.resolve_backend("torch", cpu, 8, torch.float32)
    monkeypatch.setenv(scan.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match="unknown scan backend 'fast'"):
        scan.resolve_backend("auto", cpu, 8, torch.float32)


def test_auto_on_cuda_falls_back_with_one_warning_naming_each_reason(fresh_choice, monkeypatch, caplog):
    """A d_state the Triton scan does not support (or no triton at all) and a mamba-ssm that does not import: the
    PyTorch scan, one warning saying why (decided before anything touches the GPU, so this runs without one)."""
    monkeypatch.setitem(scan._kernels, "mamba_ssm", None)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger=scan.logger.name):
        for _ in range(3):
            assert scan.resolve_backend("auto", cuda, 6, torch.bfloat16) == "torch"
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    triton_reason = "needs a power-of-two d_state, got 6" if scan._kernel("triton") else "does not import"
    assert f"triton {triton_reason}" in message and "mamba_ssm does not import" in message, message
    with pytest.raises(RuntimeError, match=f"'triton' was forced but cannot run here: {triton_reason}"):
        scan.resolve_backend("triton", cuda, 6, torch.float32)


def test_self_check_runs_at_the_calls_d_state_and_dtype(fresh_choice, monkeypatch):
    """A kernel that is right only for d_state 8 in float32 is chosen exactly there, each case checked once."""
    calls = []

    def kernel_right_for_d_state_8_fp32(u, delta, A, B, C, D, delta_bias, delta_softplus):
        calls.append((A.shape[1], u.dtype))
        y = scan.selective_scan_sequential(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)
        return y if (A.shape[1], u.dtype) == (8, torch.float32) else y + 1

    monkeypatch.setitem(scan._kernels, "triton", kernel_right_for_d_state_8_fp32)
    monkeypatch.setitem(scan._kernels, "mamba_ssm", None)
    monkeypatch.setattr(scan, "_unsupported", lambda name, device, d_state: None if name == "triton" else "absent")
    cpu = torch.device("cpu")
    for _ in range(2):
        assert scan.resolve_backend("auto", cpu, 8, torch.float32) == "triton"
        assert scan.resolve_backend("auto", cpu, 16, torch.float32) == "torch"
        assert scan.resolve_backend("auto", cpu, 8, torch.bfloat16) == "torch"
    assert calls == [(8, torch.float32), (16, torch.float32), (8, torch.bfloat16)]
    with pytest.raises(RuntimeError, match="'triton' was forced but cannot run here: is off by"):
        scan.resolve_backend("triton", cpu, 16, torch.float32)


def test_torch_backend_loops_in_eager_on_cpu_and_chunks_when_compiled(fresh_choice):
    inputs = {k: v.detach() for k, v in random_problem(2, 6, 8, 50, seed=4).items()}

    def dispatched(u, delta, A, B, C, D, delta_bias):
        return scan.selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias)

    order = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    args = [inputs[k] for k in order]
    torch.testing.assert_close(dispatched(*args), run(scan.selective_scan_sequential, inputs), rtol=0, atol=0)
    compiled = torch.compile(dispatched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), run(scan.selective_scan_chunked, inputs), rtol=0, atol=0)


@needs_shared
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_model_with_chunked_scan_matches_original_outputs(name, monkeypatch):
    """The chunked scan (what compiled and exported graphs and GPUs run) in the whole model, against the
    original's outputs at every fixture size: float32 precision (1e-5 relative)."""
    monkeypatch.setattr(scan, "selective_scan_sequential", scan.selective_scan_chunked)  # the eager-CPU dispatch too
    config, state_dict, expected = load_fixture(name)
    model = modeling.MambaVisionModelForImageClassification(config).eval()
    model.load_state_dict(state_dict, strict=True)
    for size in FIXTURE_SIZES:
        with torch.no_grad():
            logits = model(expected[f"input_{size}"]).logits
        assert_close_relative(logits, expected[f"logits_{size}"], what=f"{name} logits {size}")

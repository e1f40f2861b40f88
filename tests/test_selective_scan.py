"""The PyTorch selective scan against a naive float64 loop, and the backend switch."""

import pytest
import torch
import torch.nn.functional as F

from mambavision_tools import model_code

scan = model_code.load("selective_scan")


def naive_scan(u, delta, A, B, C, D, delta_bias):
    """The recurrence written out step by step in float64, straight from its definition."""
    u, delta, A, B, C, D, delta_bias = (t.double() for t in (u, delta, A, B, C, D, delta_bias))
    delta = F.softplus(delta + delta_bias[:, None])
    batch, dim, length = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)


def random_problem(batch, dim, d_state, length, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(
        u=torch.randn(batch, dim, length, generator=gen),
        delta=torch.randn(batch, dim, length, generator=gen) * 0.5,
        A=-torch.exp(torch.randn(dim, d_state, generator=gen)),
        B=torch.randn(batch, d_state, length, generator=gen),
        C=torch.randn(batch, d_state, length, generator=gen),
        D=torch.randn(dim, generator=gen),
        delta_bias=torch.randn(dim, generator=gen) * 0.5,
    )
    return {k: v.requires_grad_() for k, v in tensors.items()}


@pytest.mark.parametrize("shape", [(2, 16, 8, 49), (1, 6, 8, 1), (3, 10, 4, 37)])
def test_reference_scan_matches_naive_loop(shape):
    inputs = random_problem(*shape, seed=sum(shape))
    got = scan.selective_scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                                  delta_bias=inputs["delta_bias"], delta_softplus=True)
    want = naive_scan(**inputs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    weight = torch.randn_like(want)
    got_grads = torch.autograd.grad((got * weight.float()).sum(), list(inputs.values()))
    want_grads = torch.autograd.grad((want * weight).sum(), list(inputs.values()))
    for name, g, w in zip(inputs, got_grads, want_grads):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4 * w.abs().max().item(), msg=name)


def test_reference_scan_keeps_dtype_and_returns_state():
    inputs = {k: v.detach() for k, v in random_problem(2, 4, 8, 5, seed=0).items()}
    y, state = scan.selective_scan_ref(inputs["u"].half(), inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                       inputs["D"], delta_bias=inputs["delta_bias"], delta_softplus=True,
                                       return_last_state=True)
    assert y.dtype == torch.float16 and state.shape == (2, 4, 8) and state.dtype == torch.float32


def test_backend_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(scan.ENV_BACKEND, raising=False)
    assert scan.resolve_backend("auto", cpu) == "torch"
    assert scan.resolve_backend("torch", cpu) == "torch"
    with pytest.raises(RuntimeError, match="'mamba_ssm' was forced"):
        scan.resolve_backend("mamba_ssm", cpu)
    monkeypatch.setenv(scan.ENV_BACKEND, "mamba_ssm")  # the environment wins over the config
    with pytest.raises(RuntimeError, match="'mamba_ssm' was forced"):
        scan.resolve_backend("torch", cpu)
    monkeypatch.setenv(scan.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match="unknown scan backend 'fast'"):
        scan.resolve_backend("auto", cpu)

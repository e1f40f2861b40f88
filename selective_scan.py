"""Selective scan (the S6 recurrence of Mamba) for MambaVision, with one dispatcher over its backends.

Every backend has the signature of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

    u, delta: (batch, dim, length)    A: (dim, d_state)    B, C: (batch, d_state, length)
    D: (dim,)    z: (batch, dim, length) or None    delta_bias: (dim,) or None

    delta = softplus(delta + delta_bias)                      (when delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (state (dim, d_state), float32)
    y_t   = <h_t, C_t> + D * u_t,  then  y * silu(z)          (when z is given)

Backends: ``torch`` (this file, runs anywhere, differentiable), ``triton`` (``selective_scan_triton.py``,
CUDA, forward and backward, nothing to compile) and ``mamba_ssm`` (its CUDA kernel, used only when
installed and verified on the device). ``MAMBAVISION_SCAN_BACKEND`` or the config's
``scan_backend`` force one; ``auto`` picks the fastest that works for the tensors at hand.
"""

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_BACKEND = "MAMBAVISION_SCAN_BACKEND"


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Pure-PyTorch selective scan in float32: the reference every other backend is tested against.

    The element-wise work is vectorised over (batch, dim, d_state) and laid out time-major, so the
    sequential part is one fused multiply-add per step on a contiguous slice. Autocast is off inside:
    the scan stays float32 under mixed precision, as mamba-ssm's kernel does.
    """
    with torch.autocast(u.device.type, enabled=False):
        y, state = _scan_float32(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y = y.to(u.dtype)
    return (y, state) if return_last_state else y


def _scan_float32(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_t = delta.permute(2, 0, 1)  # (L, b, d)
    decay = torch.exp(delta_t.unsqueeze(-1) * A)  # (L, b, d, n)
    drive = (delta_t * u.permute(2, 0, 1)).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)  # (L, b, d, n)
    state = torch.zeros_like(drive[0])
    states = []
    for step in range(u.shape[-1]):
        state = torch.addcmul(drive[step], decay[step], state)
        states.append(state)
    y = torch.einsum("lbdn,bnl->bdl", torch.stack(states), C)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y, state


def _triton_scan():
    """This project's Triton scan if Triton imports, else None."""
    try:
        from .selective_scan_triton import selective_scan_triton
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        logger.debug("Triton scan unavailable: %s", error)
        return None
    return selective_scan_triton


def _mamba_ssm_scan():
    """mamba-ssm's CUDA ``selective_scan_fn`` if it imports, else None (a broken install is common)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        logger.debug("mamba-ssm unavailable: %s", error)
        return None
    return selective_scan_fn


_verified = {}


def _works_on(name, scan, device):
    """Run ``scan`` once on a small problem on ``device`` and compare it with the reference (cached)."""
    key = (name, str(device))
    if key not in _verified:
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            b, d, n, length = 2, 16, 8, 33
            args = [torch.randn(b, d, length, generator=gen), torch.randn(b, d, length, generator=gen),
                    -torch.rand(d, n, generator=gen) - 0.5, torch.randn(b, n, length, generator=gen),
                    torch.randn(b, n, length, generator=gen), torch.randn(d, generator=gen)]
            bias = torch.randn(d, generator=gen)
            args = [t.to(device) for t in args]
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                got = scan(*args, delta_bias=bias.to(device), delta_softplus=True)
                want = selective_scan_ref(*args, delta_bias=bias.to(device), delta_softplus=True)
            _verified[key] = bool(torch.allclose(got.float(), want, rtol=1e-3, atol=1e-3))
        except Exception as error:  # noqa: BLE001 - a kernel that raises does not work
            _warn_once(f"MambaVision: the {name} selective scan failed its self-check on {device}: {error}")
            _verified[key] = False
    return _verified[key]


_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


_FAST_BACKENDS = {"mamba_ssm": _mamba_ssm_scan, "triton": _triton_scan}  # in order of preference
_kernels = {}


def _kernel(name):
    """A fast backend's scan function, imported once (None when it does not import): a failed import is
    not cached by Python, and this runs on every mixer call."""
    if name not in _kernels:
        _kernels[name] = _FAST_BACKENDS[name]()
    return _kernels[name]


@torch.compiler.assume_constant_result
def resolve_backend(requested, device):
    """The one place that decides which scan runs: ``requested`` ("auto" or a backend) for ``device``.

    The environment variable wins over the config. A forced backend that cannot run raises; "auto" takes
    the first fast backend that works on a CUDA device, else the PyTorch scan, warning once when a CUDA
    tensor misses its fast kernel. Compiled graphs see the answer as a constant.
    """
    requested = os.environ.get(ENV_BACKEND, requested) or "auto"
    if requested == "torch":
        return "torch"
    if requested != "auto" and requested not in _FAST_BACKENDS:
        raise ValueError(f"unknown scan backend {requested!r}; choose auto, torch, triton or mamba_ssm")
    candidates = _FAST_BACKENDS if requested == "auto" else [requested]
    for name in candidates:
        scan = _kernel(name) if device.type == "cuda" else None
        if scan is not None and _works_on(name, scan, device):
            return name
    if requested != "auto":
        raise RuntimeError(f"scan backend {requested!r} was forced but does not work on {device}")
    if device.type == "cuda":
        _warn_once("MambaVision: no working fast selective-scan kernel for CUDA; using the slower PyTorch scan.")
    return "torch"


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend="auto"):
    """Dispatch to the chosen backend (see ``resolve_backend``)."""
    name = resolve_backend(backend, u.device)
    scan = selective_scan_ref if name == "torch" else _kernel(name)
    return scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)

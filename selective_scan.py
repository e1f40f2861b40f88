"""Selective scan (the S6 recurrence of Mamba) for MambaVision, with one dispatcher over its backends.

Every backend has the signature of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

    u, delta: (batch, dim, length)    A: (dim, d_state), negative    B, C: (batch, d_state, length)
    D: (dim,)    z: (batch, dim, length) or None    delta_bias: (dim,) or None

    delta = softplus(delta + delta_bias)                      (when delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (state (dim, d_state), float32)
    y_t   = <h_t, C_t> + D * u_t,  then  y * silu(z)          (when z is given)

Backends (``SCAN_BACKENDS``, named in the configuration): ``torch`` (this file: runs anywhere, differentiable;
``selective_scan_chunked``, loop-free, for compiled and exported graphs and GPUs, the step loop
``selective_scan_sequential`` in eager on a CPU), ``triton`` (``selective_scan_triton.py``: CUDA, power-of-two
d_state, no z) and ``mamba_ssm`` (its CUDA kernel, when installed). ``resolve_backend`` makes the one choice;
``MAMBAVISION_SCAN_BACKEND`` or the config's ``scan_backend`` force a backend, ``auto`` takes the fastest that
supports the tensors at hand and passes a self-check against ``selective_scan_sequential``.
"""

import logging
import math
import os

import torch
import torch.nn.functional as F

from .compatibility_mambavision import is_compiling
from .configuration_mambavision import check_backend_name

logger = logging.getLogger(__name__)

ENV_BACKEND = "MAMBAVISION_SCAN_BACKEND"

# The chunked scan: CHUNK tokens per chunk. A step's log-decay is floored at LOG_DECAY_FLOOR (exp(-20) = 2e-9:
# such a step forgets its state to float32 precision), so a chunk's decays span at most CHUNK * 20 in log space
# and the factors exp(+-span / 2) <= e^60 stay far inside float32's range (CHUNK <= 6). 6 measured best on a
# 2-core CPU: onnxruntime latency equal to 4 and 5, the fewest ONNX nodes, the fastest export (benchmarks/NOTES.md).
CHUNK = 6
LOG_DECAY_FLOOR = -20.0


def selective_scan_sequential(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The recurrence step by step in float32: the ``torch`` backend in eager mode on a CPU, and what the fast
    kernels' self-check compares with.

    The element-wise work is vectorised over (batch, dim, d_state) and laid out time-major, so the
    sequential part is one fused multiply-add per step on a contiguous slice; without autograd the steps
    overwrite the drive in place (no allocation per step, no stacking). Autocast is off inside: the scan
    stays float32 under mixed precision, as mamba-ssm's kernel does.
    """
    dtype = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = _float32_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
        delta_t = delta.permute(2, 0, 1)  # (L, b, d)
        decay = torch.exp(delta_t.unsqueeze(-1) * A).unbind(0)  # L x (b, d, n)
        states = (delta_t * u.permute(2, 0, 1)).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)  # drive (L, b, d, n)
        if states.requires_grad:
            steps = [torch.zeros_like(states[0])]
            for decay_t, drive_t in zip(decay, states.unbind(0)):
                steps.append(torch.addcmul(drive_t, decay_t, steps[-1]))
            states = torch.stack(steps[1:])
        else:
            steps = states.unbind(0)
            for t in range(1, len(steps)):
                steps[t].addcmul_(decay[t], steps[t - 1])
        y = torch.einsum("lbdn,bnl->bdl", states, C)
        y = _output(y, u, D, z)
    return (y.to(dtype), states[-1]) if return_last_state else y.to(dtype)


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The recurrence without a loop over tokens, in float32: compiled and exported graphs, GPUs.

    Within a chunk the decays are a cumulative sum in log space, h_t = sum_s exp(S_t - S_s) x_s, computed
    as exp(S_t - m) * cumsum(exp(m - S_s) x_s) around the chunk's middle m; the chunks' end states follow
    the same recurrence one level up (a tree of ~log_CHUNK(length) levels, all static shapes).
    """
    dtype = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = _float32_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
        u_t, delta_t = u.transpose(1, 2), delta.transpose(1, 2)  # (b, L, d): the mixer's token layout in memory
        log_decay = delta_t.unsqueeze(-1) * A  # (b, L, d, n)
        drive = (delta_t * u_t).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)  # (b, L, d, n)
        states = _linear_recurrence(log_decay, drive)
        y = (states * C.transpose(1, 2).unsqueeze(2)).sum(-1).transpose(1, 2)  # (b, L, d) -> (b, d, L)
        y = _output(y, u, D, z)
    return (y.to(dtype), states[:, -1]) if return_last_state else y.to(dtype)


def _linear_recurrence(log_decay, drive):
    """States of h_t = exp(log_decay_t) * h_{t-1} + drive_t from h_{-1} = 0, along dim 1 of (b, L, d, n)."""
    length = log_decay.shape[1]
    pad = -length % CHUNK  # padded steps keep the state (decay 1, drive 0) and are cut off below
    log_decay = log_decay.clamp(min=LOG_DECAY_FLOOR)
    if pad:
        log_decay, drive = F.pad(log_decay, (0, 0, 0, 0, 0, pad)), F.pad(drive, (0, 0, 0, 0, 0, pad))
    chunks = (length + pad) // CHUNK
    cumulative = log_decay.unflatten(1, (chunks, CHUNK)).cumsum(2)  # S_t within each chunk, in [CHUNK * floor, 0]
    middle = CHUNK * LOG_DECAY_FLOOR / 2
    scale = torch.exp(cumulative - middle)
    states = scale * (torch.exp(middle - cumulative) * drive.unflatten(1, (chunks, CHUNK))).cumsum(2)
    if chunks > 1:  # carry in each chunk's incoming state, from the same recurrence over the chunks' ends
        ends = _linear_recurrence(cumulative[:, :, -1], states[:, :, -1])  # (b, chunks, d, n)
        incoming = F.pad(ends, (0, 0, 0, 0, 1, -1)).unsqueeze(2)  # the state before each chunk, zero for the first
        states = torch.addcmul(states, scale, incoming, value=math.exp(middle))  # + exp(S_t) * incoming
    states = states.flatten(1, 2)
    return states[:, :length] if pad else states


def _float32_inputs(u, delta, A, B, C, delta_bias, delta_softplus):
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A, B, C


def _output(y, u, D, z):
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


# ---------------------------------------------------------------------------------------------------------
# The fast kernels: guarded imports, each done once (a failed import is not cached by Python, and the
# dispatcher runs on every mixer call), what each supports, and a one-time self-check per case.

_kernels = {}  # backend name -> its scan function, or None when it does not import
_checked = {}  # (backend, device, d_state, dtype) -> None when its self-check passed, else why not
_warned = set()


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


# the fast backends in the order "auto" tries them: fastest first (eager MambaVision-T on an H100,
# bf16, batch 256: Triton 13,922 img/s, mamba-ssm 13,588)
_FAST_BACKENDS = {"triton": _triton_scan, "mamba_ssm": _mamba_ssm_scan}


def _kernel(name):
    if name not in _kernels:
        _kernels[name] = _FAST_BACKENDS[name]()
    return _kernels[name]


def _unsupported(name, device, d_state):
    """Why fast backend ``name`` cannot run the scan for these tensors, or None when it can (decided before
    anything touches the GPU)."""
    if device.type != "cuda":
        return f"needs a CUDA tensor, got one on {device.type}"
    if _kernel(name) is None:
        return "does not import (see the debug log)"
    if name == "triton":  # the kernel's own rule (it imported, just above)
        from .selective_scan_triton import d_state_problem

        return d_state_problem(d_state)
    return None


def _self_check_failure(name, device, d_state, dtype):
    """Run backend ``name`` once on a small problem of this d_state and input dtype on ``device`` and compare
    it with the reference: None when it agrees, else what went wrong (cached per case)."""
    key = (name, str(device), d_state, dtype)
    if key not in _checked:
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            b, d, length = 2, 16, 33
            u, delta = torch.randn(2, b, d, length, generator=gen).to(device, dtype)
            B, C = torch.randn(2, b, d_state, length, generator=gen).to(device, dtype)
            A = (-torch.rand(d, d_state, generator=gen) - 0.5).to(device)
            D, bias = torch.randn(2, d, generator=gen).to(device)
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                got = _kernel(name)(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True).float()
                want = selective_scan_sequential(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True).float()
            error = ((got - want).norm() / want.norm()).item()
            tolerance = 1e-3 if dtype == torch.float32 else 2e-2
            _checked[key] = None if error <= tolerance else f"is off by {error:.1e} in its self-check"
        except Exception as error:  # noqa: BLE001 - a kernel that raises does not work
            _checked[key] = f"failed its self-check: {type(error).__name__}: {error}"
    return _checked[key]


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


@torch.compiler.assume_constant_result
def resolve_backend(requested, device, d_state, dtype):
    """The one place that decides which scan runs: ``requested`` ("auto" or a backend) for a scan on
    ``device`` with this ``d_state`` and input ``dtype``.

    The environment variable wins over the config. A forced backend that cannot run raises; "auto" takes
    the first fast backend that supports the tensors and passes its self-check, else the PyTorch scan,
    warning once when a CUDA tensor misses every fast kernel. Compiled graphs see the answer as a constant.
    """
    requested = os.environ.get(ENV_BACKEND, requested) or "auto"
    check_backend_name(requested, ENV_BACKEND if ENV_BACKEND in os.environ else "the requested backend")
    if requested == "torch":
        return "torch"
    reasons = {}
    for name in _FAST_BACKENDS if requested == "auto" else [requested]:
        reasons[name] = _unsupported(name, device, d_state) or _self_check_failure(name, device, d_state, dtype)
        if reasons[name] is None:
            return name
    if requested != "auto":
        raise RuntimeError(f"scan backend {requested!r} was forced but cannot run here: {reasons[requested]}")
    if device.type == "cuda":
        why = "; ".join(f"{name} {reason}" for name, reason in reasons.items())
        _warn_once(f"MambaVision: no fast selective-scan kernel for this CUDA scan ({why}); using the PyTorch scan.")
    return "torch"


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend="auto"):
    """Dispatch to the chosen backend (see ``resolve_backend``). The ``torch`` backend runs the chunked scan,
    except in eager mode on a CPU: there the step loop is faster (its steps are small, and the chunked form
    makes about a dozen full passes over the (b, L, d, n) states; benchmarks/NOTES.md has the numbers)."""
    name = resolve_backend(backend, u.device, A.shape[1], u.dtype)
    if name != "torch":
        scan = _kernel(name)
    elif u.device.type == "cpu" and not is_compiling():
        scan = selective_scan_sequential
    else:
        scan = selective_scan_chunked
    return scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)

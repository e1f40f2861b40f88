"""Triton selective scan for MambaVision: forward and backward, registered as a torch custom op.

Specialised for what MambaVision needs (no z gate, delta bias + softplus, small d_state, window-length
sequences). Each program owns one sequence and a block of channels; it walks the sequence in chunks,
and inside a chunk the linear recurrence h_t = a_t * h_{t-1} + b_t runs as a parallel associative scan.
The longest sequences at inference are cut into splits scanned in parallel: a first pass finds each split's end state
from zero and its decay product, and the forward kernel enters each split with the state they compose to.
The state stays in float32 whatever the input dtype. Training saves only the state at each chunk start;
the backward pass recomputes the chunk and runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1}
as a reverse scan, using a_t h_{t-1} = h_t - b_t so no state needs storing per step.
"""

import contextlib

import torch

try:  # optional (CUDA only): inside try, transformers' import check of remote code does not require it
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(f"the Triton scan needs triton: {error}") from error
if not hasattr(torch.library, "custom_op"):  # the dispatcher falls back to the PyTorch scan
    raise ImportError(f"the Triton scan needs torch >= 2.4 (torch.library.custom_op), found {torch.__version__}")

# (channels per program, chunk length, warps): inference needs no saved states and takes its own shape
INFER_CONFIG = (8, 16, 1)
# Windows of 32x32 tokens and more (dense prediction at 512 and up) come as few long sequences: fewer channels per
# program keep the multiprocessors busy (benchmarks/NOTES.md, 2026-12-04: T's level 2 at 512, 4,096 tokens,
# 318 us at (2, 32, 1) against 500+ at (8, 16, 1))
LONG_SEQUENCE, LONG_INFER_CONFIG, MIN_PROGRAMS = 1024, (4, 32, 1), 1024
# Only the longest sequences gain from being cut into splits scanned in parallel (a first pass for each split's end
# state and decay product, then the forward kernel entering each split with the state they compose to): every split
# is walked twice, and the scan is bound by its arithmetic more than by its serial walk. H200 (benchmarks/NOTES.md,
# 2026-12-04, third session): one split was fastest at every shape of 4,096 tokens or fewer; at 12,544 (detection's
# 112x112 window) 12 splits at (4, 32, 1) took 546 us against 788 unsplit for T's 8 x 160 channels, 813 against 859
# for B's 8 x 256.
SPLIT_FROM, SPLIT_CONFIG = 8192, (4, 32, 1, 12)
TRAIN_CONFIG = (16, 4, 2)  # the backward pass reads states saved at this chunk length


def infer_config(batch, dim, length):
    """The inference launch config (channels per program, chunk length, warps, splits) for ``batch`` sequences of
    ``dim`` channels and ``length`` tokens."""
    if length < LONG_SEQUENCE:
        return (*INFER_CONFIG, 1)
    if length >= SPLIT_FROM:
        return SPLIT_CONFIG
    block, chunk, warps = LONG_INFER_CONFIG
    return (block if batch * dim // block >= MIN_PROGRAMS else block // 2), chunk, warps, 1


@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    """Compose two affine steps x -> a x + b: first ``(a_first, b_first)``, then ``(a_then, b_then)``."""
    return a_first * a_then, b_first * a_then + b_then


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias, A, pid_b, offs_d, mask_d, t, mask_t, offs_n,
                su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l):
    """One chunk's inputs in float32: u, raw delta, delta, B, C, the decay a and the drive b = delta u B."""
    mask = mask_t[:, None] & mask_d[None, :]
    u = tl.load(u_ptr + pid_b * su_b + offs_d[None, :] * su_d + t[:, None] * su_l, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(delta_ptr + pid_b * sdt_b + offs_d[None, :] * sdt_d + t[:, None] * sdt_l, mask=mask,
                  other=0.0).to(tl.float32) + bias[None, :]
    delta = tl.where(mask, _softplus(raw), 0.0)  # (CHUNK, BLOCK_D)
    B = tl.load(B_ptr + pid_b * sB_b + offs_n[None, :] * sB_n + t[:, None] * sB_l, mask=mask_t[:, None],
                other=0.0).to(tl.float32)  # (CHUNK, N)
    C = tl.load(C_ptr + pid_b * sC_b + offs_n[None, :] * sC_n + t[:, None] * sC_l, mask=mask_t[:, None],
                other=0.0).to(tl.float32)
    a = tl.exp(delta[:, :, None] * A[None, :, :])  # (CHUNK, BLOCK_D, N); 1 where masked: state carries over
    b = (delta * u)[:, :, None] * B[:, None, :]
    return u, raw, delta, B, C, a, b


@triton.jit
def _row(x, rows, index):
    """Row ``index`` of a (CHUNK, ...) block, as a masked sum (register blocks cannot be indexed)."""
    return tl.sum(tl.where((rows == index)[:, None, None], x, 0.0), axis=0)


@triton.jit
def _program_channels(A_ptr, D_ptr, bias_ptr, pid_d, dim, N: tl.constexpr, BLOCK: tl.constexpr,
                      CHUNK_L: tl.constexpr):
    """This program's channel block: offsets, mask, state and row indices, and its A, D, delta_bias."""
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask_d = offs_d < dim
    offs_n = tl.arange(0, N)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None], other=0.0).to(tl.float32)
    D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, mask_d, offs_n, tl.arange(0, CHUNK_L), A, D, bias


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, states_ptr, split_end_ptr, split_decay_ptr,
    L, dim, split_len,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sy_b, sy_d, sy_l,
    N: tl.constexpr, BLOCK: tl.constexpr, CHUNK_L: tl.constexpr, SAVE_STATES: tl.constexpr,
    SPLIT_SUMMARY: tl.constexpr,
):
    """One (sequence, channel block, split of ``split_len`` tokens): writes y, entering the split with the state
    composed from the earlier splits' summaries (none with one split); or, with ``SPLIT_SUMMARY``, writes the
    split's summary instead of y: its end state from a zero start and its decay product, (batch, dim, splits - 1, N).
    """
    pid_b, pid_d, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d, mask_d, offs_n, rows, A, D, bias = _program_channels(A_ptr, D_ptr, bias_ptr, pid_d, dim, N, BLOCK, CHUNK_L)
    summaries = tl.cdiv(L, split_len) - 1
    summary = ((pid_b * dim + offs_d[:, None]) * summaries) * N + offs_n[None, :]  # split 0's, (BLOCK, N)
    state = tl.zeros((BLOCK, N), dtype=tl.float32)
    if SPLIT_SUMMARY:
        split_decay = tl.full((BLOCK, N), 1.0, dtype=tl.float32)
    else:
        for earlier in range(split):  # H_0 = 0, H_{s+1} = P_s H_s + h_s: the state entering this split
            state = (tl.load(split_decay_ptr + summary + earlier * N, mask=mask_d[:, None], other=0.0) * state
                     + tl.load(split_end_ptr + summary + earlier * N, mask=mask_d[:, None], other=0.0))
    start = split * split_len
    stop = tl.minimum(start + split_len, L)
    num_chunks = tl.cdiv(L, CHUNK_L)
    for chunk in range(start // CHUNK_L, tl.cdiv(stop, CHUNK_L)):
        if SAVE_STATES:  # (batch, dim, chunks, N): the state entering each chunk, for the backward pass
            tl.store(states_ptr + ((pid_b * dim + offs_d[:, None]) * num_chunks + chunk) * N + offs_n[None, :],
                     state, mask=mask_d[:, None])
        t = chunk * CHUNK_L + rows
        mask_t = t < stop
        u, raw, delta, B, C, a, b = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, A, pid_b, offs_d, mask_d, t, mask_t, offs_n,
            su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l)
        decay, h = tl.associative_scan((a, b), axis=0, combine_fn=_compose)
        h = h + decay * state[None, :, :]
        state = _row(h, rows, CHUNK_L - 1)
        if SPLIT_SUMMARY:
            split_decay = split_decay * _row(decay, rows, CHUNK_L - 1)
        else:
            y = tl.sum(h * C[:, None, :], axis=2) + D[None, :] * u
            tl.store(y_ptr + pid_b * sy_b + offs_d[None, :] * sy_d + t[:, None] * sy_l,
                     y.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])
    if SPLIT_SUMMARY:
        tl.store(split_end_ptr + summary + split * N, state, mask=mask_d[:, None])
        tl.store(split_decay_ptr + summary + split * N, split_decay, mask=mask_d[:, None])


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, states_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, L, dim,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sdy_b, sdy_d, sdy_l,
    N: tl.constexpr, BLOCK: tl.constexpr, CHUNK_L: tl.constexpr,
):
    """Gradients of one (sequence, channel block); per-program partial sums for the shared tensors.

    du, ddelta: (batch, dim, L) float32. dB, dC: (batch, dim_blocks, N, L). dA: (batch, dim, N).
    dD, dbias: (batch, dim).
    """
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d, mask_d, offs_n, rows, A, D, bias = _program_channels(A_ptr, D_ptr, bias_ptr, pid_d, dim, N, BLOCK, CHUNK_L)
    num_chunks = tl.cdiv(L, CHUNK_L)
    grad_next = tl.zeros((BLOCK, N), dtype=tl.float32)  # g at the first step of the later chunk
    dA = tl.zeros((BLOCK, N), dtype=tl.float32)
    dD = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    for step in range(num_chunks):
        chunk = num_chunks - 1 - step
        t = chunk * CHUNK_L + rows
        mask_t = t < L
        mask = mask_t[:, None] & mask_d[None, :]
        u, raw, delta, B, C, a, b = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, A, pid_b, offs_d, mask_d, t, mask_t, offs_n,
            su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l)
        state = tl.load(states_ptr + ((pid_b * dim + offs_d[:, None]) * num_chunks + chunk) * N + offs_n[None, :],
                        mask=mask_d[:, None], other=0.0)
        decay, h = tl.associative_scan((a, b), axis=0, combine_fn=_compose)
        h = h + decay * state[None, :, :]
        # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, a reverse scan of the steps (a_{t+1}, C_t dy_t)
        dy = tl.load(dy_ptr + pid_b * sdy_b + offs_d[None, :] * sdy_d + t[:, None] * sdy_l, mask=mask,
                     other=0.0).to(tl.float32)
        next_mask = (t + 1 < L)[:, None] & mask_d[None, :]
        raw_next = tl.load(delta_ptr + pid_b * sdt_b + offs_d[None, :] * sdt_d + (t[:, None] + 1) * sdt_l,
                           mask=next_mask, other=0.0).to(tl.float32) + bias[None, :]
        delta_next = tl.where(next_mask, _softplus(raw_next), 0.0)
        a_next = tl.where(next_mask[:, :, None], tl.exp(delta_next[:, :, None] * A[None, :, :]), 0.0)
        carried, g = tl.associative_scan((a_next, dy[:, :, None] * C[:, None, :]), axis=0, combine_fn=_compose,
                                         reverse=True)
        g = g + carried * grad_next[None, :, :]
        grad_next = _row(g, rows, 0)
        decayed = h - b  # a_t * h_{t-1}, without storing h_{t-1}
        ddelta = tl.sum(g * (decayed * A[None, :, :] + u[:, :, None] * B[:, None, :]), axis=2)
        du = tl.sum(g * B[:, None, :], axis=2) * delta + dy * D[None, :]
        draw = tl.where(mask, ddelta * tl.sigmoid(raw), 0.0)
        dA += tl.sum(g * decayed * delta[:, :, None], axis=0)
        dD += tl.sum(dy * u, axis=0)
        dbias += tl.sum(draw, axis=0)
        out = pid_b * dim * L + offs_d[None, :] * L + t[:, None]
        tl.store(du_ptr + out, du, mask=mask)
        tl.store(ddelta_ptr + out, draw, mask=mask)
        part = ((pid_b * tl.num_programs(1) + pid_d) * N + offs_n[None, :]) * L + t[:, None]  # (CHUNK, N)
        tl.store(dB_ptr + part, tl.sum(g * (delta * u)[:, :, None], axis=1), mask=mask_t[:, None])
        tl.store(dC_ptr + part, tl.sum(h * dy[:, :, None], axis=1), mask=mask_t[:, None])
    tl.store(dA_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :], dA, mask=mask_d[:, None])
    tl.store(dD_ptr + pid_b * dim + offs_d, dD, mask=mask_d)
    tl.store(dbias_ptr + pid_b * dim + offs_d, dbias, mask=mask_d)


def _grid(batch, dim, block):
    return (batch, triton.cdiv(dim, block))


def _on_device(tensor):
    """Launch on the tensor's GPU (CPU tensors only run under TRITON_INTERPRET=1)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def scan_forward(u, delta, A, B, C, D, delta_bias, config, states=None):
    """y of the scan at launch config ``(block, chunk, warps, splits)``, saving the state entering each chunk
    into ``states`` (batch, dim, chunks, N) when given (one split only). The op below calls it with
    ``infer_config``'s or ``TRAIN_CONFIG``'s choice; tests and benchmarks force others."""
    block, chunk, warps, splits = config
    batch, dim, length = u.shape
    n = A.shape[1]
    split_len = triton.cdiv(triton.cdiv(length, splits), chunk) * chunk  # whole chunks; the last split may be short
    splits = triton.cdiv(length, split_len)
    if states is not None and splits > 1:
        raise ValueError(f"saving chunk states needs one split, got {splits}")
    y = torch.empty_like(u)  # in u's layout: a (B, C, L) view of (B, L, C) tokens stays one
    # each split's end state from a zero start and its decay product (the last split's is not needed)
    split_end, split_decay = (torch.empty(batch, dim, splits - 1, n, device=u.device, dtype=torch.float32)
                              for _ in range(2))
    args = (u, delta, A.contiguous(), B, C, D.contiguous(), delta_bias.contiguous(), y,
            split_end if states is None else states, split_end, split_decay, length, dim, split_len,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *y.stride())
    meta = dict(N=n, BLOCK=block, CHUNK_L=chunk, SAVE_STATES=states is not None, num_warps=warps)
    with _on_device(u):
        if splits > 1:
            _scan_fwd_kernel[(*_grid(batch, dim, block), splits - 1)](*args, SPLIT_SUMMARY=True, **meta)
        _scan_fwd_kernel[(*_grid(batch, dim, block), splits)](*args, SPLIT_SUMMARY=False, **meta)
    return y


def _register_ops():
    """Define the forward/backward custom ops once per process (this file may be imported twice)."""
    if hasattr(torch.ops.mambavision, "selective_scan_fwd"):
        return torch.ops.mambavision.selective_scan_fwd

    @torch.library.custom_op("mambavision::selective_scan_fwd", mutates_args=())
    def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, delta_bias: torch.Tensor, save_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
        batch, dim, length = u.shape
        chunks = triton.cdiv(length, TRAIN_CONFIG[1]) if save_states else 0
        states = torch.empty(batch, dim, chunks, A.shape[1], device=u.device, dtype=torch.float32)
        if save_states:
            return scan_forward(u, delta, A, B, C, D, delta_bias, (*TRAIN_CONFIG, 1), states), states
        return scan_forward(u, delta, A, B, C, D, delta_bias, infer_config(batch, dim, length)), states

    @_scan_fwd.register_fake
    def _(u, delta, A, B, C, D, delta_bias, save_states):
        chunks = -(-u.shape[2] // TRAIN_CONFIG[1]) if save_states else 0
        return torch.empty_like(u), u.new_empty(
            u.shape[0], u.shape[1], chunks, A.shape[1], dtype=torch.float32)

    @torch.library.custom_op("mambavision::selective_scan_bwd", mutates_args=())
    def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, delta_bias: torch.Tensor, states: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
        batch, dim, length = u.shape
        n = A.shape[1]
        block, chunk, warps = TRAIN_CONFIG
        grid = _grid(batch, dim, block)
        f32 = dict(device=u.device, dtype=torch.float32)
        du, ddelta = torch.empty(batch, dim, length, **f32), torch.empty(batch, dim, length, **f32)
        dA, dD, dbias = torch.empty(batch, dim, n, **f32), torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        dB, dC = torch.empty(batch, grid[1], n, length, **f32), torch.empty(batch, grid[1], n, length, **f32)
        with _on_device(u):
            _scan_bwd_kernel[grid](
                u, delta, A.contiguous(), B, C, D.contiguous(), delta_bias.contiguous(), dy, states,
                du, ddelta, dA, dB, dC, dD, dbias, length, dim,
                *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *dy.stride(),
                N=n, BLOCK=block, CHUNK_L=chunk, num_warps=warps)
        return [du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.sum(1).to(B.dtype),
                dC.sum(1).to(C.dtype), dD.sum(0).to(D.dtype), dbias.sum(0).to(delta_bias.dtype)]

    @_scan_bwd.register_fake
    def _(u, delta, A, B, C, D, delta_bias, states, dy):
        return [t.new_empty(t.shape) for t in (u, delta, A, B, C, D, delta_bias)]  # contiguous, as computed

    def _setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, delta_bias, _ = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])

    def _backward(ctx, grad_y, _grad_states):
        grads = _scan_bwd(*ctx.saved_tensors, grad_y)
        return (*grads, None)

    _scan_fwd.register_autograd(_backward, setup_context=_setup_context)
    return _scan_fwd


_scan_fwd = _register_ops()


def d_state_problem(d_state):
    """Why this kernel cannot take ``d_state`` (it needs a power of two), or None: the entry point below refuses
    such a scan, and the dispatcher asks before it picks the kernel."""
    return f"needs a power-of-two d_state, got {d_state}" if d_state & (d_state - 1) else None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """``selective_scan_fn``'s signature for MambaVision's case: D, delta_bias and softplus, no z."""
    if z is not None or not delta_softplus or return_last_state or D is None or delta_bias is None:
        raise NotImplementedError("the Triton scan covers MambaVision's case: D, delta_bias, softplus, no z")
    if d_state_problem(A.shape[1]):
        raise NotImplementedError(f"the Triton scan {d_state_problem(A.shape[1])}")
    save_states = torch.is_grad_enabled() and any(
        t.requires_grad for t in (u, delta, A, B, C, D, delta_bias))
    return _scan_fwd(u, delta, A, B, C, D, delta_bias, save_states)[0]

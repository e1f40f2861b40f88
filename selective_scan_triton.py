"""Triton selective scan for MambaVision: forward and backward, registered as a torch custom op.

Specialised for what MambaVision needs (no z gate, delta bias + softplus, small d_state, window-length
sequences). Each program owns one sequence and a block of channels; it walks the sequence in chunks,
and inside a chunk the linear recurrence h_t = a_t * h_{t-1} + b_t runs as a parallel associative scan.
At inference over windows with many sequences x channels, each program instead walks the sequence token by
token, the state in registers (chunks of one token). The longest sequences at inference are cut into splits
scanned in parallel: a first pass finds each split's end state from zero and its decay product, and the forward
kernel enters each split with the state they compose to.
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
# Training: the forward saves the state entering each chunk of TRAIN_CONFIG's length, and the backward reads them at
# its own channel block and warps. H200, graph-captured (benchmarks/NOTES.md, 2026-12-04, fifth session), at B's
# level 2 at batch 128: forward 135 us at (16, 4, 1) against 169 at (16, 4, 2), backward 358 at (8, 1) against 448
# at (16, 2); one warp wins because the chunk's scans and sums then stay within a warp's shuffles
TRAIN_CONFIG = (16, 4, 1)
BACKWARD_CONFIG = (8, 1)  # (channels per program, warps) of the backward pass, at TRAIN_CONFIG's chunk length


# Inference over windows (fewer than LONG_SEQUENCE tokens) with many sequences x channels: chunks of one token, i.e.
# a walk along the sequence with the state in registers and the next token's loads in flight, one warp a program, the
# channel block the largest that still gives WALK_PROGRAMS programs. H200, CUDA-graph-captured (benchmarks/NOTES.md,
# 2026-12-04, sixth session), at batch 256: T's level 2 104 us against 158 chunked, level 3 33 against 96; B's 124
# against 248 and 44 against 152; L3-512's level 3 at batch 32, 129 against 157. Fewer programs keep the chunked scan,
# which also scans within chunks (T's level 2 at batch 1: 30 us against the walk's 41), as do longer sequences
# (L3-512's level 2, 1,024 tokens: 331 against 448).
WALK_BLOCKS, WALK_PROGRAMS = (64, 32, 16, 8), 2048


def infer_config(batch, dim, length):
    """The inference launch config (channels per program, chunk length, warps, splits) for ``batch`` sequences of
    ``dim`` channels and ``length`` tokens; a chunk length of 1 is the walk."""
    if length < LONG_SEQUENCE:
        walk = [block for block in WALK_BLOCKS if batch * triton.cdiv(dim, block) >= WALK_PROGRAMS]
        return (walk[0], 1, 1, 1) if walk else (*INFER_CONFIG, 1)
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
def _load_inputs(u_ptr, delta_ptr, B_ptr, C_ptr, pid_b, offs_d, mask_d, t, mask_t, offs_n,
                 su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l):
    """One chunk's u and raw delta (CHUNK, BLOCK_D) and B, C (CHUNK, N), as stored."""
    mask = mask_t[:, None] & mask_d[None, :]
    u = tl.load(u_ptr + pid_b * su_b + offs_d[None, :] * su_d + t[:, None] * su_l, mask=mask, other=0.0)
    raw = tl.load(delta_ptr + pid_b * sdt_b + offs_d[None, :] * sdt_d + t[:, None] * sdt_l, mask=mask, other=0.0)
    B = tl.load(B_ptr + pid_b * sB_b + offs_n[None, :] * sB_n + t[:, None] * sB_l, mask=mask_t[:, None], other=0.0)
    C = tl.load(C_ptr + pid_b * sC_b + offs_n[None, :] * sC_n + t[:, None] * sC_l, mask=mask_t[:, None], other=0.0)
    return u, raw, B, C


@triton.jit
def _chunk_terms(u, raw, B, C, bias, A, mask):
    """A chunk's loaded inputs in float32 (u, raw delta + bias, delta, B, C), the decay a and the drive
    b = delta u B."""
    u, B, C = u.to(tl.float32), B.to(tl.float32), C.to(tl.float32)
    raw = raw.to(tl.float32) + bias[None, :]
    delta = tl.where(mask, _softplus(raw), 0.0)  # (CHUNK, BLOCK_D)
    a = tl.exp(delta[:, :, None] * A[None, :, :])  # (CHUNK, BLOCK_D, N); 1 where masked: state carries over
    b = (delta * u)[:, :, None] * B[:, None, :]
    return u, raw, delta, B, C, a, b


@triton.jit
def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias, A, pid_b, offs_d, mask_d, t, mask_t, offs_n,
                su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l):
    """One chunk's inputs and terms (``_chunk_terms``)."""
    u, raw, B, C = _load_inputs(u_ptr, delta_ptr, B_ptr, C_ptr, pid_b, offs_d, mask_d, t, mask_t, offs_n,
                                su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l)
    return _chunk_terms(u, raw, B, C, bias, A, mask_t[:, None] & mask_d[None, :])


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
def _walk_loads(u_ptr, delta_ptr, B_ptr, C_ptr, u_row, delta_row, B_row, C_row, mask_d, t, L,
                su_l, sdt_l, sB_l, sC_l):
    """Token ``t``'s u and raw delta (BLOCK,) and B, C (N,), as stored; nothing past the end."""
    live = t < L
    u = tl.load(u_ptr + u_row + t * su_l, mask=mask_d & live, other=0.0)
    raw = tl.load(delta_ptr + delta_row + t * sdt_l, mask=mask_d & live, other=0.0)
    B = tl.load(B_ptr + B_row + t * sB_l, mask=live, other=0.0)
    C = tl.load(C_ptr + C_row + t * sC_l, mask=live, other=0.0)
    return u, raw, B, C


@triton.jit
def _scan_walk_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, L, dim,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sy_b, sy_d, sy_l,
    N: tl.constexpr, BLOCK: tl.constexpr,
):
    """One (sequence, channel block), token by token: h_t = a_t h_{t-1} + b_t in registers, y_t = C_t h_t + D u_t;
    each step computes with the token it loaded the step before while the next token's loads are in flight."""
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d, mask_d, offs_n, _, A, D, bias = _program_channels(A_ptr, D_ptr, bias_ptr, pid_d, dim, N, BLOCK, 1)
    u_row, delta_row = pid_b * su_b + offs_d * su_d, pid_b * sdt_b + offs_d * sdt_d  # token 0's offsets
    B_row, C_row = pid_b * sB_b + offs_n * sB_n, pid_b * sC_b + offs_n * sC_n
    y_row = y_ptr + pid_b * sy_b + offs_d * sy_d
    state = tl.zeros((BLOCK, N), dtype=tl.float32)
    u_in, raw_in, B_in, C_in = _walk_loads(u_ptr, delta_ptr, B_ptr, C_ptr, u_row, delta_row, B_row, C_row, mask_d,
                                           0, L, su_l, sdt_l, sB_l, sC_l)
    for t in range(L):
        u, raw, B, C = u_in.to(tl.float32), raw_in.to(tl.float32), B_in.to(tl.float32), C_in.to(tl.float32)
        u_in, raw_in, B_in, C_in = _walk_loads(u_ptr, delta_ptr, B_ptr, C_ptr, u_row, delta_row, B_row, C_row,
                                               mask_d, t + 1, L, su_l, sdt_l, sB_l, sC_l)
        delta = _softplus(raw + bias)  # (BLOCK,)
        state = tl.exp(delta[:, None] * A) * state + (delta * u)[:, None] * B[None, :]  # (BLOCK, N)
        y = tl.sum(state * C[None, :], axis=1) + D * u
        tl.store(y_row + t * sy_l, y.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _bwd_loads(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, states_ptr, pid_b, offs_d, mask_d, chunk, rows, offs_n, L, dim,
               su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sdy_b, sdy_d, sdy_l,
               N: tl.constexpr, CHUNK_L: tl.constexpr):
    """What the backward pass reads for ``chunk`` (nothing where it is -1), as stored: u, raw delta, B, C, dy, the
    raw delta one step later, and the state entering the chunk."""
    t = chunk * CHUNK_L + rows
    mask_t = (t < L) & (chunk >= 0)
    mask = mask_t[:, None] & mask_d[None, :]
    u, raw, B, C = _load_inputs(u_ptr, delta_ptr, B_ptr, C_ptr, pid_b, offs_d, mask_d, t, mask_t, offs_n,
                                su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l)
    dy = tl.load(dy_ptr + pid_b * sdy_b + offs_d[None, :] * sdy_d + t[:, None] * sdy_l, mask=mask, other=0.0)
    next_mask = (t + 1 < L)[:, None] & mask
    raw_next = tl.load(delta_ptr + pid_b * sdt_b + offs_d[None, :] * sdt_d + (t[:, None] + 1) * sdt_l,
                       mask=next_mask, other=0.0)
    num_chunks = tl.cdiv(L, CHUNK_L)
    state = tl.load(states_ptr + ((pid_b * dim + offs_d[:, None]) * num_chunks + chunk) * N + offs_n[None, :],
                    mask=mask_d[:, None] & (chunk >= 0), other=0.0)
    return u, raw, B, C, dy, raw_next, state


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, states_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, L, dim,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sdy_b, sdy_d, sdy_l,
    sdu_b, sdu_d, sdu_l, sddt_b, sddt_d, sddt_l,
    N: tl.constexpr, BLOCK: tl.constexpr, CHUNK_L: tl.constexpr,
):
    """Gradients of one (sequence, channel block); per-program partial sums for the shared tensors.

    du, ddelta: u's and delta's dtypes, any strides. Float32 partial sums: dB, dC (batch, dim_blocks, N, L),
    dA (batch, dim, N), dD and dbias (batch, dim).
    """
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d, mask_d, offs_n, rows, A, D, bias = _program_channels(A_ptr, D_ptr, bias_ptr, pid_d, dim, N, BLOCK, CHUNK_L)
    num_chunks = tl.cdiv(L, CHUNK_L)
    grad_next = tl.zeros((BLOCK, N), dtype=tl.float32)  # g at the first step of the later chunk
    dA = tl.zeros((BLOCK, N), dtype=tl.float32)
    dD = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    # the last chunk's loads; each step then loads the chunk before its own, in flight while it computes (the
    # backward is bound by its serial walk: H200, B's level 2 at batch 128, 358 us against 400 loading at the step)
    u_in, raw_in, B_in, C_in, dy_in, raw_next_in, state = _bwd_loads(
        u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, states_ptr, pid_b, offs_d, mask_d, num_chunks - 1, rows, offs_n, L,
        dim, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sdy_b, sdy_d, sdy_l, N, CHUNK_L)
    for step in range(num_chunks):
        chunk = num_chunks - 1 - step
        t = chunk * CHUNK_L + rows
        mask_t = t < L
        mask = mask_t[:, None] & mask_d[None, :]
        next_mask = (t + 1 < L)[:, None] & mask_d[None, :]
        u, raw, delta, B, C, a, b = _chunk_terms(u_in, raw_in, B_in, C_in, bias, A, mask)
        dy = dy_in.to(tl.float32)
        delta_next = tl.where(next_mask, _softplus(raw_next_in.to(tl.float32) + bias[None, :]), 0.0)
        decay, h = tl.associative_scan((a, b), axis=0, combine_fn=_compose)
        h = h + decay * state[None, :, :]
        u_in, raw_in, B_in, C_in, dy_in, raw_next_in, state = _bwd_loads(  # chunk -1 loads nothing
            u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, states_ptr, pid_b, offs_d, mask_d, chunk - 1, rows, offs_n, L,
            dim, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sdy_b, sdy_d, sdy_l,
            N, CHUNK_L)
        # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, a reverse scan of the steps (a_{t+1}, C_t dy_t)
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
        tl.store(du_ptr + pid_b * sdu_b + offs_d[None, :] * sdu_d + t[:, None] * sdu_l,
                 du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + pid_b * sddt_b + offs_d[None, :] * sddt_d + t[:, None] * sddt_l,
                 draw.to(ddelta_ptr.dtype.element_ty), mask=mask)
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
    tensors = (u, delta, A.contiguous(), B, C, D.contiguous(), delta_bias.contiguous(), y)
    strides = (*u.stride(), *delta.stride(), *B.stride(), *C.stride(), *y.stride())
    if chunk == 1 and splits == 1 and states is None:  # chunks of one token: the walk, with no chunk scan to run
        with _on_device(u):
            _scan_walk_kernel[_grid(batch, dim, block)](*tensors, length, dim, *strides, N=n, BLOCK=block,
                                                        num_warps=warps)
        return y
    # each split's end state from a zero start and its decay product (the last split's is not needed)
    split_end, split_decay = (torch.empty(batch, dim, splits - 1, n, device=u.device, dtype=torch.float32)
                              for _ in range(2))
    args = (*tensors, split_end if states is None else states, split_end, split_decay, length, dim, split_len,
            *strides)
    meta = dict(N=n, BLOCK=block, CHUNK_L=chunk, SAVE_STATES=states is not None, num_warps=warps)
    with _on_device(u):
        if splits > 1:
            _scan_fwd_kernel[(*_grid(batch, dim, block), splits - 1)](*args, SPLIT_SUMMARY=True, **meta)
        _scan_fwd_kernel[(*_grid(batch, dim, block), splits)](*args, SPLIT_SUMMARY=False, **meta)
    return y


def _backward_outputs(u, delta, A, B):
    """The backward op's outputs, empty: du and ddelta in u's and delta's dtypes as (batch, dim, L) views of
    (batch, L, dim) tokens, the mixer's layout (fixed, not copied from the inputs' strides, so the fake outputs
    match the real ones whatever strides the inputs come with), then float32 partial sums."""
    batch, dim, length = u.shape
    n, blocks = A.shape[1], triton.cdiv(dim, BACKWARD_CONFIG[0])
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = (u.new_empty(batch, length, dim, dtype=t.dtype).transpose(1, 2) for t in (u, delta))
    return [du, ddelta, torch.empty(batch, dim, n, **f32),
            torch.empty(batch, blocks, n, length, **f32), torch.empty(batch, blocks, n, length, **f32),
            torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)]


# The ops' names carry a revision, raised whenever what the backward op returns changes: torch's on-disk compile cache
# keys a compiled training graph on the forward graph, where only the forward op's name appears, so a cache written
# by an earlier revision of this file would replay its backward against this one's op (seen on the H200: "expected
# stride 1==49" in the backward op after the partial sums moved out of it)
OP_REVISION = 2
FORWARD_OP, BACKWARD_OP = f"selective_scan_fwd_r{OP_REVISION}", f"selective_scan_bwd_r{OP_REVISION}"


def _register_ops():
    """Define the forward/backward custom ops once per process (this file may be imported twice)."""
    if hasattr(torch.ops.mambavision, FORWARD_OP):
        return getattr(torch.ops.mambavision, FORWARD_OP)

    @torch.library.custom_op(f"mambavision::{FORWARD_OP}", mutates_args=())
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

    @torch.library.custom_op(f"mambavision::{BACKWARD_OP}", mutates_args=())
    def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, delta_bias: torch.Tensor, states: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
        """du and ddelta, then float32 partial sums of the other gradients (``_backward`` reduces them, in the
        traced graph where the compiler can fuse the sums with their consumers)."""
        grads = _backward_outputs(u, delta, A, B)
        du, ddelta, dA, dB, dC, dD, dbias = grads
        block, warps = BACKWARD_CONFIG
        with _on_device(u):
            _scan_bwd_kernel[_grid(*u.shape[:2], block)](
                u, delta, A.contiguous(), B, C, D.contiguous(), delta_bias.contiguous(), dy, states,
                du, ddelta, dA, dB, dC, dD, dbias, u.shape[2], u.shape[1],
                *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *dy.stride(), *du.stride(), *ddelta.stride(),
                N=A.shape[1], BLOCK=block, CHUNK_L=TRAIN_CONFIG[1], num_warps=warps)
        return grads

    @_scan_bwd.register_fake
    def _(u, delta, A, B, C, D, delta_bias, states, dy):
        return _backward_outputs(u, delta, A, B)

    def _setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, delta_bias, _ = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])

    def _backward(ctx, grad_y, _grad_states):
        u, delta, A, B, C, D, delta_bias, _ = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias = _scan_bwd(*ctx.saved_tensors, grad_y)
        return (du, ddelta, dA.sum(0).to(A.dtype), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype),
                dD.sum(0).to(D.dtype), dbias.sum(0).to(delta_bias.dtype), None)

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

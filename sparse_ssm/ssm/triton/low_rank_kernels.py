"""Triton kernels of a selective scan whose per-token operator is a product of diagonal-plus-low-rank
sweeps (the low-rank structure's bilinear / gbt step: two sweeps of rank r).

The layout of the diagonal kernels (`diagonal_kernels.py`): one program per (batch row, head, tile
of BLOCK_P channels) walks the sequence with the state X (BLOCK_N states, BLOCK_P channels) in
registers, in the compute dtype (float32, or float64 for float64 inputs).  The caller (`low_rank.py`)
gives every token's SWEEPS sweeps, computed in PyTorch: diagonals s (b, L, H, SWEEPS, N) and factors
P, Q (b, L, H, SWEEPS, N, RANK); and B_bar (b, L, H, N).  Per token t, for every channel p:

    X <- diag(s_{t,j}) X + P_{t,j} (Q_{t,j}^T X)        j = 1 .. SWEEPS
    X <- X + B_bar_t u_t^T
    y_t[p] = sum_n C_t[n] X[n, p] + D_t u_t[p],  times silu(z_t[p]) with the gate

Tokens past the end get s = 1, P = Q = 0 and B_bar = 0 (they leave the state alone).  The forward
stores the state before every CHUNK tokens; the backward recomputes a chunk's states from its
checkpoint into a per-program scratch buffer, then runs the reverse-time recurrence of the state
gradient G through the sweeps, last first (a sweep's input X_j recomputed from X_{t-1}):

    G <- G + C_t dy_t^T;  dB_bar_t = G u_t;  then per sweep, with W = Q^T X_j and V = P^T G:
    ds = rows of G * X_j summed over channels,  dP = G W^T,  dQ = X_j V^T,  G <- diag(s) G + Q V

Gradients of per-token values summed over channels (s, P, Q, B_bar, C, D) are accumulated over the
channel tiles with atomic adds into zeroed buffers.  Inputs are contiguous: u, z, y (b, L, H, P);
D (b, L, H); C (b, L, G, N); states (b, H, N, P).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _token_inputs(bbar_ptr, C_ptr, u_ptr, D_ptr, batch, t, h, g, L, H, G, N, P, offs_n, offs_p,
                  COMPUTE: tl.constexpr):
    """Token t's B_bar and C (BLOCK_N,), D and u (BLOCK_P,) in the compute dtype (zeros past the end);
    also the token's flat index, whether it is live, its (P,) row offsets and the channel mask."""
    live = batch * L + t < (batch + 1) * L
    tok = tl.minimum(batch * L + t, batch * L + L - 1)        # scalar loads stay in bounds, unmasked
    live_n = offs_n < tl.where(live, N, 0)
    Bbar = tl.load(bbar_ptr + (tok * H + h) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    Cv = tl.load(C_ptr + (tok * G + g) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    dd = tl.where(live, tl.load(D_ptr + tok * H + h).to(COMPUTE), 0.0)
    row = (tok * H + h) * P + offs_p
    live_p = offs_p < tl.where(live, P, 0)
    u = tl.load(u_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
    return Bbar, Cv, dd, u, tok, live, row, live_p


@triton.jit
def _sweep_operator(s_ptr, p_ptr, q_ptr, tok, live, h, H, N, j, offs_n, offs_r, SWEEPS: tl.constexpr,
                    RANK: tl.constexpr, COMPUTE: tl.constexpr):
    """Sweep j of token `tok`: s (BLOCK_N,), P and Q (BLOCK_N, BLOCK_R) (1 and zeros past the end)."""
    live_n = offs_n < tl.where(live, N, 0)
    base = (tok * H + h) * SWEEPS + j
    s = tl.load(s_ptr + base * N + offs_n, mask=live_n, other=1.0).to(COMPUTE)
    factor = base * N * RANK + offs_n[:, None] * RANK + offs_r[None, :]
    mask = live_n[:, None] & (offs_r < RANK)[None, :]
    Pm = tl.load(p_ptr + factor, mask=mask, other=0.0).to(COMPUTE)
    Qm = tl.load(q_ptr + factor, mask=mask, other=0.0).to(COMPUTE)
    return s, Pm, Qm


@triton.jit
def _project(M, X):
    """M^T X: M (BLOCK_N, BLOCK_R), X (BLOCK_N, BLOCK_P) -> (BLOCK_R, BLOCK_P)."""
    return tl.sum(M[:, :, None] * X[:, None, :], axis=0)


@triton.jit
def _expand(M, W):
    """M W: M (BLOCK_N, BLOCK_R), W (BLOCK_R, BLOCK_P) -> (BLOCK_N, BLOCK_P)."""
    return tl.sum(M[:, :, None] * W[None, :, :], axis=1)


@triton.jit
def _sweeps(X, s_ptr, p_ptr, q_ptr, tok, live, h, H, N, offs_n, offs_r, STEPS: tl.constexpr,
            SWEEPS: tl.constexpr, RANK: tl.constexpr, COMPUTE: tl.constexpr):
    """The token's first STEPS sweeps applied to X."""
    for j in tl.static_range(STEPS):
        s, Pm, Qm = _sweep_operator(s_ptr, p_ptr, q_ptr, tok, live, h, H, N, j, offs_n, offs_r, SWEEPS, RANK,
                                    COMPUTE)
        X = s[:, None] * X + _expand(Pm, _project(Qm, X))
    return X


@triton.jit
def low_rank_forward(s_ptr, p_ptr, q_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, h0_ptr, y_ptr, hT_ptr, ckpt_ptr,
                     L, H, G, N, P, n_chunks,
                     HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr,
                     SWEEPS: tl.constexpr, RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
    """Grid (b * H, cdiv(P, BLOCK_P)): y, the final state and (SAVE) the chunk checkpoints
    (b, H, n_chunks, N, P), n_chunks = cdiv(L, CHUNK)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n, offs_r = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_R)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    state_offs = offs_n[:, None] * P + offs_p[None, :]
    mask_np = (offs_n < N)[:, None] & (offs_p < P)[None, :]
    if HAS_H0:
        X = tl.load(h0_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    else:
        X = tl.zeros((BLOCK_N, BLOCK_P), dtype=COMPUTE)
    for c in range(0, n_chunks):
        if SAVE:
            tl.store(ckpt_ptr + (bh * n_chunks + c) * N * P + state_offs, X, mask=mask_np)
        for i in range(0, CHUNK):
            Bbar, Cv, dd, u, tok, live, row, live_p = _token_inputs(bbar_ptr, C_ptr, u_ptr, D_ptr, batch,
                                                                    c * CHUNK + i, h, g, L, H, G, N, P, offs_n,
                                                                    offs_p, COMPUTE)
            X = _sweeps(X, s_ptr, p_ptr, q_ptr, tok, live, h, H, N, offs_n, offs_r, SWEEPS, SWEEPS, RANK, COMPUTE)
            X = X + Bbar[:, None] * u[None, :]
            y = tl.sum(Cv[:, None] * X, axis=0) + dd * u
            if HAS_Z:
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = y * zv / (1.0 + tl.exp(-zv))
            tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty), mask=live_p)
    tl.store(hT_ptr + bh * N * P + state_offs, X, mask=mask_np)


@triton.jit
def _sweeps_backward(Gs, Xprev, s_ptr, p_ptr, q_ptr, ds_ptr, dp_ptr, dq_ptr, part, tok, live, h, H, N, offs_n,
                     offs_r, SWEEPS: tl.constexpr, RANK: tl.constexpr, COMPUTE: tl.constexpr):
    """The state gradient through the token's sweeps, last first; their gradients added at `part`
    (the token's padded index).  Returns G at X_{t-1}."""
    live_n = offs_n < N
    factor_mask = live_n[:, None] & (offs_r < RANK)[None, :]
    for j in tl.static_range(SWEEPS - 1, -1, -1):
        Xj = _sweeps(Xprev, s_ptr, p_ptr, q_ptr, tok, live, h, H, N, offs_n, offs_r, j, SWEEPS, RANK, COMPUTE)
        s, Pm, Qm = _sweep_operator(s_ptr, p_ptr, q_ptr, tok, live, h, H, N, j, offs_n, offs_r, SWEEPS, RANK,
                                    COMPUTE)
        W = _project(Qm, Xj)
        V = _project(Pm, Gs)
        base = part * SWEEPS + j
        tl.atomic_add(ds_ptr + base * N + offs_n, tl.sum(Gs * Xj, axis=1), mask=live_n)
        factor = base * N * RANK + offs_n[:, None] * RANK + offs_r[None, :]
        tl.atomic_add(dp_ptr + factor, tl.sum(Gs[:, None, :] * W[None, :, :], axis=2), mask=factor_mask)
        tl.atomic_add(dq_ptr + factor, tl.sum(Xj[:, None, :] * V[None, :, :], axis=2), mask=factor_mask)
        Gs = s[:, None] * Gs + _expand(Qm, V)
    return Gs


@triton.jit
def low_rank_backward(s_ptr, p_ptr, q_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, ckpt_ptr, dout_ptr, dhT_ptr,
                      scratch_ptr, du_ptr, dz_ptr, dh0_ptr, ds_ptr, dp_ptr, dq_ptr, dbbar_ptr, dC_ptr, dD_ptr,
                      L, H, G, N, P, n_chunks,
                      HAS_Z: tl.constexpr, CHUNK: tl.constexpr, SWEEPS: tl.constexpr, RANK: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
    """Grid as the forward.  du, dz (b, L, H, P) and dh0 (b, H, N, P) directly; ds (b, L', H, SWEEPS,
    N), dP, dQ (b, L', H, SWEEPS, N, RANK), dB_bar, dC (b, L', H, N) per head and dD (b, L', H) added
    into zeroed buffers, L' the length padded to whole chunks (padding tokens add junk, sliced off)."""
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n, offs_r = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_R)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    state_offs = offs_n[:, None] * P + offs_p[None, :]
    mask_np = (offs_n < N)[:, None] & (offs_p < P)[None, :]
    live_n = offs_n < N
    size = BLOCK_N * BLOCK_P
    scratch = scratch_ptr + (bh * tl.num_programs(1) + tile) * (CHUNK + 1) * size
    scratch_offs = offs_n[:, None] * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
    Gs = tl.load(dhT_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        X = tl.load(ckpt_ptr + (bh * n_chunks + c) * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
        tl.store(scratch + scratch_offs, X)
        for i in range(0, CHUNK):                 # the chunk's states again, X_t in slot i + 1
            Bbar, _, _, u, tok, live, _, _ = _token_inputs(bbar_ptr, C_ptr, u_ptr, D_ptr, batch, c * CHUNK + i, h, g,
                                                           L, H, G, N, P, offs_n, offs_p, COMPUTE)
            X = _sweeps(X, s_ptr, p_ptr, q_ptr, tok, live, h, H, N, offs_n, offs_r, SWEEPS, SWEEPS, RANK, COMPUTE)
            X = X + Bbar[:, None] * u[None, :]
            tl.store(scratch + (i + 1) * size + scratch_offs, X)
        tl.debug_barrier()
        for j in range(0, CHUNK):
            i = CHUNK - 1 - j
            t = c * CHUNK + i
            Xt = tl.load(scratch + (i + 1) * size + scratch_offs)
            Xprev = tl.load(scratch + i * size + scratch_offs)
            Bbar, Cv, dd, u, tok, live, row, live_p = _token_inputs(bbar_ptr, C_ptr, u_ptr, D_ptr, batch, t, h, g,
                                                                    L, H, G, N, P, offs_n, offs_p, COMPUTE)
            dy = tl.load(dout_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
            if HAS_Z:                              # out = y silu(z): y recomputed from X_t
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = tl.sum(Cv[:, None] * Xt, axis=0) + dd * u
                sig = 1.0 / (1.0 + tl.exp(-zv))
                tl.store(dz_ptr + row, (dy * y * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                         mask=live_p)
                dy = dy * zv * sig
            Gs += Cv[:, None] * dy[None, :]
            du = dd * dy + tl.sum(Bbar[:, None] * Gs, axis=0)
            tl.store(du_ptr + row, du.to(du_ptr.dtype.element_ty), mask=live_p)
            part = (batch * n_chunks * CHUNK + t) * H + h
            tl.atomic_add(dbbar_ptr + part * N + offs_n, tl.sum(Gs * u[None, :], axis=1), mask=live_n)
            tl.atomic_add(dC_ptr + part * N + offs_n, tl.sum(Xt * dy[None, :], axis=1), mask=live_n)
            tl.atomic_add(dD_ptr + part, tl.sum(dy * u, axis=0))
            Gs = _sweeps_backward(Gs, Xprev, s_ptr, p_ptr, q_ptr, ds_ptr, dp_ptr, dq_ptr, part, tok, live, h, H, N,
                                  offs_n, offs_r, SWEEPS, RANK, COMPUTE)
        tl.debug_barrier()
    tl.store(dh0_ptr + bh * N * P + state_offs, Gs, mask=mask_np)

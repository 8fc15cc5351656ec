"""Triton kernels of the permutation-diagonal selective scan (PD-SSM: A_bar_t = P_t diag(d_t), P_t one
1 per column).

The layout of the diagonal kernels (`diagonal_kernels.py`): one program per (batch row, head, tile
of BLOCK_P channels) walks the sequence with the state X (BLOCK_N states, BLOCK_P channels) in
registers, in the compute dtype (float32, or float64 for float64 inputs).  The caller
(`permutation.py`) gives every token's destination rows f (b, L, H, N) (state j moves to row f[j]:
P's arg-max per column), decay d (b, L, H, N) and B_bar (b, L, H, N): N numbers per token where the
dense operator would be N^2.  Per token t, for every channel p:

    X[i, p] <- sum_{j: f_t[j] = i} d_t[j] X[j, p]  +  B_bar_t[i] u_t[p]
    y_t[p]   = sum_n C_t[n] X[n, p] + D_t u_t[p],  times silu(z_t[p]) with the gate

(the move is a one-hot product in registers, BLOCK_N BLOCK_N BLOCK_P multiply-adds).  Tokens past
the end get f = identity, d = 1 and B_bar = 0.  The forward stores the state before every CHUNK
tokens; the backward recomputes a chunk's states from its checkpoint into a per-program scratch
buffer, then runs the reverse-time recurrence of the state gradient G:

    G <- G + C_t dy_t^T;  dB_bar_t = G u_t;  dA_bar_t = G X_{t-1}^T  (N x N: the straight-through
    selection's gradient reaches every logit);  G[j] <- d_t[j] G[f_t[j]]

Gradients of per-token values summed over channels (A_bar, B_bar, C, D) are accumulated over the
channel tiles with atomic adds into zeroed buffers.  Inputs are contiguous: u, z, y (b, L, H, P);
D (b, L, H); C (b, L, G, N); states (b, H, N, P).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _token_inputs(f_ptr, d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch, t, h, g, L, H, G, N, P, offs_n, offs_p,
                  COMPUTE: tl.constexpr):
    """Token t's one-hot move M[i, j] = (f[j] == i) (BLOCK_N, BLOCK_N), decay, B_bar and C (BLOCK_N,),
    D and u (BLOCK_P,) in the compute dtype (the identity and zeros past the end); also its (P,) row
    offsets and the channel mask."""
    live = batch * L + t < (batch + 1) * L
    tok = tl.minimum(batch * L + t, batch * L + L - 1)        # scalar loads stay in bounds, unmasked
    live_n = offs_n < tl.where(live, N, 0)
    f = tl.where(live_n, tl.load(f_ptr + (tok * H + h) * N + offs_n, mask=live_n, other=0), offs_n)
    move = (f[None, :] == offs_n[:, None]).to(COMPUTE)
    dv = tl.load(d_ptr + (tok * H + h) * N + offs_n, mask=live_n, other=1.0).to(COMPUTE)
    Bbar = tl.load(bbar_ptr + (tok * H + h) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    Cv = tl.load(C_ptr + (tok * G + g) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    dd = tl.where(live, tl.load(D_ptr + tok * H + h).to(COMPUTE), 0.0)
    row = (tok * H + h) * P + offs_p
    live_p = offs_p < tl.where(live, P, 0)
    u = tl.load(u_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
    return move, dv, Bbar, Cv, dd, u, row, live_p


@triton.jit
def _transition(move, dv, X):
    """P diag(d) X: the rows of d X summed into their destinations, (BLOCK_N, BLOCK_P)."""
    return tl.sum(move[:, :, None] * (dv[:, None] * X)[None, :, :], axis=1)


@triton.jit
def permutation_forward(f_ptr, d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, h0_ptr, y_ptr, hT_ptr, ckpt_ptr,
                        L, H, G, N, P, n_chunks,
                        HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
    """Grid (b * H, cdiv(P, BLOCK_P)): y, the final state and (SAVE) the chunk checkpoints
    (b, H, n_chunks, N, P), n_chunks = cdiv(L, CHUNK)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
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
            move, dv, Bbar, Cv, dd, u, row, live_p = _token_inputs(f_ptr, d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch,
                                                                   c * CHUNK + i, h, g, L, H, G, N, P, offs_n, offs_p,
                                                                   COMPUTE)
            X = _transition(move, dv, X) + Bbar[:, None] * u[None, :]
            y = tl.sum(Cv[:, None] * X, axis=0) + dd * u
            if HAS_Z:
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = y * zv / (1.0 + tl.exp(-zv))
            tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty), mask=live_p)
    tl.store(hT_ptr + bh * N * P + state_offs, X, mask=mask_np)


@triton.jit
def permutation_backward(f_ptr, d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, ckpt_ptr, dout_ptr, dhT_ptr,
                         scratch_ptr, du_ptr, dz_ptr, dh0_ptr, dabar_ptr, dbbar_ptr, dC_ptr, dD_ptr,
                         L, H, G, N, P, n_chunks,
                         HAS_Z: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                         COMPUTE: tl.constexpr):
    """Grid as the forward.  du, dz (b, L, H, P) and dh0 (b, H, N, P) directly; dA_bar (b, L', H, N, N),
    dB_bar, dC (b, L', H, N) per head and dD (b, L', H) added into zeroed buffers, L' the length
    padded to whole chunks (padding tokens add junk there, sliced off)."""
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    state_offs = offs_n[:, None] * P + offs_p[None, :]
    mask_np = (offs_n < N)[:, None] & (offs_p < P)[None, :]
    live_n = offs_n < N
    size = BLOCK_N * BLOCK_P
    scratch = scratch_ptr + (bh * tl.num_programs(1) + tile) * (CHUNK + 1) * size
    scratch_offs = offs_n[:, None] * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
    entry = offs_n[:, None] * N + offs_n[None, :]
    Gs = tl.load(dhT_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        X = tl.load(ckpt_ptr + (bh * n_chunks + c) * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
        tl.store(scratch + scratch_offs, X)
        for i in range(0, CHUNK):                 # the chunk's states again, X_t in slot i + 1
            move, dv, Bbar, _, _, u, _, _ = _token_inputs(f_ptr, d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch,
                                                          c * CHUNK + i, h, g, L, H, G, N, P, offs_n, offs_p, COMPUTE)
            X = _transition(move, dv, X) + Bbar[:, None] * u[None, :]
            tl.store(scratch + (i + 1) * size + scratch_offs, X)
        tl.debug_barrier()
        for j in range(0, CHUNK):
            i = CHUNK - 1 - j
            t = c * CHUNK + i
            Xt = tl.load(scratch + (i + 1) * size + scratch_offs)
            Xprev = tl.load(scratch + i * size + scratch_offs)
            move, dv, Bbar, Cv, dd, u, row, live_p = _token_inputs(f_ptr, d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch,
                                                                   t, h, g, L, H, G, N, P, offs_n, offs_p, COMPUTE)
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
            tl.atomic_add(dabar_ptr + part * N * N + entry, tl.sum(Gs[:, None, :] * Xprev[None, :, :], axis=2),
                          mask=live_n[:, None] & live_n[None, :])
            tl.atomic_add(dbbar_ptr + part * N + offs_n, tl.sum(Gs * u[None, :], axis=1), mask=live_n)
            tl.atomic_add(dC_ptr + part * N + offs_n, tl.sum(Xt * dy[None, :], axis=1), mask=live_n)
            tl.atomic_add(dD_ptr + part, tl.sum(dy * u, axis=0))
            Gs = dv[:, None] * tl.sum(move[:, :, None] * Gs[:, None, :], axis=0)      # diag(d) P^T G
        tl.debug_barrier()
    tl.store(dh0_ptr + bh * N * P + state_offs, Gs, mask=mask_np)

"""Triton kernels of the Householder-product selective scan (DeltaProduct: R reflections per token).

The layout of the diagonal kernels (`diagonal_kernels.py`): one program per (batch row, head, tile
of BLOCK_P channels) walks the sequence with the state X (BLOCK_N states, BLOCK_P channels) in
registers, in the compute dtype (float32, or float64 for float64 inputs).  The caller (`householder.py`)
gives every token's factors, computed in PyTorch: the decay d (b, L, H, N), the unit keys k
(b, L, H, R, N), the strengths beta (b, L, H, R) and B_bar (b, L, H, N).  Per token t, for every
channel p (flash-linear-attention's fused recurrent delta rule applies its rank-1 update the same way):

    X <- diag(d_t) X
    X <- X - beta_{t,i} k_{t,i} (k_{t,i}^T X)       i = 1 .. R  (a reduction over the states)
    X <- X + B_bar_t u_t^T
    y_t[p] = sum_n C_t[n] X[n, p] + D_t u_t[p],  times silu(z_t[p]) with the gate

Tokens past the end get d = 1, beta = 0 and B_bar = 0 (they leave the state alone).  The forward
stores the state before every CHUNK tokens; the backward recomputes a chunk's states from its
checkpoint into a per-program scratch buffer, then runs the reverse-time recurrence of the state
gradient G, undoing a token's operations in reverse order (the state between reflections is
recomputed from X_{t-1}: R (R + 1) / 2 extra rank-1 updates per token):

    G <- G + C_t dy_t^T;  dB_bar_t = G u_t;  then per reflection, last first, with X_i its input,
    w = k^T X_i, v = k^T G:  dbeta = -v . w,  dk = -beta (G w + X_i v),  G <- G - beta k v^T;
    then dd_t = rows of G * X_{t-1} summed over channels,  G <- diag(d_t) G

Gradients of per-token values summed over channels (d, k, beta, B_bar, C, D) are accumulated over
the channel tiles with atomic adds into zeroed buffers.  Inputs are contiguous: u, z, y (b, L, H, P);
D (b, L, H); C (b, L, G, N); states (b, H, N, P).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _token_inputs(d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch, t, h, g, L, H, G, N, P, offs_n, offs_p,
                  COMPUTE: tl.constexpr):
    """Token t's decay, B_bar and C (BLOCK_N,), D and u (BLOCK_P,) in the compute dtype (the identity
    and zeros past the end); also the token's flat index, whether it is live, its (P,) row offsets
    and the channel mask."""
    live = batch * L + t < (batch + 1) * L
    tok = tl.minimum(batch * L + t, batch * L + L - 1)        # scalar loads stay in bounds, unmasked
    live_n = offs_n < tl.where(live, N, 0)
    dv = tl.load(d_ptr + (tok * H + h) * N + offs_n, mask=live_n, other=1.0).to(COMPUTE)
    Bbar = tl.load(bbar_ptr + (tok * H + h) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    Cv = tl.load(C_ptr + (tok * G + g) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    dd = tl.where(live, tl.load(D_ptr + tok * H + h).to(COMPUTE), 0.0)
    row = (tok * H + h) * P + offs_p
    live_p = offs_p < tl.where(live, P, 0)
    u = tl.load(u_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
    return dv, Bbar, Cv, dd, u, tok, live, row, live_p


@triton.jit
def _reflection(k_ptr, beta_ptr, tok, live, h, H, N, i, offs_n, R: tl.constexpr, COMPUTE: tl.constexpr):
    """Reflection i of token `tok`: its unit key (BLOCK_N,) and strength (0 past the end)."""
    k = tl.load(k_ptr + ((tok * H + h) * R + i) * N + offs_n, mask=offs_n < N, other=0.0).to(COMPUTE)
    beta = tl.where(live, tl.load(beta_ptr + (tok * H + h) * R + i).to(COMPUTE), 0.0)
    return k, beta


@triton.jit
def _reflect(X, k, beta):
    """(I - beta k k^T) X: X (BLOCK_N, BLOCK_P), k (BLOCK_N,)."""
    return X - (beta * k)[:, None] * tl.sum(k[:, None] * X, axis=0)[None, :]


@triton.jit
def _transition(X, dv, k_ptr, beta_ptr, tok, live, h, H, N, offs_n, STEPS: tl.constexpr, R: tl.constexpr,
                COMPUTE: tl.constexpr):
    """diag(d) X, then the token's first STEPS reflections."""
    X = dv[:, None] * X
    for i in tl.static_range(STEPS):
        k, beta = _reflection(k_ptr, beta_ptr, tok, live, h, H, N, i, offs_n, R, COMPUTE)
        X = _reflect(X, k, beta)
    return X


@triton.jit
def householder_forward(d_ptr, k_ptr, beta_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, h0_ptr, y_ptr, hT_ptr,
                        ckpt_ptr, L, H, G, N, P, n_chunks,
                        HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr,
                        R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
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
            dv, Bbar, Cv, dd, u, tok, live, row, live_p = _token_inputs(
                d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch, c * CHUNK + i, h, g, L, H, G, N, P, offs_n, offs_p,
                COMPUTE)
            X = _transition(X, dv, k_ptr, beta_ptr, tok, live, h, H, N, offs_n, R, R, COMPUTE)
            X = X + Bbar[:, None] * u[None, :]
            y = tl.sum(Cv[:, None] * X, axis=0) + dd * u
            if HAS_Z:
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = y * zv / (1.0 + tl.exp(-zv))
            tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty), mask=live_p)
    tl.store(hT_ptr + bh * N * P + state_offs, X, mask=mask_np)


@triton.jit
def _reflections_backward(Gs, Xprev, dv, k_ptr, beta_ptr, dk_ptr, dbeta_ptr, part, tok, live, h, H, N, offs_n,
                          R: tl.constexpr, COMPUTE: tl.constexpr):
    """The state gradient through the token's reflections, last first; their key and strength
    gradients added at `part` (the token's padded index).  Returns G at diag(d) X_{t-1}."""
    for i in tl.static_range(R - 1, -1, -1):
        Xi = _transition(Xprev, dv, k_ptr, beta_ptr, tok, live, h, H, N, offs_n, i, R, COMPUTE)   # its input
        k, beta = _reflection(k_ptr, beta_ptr, tok, live, h, H, N, i, offs_n, R, COMPUTE)
        w = tl.sum(k[:, None] * Xi, axis=0)
        v = tl.sum(k[:, None] * Gs, axis=0)
        tl.atomic_add(dbeta_ptr + part * R + i, -tl.sum(v * w, axis=0))
        dk = -beta * (tl.sum(Gs * w[None, :], axis=1) + tl.sum(Xi * v[None, :], axis=1))
        tl.atomic_add(dk_ptr + (part * R + i) * N + offs_n, dk, mask=offs_n < N)
        Gs = Gs - (beta * k)[:, None] * v[None, :]
    return Gs


@triton.jit
def householder_backward(d_ptr, k_ptr, beta_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, ckpt_ptr, dout_ptr,
                         dhT_ptr, scratch_ptr, du_ptr, dz_ptr, dh0_ptr, dd_ptr, dk_ptr, dbeta_ptr, dbbar_ptr,
                         dC_ptr, dD_ptr, L, H, G, N, P, n_chunks,
                         HAS_Z: tl.constexpr, CHUNK: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
    """Grid as the forward.  du, dz (b, L, H, P) and dh0 (b, H, N, P) directly; dd, dB_bar, dC
    (b, L', H, N), dk (b, L', H, R, N), dbeta (b, L', H, R) and dD (b, L', H) per head added into
    zeroed buffers, L' the length padded to whole chunks (padding tokens add junk there, sliced off)."""
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
    Gs = tl.load(dhT_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        X = tl.load(ckpt_ptr + (bh * n_chunks + c) * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
        tl.store(scratch + scratch_offs, X)
        for i in range(0, CHUNK):                 # the chunk's states again, X_t in slot i + 1
            dv, Bbar, _, _, u, tok, live, _, _ = _token_inputs(d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch,
                                                               c * CHUNK + i, h, g, L, H, G, N, P, offs_n, offs_p,
                                                               COMPUTE)
            X = _transition(X, dv, k_ptr, beta_ptr, tok, live, h, H, N, offs_n, R, R, COMPUTE)
            X = X + Bbar[:, None] * u[None, :]
            tl.store(scratch + (i + 1) * size + scratch_offs, X)
        tl.debug_barrier()
        for j in range(0, CHUNK):
            i = CHUNK - 1 - j
            t = c * CHUNK + i
            Xt = tl.load(scratch + (i + 1) * size + scratch_offs)
            Xprev = tl.load(scratch + i * size + scratch_offs)
            dv, Bbar, Cv, dd, u, tok, live, row, live_p = _token_inputs(
                d_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch, t, h, g, L, H, G, N, P, offs_n, offs_p, COMPUTE)
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
            Gs = _reflections_backward(Gs, Xprev, dv, k_ptr, beta_ptr, dk_ptr, dbeta_ptr, part, tok, live, h, H, N,
                                       offs_n, R, COMPUTE)
            tl.atomic_add(dd_ptr + part * N + offs_n, tl.sum(Gs * Xprev, axis=1), mask=live_n)
            Gs = dv[:, None] * Gs
        tl.debug_barrier()
    tl.store(dh0_ptr + bh * N * P + state_offs, Gs, mask=mask_np)

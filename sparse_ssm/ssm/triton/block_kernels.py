"""Triton kernels of the block-diagonal selective scan (blocks of BS = 2, 4 or 8 states).

The layout of the diagonal kernels (`diagonal_kernels.py`): one program per (batch row, head, tile
of BLOCK_P channels) walks the sequence with the state X (BLOCK_NB blocks, BS states, BLOCK_P
channels) in registers, in the compute dtype (float32, or float64 for float64 inputs).  The
kernels take every token's discretised operator from the caller (`block.py` computes it in
PyTorch with `BlockStructure.discretize`): A_bar (b, L, H, NB, BS, BS) and B_bar (b, L, H, N),
N = NB BS.  Per token t, for every block i, row r, channel p:

    X[i, r, p] <- sum_c A_bar_t[i, r, c] X[i, c, p] + B_bar_t[i, r] u_t[p]
    y_t[p]      = sum_{i, r} C_t[i, r] X[i, r, p] + D_t u_t[p],  times silu(z_t[p]) with the gate

Tokens past the end get A_bar = I and B_bar = 0 (they leave the state alone).  The forward stores
the state before every CHUNK tokens; the backward recomputes a chunk's states from its checkpoint
into a per-program scratch buffer, then runs the reverse-time recurrence of the state gradient G:

    G <- G + C_t dy_t^T;  dA_bar_t = G X_{t-1}^T (per block);  dB_bar_t = G u_t;  G <- A_bar_t^T G

Gradients of per-token values summed over channels (A_bar, B_bar, C, D) are accumulated over the
channel tiles with atomic adds into zeroed buffers.  Inputs are contiguous: u, z, y (b, L, H, P);
D (b, L, H); A_bar (b, L, H, NB, BS, BS); B_bar (b, L, H, N); C (b, L, G, N); states (b, H, N, P).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _token_inputs(abar_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch, t, h, g, L, H, G, NB, P, offs_i, offs_r, offs_p,
                  BS: tl.constexpr, COMPUTE: tl.constexpr):
    """Token t's operator and inputs of one head in the compute dtype (the identity and zeros past
    the end): A_bar (BLOCK_NB, BS, BS), B_bar and C (BLOCK_NB, BS), D, u (BLOCK_P,); also the offset
    of its (P,) rows, the channel mask and the (BLOCK_NB, BS) state index n = i BS + r."""
    live = batch * L + t < (batch + 1) * L
    tok = tl.minimum(batch * L + t, batch * L + L - 1)        # scalar loads stay in bounds, unmasked
    N = NB * BS
    n = offs_i[:, None] * BS + offs_r[None, :]
    live_n = n < tl.where(live, N, 0)
    op = n[:, :, None] * BS + offs_r[None, None, :]           # (i, r, c) -> (i BS + r) BS + c
    Abar = tl.load(abar_ptr + (tok * H + h) * N * BS + op, mask=op < tl.where(live, N * BS, 0), other=0.0)
    eye = (offs_r[:, None] == offs_r[None, :]).to(COMPUTE)
    Abar = Abar.to(COMPUTE) + tl.where(live, 0.0, 1.0) * eye[None, :, :]
    Bbar = tl.load(bbar_ptr + (tok * H + h) * N + n, mask=live_n, other=0.0).to(COMPUTE)
    Cv = tl.load(C_ptr + (tok * G + g) * N + n, mask=live_n, other=0.0).to(COMPUTE)
    d = tl.where(live, tl.load(D_ptr + tok * H + h).to(COMPUTE), 0.0)
    row = (tok * H + h) * P + offs_p
    live_p = offs_p < tl.where(live, P, 0)
    u = tl.load(u_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
    return Abar, Bbar, Cv, d, u, row, live_p, n, op


@triton.jit
def _step(Abar, Bbar, u, X):
    """A_bar X + B_bar u^T, block by block: (BLOCK_NB, BS, BLOCK_P)."""
    return tl.sum(Abar[:, :, :, None] * X[:, None, :, :], axis=2) + Bbar[:, :, None] * u[None, None, :]


@triton.jit
def readout(Cv, X):
    """sum_{i, r} C[i, r] X[i, r, :]: (BLOCK_P,)."""
    return tl.sum(tl.sum(Cv[:, :, None] * X, axis=1), axis=0)


@triton.jit
def block_forward(abar_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, h0_ptr, y_ptr, hT_ptr, ckpt_ptr,
                  L, H, G, NB, P, n_chunks,
                  HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr,
                  BS: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
    """Grid (b * H, cdiv(P, BLOCK_P)): y, the final state and (SAVE) the chunk checkpoints
    (b, H, n_chunks, N, P), n_chunks = cdiv(L, CHUNK)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_i, offs_r = tl.arange(0, BLOCK_NB), tl.arange(0, BS)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    N = NB * BS
    n = offs_i[:, None] * BS + offs_r[None, :]
    state_offs = n[:, :, None] * P + offs_p[None, None, :]
    mask_np = (n < N)[:, :, None] & (offs_p < P)[None, None, :]
    if HAS_H0:
        X = tl.load(h0_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    else:
        X = tl.zeros((BLOCK_NB, BS, BLOCK_P), dtype=COMPUTE)
    for k in range(0, n_chunks):
        if SAVE:
            tl.store(ckpt_ptr + (bh * n_chunks + k) * N * P + state_offs, X, mask=mask_np)
        for i in range(0, CHUNK):
            t = k * CHUNK + i
            Abar, Bbar, Cv, d, u, row, live_p, _, _ = _token_inputs(abar_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch,
                                                                    t, h, g, L, H, G, NB, P, offs_i, offs_r, offs_p,
                                                                    BS, COMPUTE)
            X = _step(Abar, Bbar, u, X)
            y = readout(Cv, X) + d * u
            if HAS_Z:
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = y * zv / (1.0 + tl.exp(-zv))
            tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty), mask=live_p)
    tl.store(hT_ptr + bh * N * P + state_offs, X, mask=mask_np)


@triton.jit
def block_backward(abar_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, ckpt_ptr, dout_ptr, dhT_ptr, scratch_ptr,
                   du_ptr, dz_ptr, dh0_ptr, dabar_ptr, dbbar_ptr, dC_ptr, dD_ptr,
                   L, H, G, NB, P, n_chunks,
                   HAS_Z: tl.constexpr, CHUNK: tl.constexpr, BS: tl.constexpr, BLOCK_NB: tl.constexpr,
                   BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
    """Grid as the forward.  du, dz (b, L, H, P) and dh0 (b, H, N, P) directly; dA_bar
    (b, L', H, NB, BS, BS), dB_bar, dC (b, L', H, N) per head and dD (b, L', H) added into zeroed
    buffers, L' the length padded to whole chunks (padding tokens add junk there, sliced off)."""
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_i, offs_r = tl.arange(0, BLOCK_NB), tl.arange(0, BS)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    N = NB * BS
    n = offs_i[:, None] * BS + offs_r[None, :]
    state_offs = n[:, :, None] * P + offs_p[None, None, :]
    mask_np = (n < N)[:, :, None] & (offs_p < P)[None, None, :]
    size = BLOCK_NB * BS * BLOCK_P
    scratch = scratch_ptr + (bh * tl.num_programs(1) + tile) * (CHUNK + 1) * size
    scratch_offs = n[:, :, None] * BLOCK_P + tl.arange(0, BLOCK_P)[None, None, :]
    Gs = tl.load(dhT_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        X = tl.load(ckpt_ptr + (bh * n_chunks + k) * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
        tl.store(scratch + scratch_offs, X)
        for i in range(0, CHUNK):                 # the chunk's states again, X_t in slot i + 1
            Abar, Bbar, _, _, u, _, _, _, _ = _token_inputs(abar_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, batch,
                                                            k * CHUNK + i, h, g, L, H, G, NB, P, offs_i, offs_r,
                                                            offs_p, BS, COMPUTE)
            X = _step(Abar, Bbar, u, X)
            tl.store(scratch + (i + 1) * size + scratch_offs, X)
        tl.debug_barrier()
        for j in range(0, CHUNK):
            i = CHUNK - 1 - j
            t = k * CHUNK + i
            Xt = tl.load(scratch + (i + 1) * size + scratch_offs)
            Xprev = tl.load(scratch + i * size + scratch_offs)
            Abar, Bbar, Cv, d, u, row, live_p, n, op = _token_inputs(abar_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr,
                                                                     batch, t, h, g, L, H, G, NB, P, offs_i,
                                                                     offs_r, offs_p, BS, COMPUTE)
            dy = tl.load(dout_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
            if HAS_Z:                              # out = y silu(z): y recomputed from X_t
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = readout(Cv, Xt) + d * u
                sig = 1.0 / (1.0 + tl.exp(-zv))
                tl.store(dz_ptr + row, (dy * y * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                         mask=live_p)
                dy = dy * zv * sig
            Gs += Cv[:, :, None] * dy[None, None, :]
            du = d * dy + readout(Bbar, Gs)
            tl.store(du_ptr + row, du.to(du_ptr.dtype.element_ty), mask=live_p)
            part = (batch * n_chunks * CHUNK + t) * H + h
            live_n = n < N
            tl.atomic_add(dabar_ptr + part * N * BS + op, tl.sum(Gs[:, :, None, :] * Xprev[:, None, :, :], axis=3),
                          mask=op < N * BS)
            tl.atomic_add(dbbar_ptr + part * N + n, tl.sum(Gs * u[None, None, :], axis=2), mask=live_n)
            tl.atomic_add(dC_ptr + part * N + n, tl.sum(Xt * dy[None, None, :], axis=2), mask=live_n)
            tl.atomic_add(dD_ptr + part, tl.sum(dy * u, axis=0))
            Gs = tl.sum(Abar[:, :, :, None] * Gs[:, :, None, :], axis=1)          # A_bar^T G
        tl.debug_barrier()
    tl.store(dh0_ptr + bh * N * P + state_offs, Gs, mask=mask_np)

"""Triton kernels of the banded selective scan: two block-diagonal sweeps per token, the second on
the partition shifted by `front` states (`structures/banded.py`: A_bar = D(A1) D(A0)).

The layout of the block kernels (`block_kernels.py`): one program per (batch row, head, tile of
BLOCK_P channels) walks the sequence with the state X in registers, in the compute dtype (float32,
or float64 for float64 inputs), as the real partition's blocks (NB0 blocks of BS states).  The
caller (`banded.py`) gives every token's discretised blocks: A0_bar (b, L, H, NB0, BS, BS), A1_bar
(b, L, H, NB1, BS, BS) over the shifted coordinates (state n at row FRONT + n of NB1 BS rows, the
others zero padding) and B_bar (b, L, H, N).  Per token t:

    X <- A0_bar_t X (per block);  X <- crop(A1_bar_t pad(X)) (per shifted block);  X <- X + B_bar_t u_t^T
    y_t[p] = sum_n C_t[n] X[n, p] + D_t u_t[p],  times silu(z_t[p]) with the gate

Registers cannot move states between the two partitions, so every change of partition goes through
a per-program buffer of NB1 BS rows (pad rows kept zero): stored in one layout, read back in the
other, a barrier between.  Tokens past the end get identities and B_bar = 0.  The forward stores the
state before every CHUNK tokens; the backward recomputes a chunk's states from its checkpoint into
a per-program scratch buffer, then runs the reverse-time recurrence of the state gradient G:

    G <- G + C_t dy_t^T;  dB_bar_t = G u_t;  Gw = pad(G), Z = pad(A0_bar_t X_{t-1}):
    dA1_bar_t = Gw Z^T;  Gy = crop(A1_bar_t^T Gw);  dA0_bar_t = Gy X_{t-1}^T;  G <- A0_bar_t^T Gy

(per block).  Gradients of per-token values summed over channels (A0_bar, A1_bar, B_bar, C, D) are
accumulated over the channel tiles with atomic adds into zeroed buffers.  Inputs are contiguous:
u, z, y (b, L, H, P); D (b, L, H); C (b, L, G, N); states (b, H, N, P).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .block_kernels import readout


@triton.jit
def _blocks_at(abar_ptr, tok, live, h, H, NB, offs_i, offs_r, BS: tl.constexpr, COMPUTE: tl.constexpr):
    """Token `tok`'s blocks (BLOCK, BS, BS) of a head (the identity past the end), and their (i, r, c)
    offsets within the token's NB BS BS entries."""
    op = (offs_i[:, None, None] * BS + offs_r[None, :, None]) * BS + offs_r[None, None, :]
    Abar = tl.load(abar_ptr + (tok * H + h) * NB * BS * BS + op, mask=op < tl.where(live, NB * BS * BS, 0),
                   other=0.0).to(COMPUTE)
    eye = (offs_r[:, None] == offs_r[None, :]).to(COMPUTE)
    return Abar + tl.where(live, 0.0, 1.0) * eye[None, :, :], op


@triton.jit
def _apply_blocks(A, X):
    """A X block by block: A (BLOCK, BS, BS), X (BLOCK, BS, BLOCK_P)."""
    return tl.sum(A[:, :, :, None] * X[:, None, :, :], axis=2)


@triton.jit
def _token_inputs(bbar_ptr, C_ptr, u_ptr, D_ptr, batch, t, h, g, L, H, G, N, P, n, offs_p, COMPUTE: tl.constexpr):
    """Token t's B_bar and C (BLOCK_NB0, BS) at state indices n, D and u (BLOCK_P,) in the compute
    dtype (zeros past the end); also the token's flat index, whether it is live, its (P,) row offsets
    and the channel mask."""
    live = batch * L + t < (batch + 1) * L
    tok = tl.minimum(batch * L + t, batch * L + L - 1)        # scalar loads stay in bounds, unmasked
    live_n = n < tl.where(live, N, 0)
    Bbar = tl.load(bbar_ptr + (tok * H + h) * N + n, mask=live_n, other=0.0).to(COMPUTE)
    Cv = tl.load(C_ptr + (tok * G + g) * N + n, mask=live_n, other=0.0).to(COMPUTE)
    dd = tl.where(live, tl.load(D_ptr + tok * H + h).to(COMPUTE), 0.0)
    row = (tok * H + h) * P + offs_p
    live_p = offs_p < tl.where(live, P, 0)
    u = tl.load(u_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
    return Bbar, Cv, dd, u, tok, live, row, live_p


@triton.jit
def _to_shifted(X, shuffle, n, m, N, FRONT: tl.constexpr, BLOCK_P: tl.constexpr):
    """The real partition's (BLOCK_NB0, BS, BLOCK_P) -> the shifted one's (BLOCK_NB1, BS, BLOCK_P)
    through the buffer: state n at buffer row FRONT + n; the shifted block rows m read row m."""
    cols = tl.arange(0, BLOCK_P)[None, None, :]
    tl.store(shuffle + (FRONT + n)[:, :, None] * BLOCK_P + cols, X, mask=(n < N)[:, :, None])
    tl.debug_barrier()
    Z = tl.load(shuffle + m[:, :, None] * BLOCK_P + cols)
    tl.debug_barrier()
    return Z


@triton.jit
def _to_real(Z, shuffle, n, m, N, FRONT: tl.constexpr, BLOCK_P: tl.constexpr):
    """The shifted partition's rows of real states -> the real partition (crop), through the buffer;
    the pad rows of the buffer stay zero."""
    cols = tl.arange(0, BLOCK_P)[None, None, :]
    real = (m >= FRONT) & (m < FRONT + N)
    tl.store(shuffle + m[:, :, None] * BLOCK_P + cols, Z, mask=real[:, :, None])
    tl.debug_barrier()
    X = tl.load(shuffle + (FRONT + n)[:, :, None] * BLOCK_P + cols, mask=(n < N)[:, :, None], other=0.0)
    tl.debug_barrier()
    return X


@triton.jit
def banded_forward(a0_ptr, a1_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, h0_ptr, y_ptr, hT_ptr, ckpt_ptr,
                   shuffle_ptr, L, H, G, NB0, NB1, P, n_chunks,
                   HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr,
                   BS: tl.constexpr, FRONT: tl.constexpr, BLOCK_NB0: tl.constexpr, BLOCK_NB1: tl.constexpr,
                   BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
    """Grid (b * H, cdiv(P, BLOCK_P)): y, the final state and (SAVE) the chunk checkpoints
    (b, H, n_chunks, N, P), n_chunks = cdiv(L, CHUNK).  `shuffle` holds BLOCK_NB1 BS BLOCK_P zeros
    per program."""
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BS)
    offs_i, offs_j = tl.arange(0, BLOCK_NB0), tl.arange(0, BLOCK_NB1)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    N = NB0 * BS
    n = offs_i[:, None] * BS + offs_r[None, :]
    m = offs_j[:, None] * BS + offs_r[None, :]
    shuffle = shuffle_ptr + (bh * tl.num_programs(1) + tile) * BLOCK_NB1 * BS * BLOCK_P
    state_offs = n[:, :, None] * P + offs_p[None, None, :]
    mask_np = (n < N)[:, :, None] & (offs_p < P)[None, None, :]
    if HAS_H0:
        X = tl.load(h0_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    else:
        X = tl.zeros((BLOCK_NB0, BS, BLOCK_P), dtype=COMPUTE)
    for c in range(0, n_chunks):
        if SAVE:
            tl.store(ckpt_ptr + (bh * n_chunks + c) * N * P + state_offs, X, mask=mask_np)
        for i in range(0, CHUNK):
            Bbar, Cv, dd, u, tok, live, row, live_p = _token_inputs(bbar_ptr, C_ptr, u_ptr, D_ptr, batch,
                                                                    c * CHUNK + i, h, g, L, H, G, N, P, n, offs_p,
                                                                    COMPUTE)
            A0, _ = _blocks_at(a0_ptr, tok, live, h, H, NB0, offs_i, offs_r, BS, COMPUTE)
            A1, _ = _blocks_at(a1_ptr, tok, live, h, H, NB1, offs_j, offs_r, BS, COMPUTE)
            Z = _to_shifted(_apply_blocks(A0, X), shuffle, n, m, N, FRONT, BLOCK_P)
            X = _to_real(_apply_blocks(A1, Z), shuffle, n, m, N, FRONT,
                         BLOCK_P)
            X = X + Bbar[:, :, None] * u[None, None, :]
            y = readout(Cv, X) + dd * u
            if HAS_Z:
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = y * zv / (1.0 + tl.exp(-zv))
            tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty), mask=live_p)
    tl.store(hT_ptr + bh * N * P + state_offs, X, mask=mask_np)


@triton.jit
def banded_backward(a0_ptr, a1_ptr, bbar_ptr, C_ptr, u_ptr, D_ptr, z_ptr, ckpt_ptr, dout_ptr, dhT_ptr, scratch_ptr,
                    shuffle_ptr, du_ptr, dz_ptr, dh0_ptr, da0_ptr, da1_ptr, dbbar_ptr, dC_ptr, dD_ptr,
                    L, H, G, NB0, NB1, P, n_chunks,
                    HAS_Z: tl.constexpr, CHUNK: tl.constexpr, BS: tl.constexpr, FRONT: tl.constexpr,
                    BLOCK_NB0: tl.constexpr, BLOCK_NB1: tl.constexpr, BLOCK_P: tl.constexpr,
                    COMPUTE: tl.constexpr):
    """Grid as the forward.  du, dz (b, L, H, P) and dh0 (b, H, N, P) directly; dA0_bar, dA1_bar
    (b, L', H, NB, BS, BS), dB_bar, dC (b, L', H, N) per head and dD (b, L', H) added into zeroed
    buffers, L' the length padded to whole chunks (padding tokens add junk there, sliced off)."""
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BS)
    offs_i, offs_j = tl.arange(0, BLOCK_NB0), tl.arange(0, BLOCK_NB1)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    N = NB0 * BS
    n = offs_i[:, None] * BS + offs_r[None, :]
    m = offs_j[:, None] * BS + offs_r[None, :]
    program = bh * tl.num_programs(1) + tile
    shuffle = shuffle_ptr + program * BLOCK_NB1 * BS * BLOCK_P
    size = BLOCK_NB0 * BS * BLOCK_P
    scratch = scratch_ptr + program * (CHUNK + 1) * size
    scratch_offs = n[:, :, None] * BLOCK_P + tl.arange(0, BLOCK_P)[None, None, :]
    state_offs = n[:, :, None] * P + offs_p[None, None, :]
    mask_np = (n < N)[:, :, None] & (offs_p < P)[None, None, :]
    Gs = tl.load(dhT_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        X = tl.load(ckpt_ptr + (bh * n_chunks + c) * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
        tl.store(scratch + scratch_offs, X)
        for i in range(0, CHUNK):                 # the chunk's states again, X_t in slot i + 1
            Bbar, _, _, u, tok, live, _, _ = _token_inputs(bbar_ptr, C_ptr, u_ptr, D_ptr, batch, c * CHUNK + i, h, g,
                                                           L, H, G, N, P, n, offs_p, COMPUTE)
            A0, _ = _blocks_at(a0_ptr, tok, live, h, H, NB0, offs_i, offs_r, BS, COMPUTE)
            A1, _ = _blocks_at(a1_ptr, tok, live, h, H, NB1, offs_j, offs_r, BS, COMPUTE)
            Z = _to_shifted(_apply_blocks(A0, X), shuffle, n, m, N, FRONT, BLOCK_P)
            X = _to_real(_apply_blocks(A1, Z), shuffle, n, m, N, FRONT, BLOCK_P) + Bbar[:, :, None] * u[None, None, :]
            tl.store(scratch + (i + 1) * size + scratch_offs, X)
        tl.debug_barrier()
        for j in range(0, CHUNK):
            i = CHUNK - 1 - j
            t = c * CHUNK + i
            Xt = tl.load(scratch + (i + 1) * size + scratch_offs)
            Xprev = tl.load(scratch + i * size + scratch_offs)
            Bbar, Cv, dd, u, tok, live, row, live_p = _token_inputs(bbar_ptr, C_ptr, u_ptr, D_ptr, batch, t, h, g,
                                                                    L, H, G, N, P, n, offs_p, COMPUTE)
            A0, op0 = _blocks_at(a0_ptr, tok, live, h, H, NB0, offs_i, offs_r, BS, COMPUTE)
            A1, op1 = _blocks_at(a1_ptr, tok, live, h, H, NB1, offs_j, offs_r, BS, COMPUTE)
            dy = tl.load(dout_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
            if HAS_Z:                              # out = y silu(z): y recomputed from X_t
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = readout(Cv, Xt) + dd * u
                sig = 1.0 / (1.0 + tl.exp(-zv))
                tl.store(dz_ptr + row, (dy * y * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                         mask=live_p)
                dy = dy * zv * sig
            Gs += Cv[:, :, None] * dy[None, None, :]
            du = dd * dy + readout(Bbar, Gs)
            tl.store(du_ptr + row, du.to(du_ptr.dtype.element_ty), mask=live_p)
            part = (batch * n_chunks * CHUNK + t) * H + h
            live_n = n < N
            tl.atomic_add(dbbar_ptr + part * N + n, tl.sum(Gs * u[None, None, :], axis=2), mask=live_n)
            tl.atomic_add(dC_ptr + part * N + n, tl.sum(Xt * dy[None, None, :], axis=2), mask=live_n)
            tl.atomic_add(dD_ptr + part, tl.sum(dy * u, axis=0))
            Z = _to_shifted(_apply_blocks(A0, Xprev), shuffle, n, m, N, FRONT, BLOCK_P)
            Gw = _to_shifted(Gs, shuffle, n, m, N, FRONT, BLOCK_P)
            tl.atomic_add(da1_ptr + part * NB1 * BS * BS + op1, tl.sum(Gw[:, :, None, :] * Z[:, None, :, :], axis=3),
                          mask=op1 < NB1 * BS * BS)
            Gy = _to_real(tl.sum(A1[:, :, :, None] * Gw[:, :, None, :], axis=1), shuffle, n, m, N, FRONT, BLOCK_P)
            tl.atomic_add(da0_ptr + part * N * BS + op0, tl.sum(Gy[:, :, None, :] * Xprev[:, None, :, :], axis=3),
                          mask=op0 < N * BS)
            Gs = tl.sum(A0[:, :, :, None] * Gy[:, :, None, :], axis=1)          # A0_bar^T Gy
        tl.debug_barrier()
    tl.store(dh0_ptr + bh * N * P + state_offs, Gs, mask=mask_np)

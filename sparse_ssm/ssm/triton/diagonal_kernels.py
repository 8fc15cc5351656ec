"""Triton kernels of the diagonal selective scan: a recurrent forward and its reverse-time backward.

One program per (batch row, head, tile of BLOCK_P channels) walks the sequence with the state
X (BLOCK_N states, BLOCK_P channels) in registers, in the compute dtype (float32, or float64 for
float64 inputs), reading the inputs in whatever dtype they come in.  Per token t, for every state n
and channel p (`scan.py` states the equations; the discretisation is inlined here):

    x = dt_t a_t[n]
    zoh:  decay = exp(x),                    s = dt_t expm1(x) / x
    gbt:  decay = (1 + (1 - alpha) x) / den, s = dt_t / den,        den = 1 - alpha x
    signed eigenvalues: decay <- 2 decay - 1
    X[n, p] <- decay X[n, p] + s B_t[n] u_t[p]
    y_t[p]   = sum_n C_t[n] X[n, p] + D_t u_t[p],  times silu(z_t[p]) with the gate

The forward stores the state before every CHUNK tokens (chunk checkpoints, 1 / CHUNK of the
per-token states).  The backward walks the chunks from last to first: it recomputes the chunk's
states from its checkpoint into a per-program scratch buffer (CHUNK + 1 states), then runs the
reverse-time recurrence of the state gradient G (mamba_ssm's selective-scan backward does the
same per chunk):

    G <- G + C_t dy_t^T;  then the token's gradients from G, X_t and X_{t-1};  G <- decay_t G

and G left after the first token is the initial state's gradient.  Gradients of per-token values
that sum over channels (dt, a, B, C, D) are written per channel tile and summed by the caller.
Inputs are contiguous: u, z, y (b, L, H, P); dt, D (b, L, H); a (b, L, H, N); B, C (b, L, G, N);
states (b, H, N, P).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _phi(x, SMALL: tl.constexpr):
    """(expm1(x) / x, its derivative), by their series where |x| < SMALL (no cancellation)."""
    small = tl.abs(x) < SMALL
    safe = tl.where(small, 1.0, x)
    ex = tl.exp(x)
    series = 1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0))))
    phi = tl.where(small, series, (ex - 1.0) / safe)
    dseries = 0.5 + x * (1.0 / 3.0 + x * (1.0 / 8.0 + x * (1.0 / 30.0 + x * (1.0 / 144.0))))
    return phi, tl.where(small, dseries, (ex - phi) / safe)


@triton.jit
def _discretize(dt, a, alpha, GBT: tl.constexpr, SIGNED: tl.constexpr, SMALL: tl.constexpr):
    """For x = dt a (N,): decay, input gain s, d decay / dx, ds / dx and the direct ds / d dt."""
    x = dt * a
    if GBT:
        inv = 1.0 / (1.0 - alpha * x)
        decay = (1.0 + (1.0 - alpha) * x) * inv
        ddecay = inv * inv
        s = dt * inv
        ds_dx = dt * alpha * inv * inv
        ds_ddt = inv
    else:
        phi, dphi = _phi(x, SMALL)
        decay = tl.exp(x)
        ddecay = decay
        s = dt * phi
        ds_dx = dt * dphi
        ds_ddt = phi
    if SIGNED:
        decay = 2.0 * decay - 1.0
        ddecay = 2.0 * ddecay
    return decay, s, ddecay, ds_dx, ds_ddt


@triton.jit
def _token_inputs(u_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, D_ptr, batch, t, h, g, L, H, G, N, P, offs_n, offs_p,
                  COMPUTE: tl.constexpr):
    """Token t's inputs of one head in the compute dtype, zeros (dt = 0: X left alone) past the end;
    also the offset of its (P,) rows and the channel mask.  (Masks are built by comparisons: the
    interpreter turns `mask & scalar_bool` into an int array, which its loads refuse.)"""
    live = batch * L + t < (batch + 1) * L
    tok = tl.minimum(batch * L + t, batch * L + L - 1)        # scalar loads stay in bounds, unmasked
    live_n, live_p = offs_n < tl.where(live, N, 0), offs_p < tl.where(live, P, 0)
    dt = tl.where(live, tl.load(dt_ptr + tok * H + h).to(COMPUTE), 0.0)
    d = tl.where(live, tl.load(D_ptr + tok * H + h).to(COMPUTE), 0.0)
    a = tl.load(a_ptr + (tok * H + h) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    Bv = tl.load(B_ptr + (tok * G + g) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    Cv = tl.load(C_ptr + (tok * G + g) * N + offs_n, mask=live_n, other=0.0).to(COMPUTE)
    row = (tok * H + h) * P + offs_p
    u = tl.load(u_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
    return dt, d, a, Bv, Cv, u, row, live_p


@triton.jit
def diagonal_forward(u_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, D_ptr, z_ptr, h0_ptr, y_ptr, hT_ptr, ckpt_ptr,
                     L, H, G, N, P, n_chunks, alpha,
                     HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr, GBT: tl.constexpr,
                     SIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                     COMPUTE: tl.constexpr, SMALL: tl.constexpr):
    """Grid (b * H, cdiv(P, BLOCK_P)): y, the final state and (SAVE) the chunk checkpoints
    (b, H, n_chunks, N, P), n_chunks = cdiv(L, CHUNK) (from the host: triton 3.6's interpreter
    cannot loop up to a tl.cdiv)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    mask_n, mask_p = offs_n < N, offs_p < P
    mask_np = mask_n[:, None] & mask_p[None, :]
    state_offs = offs_n[:, None] * P + offs_p[None, :]
    if HAS_H0:
        X = tl.load(h0_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    else:
        X = tl.zeros((BLOCK_N, BLOCK_P), dtype=COMPUTE)
    for k in range(0, n_chunks):
        if SAVE:
            tl.store(ckpt_ptr + (bh * n_chunks + k) * N * P + state_offs, X, mask=mask_np)
        for i in range(0, CHUNK):
            t = k * CHUNK + i
            dt, d, a, Bv, Cv, u, row, live_p = _token_inputs(u_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, D_ptr, batch, t, h,
                                                             g, L, H, G, N, P, offs_n, offs_p, COMPUTE)
            decay, s, _, _, _ = _discretize(dt, a, alpha, GBT, SIGNED, SMALL)
            X = decay[:, None] * X + (s * Bv)[:, None] * u[None, :]
            y = tl.sum(Cv[:, None] * X, axis=0) + d * u
            if HAS_Z:
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = y * zv / (1.0 + tl.exp(-zv))
            tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty), mask=live_p)
    tl.store(hT_ptr + bh * N * P + state_offs, X, mask=mask_np)


@triton.jit
def diagonal_backward(u_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, D_ptr, z_ptr, ckpt_ptr, dout_ptr, dhT_ptr, scratch_ptr,
                      du_ptr, dz_ptr, dh0_ptr, ddt_ptr, da_ptr, dB_ptr, dC_ptr, dD_ptr,
                      L, H, G, N, P, n_chunks, alpha, rows,
                      HAS_Z: tl.constexpr, GBT: tl.constexpr, SIGNED: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr, SMALL: tl.constexpr):
    """Grid as the forward.  du, dz (b, L, H, P) and dh0 (b, H, N, P) directly; ddt, dD
    (tiles, b, L', H) and da, dB, dC (tiles, b, L', H, N) per channel tile, L' the length padded to
    whole chunks (`rows` = b)."""
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    batch, h = bh // H, bh % H
    g = h // (H // G)
    mask_n, mask_p = offs_n < N, offs_p < P
    mask_np = mask_n[:, None] & mask_p[None, :]
    state_offs = offs_n[:, None] * P + offs_p[None, :]
    scratch = scratch_ptr + (bh * tl.num_programs(1) + tile) * (CHUNK + 1) * BLOCK_N * BLOCK_P
    scratch_offs = offs_n[:, None] * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
    Gs = tl.load(dhT_ptr + bh * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        X = tl.load(ckpt_ptr + (bh * n_chunks + k) * N * P + state_offs, mask=mask_np, other=0.0).to(COMPUTE)
        tl.store(scratch + scratch_offs, X)
        for i in range(0, CHUNK):                 # the chunk's states again, X_t in slot i + 1
            t = k * CHUNK + i
            dt, _, a, Bv, _, u, _, _ = _token_inputs(u_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, D_ptr, batch, t, h, g, L,
                                                     H, G, N, P, offs_n, offs_p, COMPUTE)
            decay, s, _, _, _ = _discretize(dt, a, alpha, GBT, SIGNED, SMALL)
            X = decay[:, None] * X + (s * Bv)[:, None] * u[None, :]
            tl.store(scratch + (i + 1) * BLOCK_N * BLOCK_P + scratch_offs, X)
        tl.debug_barrier()
        for j in range(0, CHUNK):
            i = CHUNK - 1 - j
            t = k * CHUNK + i
            Xt = tl.load(scratch + (i + 1) * BLOCK_N * BLOCK_P + scratch_offs)
            Xprev = tl.load(scratch + i * BLOCK_N * BLOCK_P + scratch_offs)
            dt, d, a, Bv, Cv, u, row, live_p = _token_inputs(u_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, D_ptr, batch, t, h,
                                                             g, L, H, G, N, P, offs_n, offs_p, COMPUTE)
            dy = tl.load(dout_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
            if HAS_Z:                              # out = y silu(z): y recomputed from X_t
                zv = tl.load(z_ptr + row, mask=live_p, other=0.0).to(COMPUTE)
                y = tl.sum(Cv[:, None] * Xt, axis=0) + d * u
                sig = 1.0 / (1.0 + tl.exp(-zv))
                tl.store(dz_ptr + row, (dy * y * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                         mask=live_p)
                dy = dy * zv * sig
            Gs += Cv[:, None] * dy[None, :]
            decay, s, ddecay, ds_dx, ds_ddt = _discretize(dt, a, alpha, GBT, SIGNED, SMALL)
            du = d * dy + tl.sum((s * Bv)[:, None] * Gs, axis=0)
            tl.store(du_ptr + row, du.to(du_ptr.dtype.element_ty), mask=live_p)
            dB_bar = tl.sum(Gs * u[None, :], axis=1)
            ds = Bv * dB_bar
            dx = tl.sum(Gs * Xprev, axis=1) * ddecay + ds * ds_dx
            part = ((tile * rows + batch) * n_chunks * CHUNK + t) * H + h    # padding tokens write zeros
            tl.store(ddt_ptr + part, tl.sum(dx * a + ds * ds_ddt, axis=0))
            tl.store(dD_ptr + part, tl.sum(dy * u, axis=0))
            tl.store(da_ptr + part * N + offs_n, dx * dt, mask=mask_n)
            tl.store(dB_ptr + part * N + offs_n, s * dB_bar, mask=mask_n)
            tl.store(dC_ptr + part * N + offs_n, tl.sum(Xt * dy[None, :], axis=1), mask=mask_n)
            Gs = decay[:, None] * Gs
        tl.debug_barrier()
    tl.store(dh0_ptr + bh * N * P + state_offs, Gs, mask=mask_np)

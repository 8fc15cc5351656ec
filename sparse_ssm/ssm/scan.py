"""The selective scan: the discrete recurrence of a selective SSM, per head.

For each head, with state X_t of shape (N, P) (N states, P channels of the head):

    A_bar_t, B_bar_t = discretize(A_t, B_t, dt_t)          (A_t structured, see structures.py)
    X_t = A_bar_t X_{t-1} + B_bar_t u_t^T                  (N, N) @ (N, P) + (N, 1) (1, P)
    y_t = X_t^T C_t + D_t u_t                              (P,)

All functions here share one signature (like mamba_ssm's `selective_scan_ref`):

    fn(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state=None, z=None) -> (y, final_state)

    u  (batch, length, heads, P)   inputs            dt (batch, length, heads)   step sizes > 0
    A_raw (batch, length, heads, structure.raw_size): the raw parameters of A_t per token and head;
       structure.continuous(A_raw) is the continuous A_t (built inside, so that a fused kernel
       can build it in registers)
    B, C (batch, length, groups, N): shared by the heads of a group (groups divides heads;
         groups = heads gives every head its own)        D (batch, length, heads)   skip gains
    initial_state, final_state (batch, heads, N, P);  y (batch, length, heads, P)
    z  (batch, length, heads, P) or None: Mamba's output gate, y <- y * silu(z)

- `selective_scan_ref`: the slow reference.  Dense N x N matrices from
  `structure.dense_discretize` (dense `discretization.discretize` of the dense A_t), one Python
  step per token.  Obviously correct, O(L N^3).
- `selective_scan_sequential`: one step per token with the structured operators
  (what recurrent decoding uses; `use_parallel_scan: false`).
- `selective_scan_fused` (`fused.py`): the fast path on CPUs for the diagonal structure, a native
  kernel that walks the sequence once with the state in registers (`selective_scan` uses it
  whenever it is available; otherwise the chunked path below).
- `selective_scan_triton` (`triton/`): the path on CUDA devices for the diagonal, rotation,
  block and banded (b = 2, 4, 8), householder, low-rank and permutation structures, Triton
  kernels that walk the sequence once with the state in registers (where triton is importable).
- `selective_scan_chunked`: the pure-PyTorch fast path.  The sequence is cut into chunks of T tokens.
  * Diagonal A (the Mamba case) uses the matmul form of Mamba-2's SSD, with one decay per state:
    inside a chunk, with l_t = log A_bar_t and the inclusive cumulative sum S_t = sum_{k<=t} l_k,
        y_t = sum_{s<=t} [ sum_n C_t[n] B_bar_s[n] exp(S_t[n] - S_s[n]) ] u_s        (intra-chunk)
            + (C_t * exp(S_t))^T X_start                                               (carried state)
    and the chunk's end state is exp(S_T) * X_start + sum_s exp(S_T - S_s) B_bar_s u_s^T.
    Only (T, T, N) decay tensors per chunk are formed, never (length, width, N) states.
    (bilinear / gbt decays can be negative: magnitudes go through the logs, signs through the
    parity of the number of negative factors.)
  * Other structures use a two-level scan: inside every chunk (all chunks at once, T steps) the
    local state from zero and the prefix operator P_t = A_bar_t ... A_bar_1 (block-diagonal for
    block structures, N x N for banded and low-rank); then the chunk boundary states;
    then y_t += (P_t^T C_t)^T X_start.
  * The chunk boundary states (both cases): chunk k maps X to P_k X + Z_k.  A tree over the chunks
    (odd-even reduction, `_chunk_boundary_states`) composes these maps in about 4 log2(L / T)
    Python steps of O(L / T) work in all, on every device, so the steps per layer are
    T + O(log2(L / T)) (structured) or O(log2(L / T)) (diagonal), never one per chunk.
    T: the model's `scan_chunk_size`, or `chunk_size_for(device, structure)` when it is unset.
  * bf16 / fp16 inputs are computed in float32 (y in the inputs' dtype, the state float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused, triton
from .discretization import alpha_for, expm1_ratio
from .structures import DiagonalStructure


def _per_head(X, heads: int):
    """B or C per group (b, L, G, N) -> per head (b, L, heads, N)."""
    return X if X.shape[2] == heads else X.repeat_interleave(heads // X.shape[2], dim=2)


def _gated(y, z):
    return y if z is None else y * F.silu(z)


def _at_least_fp32(x):
    """bf16 / fp16 tensors as float32; anything else (None included) as it is."""
    return x.float() if x is not None and x.dtype in (torch.bfloat16, torch.float16) else x


def _zero_state(u, N):
    b, _, h, p = u.shape
    return u.new_zeros(b, h, N, p)


def selective_scan_ref(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None):
    """Slow reference: dense matrices, dense discretisation, a loop over tokens."""
    B, C = _per_head(B, u.shape[2]), _per_head(C, u.shape[2])
    A_bar, B_bar = structure.dense_discretize(structure.continuous(A_raw), dt, B, method, alpha)  # (b, L, h, N, N), (b, L, h, N)
    X = _zero_state(u, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(u.shape[1]):
        X = A_bar[:, t] @ X + B_bar[:, t, :, :, None] * u[:, t, :, None, :]
        ys.append((C[:, t, :, :, None] * X).sum(-2) + D[:, t, :, None] * u[:, t])
    return _gated(torch.stack(ys, 1), z), X


def selective_scan_sequential(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None,
                              z=None):
    """One step per token with the structured discrete operators (recurrent mode)."""
    B, C = _per_head(B, u.shape[2]), _per_head(C, u.shape[2])
    A_bar, B_bar = structure.discretize(structure.continuous(A_raw), dt, B, method, alpha)
    X = _zero_state(u, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    steps = zip(*(t.unbind(1) for t in A_bar), B_bar.unbind(1), C.unbind(1), D.unbind(1), u.unbind(1))
    for *op, b_t, c_t, d_t, u_t in steps:
        X = structure.apply(op, X) + b_t[..., None] * u_t[..., None, :]
        ys.append((c_t[..., None] * X).sum(-2) + d_t[..., None] * u_t)
    return _gated(torch.stack(ys, 1), z), X


def _pad_time(x, pad):
    """Zero-pad dimension 1 of a tensor or of every tensor in a tuple."""
    if isinstance(x, tuple):
        return tuple(_pad_time(t, pad) for t in x)
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1) if pad else x


def _chunk(x, T):
    """(b, L, ...) -> (b, L/T, T, ...) after zero-padding the length to a multiple of T."""
    x = _pad_time(x, (-x.shape[1]) % T)
    return x.reshape(x.shape[0], -1, T, *x.shape[2:])


def _diagonal_log_decay(a, dt, method, alpha, signed=False):
    """log |A_bar| (b, L, h, N), negative-sign mask (or None), and the B_bar scale.  `signed`:
    A_bar is 2 A_bar - 1 (eigenvalues in (-1, 1])."""
    dta = dt[..., None] * a
    tiny = torch.finfo(dta.dtype).tiny
    if method == "zoh":
        if not signed:
            return dta, None, dt[..., None] * expm1_ratio(dta)
        value = 2 * torch.exp(dta) - 1
        return torch.log(value.abs().clamp_min(tiny)), value < 0, dt[..., None] * expm1_ratio(dta)
    al = alpha_for(method, alpha)
    num = 1.0 + (1.0 - al) * dta
    den = 1.0 - al * dta
    if signed:                                   # 2 num / den - 1 = (2 num - den) / den
        num = 2 * num - den
    log_abs = torch.log(num.abs().clamp_min(tiny)) - torch.log(den)
    return log_abs, (num < 0), dt[..., None] / den


def _signed_exp(log_abs, parity):
    out = torch.exp(log_abs)
    return out if parity is None else out * (1.0 - 2.0 * torch.remainder(parity, 2.0))


def _diagonal_chunked(u, dt, a, B, C, D, method, alpha, initial_state, T, signed, leaf):
    b, L, h, P = u.shape
    N = a.shape[-1]
    log_decay, negative, b_scale = _diagonal_log_decay(a, dt, method, alpha, signed)
    B_bar = b_scale * B
    # (b, L, h, .) -> (b, h, c, T, .)
    to_chunks = lambda x: _chunk(x, T).permute(0, 3, 1, 2, 4).contiguous()
    ld, Bc, Cc, uc = to_chunks(log_decay), to_chunks(B_bar), to_chunks(C), to_chunks(u)
    cum = ld.cumsum(3)                                                  # (b, h, c, T, N)
    par = None
    if negative is not None:
        par = to_chunks(negative.to(u.dtype)).cumsum(3)
    causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()[..., None]
    # intra-chunk: G[t, s] = sum_n C_t[n] B_s[n] exp(S_t[n] - S_s[n]),  s <= t
    diff = cum[..., :, None, :] - cum[..., None, :, :]                 # (b, h, c, T, T, N)
    diff = torch.where(causal, diff, float("-inf"))
    decay = _signed_exp(diff, None if par is None else par[..., :, None, :] - par[..., None, :, :])
    G = (Cc[..., :, None, :] * Bc[..., None, :, :] * decay).sum(-1)   # (b, h, c, T, T); einsum is 3x slower
    y = G @ uc                                                          # (b, h, c, T, P)
    # chunk states from zero start, and the carried states
    last = cum[..., -1:, :]
    plast = None if par is None else par[..., -1:, :]
    to_end = _signed_exp(last - cum, None if par is None else plast - par)
    local_end = (Bc * to_end).transpose(-1, -2) @ uc                    # (b, h, c, N, P)
    chunk_decay = _signed_exp(last, plast)[..., 0, :]                   # (b, h, c, N)
    X_start, X = _chunk_boundary_states(DiagonalStructure(N), (chunk_decay,), local_end, initial_state, dim=2,
                                        leaf=leaf)                          # (b, h, c, N, P)
    y = y + (Cc * _signed_exp(cum, par)) @ X_start
    y = y.reshape(b, h, -1, P)[:, :, :L].transpose(1, 2)
    return y + D[..., None] * u, X


def _chunk_states_sequential(structure, prefix, Z, X0, dim):
    """`_chunk_boundary_states` one chunk per Python step."""
    X = torch.zeros_like(Z.select(dim, 0)) if X0 is None else X0
    starts = []
    # unbind, not indexing: the backward of x[:, k] would write a full-size zero tensor per chunk
    for *chunk_op, z_k in zip(*(p.unbind(dim) for p in prefix), Z.unbind(dim)):
        starts.append(X)
        X = structure.transfer(chunk_op, X) + z_k
    return torch.stack(starts, dim), X


def _chunk_boundary_states(structure, prefix, Z, X0, dim=1, leaf=None):
    """The state entering every chunk.

    Chunk k maps a state X to prefix_k X + Z_k: prefix is a tuple of (b, c, h, ...) chunk operators
    in the structure's prefix layout, Z (b, c, h, N, P) every chunk's end state from zero, X0
    (b, h, N, P) the state before the first chunk (None: zeros); `dim`: the chunk axis c (1 as
    shown; 2 for (b, h, c, ...)).  Returns X_start (Z's shape) and the final state (b, h, N, P).

    A work-efficient tree (odd-even reduction): neighbouring chunks are composed into pairs, the
    pairs' boundary states come from the same function one level up, and every second chunk's start
    follows from its left neighbour's.  Each level is a handful of batched calls on half as many
    chunks, so about 4 log2(c / leaf) + leaf Python steps and O(c) work in all (no per-chunk loop,
    and none of a Hillis-Steele scan's O(c log c) memory traffic).  At most `leaf` chunks
    (LEAF_CHUNKS when None) are stepped one at a time.
    """
    leaf = LEAF_CHUNKS if leaf is None else leaf
    c = Z.shape[dim]
    if c <= leaf:
        return _chunk_states_sequential(structure, prefix, Z, X0, dim)
    if c % 2:                                        # the last chunk after the tree over the others
        head = lambda x: x.narrow(dim, 0, c - 1)
        starts, X = _chunk_boundary_states(structure, tuple(map(head, prefix)), head(Z), X0, dim, leaf)
        last = tuple(p.select(dim, c - 1) for p in prefix)
        return torch.cat([starts, X.unsqueeze(dim)], dim), structure.transfer(last, X) + Z.select(dim, c - 1)
    pairs = lambda x, i: x.unflatten(dim, (c // 2, 2)).select(dim + 1, i)
    even, odd = tuple(pairs(p, 0) for p in prefix), tuple(pairs(p, 1) for p in prefix)
    Z_even = pairs(Z, 0)
    Z_pair = structure.transfer(odd, Z_even) + pairs(Z, 1)
    starts_even, X = _chunk_boundary_states(structure, structure.compose_prefixes(odd, even), Z_pair, X0, dim, leaf)
    starts_odd = structure.transfer(even, starts_even) + Z_even
    return torch.stack([starts_even, starts_odd], dim + 1).flatten(dim, dim + 1), X


def _structured_chunked(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, T, leaf):
    b, L, h, P = u.shape
    N = B.shape[-1]
    # padding tokens get dt = 0: A_bar = I and B_bar = 0, so they leave the state alone
    pad = (-L) % T
    dt, A_raw, B = _pad_time(dt, pad), _pad_time(A_raw, pad), _pad_time(B, pad)
    A_bar, B_bar = structure.discretize(structure.continuous(A_raw), dt, B, method, alpha)
    n_chunks = (L + pad) // T
    ops = tuple(t.reshape(b, n_chunks, T, *t.shape[2:]) for t in A_bar)   # (b, c, T, h, ...)
    Bc, Cc, uc = _chunk(B_bar, T), _chunk(C, T), _chunk(u, T)
    Z = u.new_zeros(b, n_chunks, h, N, P)
    prefix = structure.identity(u, (b, n_chunks, h))
    ys, pulled = [], []
    steps = zip(*(x.unbind(2) for x in ops), Bc.unbind(2), Cc.unbind(2), uc.unbind(2))
    for *op, b_t, c_t, u_t in steps:
        Z = structure.apply(op, Z) + b_t[..., None] * u_t[..., None, :]
        prefix = structure.compose(op, prefix)
        ys.append((c_t[..., None] * Z).sum(-2))
        pulled.append(structure.pull_back(prefix, c_t))
    y = torch.stack(ys, 2)                                              # (b, c, T, h, P)
    pulled = torch.stack(pulled, 2)                                     # (b, c, T, h, N)
    X_start, X = _chunk_boundary_states(structure, prefix, Z, initial_state, leaf=leaf)   # (b, c, h, N, P)
    y = y + (pulled[..., None] * X_start[:, :, None]).sum(-2)
    y = y.reshape(b, -1, h, P)[:, :L]
    return y + D[..., None] * u, X


# Tokens per chunk of the chunked scan when the model config leaves `scan_chunk_size` unset, and the
# chunks stepped one at a time at the bottom of the tree over the chunk boundaries.  On a CPU
# (measured by bench/fallback.py, 1 thread, fwd + bwd, SPARSE_SSM_NATIVE=0): CPU_CHUNK_SIZE and
# LEAF_CHUNKS.  The Python steps per layer are then about T + 4 log2(L / (T LEAF_CHUNKS)) + LEAF_CHUNKS
# (structured) or 4 log2(L / (T LEAF_CHUNKS)) + LEAF_CHUNKS (diagonal), whatever the length: the
# diagonal path forms (T, T, N) decays per chunk (b h L T N elements: memory grows with T), the
# structured path steps through T tokens inside the chunks (all chunks at once).
CPU_CHUNK_SIZE = {"diagonal": 8, "structured": 8}
DEVICE_CHUNK_SIZE = {"diagonal": 32, "structured": 16}
LEAF_CHUNKS = 4


def chunk_size_for(device: torch.device, structure) -> int:
    """The chunk size of the chunked scan on `device` for `structure` (see CPU_CHUNK_SIZE)."""
    sizes = CPU_CHUNK_SIZE if device.type == "cpu" else DEVICE_CHUNK_SIZE
    return sizes["diagonal" if isinstance(structure, DiagonalStructure) else "structured"]


def selective_scan_chunked(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None,
                           chunk_size=None, leaf=None):
    """Pure-PyTorch fast path (see the module docstring): chunked matmul scan.  chunk_size None:
    `chunk_size_for(u.device, structure)`; leaf: the chunks stepped one at a time at the bottom of
    the tree over the chunk boundaries (None: LEAF_CHUNKS; see `_chunk_boundary_states`).
    bf16 / fp16 inputs are computed in float32 (the matrix exponentials, solves and decay products
    lose every digit in 8 bits of mantissa): y comes back in u's dtype, the final state in float32,
    each gradient in its input's dtype (as on the Triton path)."""
    T = chunk_size_for(u.device, structure) if chunk_size is None else chunk_size
    out_dtype = u.dtype
    u, dt, A_raw, B, C, D, initial_state, z = map(_at_least_fp32, (u, dt, A_raw, B, C, D, initial_state, z))
    B, C = _per_head(B, u.shape[2]), _per_head(C, u.shape[2])
    with torch.autocast(u.device.type, enabled=False):
        if isinstance(structure, DiagonalStructure):
            y, X = _diagonal_chunked(u, dt, structure.continuous(A_raw), B, C, D, method, alpha, initial_state, T,
                                     structure.signed, leaf)
        else:
            y, X = _structured_chunked(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, T, leaf)
        return _gated(y, z).to(out_dtype), X


def selective_scan(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None,
                   use_parallel_scan=True, chunk_size=None):
    """Dispatch: the fused kernel where it applies (CPU), the Triton kernels on CUDA where they apply
    (`triton.use_triton`), else the chunked path; the sequential scan when `use_parallel_scan` is off."""
    if use_parallel_scan:
        if fused.available(u, structure, method):
            return fused.selective_scan_fused(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)
        if triton.use_triton(u.device, structure):
            return triton.selective_scan_triton(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)
        return selective_scan_chunked(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z, chunk_size)
    return selective_scan_sequential(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)


def selective_scan_step(u, dt, A_raw, B, C, D, structure, method, alpha, state, z=None):
    """One recurrent step in place (decoding): u (b, H, P), dt (b, H), A_raw (b, H, raw_size),
    B/C (b, G, N), D (b, H), z (b, H, P) or None; `state` (b, H, N, P) is advanced in place.
    Returns y (b, H, P).  Dispatch: the fused kernel on CPUs; on CUDA one Triton launch (diagonal,
    rotation, blocks of 2, 4, 8: `triton.selective_state_update`, unless SPARSE_SSM_TRITON=0);
    else the sequential scan's step."""
    if fused.available(u, structure, method) and state.is_contiguous() and state.dtype == u.dtype:
        if isinstance(structure, DiagonalStructure):
            return fused.step_in_place(u, dt, structure.continuous(A_raw), B, C, D, method, alpha, state, z, structure)
        y, new = fused.selective_scan_fused(u[:, None], dt[:, None], A_raw[:, None], B[:, None], C[:, None], D[:, None],
                                            structure, method, alpha, state, None if z is None else z[:, None])
        state.copy_(new)
        return y[:, 0]
    if triton.use_triton(u.device, structure) and triton.state_update_fits(structure, u, state):
        return triton.selective_state_update(u, dt, A_raw, B, C, D, structure, method, alpha, state, z)
    y, new = selective_scan_sequential(u[:, None], dt[:, None], A_raw[:, None], B[:, None], C[:, None], D[:, None],
                                       structure, method, alpha, state, None if z is None else z[:, None])
    state.copy_(new)
    return y[:, 0]

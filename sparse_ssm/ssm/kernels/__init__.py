"""The native CPU kernels of the scan, built on first use and loaded with ctypes.

`native_library()` returns the loaded library, or None when it cannot be had (no C++ compiler,
a failed build, or ``SPARSE_SSM_NATIVE=0`` in the environment); callers then use the pure-PyTorch
paths, and a one-time note says why.  The sources (`selective_scan.cpp`: the diagonal selective
scan with its output gate; `block_scan.cpp`: the same for block-diagonal, rotation and banded
structures, their operators built in the kernel; `lowrank_scan.cpp`: for diagonal-plus-low-rank
A_t through the Woodbury identity; `householder_scan.cpp`: for products of Householder reflections
times a diagonal, applied to the state one reflection at a time; `scan_head.h`: the walk over one
(batch row, head) that those two share; `causal_conv.cpp`: the causal depthwise convolution +
SiLU; `cross_entropy.cpp`: the softmax cross-entropy of the LM head's logits, in place;
`lm_head.cpp`: the LM head's logits for the few rows of a decoding step (one pass over its weight);
`layer_step.cpp`: a whole decoding step of a layer (diagonal A or the block family) between its
projections, the RMSNorm of its rows, the residual block around both, and the pre-norm FFN of a block;
`block_ops.h`: the per-token operators of the block family, shared by `block_scan.cpp` and the step;
`block_heads.h`: those of every head of a step at once; `int8_gemv.h` / `int8_gemv.cpp`: the product
of a few float rows with an int8 weight (weight-only int8, int8 activations, AVX512-VNNI),
`int8_columns.h` the same with the weight transposed (the generator's short A map); `vec.h`: their
vector utilities — plain C++
with C entry points and no PyTorch headers, built in under a minute) are compiled by
`torch.utils.cpp_extension.load` (ninja; the build is cached under ~/.cache/sparse_ssm/kernels,
keyed by the source, the compiler flags, the CPU and the paths of the sources and of torch, and
guarded by a file lock so that several processes build it once).  It is compiled for the machine
it runs on (-march=native).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / name for name in ("selective_scan.cpp", "block_scan.cpp", "lowrank_scan.cpp", "householder_scan.cpp",
                                    "causal_conv.cpp", "cross_entropy.cpp", "layer_step.cpp", "int8_gemv.cpp",
                                    "lm_head.cpp")]
HEADERS = [HERE / name for name in ("vec.h", "pool.h", "scan_head.h", "block_ops.h", "block_heads.h", "int8_gemv.h",
                                    "int8_columns.h", "float_gemv.h")]
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-pthread"]
ABI_VERSION = 3

_state = {"tried": False, "lib": None, "reason": None}


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" where it cannot be read)."""
    try:
        rows = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line for line in rows if line.startswith(("flags", "Features"))).split(":", 1)[1].strip()
    except (OSError, StopIteration, IndexError):
        return ""


def _cpu_signature() -> str:
    return f"{platform.machine()}:{platform.processor()}:{cpu_flags()}"


def _build() -> Path:
    import shutil

    from torch.utils.cpp_extension import load

    # always the `ninja` wheel's (a dependency) when it is installed: a system ninja of another version
    # (1.11 against the wheel's 1.13) reads the other's build log as stale and silently rebuilds every
    # kernel, so `.venv/bin/python` (system ninja first on PATH) and an activated venv would alternate
    try:
        import ninja
    except ImportError:
        ninja = None
    if ninja is not None and shutil.which("ninja") != shutil.which("ninja", path=ninja.BIN_DIR):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

    text = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    # the build files name the sources' and torch's paths: another checkout or environment gets its own
    # folder instead of making ninja rebuild this one
    where = f"{HERE}|{Path(torch.__file__).parent}|{torch.__version__}"
    key = hashlib.sha256(text + " ".join(CFLAGS).encode() + _cpu_signature().encode() + where.encode()).hexdigest()[:12]
    name = f"sparse_ssm_scan_{key}"
    folder = Path(os.environ.get("SPARSE_SSM_CACHE", Path.home() / ".cache" / "sparse_ssm")) / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"{name}.so"
    if not library.is_file():
        print("sparse-ssm: compiling the fused CPU scan kernel (once per checkout and environment; under a "
              "minute) ...", file=sys.stderr, flush=True)
    return Path(load(name, [str(p) for p in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-pthread"],
                     extra_include_paths=[str(HERE)], build_directory=str(folder), is_python_module=False,
                     verbose=False))


def _bind(lib: ctypes.CDLL):
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    scan_dims = [i64] * 7 + [c_int, ctypes.c_double, c_int]           # b, L, H, P, N, G, z_stride, method, alpha, threads
    conv_dims = [i64] * 5 + [c_int]                                    # b, L, E, K, x_stride, threads
    block_dims = [i64] * 8 + [c_int, c_int, ctypes.c_double, c_int]  # b, L, H, P, N, G, bs, z_stride, kind, method, ...
    lowrank_dims = [i64] * 8 + [ctypes.c_double, c_int]              # b, L, H, P, N, G, rank, z_stride, alpha, threads
    householder_dims = [i64] * 8 + [c_int, ctypes.c_double, c_int]   # b, L, H, P, N, G, reflections, z_stride, method, ...
    signatures = {"ssm_diag_forward": [ptr] * 12 + scan_dims, "ssm_diag_backward": [ptr] * 19 + scan_dims,
                  "ssm_block_forward": [ptr] * 12 + block_dims, "ssm_block_backward": [ptr] * 19 + block_dims,
                  "ssm_lowrank_forward": [ptr] * 12 + lowrank_dims, "ssm_lowrank_backward": [ptr] * 19 + lowrank_dims,
                  "ssm_householder_forward": [ptr] * 12 + householder_dims,
                  "ssm_householder_backward": [ptr] * 19 + householder_dims,
                  "ssm_conv_forward": [ptr] * 6 + conv_dims, "ssm_conv_backward": [ptr] * 9 + conv_dims,
                  "ssm_cross_entropy": [ptr] * 3 + [i64, i64, ctypes.c_double, c_int, c_int],
                  "ssm_layer_step": [ptr] * 12 + [i64] * 8 + [c_int, ctypes.c_double, c_int],
                  "ssm_int8_linear": [ptr] * 5 + [i64] * 3 + [c_int],
                  "ssm_ffn_step_q8": [ptr] * 3 + [ctypes.c_double] + [ptr] * 6 + [i64] * 3 + [c_int] * 2,
                  "ssm_block_step_q8": [ptr] * 3 + [ctypes.c_double] + [ptr] * 4 + [i64] + [ptr] * 13 + [i64] * 8
                  + [c_int, ctypes.c_double, c_int],
                  "ssm_rms_norm": [ptr] * 3 + [i64, i64, ctypes.c_double],
                  "ssm_lm_head": [ptr] * 3 + [i64] * 3 + [c_int],
                  "ssm_ffn_step": [ptr] * 3 + [ctypes.c_double] + [ptr] * 4 + [i64] * 3 + [c_int] * 2,
                  "ssm_block_step": [ptr] * 3 + [ctypes.c_double] + [ptr] * 2 + [i64] + [ptr] * 10 + [i64] * 8
                  + [c_int, ctypes.c_double, c_int]}
    for name, argtypes in signatures.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, c_int
    lib.ssm_lm_head_bf16.argtypes, lib.ssm_lm_head_bf16.restype = signatures["ssm_lm_head"], c_int
    lib.ssm_kernel_abi_version.restype = ctypes.c_int
    lib.ssm_scan_chunk.restype = ctypes.c_int64
    if lib.ssm_kernel_abi_version() != ABI_VERSION:
        raise RuntimeError(f"the built kernel has ABI {lib.ssm_kernel_abi_version()}, expected {ABI_VERSION}")
    return lib


def native_library():
    """The ctypes library of the fused kernels, or None (the pure-PyTorch scan is used)."""
    if not _state["tried"]:
        _state["tried"] = True
        if os.environ.get("SPARSE_SSM_NATIVE", "1") == "0":
            _state["reason"] = "SPARSE_SSM_NATIVE=0"
        else:
            try:
                _state["lib"] = _bind(ctypes.CDLL(str(_build())))
            except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: all mean "fall back"
                _state["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
                print(f"sparse-ssm: the fused CPU scan kernel is not available ({_state['reason']}); using the "
                      f"pure-PyTorch scan (correct, slower). Install a C++ compiler (g++) and ninja to get it.",
                      file=sys.stderr, flush=True)
    return _state["lib"]


def unavailable_reason() -> str | None:
    """Why `native_library()` returned None (after it was called), else None."""
    return _state["reason"]


def cross_entropy_rows_(logits, targets, scale: float, grad: bool):
    """Per-row softmax cross-entropy of logits (rows, V) (float32/64, contiguous, CPU) against
    targets (rows,) (negative: ignored), computed by the native kernel: returns the losses (rows,)
    and, with `grad`, overwrites the logits with scale * (softmax - onehot).  None when the kernel
    is unavailable."""

    lib = native_library()
    if lib is None or logits.dtype not in (torch.float32, torch.float64) or not logits.is_contiguous():
        return None
    losses = logits.new_empty(logits.shape[0])
    targets = targets.to(torch.int64).contiguous()
    fn = getattr(lib, f"ssm_cross_entropy_{'f32' if logits.dtype == torch.float32 else 'f64'}")
    err = fn(ctypes.c_void_p(logits.data_ptr()), ctypes.c_void_p(targets.data_ptr()),
             ctypes.c_void_p(losses.data_ptr()), logits.shape[0], logits.shape[1], float(scale), int(grad),
             torch.get_num_threads())
    if err:
        raise ValueError(f"cross entropy kernel: a target is outside the vocabulary of {logits.shape[1]} (code {err})")
    return losses


LM_HEAD_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}


def lm_head_rows(x, weight):
    """x (rows, dim) @ weight (vocab, dim)^T -> (rows, vocab) by the native few-rows kernel (one pass
    over the weight; float32 / float64 / bf16, x and weight of the same dtype, CPU), or None when the
    kernel is unavailable or does not take these tensors (the caller uses F.linear, its reference)."""
    lib = native_library()
    name = LM_HEAD_DTYPES.get(x.dtype)
    if (lib is None or name is None or weight.dtype != x.dtype or x.device.type != "cpu" or x.dim() != 2
            or weight.dim() != 2 or x.shape[1] != weight.shape[1]
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    x, weight = x.contiguous(), weight.detach().contiguous()
    out = x.new_empty(x.shape[0], weight.shape[0])
    getattr(lib, f"ssm_lm_head_{name}")(ptr(x), ptr(weight), ptr(out), x.shape[0], weight.shape[0], x.shape[1],
                                        torch.get_num_threads())
    return out


# --- the operators that wrap the kernels, and the conventions of their arguments -----------------

class CpuOp:
    """The torch operator `qualname` (e.g. "sparse_ssm::diag_scan") with a CPU kernel, called like a
    function; `register_fake` and `register_autograd` as on `torch.library.custom_op`'s operators
    (so it runs under autograd and torch.compile).  Made with `torch.library.define` / `impl`
    rather than `custom_op`, whose kernel wrapper imports torch._dynamo on its first call: about
    2 s in every new process (every CLI command) for nothing on the eager path."""

    def __init__(self, qualname: str, fn):
        torch.library.define(qualname, torch.library.infer_schema(fn, mutates_args=()))
        torch.library.impl(qualname, "cpu", fn)
        namespace, name = qualname.split("::")
        self.qualname, self.op = qualname, getattr(getattr(torch.ops, namespace), name).default

    def __call__(self, *args):
        return self.op(*args)

    def register_fake(self, fn):
        torch.library.register_fake(self.qualname)(fn)
        return fn

    def register_autograd(self, backward, setup_context):
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context)


def register_scan_autograd(scan: CpuOp, scan_backward: CpuOp):
    """The autograd formula of a scan operator scan(u, dt, a, B, C, D, h0, z, *options) -> (y, hT,
    chunk-start states, ungated y), whose gradients scan_backward(u, dt, a, B, C, D, states, z,
    ungated y, dy, dhT, *options) computes (`options`: the non-tensor arguments after z)."""
    def setup_context(ctx, inputs, output):
        u, dt, a, B, C, D, h0, z, *options = inputs
        ctx.save_for_backward(u, dt, a, B, C, D, output[2], z, output[3])
        ctx.options, ctx.has_h0 = options, h0 is not None

    def backward(ctx, dy, dhT, _states_grad, _ypre_grad):
        u, dt, a, B, C, D, states, z, ypre = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy.contiguous()
        dhT = None if dhT is None else dhT.contiguous()
        du, ddt, da, dB, dC, dD, dh0, dz = scan_backward(u, dt, a, B, C, D, states, z, ypre, dy, dhT, *ctx.options)
        return (du, ddt, da, dB, dC, dD, dh0 if ctx.has_h0 else None, dz if z is not None else None,
                *[None] * len(ctx.options))

    scan.register_autograd(backward, setup_context=setup_context)


def cpu_op(qualname: str):
    """Decorator: the annotated function becomes the CPU kernel of the operator `qualname` (a `CpuOp`)."""
    return lambda fn: CpuOp(qualname, fn)


SUFFIX = {"torch.float32": "f32", "torch.float64": "f64"}


def suffix(dtype) -> str | None:
    """The kernel name suffix of a dtype (float32, float64), or None."""
    return SUFFIX.get(str(dtype))


def saved_chunks(length: int) -> int:
    """How many chunk-start states the scans' forward saves for a sequence (the kernels' chunk)."""
    return -(-length // native_library().ssm_scan_chunk())


def ptr(t) -> ctypes.c_void_p:
    """A tensor's data pointer for ctypes (null for None)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


# Bits of the scans' method code (`method_id`) after bit 0 (gbt): the diagonal's signed range, and
# householder's input (`householder_scan.cpp`); the decoding step (`fused.step_code`) takes no householder
# structure, so its structure bits 2-7 never meet these two.
SIGNED_RANGE, DELTA_WRITES, NO_B_INPUT = 2, 4, 8


def method_id(method: str, alpha: float, structure=None) -> tuple[int, float]:
    """The scans' discretisation code (bit 0: gbt, else zoh; bit 1: the diagonal's signed range;
    householder's input, bit 2: delta writes, bit 3: no B term) and alpha (0.5 for bilinear)."""
    from ..discretization import alpha_for

    code = SIGNED_RANGE if getattr(structure, "signed", False) else 0
    code += {"delta": DELTA_WRITES + NO_B_INPUT, "both": DELTA_WRITES}.get(getattr(structure, "reflection_input", "b"), 0)
    return (code, 0.0) if method == "zoh" else (1 + code, alpha_for(method, alpha))


def token_rows(x):
    """x (b, L, ..., row) as the kernels read it: every token's values contiguous, tokens any stride
    apart (a view into a wider projection output is kept); returns (x, elements between tokens)."""
    L = x.shape[1]
    inner = x.shape[2:]
    expected = 1
    contiguous_inner = True
    for size, stride in zip(reversed(inner), reversed(x.stride()[2:])):
        contiguous_inner &= size == 1 or stride == expected
        expected *= size
    if not contiguous_inner or (L > 1 and x.stride(0) != L * x.stride(1)):
        x = x.contiguous()
    return x, (x.stride(1) if L > 1 else x.stride(0))


def scan_buffers(u, B, z, save: bool, hT=None):
    """Empty outputs of a scan kernel over u (b, L, H, P) with B (b, L, G, N): y (b, L, H, P), the
    final state (b, H, N, P) (`hT` if given: written in place), and with `save` the chunk-start states
    (b, H, chunks, N, P) and, with a gate z, the ungated y; those two are empty tensors otherwise."""
    b, L, H, P = u.shape
    N = B.shape[-1]
    hT = u.new_empty(b, H, N, P) if hT is None else hT
    saved = u.new_empty(b, H, saved_chunks(L), N, P) if save else u.new_empty(0)
    ypre = torch.empty_like(u) if save and z is not None else u.new_empty(0)
    return torch.empty_like(u), hT, saved, ypre


def gradient_buffers(u, dt, a, B, D, z, per_head: bool = True):
    """Empty gradients of a scan: du, ddt, da (like the transition parameters a), dB and dC ((b, L, H, N)
    per head as the kernels write them, else like B), dD, dh0 (b, H, N, P), dz (empty without a gate)."""
    b, L, H, P = u.shape
    N = B.shape[-1]
    dB, dC = (u.new_empty(b, L, H, N), u.new_empty(b, L, H, N)) if per_head else (torch.empty_like(B), torch.empty_like(B))
    return [torch.empty_like(u), torch.empty_like(dt), torch.empty_like(a), dB, dC, torch.empty_like(D),
            u.new_empty(b, H, N, P), torch.empty_like(u) if z is not None else u.new_empty(0)]


def sum_heads_per_group(grad, groups: int):
    """A per-head gradient (b, L, H, N) summed over the heads that share a group: (b, L, G, N)."""
    b, L, H, N = grad.shape
    return grad.view(b, L, groups, H // groups, N).sum(3)

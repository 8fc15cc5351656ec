"""What the tests of the Triton kernels (tests/ssm/test_triton_*.py) share: the scan's inputs, a
run of a scan with the gradients of a random weighting of its outputs, and the bodies of the checks
that are the same for every structure (fp64 match, one ulp at low precision, the dispatcher's
announcement, a model trained through either path).  Imported as `from triton_cases import ...`
(pytest puts this folder on sys.path for the test modules beside it)."""

import torch

from sparse_ssm.ssm import triton as triton_scan
from sparse_ssm.ssm.scan import selective_scan_sequential

NAMES = ("u", "dt", "A_raw", "B", "C", "D", "initial_state", "z")


def inputs(b, L, H, P, structure, G, dtype=torch.float64, state=True, gate=True, seed=0, raw_scale=0.5):
    """The scan's inputs (NAMES), float64 values cast to `dtype`; A_raw ~ raw_scale N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    N = structure.state_dim
    xs = [r(b, L, H, P), torch.nn.functional.softplus(r(b, L, H) - 1.5), raw_scale * r(b, L, H, structure.raw_size),
          r(b, L, G, N), r(b, L, G, N), r(b, L, H), r(b, H, N, P) if state else None,
          r(b, L, H, P) if gate else None]
    return [None if x is None else x.to(dtype) for x in xs]


def gradients(loss, inputs):
    """d loss / d each input, zeros for an input the loss does not use (delta writes take no B)."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def run(fn, xs, structure, method, alpha, seed=1):
    """(y, final state, gradients of a random weighting of both for every given input)."""
    leaves = [None if x is None else x.clone().requires_grad_() for x in xs]
    y, h = fn(*leaves[:6], structure, method, alpha, leaves[6], leaves[7])
    g = torch.Generator().manual_seed(seed)
    exact = lambda x: x.to(torch.bfloat16).to(torch.float16).double()        # in every dtype of the tests
    weights = lambda x: exact(torch.randn(x.shape, generator=g, dtype=torch.float64))
    loss = (y.double() * weights(y)).sum() + (h.double() * weights(h)).sum()
    return y, h, gradients(loss, [x for x in leaves if x is not None])


def assert_matches(xs, got, ref):
    """Two `run`s agree to fp64 round-off: y and h to 1e-10, every given input's gradient to 1e-9."""
    y, h, grads = got
    y_ref, h_ref, grads_ref = ref
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    given = [name for name, x in zip(NAMES, xs) if x is not None]
    for name, grad, expected in zip(given, grads, grads_ref):
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-10, msg=lambda m: f"d {name}: {m}")


def assert_matches_the_sequential_scan(xs, structure, method, alpha):
    assert_matches(xs, run(triton_scan.selective_scan_triton, xs, structure, method, alpha),
                   run(selective_scan_sequential, xs, structure, method, alpha))


def assert_forward_matches(reference, xs, structure, method, alpha):
    """Without gradients (the forward alone, no checkpoints) y and h match `reference`'s to 1e-10."""
    with torch.no_grad():
        y, h = triton_scan.selective_scan_triton(*xs[:6], structure, method, alpha, xs[6], xs[7])
        y_ref, h_ref = reference(*xs[:6], structure, method, alpha, xs[6], xs[7])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def assert_gradcheck(xs, structure, method, alpha):
    """torch.autograd.gradcheck (fast mode) of the Triton scan in every given input of `xs` (fp64)."""
    xs = [x.requires_grad_() for x in xs]
    fn = lambda *t: triton_scan.selective_scan_triton(*t[:6], structure, method, alpha, t[6], t[7])
    assert torch.autograd.gradcheck(fn, xs, fast_mode=True)


def assert_within_one_ulp(xs, structure, method, dtype, ulp, scan=None):
    """Low-precision `xs` (bf16/fp16): y and every gradient of `scan` (None: the Triton scan) are the
    fp32 sequential scan's on the same values, rounded once (one ulp of the dtype); the state is float32."""
    y, h, grads = run(scan or triton_scan.selective_scan_triton, xs, structure, method, 0.5)
    exact = [None if x is None else x.float() for x in xs]
    y_ref, h_ref, grads_ref = run(selective_scan_sequential, exact, structure, method, 0.5)
    assert y.dtype == dtype and h.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for name, got, ref in [("y", y, y_ref), *zip(NAMES, grads, grads_ref)]:
        assert got.dtype == dtype
        error = (got.float() - ref).abs()
        assert (error <= ulp * ref.abs() + 1e-5 * ref.abs().max()).all(), f"{name}: {error.max().item()} off"


def fresh_dispatcher(monkeypatch):
    """The dispatcher as in a new process: nothing announced yet, SPARSE_SSM_TRITON unset."""
    monkeypatch.setattr(triton_scan, "_announced", set())
    monkeypatch.delenv("SPARSE_SSM_TRITON", raising=False)


def announcement(name):
    """The line the dispatcher writes to stderr the first time it gives `name` to its Triton kernel."""
    return f"sparse-ssm: the selective scan on CUDA runs on the Triton kernel of the {name!r} structure"


def assert_both_paths_train_alike(monkeypatch, model, ids):
    """`model`'s loss on `ids` and its parameter gradients are the same whichever path the dispatcher
    picks (told to pick Triton for CPU tensors, the interpreter's, or the PyTorch path)."""
    from sparse_ssm.ssm import fused

    monkeypatch.setattr(fused, "available", lambda *a: False)          # the CPU kernel would take the call
    results = {}
    for path in ("triton", "pytorch"):
        monkeypatch.setattr(triton_scan, "use_triton", lambda device, structure, on=path == "triton": on)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[path] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(results["triton"][0], results["pytorch"][0], rtol=1e-10, atol=1e-10)
    for name, grad in results["pytorch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-8, atol=1e-10, msg=name)

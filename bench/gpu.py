"""The Triton kernels on one CUDA device, in one run of a few minutes (issue 34).

    python bench/gpu.py [--rounds 5] [--out bench/results]         # on the GPU machine: bench/results/gpu.{json,md}
    python bench/gpu.py --dry-run                                   # CPU, tiny shapes, Triton's interpreter:
                                                                    # checks this script, measures nothing

In one process, after checking the Triton path against the pure-PyTorch one on the device:
1. the device's copy bandwidth (a 1 GiB device-to-device copy; bytes read + written / time);
2. the selective scan alone, diagonal at state N = 16 and 128, 8 x 8 blocks and householder products
   of 2 reflections per token at N = 128 (batch 8,
   length 2048, 24 heads of 64 channels, B/C shared by the heads; fp32 inputs, the output gate z and
   the final state), forward
   and forward + backward, the Triton kernels and the PyTorch chunked path (scan_chunk_size 8),
   against the HBM floor: minimal bytes / copy bandwidth (the chunked path is not timed where its
   float32 per-token operators (b, L, H, N, block size) would pass 2 GiB: householder's N x N; the
   agreement check then runs on the first CUT tokens of one batch row).  Minimal bytes: forward
   reads u, z, dt, A (per token and head: its raw parameters, N for diagonal, N b for blocks of b,
   N + r (N + 1) for r reflections), B, C, D once
   and writes y; forward + backward adds reading them again with dy and writing a gradient of each
   input;
3. the training step (forward, loss, backward, AdamW) of `config/default_config.yaml`'s model (8 x 8
   blocks at state 128) and of the same model made diagonal (sparsity_level 0.995: block size 1),
   bf16 autocast, batch 8 x 1024: the Triton path vs the pure-PyTorch path (SPARSE_SSM_TRITON=0),
   tokens/s and peak memory (torch.cuda.max_memory_allocated);
4. decoding (`model.step`, one token per call, greedy, on the device) of the same two models in
   float32 at batch 1 and 32 after a 16-token prompt: the Triton step (one `selective_state_update`
   launch per layer and token) vs the PyTorch step (SPARSE_SSM_TRITON=0), tokens/s.
Medians over --rounds timed calls after a warm-up (the first call compiles the kernels).  The
results carry their provenance (commit, versions, device).  The GPU machine has no pydantic: bring
its wheels (pydantic, pydantic-core, annotated-types, typing-inspection for Python 3.12) and
`pip install --no-index` them there first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

# scans: (state N, structure: "diagonal", "block<b>" or "householder<r>")
FULL = {"batch": 8, "length": 2048, "heads": 24, "head_dim": 64,
        "scans": ((16, "diagonal"), (128, "diagonal"), (128, "block8"), (128, "householder2")),
        "step_batch": 8, "step_length": 1024, "chunked_operator_bytes": 2 ** 31,
        "decode_batches": (1, 32), "decode_tokens": 128}
TINY = {"batch": 2, "length": 19, "heads": 2, "head_dim": 4, "scans": ((4, "diagonal"), (8, "block8"),
                                                                      (4, "householder2")),
        "step_batch": 2, "step_length": 12, "chunked_operator_bytes": 2 ** 13,   # the dry run takes both branches
        "decode_batches": (1, 2), "decode_tokens": 2}
CUT = 256                          # tokens of one batch row that check the agreement where it is not timed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors, tiny shapes, Triton's interpreter: checks the script, measures nothing")
    parser.add_argument("--out", default=None, help="results folder (bench/results; a temporary one in a dry run)")
    return parser.parse_args(argv)


def setup_dry_run():
    """Before sparse_ssm loads: the interpreter for the kernels, no native CPU kernels, and the dispatcher
    sending CPU tensors to Triton (it only does so for CUDA ones) unless SPARSE_SSM_TRITON=0."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["SPARSE_SSM_NATIVE"] = "0"
    from sparse_ssm.ssm import triton as triton_scan

    triton_scan.use_triton = lambda device, structure: (os.environ.get("SPARSE_SSM_TRITON") != "0"
                                                        and triton_scan.supports(structure))


def median_seconds(fn, rounds, device):
    """Median wall time of fn() over `rounds` calls after one warm-up, the device synchronised."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device, rounds, numel):
    import torch

    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), rounds, device)


def scan_inputs(shape, structure, device):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device)
    b, L, H, P, N = shape["batch"], shape["length"], shape["heads"], shape["head_dim"], structure.state_dim
    dt = torch.nn.functional.softplus(r(b, L, H) - 3)
    return [r(b, L, H, P), dt, 0.25 * r(b, L, H, structure.raw_size), r(b, L, 1, N), r(b, L, 1, N), r(b, L, H), None,
            r(b, L, H, P)]


def scan_structure(N, kind):
    """DiagonalStructure(N), BlockStructure(N, b) for "block<b>", HouseholderStructure(N, r) for "householder<r>"."""
    from sparse_ssm.ssm.structures import BlockStructure, DiagonalStructure, HouseholderStructure

    if kind == "diagonal":
        return DiagonalStructure(N)
    if kind.startswith("block"):
        return BlockStructure(N, int(kind[len("block"):]))
    return HouseholderStructure(N, int(kind[len("householder"):]))


def agreement(paths, xs, structure):
    """The largest difference of y and of every gradient between the two paths, relative to the
    largest value of the PyTorch path's."""
    import torch

    results = []
    for fn in paths.values():
        leaves = [None if x is None else x.detach().requires_grad_() for x in xs]
        y, _ = fn(*leaves[:6], structure, "zoh", 0.5, None, leaves[7])
        grads = torch.autograd.grad(y, [x for x in leaves if x is not None], torch.ones_like(y))
        results.append([y.detach(), *grads])
    rel = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results)]
    return {"y_rel_diff_vs_chunked": rel[0], "max_grad_rel_diff_vs_chunked": max(rel[1:])}


def scan_rows(shape, device, rounds, bandwidth):
    """The scan alone per structure and path: forward and forward + backward against the HBM floor."""
    import torch

    from sparse_ssm.ssm.scan import selective_scan_chunked
    from sparse_ssm.ssm.triton import selective_scan_triton

    rows = []
    for N, kind in shape["scans"]:
        structure = scan_structure(N, kind)
        block_size = getattr(structure, "block_size", 1)
        xs = scan_inputs(shape, structure, device)
        paths = {"triton": selective_scan_triton,
                 "pytorch chunked": lambda *a: selective_scan_chunked(*a, chunk_size=8)}
        operator_bytes = 4 * xs[0].shape[0] * xs[0].shape[1] * xs[0].shape[2] * N * block_size
        timed = paths if operator_bytes <= shape["chunked_operator_bytes"] else {"triton": selective_scan_triton}
        cut = [None if x is None else x[:1, :CUT] for x in xs]
        check = agreement(paths, xs if timed is paths else cut, structure)
        inputs_bytes = sum(x.numel() * x.element_size() for x in xs if x is not None)
        y_bytes = xs[0].numel() * xs[0].element_size()
        floors = {"forward": (inputs_bytes + y_bytes) / bandwidth,
                  "forward+backward": (3 * inputs_bytes + 2 * y_bytes) / bandwidth}
        for name, fn in timed.items():
            leaves = [None if x is None else x.detach().requires_grad_() for x in xs]
            dy = torch.randn_like(xs[0])

            def forward():
                with torch.no_grad():
                    fn(*xs[:6], structure, "zoh", 0.5, None, xs[7])

            def both():
                y, _ = fn(*leaves[:6], structure, "zoh", 0.5, None, leaves[7])
                torch.autograd.backward(y, dy)

            for phase, call in (("forward", forward), ("forward+backward", both)):
                seconds = median_seconds(call, rounds, device)
                rows.append({"state": N, "structure": structure.name, "block_size": block_size, "path": name,
                             "phase": phase, "ms": seconds * 1e3,
                             "floor_ms": floors[phase] * 1e3, "roofline_fraction": floors[phase] / seconds,
                             "chunked_timed": timed is paths, **check})
                print(rows[-1], flush=True)
    return rows


def default_model(shape, device, dry_run, diagonal):
    """config/default_config.yaml's model (8 x 8 blocks), or made `diagonal`; tiny dimensions in a dry
    run (state 8: one 8 x 8 block)."""
    import yaml

    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    section = yaml.safe_load((HERE.parent / "config" / "default_config.yaml").read_text())["model"]
    section.update(max_seq_len=shape["step_length"])
    if dry_run:
        section.update(vocab_size=256, hidden_dim=32, state_dim=8, ffn_dim=64, num_layers=2, sparsity_level=0.0)
    if diagonal:
        section.update(sparsity_level=0.995)
    config = SparseSSMConfig(**section)
    return SparseSSMForCausalLM(config).to(device).train(), config


def set_path(env):
    """SPARSE_SSM_TRITON unset (None: the Triton path) or set to `env`."""
    if env is None:
        os.environ.pop("SPARSE_SSM_TRITON", None)
    else:
        os.environ["SPARSE_SSM_TRITON"] = env


PATHS = (("triton", None), ("pytorch", "0"))


def decode_rows(shape, device, rounds, dry_run):
    """Decoding tokens/s (`model.step`, greedy, float32), Triton step vs PyTorch step, for the default
    (block 8) model and its diagonal variant at each of the shape's decode batches."""
    import torch

    rows = []
    for model_name in ("block 8 (default)", "diagonal"):
        torch.manual_seed(0)
        model, config = default_model(shape, device, dry_run, diagonal=model_name == "diagonal")
        model.eval()
        for batch in shape["decode_batches"]:
            prompt = torch.randint(0, config.vocab_size, (batch, 16), device=device)
            for path, env in PATHS:
                set_path(env)

                def decode():
                    logits, cache = model.prefill(prompt)
                    for _ in range(shape["decode_tokens"]):
                        logits, cache = model.step(logits.argmax(-1), cache)

                seconds = median_seconds(decode, rounds, device)
                rows.append({"model": model_name, "structure": model.blocks[0].mixer.structure.name, "path": path,
                             "batch": batch, "new_tokens": shape["decode_tokens"],
                             "tokens_per_s": batch * shape["decode_tokens"] / seconds})
                print(rows[-1], flush=True)
        del model
    set_path(None)
    return rows


def train_step_rows(shape, device, rounds, dry_run):
    """Tokens/s and peak memory of the training step, Triton path vs pure-PyTorch path, for the
    default (block 8) model and its diagonal variant."""
    import torch

    rows = []
    runs = [(model, *path) for model in ("block 8 (default)", "diagonal") for path in PATHS]
    for model_name, path, env in runs:
        set_path(env)
        torch.manual_seed(0)
        model, config = default_model(shape, device, dry_run, diagonal=model_name == "diagonal")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (shape["step_batch"], shape["step_length"]), device=device)

        def step():
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row = {"model": model_name, "structure": model.blocks[0].mixer.structure.name, "path": path,
               "parameters": sum(p.numel() for p in model.parameters())}
        try:
            seconds = median_seconds(step, rounds, device)
            row |= {"tokens_per_s": ids.numel() / seconds, "step_ms": seconds * 1e3}
        except torch.OutOfMemoryError:                # one GPU run: record it and go on
            row |= {"tokens_per_s": float("nan"), "step_ms": float("nan"), "error": "out of memory"}
        cuda = device.type == "cuda"
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan")
        rows.append(row)
        print(row, flush=True)
        del model, optimizer
    set_path(None)
    return rows


def report(args, rounds, device, bandwidth, scans, steps, decodes):
    import torch

    from common import write_results
    from provenance import provenance

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, Triton interpreter)"
    lines = ["# The Triton kernels on a GPU", "", f"{name}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
             f"medians of {rounds} calls; the Triton path's y and gradients differ from the chunked path's by at "
             f"most {max(r['y_rel_diff_vs_chunked'] for r in scans):.1e} and "
             f"{max(r['max_grad_rel_diff_vs_chunked'] for r in scans):.1e} of their largest value.", "",
             "| state | structure | path | phase | ms | HBM floor (ms) | fraction |",
             "|---:|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['state']} | {r['structure']} | {r['path']} | {r['phase']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{r['roofline_fraction']:.1%} |" for r in scans]
    untimed = sorted({f"{r['structure']} at N = {r['state']}" for r in scans if not r["chunked_timed"]})
    if untimed:
        lines += ["", f"Not timed on the chunked path (its float32 per-token operators pass the shape's "
                  f"`chunked_operator_bytes`, 2 GiB on the GPU): {', '.join(untimed)}; the agreement is checked on "
                  f"the first {CUT} tokens of one batch row there."]
    lines += ["", "| training step (default model, bf16) | path | tokens/s | step (ms) | peak memory (GiB) |",
              "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} ({r['structure']}) | {r['path']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
              f"{r['peak_memory_gib']:.2f} {r.get('error', '')}|" for r in steps]
    lines += ["", "| decoding (float32, greedy, prompt 16) | path | batch | tokens/s |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} ({r['structure']}) | {r['path']} | {r['batch']} | {r['tokens_per_s']:.0f} |"
              for r in decodes]
    import triton

    out = Path(args.out or (tempfile.mkdtemp(prefix="gpu-dry-run-") if args.dry_run else HERE / "results"))
    write_results(out, "gpu", {"device": name, "copy_bytes_per_s": bandwidth, "scan": scans, "train_step": steps,
                               "decode": decodes, "triton": triton.__version__}, lines,
                  provenance(seeds=[0], dry_run=args.dry_run, device=name))


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        setup_dry_run()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device (or --dry-run to check the script on a CPU)")
    device = torch.device("cuda" if not args.dry_run else "cpu")
    shape = TINY if args.dry_run else FULL
    rounds = 1 if args.dry_run else args.rounds
    bandwidth = copy_bandwidth(device, rounds, 2 ** 16 if args.dry_run else 2 ** 28)
    scans = scan_rows(shape, device, rounds, bandwidth)
    steps = train_step_rows(shape, device, rounds, args.dry_run)
    decodes = decode_rows(shape, device, rounds, args.dry_run)
    report(args, rounds, device, bandwidth, scans, steps, decodes)


if __name__ == "__main__":
    main()

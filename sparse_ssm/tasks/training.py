"""Training the small models of the synthetic tasks: the variants that `main.py evaluate --task`
and the benches compare (`VARIANTS`, `task_model_config`), the training loop (`fit`: AdamW with a
one-cycle learning rate on fresh batches), and `run_task`, which trains a variant on a task of
`synthetic` and reports its accuracy (a position is right when the arg-max prediction equals its
label) at each test length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..model import LayerState, SparseSSMConfig, SparseSSMForCausalLM
from ..ssm.selective import SelectiveParameterGenerator
from ..util.errors import ConfigError
from .synthetic import PAPER_VOCAB, task_batches


# delta-write reflections (DeltaNet's rule, DeltaProduct's two writes a token), beta in [0, 2], steps dt
# of 1e-4 to 1e-2: the keys the householder_delta* variants share
DELTA_WRITE_KEYS = dict(selective_param_class="householder", low_rank_rank=2, a_generator_rank=32,
                        reflection_range="closed", reflection_input="delta", dt_min=1e-4, dt_max=1e-2)

# At state 16 the sparse class's block size b follows the sparsity level (`ssm.hippo.block_size_for`):
# 0.9 -> b = 1 (diagonal), 0.875 -> 2, 0.75 -> 4, 0.5 -> 8.
VARIANTS = {
    "diagonal": dict(selective_param_class="sparse", sparsity_level=0.9),      # Mamba: eigenvalues in (0, 1]
    "diagonal_signed": dict(selective_param_class="sparse", sparsity_level=0.9, eigenvalue_range="signed"),  # (-1, 1]
    "rotation": dict(selective_param_class="rotation"),                          # 2 x 2 scaled rotations
    "permutation": dict(selective_param_class="permutation"),                    # PD-SSM: P_t diag(d_t)
    # DeltaProduct: 2 reflections; a 32-wide generator bottleneck (the default, hidden / 16 = 4, is
    # narrow for the 2 x 50 raw values of its two heads: S3 holds at 4x on every seed with 32)
    "householder": dict(selective_param_class="householder", low_rank_rank=2, a_generator_rank=32),
    # the same with beta in the closed [0, 2]: a flip reaches eigenvalue -1 (at b ~ 3) instead of approaching
    # it, so composed flips and permutations neither fade nor drift with length (issue 36: S3 at 4x the
    # training length)
    "householder_closed": dict(selective_param_class="householder", low_rank_rank=2, a_generator_rank=32,
                               reflection_range="closed"),
    # the same with each reflection a delta write (DeltaNet's rule, DeltaProduct's two writes a token: the
    # input enters along the keys, not through B, so the state stays bounded without a decay), the
    # writes at beta = 1 from the start (from 0.004, nothing enters the state) and steps dt of 1e-4 to
    # 1e-2 (decays that start near 1; dt no longer scales the input): issue 36's trainable transition
    "householder_delta": dict(DELTA_WRITE_KEYS, reflection_init_logit=0.0),
    # householder_delta in the last layer only, the default diagonal SSM below it (`structured_layers`; the
    # A generator's rank, 32, is shared): the transition of config/state_tracking_lm.yaml, a hybrid whose
    # language model costs 1-2% perplexity over the diagonal's where writes from beta = 1 in every layer cost 10%
    "householder_delta_hybrid": dict(DELTA_WRITE_KEYS, reflection_init_logit=0.0, structured_layers=[-1]),
    # the hybrid with its reflection layer's decays held at 1 (`reflection_decay: false`, DeltaProduct without the
    # gate): the state forgets only what the writes replace; a test-time probe (bench/chomsky_fade.py) found
    # part of parity's fade beyond 160 in the learnt decays (most on one seed of three)
    "householder_delta_hybrid_undecayed": dict(DELTA_WRITE_KEYS, reflection_init_logit=0.0, structured_layers=[-1],
                                               reflection_decay=False),
    # householder_delta with the writes from the default beta = 0.004 (nothing enters the state at first): in
    # every layer, the language model's perplexity is the diagonal's or lower (where writes from beta = 1 cost 10%)
    "householder_delta_lm": dict(DELTA_WRITE_KEYS),
    # one layer and no conv window (a token's angle depends on that token alone), angles that start
    # at multiples of pi (Fourier HiPPO), a 32-wide generator and 4 pairs a head: a pair learns to
    # turn by 2 pi / 3 a token (two layers with a window fit mod 3 with pairs that hardly turn), and
    # fewer pairs leave fewer that half-turn beside it and drift off at long lengths
    "rotation_shallow": dict(selective_param_class="rotation", hippo_init="fourier", a_generator_rank=32,
                             conv_kernel=1, num_layers=1, state_dim=8),
    "diagonal_signed_shallow": dict(selective_param_class="sparse", sparsity_level=0.9, eigenvalue_range="signed",
                                    a_generator_rank=32, conv_kernel=1, num_layers=1, state_dim=8),  # its ablation
    # rotation_shallow with 8 heads of 16 channels, a learned initial state and pairs that become exact
    # elements of Z_60 (turns snapped to multiples of 2 pi / 60, magnitude 1, no inputs into the state:
    # counting modulo 2, 3, 4, 5, 6 can neither drift nor fade, nor drown in inputs that add up); `run_task`
    # trains the first half of the steps with continuous angles, decays and inputs (snapped from the
    # start, most seeds do not fit mod 3 or mod 5)
    "rotation_grid": dict(selective_param_class="rotation", hippo_init="fourier", a_generator_rank=32,
                          conv_kernel=1, num_layers=1, state_dim=8, num_heads=8, rotation_angle_grid=60,
                          learned_initial_state=True),
    # the same shape with one reflection a token (DeltaNet's [-1, 1]) that becomes the identity or an
    # exact reflection, decay 1, no inputs into the state, from half the steps: parity can neither fade
    # nor drift.  Its reflections start at beta = 1, halfway (from the default 0.095 some seeds have not
    # found their flip when the snap freezes beta); one reflection cannot turn: no counting modulo 3
    "householder_exact": dict(selective_param_class="householder", low_rank_rank=1, a_generator_rank=32,
                              conv_kernel=1, num_layers=1, state_dim=8, num_heads=8, exact_reflections=True,
                              reflection_init_logit=0.0, learned_initial_state=True),
    "block2": dict(selective_param_class="sparse", sparsity_level=0.875),
    "block4": dict(selective_param_class="sparse", sparsity_level=0.75),
    "block": dict(selective_param_class="sparse", sparsity_level=0.5),           # b = 8
    "dense": dict(selective_param_class="dense"),
    "low_rank": dict(selective_param_class="low_rank", discretization="bilinear"),
    "lti": dict(selective_param_class="sparse", sparsity_level=0.9, selective=False),
}
# The task model's shape, unless a variant sets its own (`task_model_config`)
TASK_MODEL = dict(hidden_dim=64, state_dim=16, num_layers=2, conv_kernel=4, num_heads=2)
# The fraction of the steps a model with an angle grid or exact reflections trains continuous (`run_task`)
ANGLE_GRID_FROM = 0.5
def check_variants(variants: list[str]):
    """A ConfigError naming --variants for a name that is not a key of VARIANTS."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")


def check_task_inputs(task: str, variants: list[str], length: int, test_lengths: list[int], num_memorize: int):
    """A ConfigError (naming the `evaluate` flag) for inputs no variant could train on; call it
    before the first variant trains."""
    check_variants(variants)
    shortest = min([length, *test_lengths])
    if task == "selective-copying" and num_memorize > shortest:
        raise ConfigError(f"--num-memorize: the {num_memorize} tokens to copy must fit the sequence: at most "
                          f"--length and every --test-lengths ({shortest})")


def task_model_config(variant: str, max_len: int, vocab: int = PAPER_VOCAB, **overrides) -> SparseSSMConfig:
    """The small model (2 layers, width 64, state 16, unless the variant sets its own) of a variant,
    for sequences up to max_len; `overrides` replace any other key (the ablations of
    bench/selective_copying.py)."""
    keys = dict(vocab_size=vocab, **TASK_MODEL, ffn_dim=0, dropout=0.0, max_seq_len=max_len)
    return SparseSSMConfig(**{**keys, **VARIANTS[variant], **overrides})


@dataclass
class TaskResult:
    name: str
    accuracy: dict          # test length -> accuracy
    seconds: float
    final_loss: float


def accuracy(model, inputs, labels, max_tokens: int = 16384) -> float:
    """Fraction of the scored positions whose arg-max prediction equals the label (the prediction at
    t is scored against labels[:, t + 1]); inputs, labels (batch, L), forwarded in slices of at most
    `max_tokens` tokens."""
    rows = max(1, max_tokens // inputs.shape[1])
    right = scored = 0
    with torch.no_grad():
        for i in range(0, len(inputs), rows):
            pred = model(inputs[i:i + rows]).logits[:, :-1].argmax(-1)
            target = labels[i:i + rows, 1:]
            mask = target != -100
            right += int((pred[mask] == target[mask]).sum())
            scored += int(mask.sum())
    return right / scored


def training_lengths(steps: int, length: int, curriculum: Sequence[tuple[int, float]] = ()) -> list[int]:
    """The sequence length of each training step: the curriculum's (length, fraction of the steps)
    phases in order, then `length` for the rest."""
    if sum(f for _, f in curriculum) > 1 or any(f < 0 or L < 1 for L, f in curriculum):
        raise ConfigError(f"curriculum {list(curriculum)}: fractions must be >= 0 and sum to at most 1, lengths >= 1")
    out = []
    for L, fraction in curriculum:
        out += [L] * round(fraction * steps)
    return (out + [length] * steps)[:steps]


def noisy_initial_states(model: SparseSSMForCausalLM, batch: int, sigma: float) -> list[LayerState]:
    """Per layer, the state a training sequence starts from under the "random noise" intervention
    of Buitrago Ruiz & Gu ("Understanding and Improving Length Generalization in Recurrent Models",
    ICML 2025): an SSM state (batch, heads, N, P) drawn from N(h0, sigma^2) (torch's global
    generator; h0 the layer's learned initial state, or zero) and a zero conv history (batch, K - 1,
    E).  Tests start from h0, as generation does; a state that never forgets (a pair that neither
    turns nor decays: a counter of the length) then carries noise the readout cannot rely on."""
    states = []
    for block in model.blocks:
        mixer = block.mixer
        ssm = sigma * torch.randn(batch, mixer.num_heads, mixer.structure.state_dim, mixer.head_dim)
        if mixer.initial_state is not None:
            ssm = ssm + mixer.initial_state
        states.append(LayerState(torch.zeros(batch, mixer.config.conv_kernel - 1, mixer.inner_dim), ssm))
    return states


def run_task(task: str, model_config: SparseSSMConfig | Callable[[], torch.nn.Module], steps: int, batch: int,
             length: int, test_lengths, lr: float = 3e-3, seed: int = 0, num_memorize: int = 16, modulus: int = 3,
             group: str = "s3", log=None, vocab: int | None = None,
             curriculum: Sequence[tuple[int, float]] = (), state_noise: tuple[float, float] = (0.0, 0.0),
             angle_grid_from: float = ANGLE_GRID_FROM) -> TaskResult:
    """Train a fresh model for `steps` AdamW steps on fresh batches, then measure accuracy on 256
    fresh sequences at each test length (`modulus`: modular-counting's m; `group`: the group of
    permutation-composition, a key of `state_tracking.GROUPS`).  `curriculum`: (length, fraction of
    the steps) phases trained first, in order; the remaining steps train at `length`.  `state_noise`
    (sigma, fraction of the steps): from that fraction of the steps on, training sequences start
    from `noisy_initial_states` (sigma 0: from zero or the learned initial state, the default).  A
    model whose transitions snap to a grid (rotation pairs: `rotation_angle_grid`; reflections:
    `exact_reflections`) trains with continuous angles, strengths and decays before the fraction
    `angle_grid_from` of the steps and snapped from there on (and in the tests).

    `model_config` is a `SparseSSMConfig`, or a callable that builds any model with the same
    interface (`model(ids, labels=..., return_logits=False).loss`, `model(ids).logits`; then pass
    `vocab`): it is called after seeding, so the same seed gives every model the same batches."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    sigma, noise_from = state_noise
    if sigma < 0 or not 0 <= noise_from <= 1:
        raise ConfigError(f"state_noise {state_noise}: sigma must be >= 0 and the fraction of the steps in [0, 1]")
    if not 0 <= angle_grid_from <= 1:
        raise ConfigError(f"angle_grid_from {angle_grid_from}: the fraction of the steps must be in [0, 1]")
    if isinstance(model_config, SparseSSMConfig):
        vocab = model_config.vocab_size
        model = SparseSSMForCausalLM(model_config)
    elif sigma:
        raise ConfigError("state_noise: the random initial states need a sparse-ssm model (a SparseSSMConfig)")
    else:
        model = model_config()
    make = task_batches(task, vocab, g, num_memorize, modulus, group)
    start = time.perf_counter()
    loss = fit(model, make, training_lengths(steps, length, curriculum), batch, lr, sigma, round(noise_from * steps),
               angle_grid_from, log)
    result = {}
    for L in test_lengths:
        inputs, labels = make(256, L)
        result[L] = accuracy(model, inputs, labels)
    return TaskResult(task, result, time.perf_counter() - start, loss)


def fit(model: torch.nn.Module, make: Callable, lengths: Sequence[int], batch: int, lr: float, sigma: float = 0.0,
        first_noisy_step: int = 0, angle_grid_from: float = ANGLE_GRID_FROM, log=None) -> float:
    """Train `model` one AdamW step (one-cycle learning rate peaking at `lr`, clipping at norm 1) per
    entry of `lengths` on a fresh batch `make(batch, length)`; return the last step's loss, with the
    model in eval mode.  From step `first_noisy_step` on, sequences start from
    `noisy_initial_states` when sigma > 0; angle grids and exact reflections snap from the fraction
    `angle_grid_from` of the steps on (and after training)."""
    steps = len(lengths)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm_up = 0.1 if 0.1 * steps != 1 else 0.15          # OneCycleLR divides by warm_up * steps - 1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warm_up)
    loss = torch.tensor(float("nan"))
    first_snapped_step = round(angle_grid_from * steps)
    grids = [(generator, generator.angle_grid) for generator in model.modules()
             if isinstance(generator, SelectiveParameterGenerator)]
    for step in range(steps):
        for generator, grid in grids:
            generator.angle_grid = grid if step >= first_snapped_step else 0
        inputs, labels = make(batch, lengths[step])
        cache = noisy_initial_states(model, batch, sigma) if sigma and step >= first_noisy_step else None
        loss = model(inputs, labels=labels, cache=cache, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1}/{steps}: loss {loss.item():.4f}")
    model.eval()
    for generator, grid in grids:
        generator.angle_grid = grid
    return float(loss.detach())

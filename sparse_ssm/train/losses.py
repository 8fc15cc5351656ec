"""Training losses beyond the model's own cross-entropy: knowledge distillation from a
teacher's stored top-k log-probabilities (see `sparse_ssm.data.teacher_targets`).

Loss (per position with teacher targets; the cross-entropy runs over every labelled position)::

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(q_T || s_T)

over k + 1 outcomes: the teacher's top-k tokens and "any other token".  The teacher's
probabilities p_i = exp(logprob_i) leave the remaining mass r = 1 - sum_i p_i for the last
outcome.  At temperature T the outcomes are re-weighted as q ∝ (p_1, ..., p_k, r) ** (1/T)
(exact at T = 1; for T != 1 the rest is treated as one token, since its split is unknown).  The
student's outcomes are s_i = softmax(z / T)_i at the k ids and s_rest = 1 - sum_i s_i.  Empty
slots (-1 ids) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                      alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd).  logits (b, L, V); labels (b, L) (-100 ignored); top_ids / top_logprobs
    (b, L, k): row t is the teacher's distribution of token t (ids -1 where empty).  Position t
    predicts token t + 1, as in the model's own loss."""
    logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()    # half precision: compute in float32
    targets, ids, teacher_lp = labels[:, 1:], top_ids[:, 1:], top_logprobs[:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    valid = ids >= 0                                                   # (b, L-1, k)
    rows = valid.any(-1) & (targets != -100)
    if alpha == 0 or not rows.any():
        kd = logits.new_zeros(())
        return (1 - alpha) * ce + alpha * kd, ce, kd
    z = logits[rows] / temperature                                     # (n, V)
    ids, valid, teacher_lp = ids[rows], valid[rows], teacher_lp[rows]
    student_lp = torch.log_softmax(z, -1).gather(-1, ids.clamp(min=0))    # (n, k)
    student_lp = student_lp.masked_fill(~valid, float("-inf"))
    student_rest = torch.log1p(-student_lp.exp().sum(-1).clamp(max=1 - 1e-6))           # (n,)
    teacher_lp = teacher_lp.masked_fill(~valid, float("-inf"))
    teacher_rest = torch.log1p(-teacher_lp.exp().sum(-1).clamp(max=1 - 1e-6))
    teacher_all = torch.cat([teacher_lp, teacher_rest[:, None]], -1) / temperature
    q_log = torch.log_softmax(teacher_all, -1)                          # renormalised at temperature T
    s_log = torch.cat([student_lp, student_rest[:, None]], -1)
    q = q_log.exp()
    kl = (q * (q_log - s_log)).nan_to_num(0.0).sum(-1)                  # 0 * log 0 = 0 on empty slots
    kd = temperature ** 2 * kl.mean()
    return (1 - alpha) * ce + alpha * kd, ce, kd

"""Random inputs and comparison helpers for the fused GTPO loss tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "dr_grpo")


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    old: torch.Tensor
    mask: torch.Tensor
    ref: torch.Tensor
    kwargs: dict


def make_case(
    seed: int,
    shape: tuple[int, ...],
    hidden_size: int,
    vocab: int,
    dtype: torch.dtype,
    agg: str,
    *,
    beta: float = 0.05,
    entropy_coef: float = 0.01,
    temperature: float = 0.7,
    dual_clip: float | None = 3.0,
) -> Case:
    """Inputs that exercise every branch: masked rows and padding ids, both
    advantage signs, ratios far outside the clip range (log-ratio noise of
    std 1), a sequence with no valid token."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, hidden_size, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5 * 2).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    if len(shape) == 2 and shape[0] > 1:
        mask[-1] = False  # a sequence with nothing to train on
    targets = torch.where(mask, targets, torch.full_like(targets, -100))
    advantages = torch.randn(shape, generator=g)
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    old = (lp + torch.randn(shape, generator=g)).float()
    ref = (lp + 0.5 * torch.randn(shape, generator=g)).float()
    kwargs = dict(
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=dual_clip,
        beta=beta,
        entropy_coef=entropy_coef,
        temperature=temperature,
        agg=agg,
    )
    return Case(hidden, weight, targets, advantages, old, mask, ref, kwargs)


def run_fused(case: Case, *, combine=None, backward_rounds: int = 1, **extra):
    """The fused loss and gradients of ``combine(loss)`` (default: the loss),
    after ``backward_rounds`` backward passes through one retained graph."""
    from turnrl.kernels.fused_linear_gtpo import gtpo_loss

    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    loss, stats = gtpo_loss(
        hidden,
        weight,
        case.targets,
        case.advantages,
        case.old,
        case.mask,
        case.ref,
        **case.kwargs,
        **extra,
    )
    out = loss if combine is None else combine(loss)
    for _ in range(backward_rounds):
        out.backward(retain_graph=backward_rounds > 1)
    return loss.detach().double(), hidden.grad.double(), weight.grad.double(), stats


def run_reference(case: Case, dtype: torch.dtype = torch.float64):
    """Unfused reference on the same (possibly bf16-rounded) inputs, in ``dtype``."""
    from turnrl.kernels.fused_linear_gtpo import torch_gtpo_loss

    hidden = case.hidden.to(dtype).requires_grad_(True)
    weight = case.weight.to(dtype).requires_grad_(True)
    loss = torch_gtpo_loss(
        hidden,
        weight,
        case.targets,
        case.advantages.to(dtype),
        case.old.to(dtype),
        case.mask,
        case.ref.to(dtype),
        **case.kwargs,
    )
    loss.backward()
    return loss.detach().double(), hidden.grad.double(), weight.grad.double()


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-2) -> float:
    """max |actual - expected| / max(max |expected|, floor).

    The floor keeps a value that cancels to nearly 0 (advantages of both
    signs) from turning rounding noise into a huge relative error.
    """
    scale = max(float(expected.abs().max()), floor)
    return float((actual - expected).abs().max()) / scale


def _errors(got, want) -> dict[str, float]:
    return {
        # The loss is a mean of O(1) per-token terms of both signs that can
        # cancel to ~1e-3: fp32 rounding of the terms (~1e-7 each) is then
        # ~1e-4 of the total however exact the kernel. Relative to the size
        # of the terms (floor 1.0) the check stays meaningful.
        "loss": rel_err(got[0], want[0], floor=1.0),
        "grad_hidden": rel_err(got[1], want[1], floor=1e-12),
        "grad_weight": rel_err(got[2], want[2], floor=1e-12),
    }


def assert_close_to_reference(case: Case, rtol: float, eager_slack: bool = False, **extra) -> dict:
    """Fused loss and gradients within ``rtol`` of the float64 reference.

    With ``eager_slack``, a quantity may also pass by being no worse than 3x
    the error of the unfused eager loss run in fp32: random tiny problems
    include near-one-hot distributions (p_max = 1 - 1e-6), where 1 - p
    cancels in any fp32 softmax backward, fused or not.
    """
    loss, g_hidden, g_weight, stats = run_fused(case, **extra)
    want = run_reference(case)
    assert torch.isfinite(loss)
    errors = _errors((loss, g_hidden, g_weight), want)
    limits = dict.fromkeys(errors, rtol)
    if eager_slack and case.hidden.dtype == torch.float32:
        eager = _errors(run_reference(case, torch.float32), want)
        limits = {k: max(rtol, 3 * eager[k]) for k in errors}
    bad = {k: (errors[k], limits[k]) for k in errors if not errors[k] <= limits[k]}
    assert not bad, (bad, float(loss), float(want[0]))
    return stats

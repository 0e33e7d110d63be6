"""Random inputs and comparison helpers for the fused GTPO loss tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch


def _test_seed() -> int:
    """``TURNRL_TEST_SEED`` (conftest.py draws it when unset and prints it)."""
    text = os.environ.get("TURNRL_TEST_SEED", "")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"TURNRL_TEST_SEED must be an integer, got {text!r}") from None


SEED = _test_seed()
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
    mask.view(-1)[0] = True  # something to train on, whatever the seed
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


def spread_ref(case: Case, seed: int) -> Case:
    """Move ``case``'s reference log-probs far from the policy's, in place:
    ``l_ref - l`` of std 2, so that k3's cap at 10 (``l_ref - l`` above about
    2.53) and k1's sign both show, and the second and third tokens at +25 and
    -25, past k3's clamp at 20 either way (which k1, abs and k2 do not have)."""
    g = torch.Generator().manual_seed(seed)
    temperature = case.kwargs["temperature"]
    with torch.no_grad():
        logits = case.hidden.double() @ case.weight.double().T / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, case.targets.clamp(min=0)[..., None])[..., 0]
    offset = 2.0 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
    far = offset.view(-1)[1:3]
    far.copy_(torch.tensor([25.0, -25.0])[: far.numel()])
    case.mask.view(-1)[:3] = True  # trained, with the id lp was taken at
    case.targets = torch.where(case.mask, case.targets.clamp(min=0), case.targets)
    case.ref = (lp + offset).float()
    return case


def inside_and_outside_the_clip(case: Case, seed: int) -> Case:
    """Bring every other token's old log-prob within 0.05 of the policy's, in
    place, so its ratio lies inside ``[0.8, 1.28]``: a small case then has
    tokens inside the clip range as well as outside, whatever the seed (a
    log-ratio noise of std 1 leaves about 18 in 100 inside)."""
    g = torch.Generator().manual_seed(seed)
    temperature = case.kwargs["temperature"]
    with torch.no_grad():
        logits = case.hidden.double() @ case.weight.double().T / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, case.targets.clamp(min=0)[..., None])[..., 0]
    near = lp + 0.1 * (torch.rand(lp.shape, generator=g, dtype=torch.float64) - 0.5)
    every_other = torch.arange(lp.numel()).reshape(lp.shape) % 2 == 0
    case.old = torch.where(every_other, near, case.old.double()).to(case.old.dtype)
    return case


def add_segments(case: Case, seed: int, *, across_rows: bool = False) -> Case:
    """Give ``case`` random ragged segments (``kwargs["segment_ids"]``), in place.

    Each row is cut into runs of 1 to 4 tokens (many of length 1), each run a
    segment with an id drawn from a wide range, negative ones included, not
    in order. One run (not the first token) has all its tokens untrained;
    the ids of untrained tokens are garbage: -1, or the id of a segment of
    trained tokens elsewhere, which they must not join. With
    ``across_rows``, the last run of each row and the first of the next
    share an id: one segment across two rows.
    """
    g = torch.Generator().manual_seed(seed)
    mask = case.mask.reshape(1, -1) if case.mask.dim() == 1 else case.mask
    rows, length = mask.shape
    runs: list[tuple[int, int, int]] = []  # (row, start, stop)
    for r in range(rows):
        start = 0
        while start < length:
            stop = min(length, start + int(torch.randint(1, 5, (1,), generator=g)))
            runs.append((r, start, stop))
            start = stop
    ids = torch.randperm(10 * len(runs) + 10, generator=g)[: len(runs)] * 7919 - 40_000
    grid = torch.empty(mask.shape, dtype=torch.int64)
    for (r, start, stop), segment in zip(runs, ids.tolist(), strict=True):
        grid[r, start:stop] = segment
    if across_rows:
        for r in range(rows - 1):
            grid[r + 1, grid[r + 1] == grid[r + 1, 0]] = int(grid[r, -1])
    untrainable = [run for run in runs if not (run[0] == 0 and run[1] == 0)]
    if untrainable:
        r, start, stop = untrainable[int(torch.randint(len(untrainable), (1,), generator=g))]
        mask[r, start:stop] = False
    garbage = torch.where(
        torch.rand(mask.shape, generator=g) < 0.5,
        torch.full_like(grid, -1),
        grid.reshape(-1)[torch.randint(grid.numel(), mask.shape, generator=g)],
    )
    grid = torch.where(mask, grid, garbage)
    case.mask = mask.reshape(case.mask.shape)
    case.targets = torch.where(case.mask, case.targets, torch.full_like(case.targets, -100))
    case.kwargs["segment_ids"] = grid.reshape(case.mask.shape)
    return case


def fused_loss(case: Case, **options):
    """``gtpo_loss`` on fresh leaf copies of the case's hidden states and head,
    with the case's options overridden by ``options``: (hidden, weight, loss,
    stats), nothing run backward yet."""
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
        **{**case.kwargs, **options},
    )
    return hidden, weight, loss, stats


def run_fused(case: Case, *, combine=None, backward_rounds: int = 1, **extra):
    """The fused loss and gradients of ``combine(loss)`` (default: the loss),
    after ``backward_rounds`` backward passes through one retained graph."""
    hidden, weight, loss, stats = fused_loss(case, **extra)
    out = loss if combine is None else combine(loss)
    for _ in range(backward_rounds):
        out.backward(retain_graph=backward_rounds > 1)
    return loss.detach().double(), hidden.grad.double(), weight.grad.double(), stats


def run_reference(case: Case, dtype: torch.dtype = torch.float64):
    """Unfused reference on the same (possibly bf16-rounded) inputs, in ``dtype``."""
    from turnrl.kernels.fused_linear_gtpo import torch_gtpo_loss

    # detach: .to(dtype) of a tensor already in dtype is the tensor itself,
    # which requires_grad_ would turn into a leaf of this graph.
    hidden = case.hidden.detach().to(dtype).requires_grad_(True)
    weight = case.weight.detach().to(dtype).requires_grad_(True)
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


def make_peaked_case(seed: int, rows: int = 5, gap: tuple[float, float] = (10.0, 16.0)) -> Case:
    """Near-one-hot rows (``1 - p_y`` from about 2e-3 down to 4e-6) whose
    target is the most likely token, with every ratio clipped: the
    policy-gradient term has no gradient, so the KL and entropy terms alone
    give a small gradient. There an fp32 ``lse`` or ``E[z]`` cancels
    (``l_y = z_y - lse`` and ``z_y - E[z]`` are ~1e-4 differences of O(10)
    numbers), and so does ``1 - p_y`` from an fp32 ``p_y``; a comparison
    relative to the largest gradient sees it (eager fp32: ~4e-3).
    """
    g = torch.Generator().manual_seed(seed)
    vocab, hidden_size = 40, 48
    # Orthonormal head rows: row i's logits are gap_i at its target, noise elsewhere.
    basis, _ = torch.linalg.qr(
        torch.randn(hidden_size, hidden_size, generator=g, dtype=torch.float64)
    )
    weight = basis[:vocab]
    targets = torch.randint(0, vocab, (1, rows), generator=g)
    gaps = gap[0] + (gap[1] - gap[0]) * torch.rand(1, rows, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(1, rows, hidden_size, generator=g, dtype=torch.float64)
    hidden = (gaps[..., None] * weight[targets] + noise).float()
    weight = weight.float()
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T
        lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    advantages = torch.randn(1, rows, generator=g)
    # old - new = 2: the ratio e**-2 is clipped for either sign of the advantage.
    old = (lp + 2.0).float()
    ref = (lp - 0.5 * torch.rand(1, rows, generator=g, dtype=torch.float64)).float()
    kwargs = dict(
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=3.0,
        beta=0.05,
        entropy_coef=0.01,
        temperature=1.0,
        agg="token_mean",
    )
    mask = torch.ones(1, rows, dtype=torch.bool)
    return Case(hidden, weight, targets, advantages, old, mask, ref, kwargs)


def assert_peaked_rows_keep_precision(seed: int, device: str = "cpu", **extra) -> None:
    """On :func:`make_peaked_case` rows the fused loss keeps fp32 precision:
    gradients within 2e-5 of float64 (no eager slack), log-probs and the
    entropy statistic within 1e-5 relative."""
    from turnrl.kernels.fused_linear_gtpo import fused_logprobs

    case = make_peaked_case(seed)
    for name in ("hidden", "weight", "targets", "advantages", "old", "mask", "ref"):
        setattr(case, name, getattr(case, name).to(device))
    stats = assert_close_to_reference(case, 2e-5, **extra)
    logits = case.hidden.double() @ case.weight.double().T
    log_p = torch.log_softmax(logits, -1)
    want_entropy = -(log_p.exp() * log_p).sum(-1).mean()
    assert float(stats["entropy"]) == pytest.approx(float(want_entropy), rel=1e-5, abs=0.0), seed
    backend = extra.get("backend", "auto")
    got = fused_logprobs(case.hidden, case.weight, case.targets, backend=backend, chunk_size=3)
    want = log_p.gather(-1, case.targets[..., None])[..., 0]
    assert float(((got.double() - want) / want).abs().max()) <= 1e-5, (seed, got, want)


def assert_autocast_changes_nothing(case: Case, device: str = "cpu", **extra) -> None:
    """Under a caller's ``torch.autocast`` (bf16), fp32 inputs give the same
    loss, gradients, statistics and log-probs as without it, the backward run
    inside the autocast region too: the fused loss chooses its own precision."""
    from turnrl.kernels.fused_linear_gtpo import fused_logprobs

    want = run_fused(case, **extra)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = run_fused(case, **extra)
        got_logprobs = fused_logprobs(
            case.hidden, case.weight, case.targets.clamp(min=0), backend=extra["backend"]
        )
    want_logprobs = fused_logprobs(
        case.hidden, case.weight, case.targets.clamp(min=0), backend=extra["backend"]
    )
    for name, g, w in zip(("loss", "grad_hidden", "grad_weight"), got, want, strict=False):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=name)
    for name, value in want[3].items():
        torch.testing.assert_close(got[3][name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert got_logprobs.dtype == torch.float32
    torch.testing.assert_close(got_logprobs, want_logprobs, rtol=1e-6, atol=1e-7)

"""Fused token-level GTPO loss: linear head, log-softmax, clipped surrogate, KL, entropy.

Per token ``t`` (``z = hidden @ weight.T / temperature``)::

    l_t      = log_softmax(z_t)[target_t]
    H_t      = entropy of softmax(z_t)                      (whole vocabulary)
    p_t      = exp(clamp(l_t - old_t, -20, 20))
    pg_t     = max(-A_t * p_t, -A_t * clip(p_t, 1 - eps_low, 1 + eps_high))
    pg_t     = min(pg_t, -A_t * dual_clip)   where A_t < 0   (only with dual_clip, as verl)
    pg_t     = -sg(clip(p_t, 1 - eps_low, 1 + eps_high)) * A_t * (1 + l_t - sg(l_t))
                                                    (instead, with policy_loss="cispo")
    pg_t     = -A_t * sigmoid(tau_t * (p_t - 1)) * 4 / tau_t
               tau_t = tau_pos where A_t > 0, else tau_neg   (instead, with policy_loss="sapo")
    kl_t     = min(exp(d) - d - 1, 10),  d = clamp(ref_t - l_t, -20, 20)   (k3, verl's "low_var_kl")
    kl_t     = exp(clamp(l_t - old_t, -20, 20)) * kl_t   (with kl_correction: not detached)
    pg_t     = 0   where A_t < 0 and sg[mean_{u in U, trained} (s_u - l_u)] > delta
                   (with off_policy_mask=delta; U: the token's unit, s: the sampler's
                   log-probs, old by default; DeepSeek-V3.2 Eq. 9)
    pg_t     = 0   where H_t < sg[H_(j)],  j = ceil((1 - rho) (n - 1))
                   (with top_entropy_quantile=rho < 1; H_(0) <= ... <= H_(n-1): the
                   entropies of the call's n trained tokens, sorted; arXiv 2506.01939)
    loss_t   = pg_t + beta * kl_t - entropy_coef * H_t

``kl_t`` is the ``kl_estimator`` of :data:`KL_ESTIMATORS` (k3 by default; see
:func:`kl_estimator_name`); only k3 clamps ``d``, the others have no exp.

and the loss is ``sum_t w_t * loss_t`` with aggregation weights ``w`` that only
depend on the mask (see :func:`aggregation_weights`).

With ``segment_ids`` (GSPO, arXiv 2507.18071, in its GSPO-token form, as
verl's ``gspo`` loss), the ratio of token ``t`` in segment ``S`` is instead

    log p_t  = clamp(sg[mean_{u in S, trained} (l_u - old_u)] + l_t - sg[l_t], -20, 20)

(``sg``: stop-gradient): its value is the segment's length-normalised
geometric-mean ratio, and ``d p_t / d l_t = p_t``, each token's own
gradient scaled by the segment's ratio (the ``1 / |S|`` of GSPO's sequence
gradient comes from a ``seq_mean`` aggregation, not from the ratio). The
clip, the dual clip, SAPO's gate and the statistics then apply per token to
that ratio.

The [N, V] logits never exist at once. Two schedules share the kernels:

* ``rows`` (the default when gradients are taken): blocks of ``R`` rows over
  the whole vocabulary. Per block, one [R, V] fp32 logits tile; the forward
  kernel folds each row into an online logsumexp (running max ``m``,
  ``r = s - 1`` where ``s = sum exp(z - m)``, ``t = sum exp(z - m) * (m - z)``)
  and picks the target logit: ``l = (z_y - m) - log1p(r)``,
  ``H = log1p(r) + t / s``. The
  block's per-token loss derivatives follow at once, so the backward kernel
  turns the same tile into
  ``dz_j = g_l * [j == y] - p_j * (g_l + g_H * ((z_j - m) + t / s))``
  (``g_l``, ``g_H``: derivatives of the loss by ``l_t`` and ``H_t``;
  ``(z_j - m) + t / s`` is ``z_j - E[z]``), and
  ``grad_hidden[block] = dz @ W / temperature``,
  ``grad_weight += dz.T @ hidden[block] / temperature``. Both gradients are
  done in the forward (as Liger-Kernel's fused cross-entropy does); the
  backward scales them. Three [N, H] x [H, V] matmuls, as eager.
* ``vocab``: chunks of ``Vc`` vocabulary columns over all rows. The forward
  streams [N, Vc] tiles through the same online logsumexp; the backward
  recomputes each tile for the gradients (``grad_weight[c]`` written once,
  ``grad_hidden`` accumulated). Four matmuls, in exchange for the smallest
  tile and nothing but [N] vectors held between forward and backward; also
  the forward-only path (:func:`fused_logprobs`, no-grad calls).

Two implementations of the tile work sit behind one autograd Function:

* ``"triton"``: the matmuls are torch (cuBLAS on a GPU; bf16/fp16 operands
  with an fp32 logits tile, see :func:`_mm_f32`), the per-row online
  reductions and the dlogits (written in the input dtype, so the gradient
  matmuls use the tensor cores) are Triton kernels, one program per row
  (Liger-Kernel's fused-linear-cross-entropy split). No ``tl.dot`` is used,
  so the interpreter's bf16 ``tl.dot`` bug (triton issue 11584) cannot bite.
* ``"torch"``: the same schedules in plain torch with fp32 (fp64 for fp64
  inputs) tiles; the CPU fallback.

The per-token terms on [N] vectors are shared by both and differentiated by
autograd (cheap: no vocabulary dimension), per block in the ``rows`` schedule.

Layout follows Liger-Kernel: kernels, launchers, the autograd Function, then
the functional wrapper; ``torch_gtpo_loss`` (unfused, whole logits) is the
reference the tests and benchmarks compare against.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from turnrl.exceptions import InvalidInputError, UnknownNameError
from turnrl.kernels.kl_estimators import KL_ESTIMATOR_ALIASES, KL_ESTIMATORS, kl_estimator_name
from turnrl.kernels.policy_losses import POLICY_LOSSES, check_policy_loss

try:  # Triton is optional: the torch backend needs only torch.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "AGGREGATIONS",
    "BACKENDS",
    "KL_ESTIMATORS",
    "KL_ESTIMATOR_ALIASES",
    "POLICY_LOSSES",
    "SCHEDULES",
    "GTPOLossFunction",
    "aggregation_weights",
    "fused_logprobs",
    "gtpo_loss",
    "kl_estimator_name",
    "torch_gtpo_loss",
]

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "dr_grpo")
BACKENDS = ("auto", "triton", "torch")
SCHEDULES = ("auto", "rows", "vocab")

# Log-ratios are clamped before exp, as verl does, so a stale old log-prob cannot overflow.
LOG_RATIO_CLAMP = 20.0
# The k3 KL of one token is capped, as verl's low_var_kl caps it: at the
# log-ratio clamp alone one token could add e**20 (about 5e8) to the loss.
# The other estimators have no exp, so neither the log-ratio clamp nor a cap
# (verl applies neither to them): either would take the KL gradient away from
# exactly the tokens that have drifted furthest from the reference, which k2's
# (x, growing with the drift) is there to pull back.
KL_CLAMP = 10.0
# Default tile budget: chunk_size * N elements per [N, Vc] logits tile. Every
# chunk adds its share into grad_hidden ([N, H] fp32 read + written once per
# chunk), so fewer, wider chunks save memory traffic on a GPU: 2**26 elements
# is a 256 MiB fp32 tile + a 128 MiB bf16 dlogits tile. The CPU keeps 2**24.
TILE_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 24}


# Row schedule: rows per block = budget // V, so one [R, V] fp32 tile holds
# about this many elements (1 GiB on CUDA: R = 1766 at V = 151936). Every
# block adds its share into grad_weight ([V, H] read + written once per
# block), so blocks must be tall: at R = 441 that traffic alone rivals a
# matmul (H100 figures in benches/RESULTS.md).
ROW_TILE_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 24}
# Every quantity is kept relative to the row's max ``m`` (``z - m``, the mean
# gap ``t / s = E[m - z] >= 0``), never as ``lse`` or ``E[z]``: on a
# near-one-hot row ``l = z_y - lse`` and ``z_j - E[z]`` are tiny differences
# of O(|z|) numbers, and forming them from fp32 ``lse`` and ``E[z]`` lost
# about 1e-6 absolute each, a 1e-3 to 1e-2 relative error in the entropy and
# KL gradients (tests/gtpo_cases.py: make_peaked_case). For the same reason
# the sum ``s = 1 + r`` is kept as ``r``, the mass of every token but one top
# token (which adds exactly 1): ``s - 1`` in fp32 is off by 1e-7, and so
# were ``l`` and ``1 - p_y`` at the top token, by 1e-3 relative at
# ``1 - p_y = 1e-4``. No sum here has a negative term, so nothing cancels.
#
# Launch options of both kernels. No fused multiply-add: the backward
# recomputes ``z - m`` and ``p`` from the same fp32 tile, and with
# fma contraction it would not round ``z`` as the forward did, so a gradient
# that is exactly zero (a one-token vocabulary, a one-hot row) came out as
# rounding noise on a GPU (the interpreter never fuses).
KERNEL_OPTIONS = {"enable_fp_fusion": False}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context with autocast off on ``device_type``.

    The fused loss picks its own precisions (an fp32 logits tile from
    operands in the inputs' dtype). Under a caller's ``torch.autocast`` the
    tile's matmul would come out in bf16/fp16 instead: the row schedule's
    gradient matmuls then mixed dtypes and failed, the vocabulary schedule's
    log-probs and entropies lost about 1e-3 to the rounded logits, and its
    backward failed where it ran inside the autocast region.
    """
    available = getattr(torch.amp, "is_autocast_available", None)
    supported = available(device_type) if available else device_type in ("cpu", "cuda")
    if not supported:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _gtpo_forward_chunk_kernel(
        logits_ptr,
        logits_stride,
        targets_ptr,
        max_ptr,
        rest_ptr,
        sumexpgap_ptr,
        target_logit_ptr,
        chunk_start,
        chunk_width,
        inv_temperature,
        BLOCK_V: tl.constexpr,
    ):
        """Fold one [N, Vc] logits tile into each row's online logsumexp state."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_stride
        target = tl.load(targets_ptr + row) - chunk_start
        m = tl.load(max_ptr + row)
        r = tl.load(rest_ptr + row)
        t = tl.load(sumexpgap_ptr + row)
        target_logit = tl.load(target_logit_ptr + row)
        for block in range(0, chunk_width, BLOCK_V):
            cols = block + tl.arange(0, BLOCK_V)
            valid = cols < chunk_width
            z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
            m_new = tl.maximum(m, tl.max(tl.where(valid, z, float("-inf")), axis=0))
            scale = tl.exp(m - m_new)
            e = tl.where(valid, tl.exp(z - m_new), 0.0)
            # Moving the max from m to m_new adds (m_new - m) to every old gap;
            # before the first element there is nothing to move (and -inf * 0).
            seen = m > float("-inf")
            t = tl.where(seen, (t + (m_new - m) * (1.0 + r)) * scale, 0.0)
            t += tl.sum(e * (m_new - z), axis=0)
            # A new top token in this block: the old mass (1 + r) shrinks and
            # every element of the block but one top one joins r.
            at_top = valid & (z == m_new)
            tops = tl.sum(at_top.to(tl.float32), axis=0)
            block_rest = tl.sum(tl.where(at_top, 0.0, e), axis=0) + (tops - 1.0)
            r = tl.where(m_new > m, (1.0 + r) * scale + block_rest, r + tl.sum(e, axis=0))
            m = m_new
            target_logit += tl.sum(tl.where(valid & (cols == target), z, 0.0), axis=0)
        tl.store(max_ptr + row, m)
        tl.store(rest_ptr + row, r)
        tl.store(sumexpgap_ptr + row, t)
        tl.store(target_logit_ptr + row, target_logit)

    @triton.jit
    def _gtpo_backward_chunk_kernel(
        logits_ptr,
        logits_stride,
        dlogits_ptr,
        dlogits_stride,
        targets_ptr,
        max_ptr,
        log_sumexp_ptr,
        mean_gap_ptr,
        tail_mass_ptr,
        grad_logprob_ptr,
        grad_entropy_ptr,
        chunk_start,
        chunk_width,
        inv_temperature,
        BLOCK_V: tl.constexpr,
    ):
        """Write d loss / d raw logits of one [N, Vc] fp32 logits tile (may alias it)."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_stride
        out_ptr = dlogits_ptr + row * dlogits_stride
        target = tl.load(targets_ptr + row) - chunk_start
        m = tl.load(max_ptr + row)
        log_s = tl.load(log_sumexp_ptr + row)
        mean_gap = tl.load(mean_gap_ptr + row)
        tail_mass = tl.load(tail_mass_ptr + row)
        g_l = tl.load(grad_logprob_ptr + row)
        g_h = tl.load(grad_entropy_ptr + row)
        for block in range(0, chunk_width, BLOCK_V):
            cols = block + tl.arange(0, BLOCK_V)
            valid = cols < chunk_width
            z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
            shifted = z - m
            p = tl.exp(shifted - log_s)
            centered = shifted + mean_gap
            dz = -p * (g_l + g_h * centered)
            # At the target, g_l * (1 - p): 1 - p cancels where p is near 1,
            # which only a top token can be, and there it is the tail mass.
            one_minus_p = tl.where(shifted == 0.0, tail_mass, 1.0 - p)
            dz = tl.where(cols == target, g_l * one_minus_p - p * g_h * centered, dz)
            dz = dz * inv_temperature
            tl.store(out_ptr + cols, dz.to(dlogits_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------
# Launchers: the vocabulary loops
# ---------------------------------------------------------------------------


def _block_v(chunk_width: int) -> int:
    # Small blocks in the interpreter keep it quick and exercise the multi-block loop.
    cap = 16 if _interpreting() else 4096
    return min(cap, triton.next_power_of_2(chunk_width))


def _chunk_bounds(size: int, chunk_size: int):
    """``(start, stop)`` of consecutive chunks of ``range(size)`` (vocabulary columns or rows)."""
    for start in range(0, size, chunk_size):
        yield start, min(start + chunk_size, size)


def _row_state(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Fresh online-logsumexp state per row: ``(m, r, t, target_logit)``."""
    m = torch.full((n,), -math.inf, dtype=torch.float32, device=device)
    return m, *(torch.zeros(n, dtype=torch.float32, device=device) for _ in range(3))


class RowStats(NamedTuple):
    """Per-row log-softmax statistics of the logits ``z``, relative to the row max.

    ``log_sumexp`` is ``log sum_j exp(z_j - row_max)``, ``mean_gap`` is
    ``E_p[row_max - z] >= 0`` and ``tail_mass`` is ``1 - p`` of a top token,
    so ``lse = row_max + log_sumexp`` and ``E[z] = row_max - mean_gap``; they
    are not formed, as they cancel (see the note above ``KERNEL_OPTIONS``).
    """

    row_max: torch.Tensor
    log_sumexp: torch.Tensor
    mean_gap: torch.Tensor
    tail_mass: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor

    def for_grads(self) -> tuple[torch.Tensor, ...]:
        """What the gradient needs: ``(row_max, log_sumexp, mean_gap, tail_mass)``."""
        return self[:4]


def _row_stats(m, r, t, target_shift) -> RowStats:
    """:class:`RowStats` from the online state ``(m, r, t)`` and ``z_y - m``."""
    s = 1.0 + r
    log_s = torch.log1p(r)
    mean_gap = t / s
    return RowStats(m, log_s, mean_gap, r / s, target_shift - log_s, log_s + mean_gap)


def _state_stats(state: tuple[torch.Tensor, ...]) -> RowStats:
    """:class:`RowStats` of a folded :func:`_row_state`."""
    m, r, t, target_logit = state
    return _row_stats(m, r, t, target_logit - m)


def _fold_tile_torch(z, m, r, t):
    """Fold an fp32/fp64 logits tile into ``(m, r, t)``; torch twin of the forward kernel.

    Overwrites ``z`` (two tiles in all: ``z`` and its exponentials).
    """
    rows = torch.arange(z.shape[0], device=z.device)
    block_max, block_top = z.max(dim=1)
    m_new = torch.maximum(m, block_max)
    scale = torch.exp(m - m_new)
    e = z.sub_(m_new[:, None]).exp()
    seen = m > -math.inf
    t = torch.where(seen, (t + (m_new - m) * (1.0 + r)) * scale, 0.0) - z.mul_(e).sum(dim=1)
    # The block's top element leaves the sum (it is the new top token's 1 where
    # the max moved into this block) and comes back where it did not.
    top_mass = e[rows, block_top]
    e[rows, block_top] = 0.0
    rest = e.sum(dim=1)
    r = torch.where(m_new > m, (1.0 + r) * scale + rest, r + rest + top_mass)
    return m_new, r, t


def _target_dlogits(shifted_y, stats, g_l, g_h) -> torch.Tensor:
    """d loss / d z at the target column (before 1/T), with ``1 - p_y`` kept exact
    at a top token: ``g_l * (1 - p_y) - p_y * g_h * (z_y - E[z])``."""
    _, log_s, mean_gap, tail_mass = stats
    p_y = torch.exp(shifted_y - log_s)
    one_minus_p = torch.where(shifted_y == 0, tail_mass, 1.0 - p_y)
    return g_l * one_minus_p - p_y * g_h * (shifted_y + mean_gap)


def _launch_options(width: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Launch options of the row kernels; ``overrides`` (``BLOCK_V``, ``num_warps``)
    are for benches/gpu_row_kernels.py's tuning sweep."""
    return {"BLOCK_V": _block_v(width), **KERNEL_OPTIONS, **overrides}


def _fold_tile(
    logits, targets, state, chunk_start: int, temperature: float, **overrides: Any
) -> None:
    """Fold an fp32 logits tile (columns ``chunk_start`` on) into ``state``, in place."""
    width = logits.shape[1]
    _gtpo_forward_chunk_kernel[(logits.shape[0],)](
        logits,
        logits.stride(0),
        targets,
        *state,
        chunk_start,
        width,
        1.0 / temperature,
        **_launch_options(width, overrides),
    )


def _tile_dlogits(
    logits, dlogits, targets, stats, g_l, g_h, chunk_start, temperature, **overrides: Any
) -> None:
    """Write d loss / d raw logits of an fp32 tile into ``dlogits`` (may be ``logits``).

    ``stats`` holds fp32 contiguous ``RowStats.for_grads()``.
    """
    width = logits.shape[1]
    row_max, log_sumexp, mean_gap, tail_mass = stats
    _gtpo_backward_chunk_kernel[(logits.shape[0],)](
        logits,
        logits.stride(0),
        dlogits,
        dlogits.stride(0),
        targets,
        row_max,
        log_sumexp,
        mean_gap,
        tail_mass,
        g_l,
        g_h,
        chunk_start,
        width,
        1.0 / temperature,
        **_launch_options(width, overrides),
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 with fp32 accumulation, whatever the (equal) input dtypes.

    Rounding the logits to bf16 costs ~1e-2 in log-probs, so low-precision
    operands go through cuBLAS with an fp32 output (``out_dtype``) on CUDA
    and through an fp32 upcast elsewhere (the CPU, the interpreter). A torch
    without ``mm(out_dtype=)`` gets the eager recipe on CUDA instead: a
    low-precision product upcast afterwards (fast, bf16-rounded).
    """
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        if _MM_OUT_DTYPE is not False:
            try:
                out = torch.mm(a, b, out_dtype=torch.float32)
                _MM_OUT_DTYPE = True
                return out
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE = False
        return (a @ b).float()
    return a.float() @ b.float()


_MM_OUT_DTYPE: bool | None = None  # whether torch.mm(out_dtype=) works here; None: untried


def stream_stats_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_size: int,
) -> RowStats:
    """Per-row :class:`RowStats` of ``hidden @ weight.T / T``, chunked."""
    dtype = _compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    h = hidden.to(dtype)
    m = torch.full((n,), -math.inf, dtype=dtype, device=hidden.device)
    r = torch.zeros(n, dtype=dtype, device=hidden.device)
    t = torch.zeros(n, dtype=dtype, device=hidden.device)
    target_logit = torch.zeros(n, dtype=dtype, device=hidden.device)
    rows = torch.arange(n, device=hidden.device)
    for start, stop in _chunk_bounds(weight.shape[0], chunk_size):
        z = h @ weight[start:stop].to(dtype).T
        z.mul_(1.0 / temperature)
        local = targets - start
        inside = (local >= 0) & (local < stop - start)
        picked = z[rows, local.clamp(0, stop - start - 1)]
        target_logit = torch.where(inside, picked, target_logit)
        m, r, t = _fold_tile_torch(z, m, r, t)
        del z
    return _state_stats((m, r, t, target_logit))


def stream_grad_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: RowStats,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Chunked ``(grad_hidden, grad_weight)`` for per-row loss derivatives by l and H."""
    dtype = _compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    h = hidden.to(dtype)
    grad_h = torch.zeros_like(h) if need_hidden else None
    grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
    rows = torch.arange(n, device=hidden.device)
    row_stats = tuple(v.to(dtype) for v in stats.for_grads())
    max_c, log_s_c, gap_c = (v[:, None] for v in row_stats[:3])
    g_l, g_h = grad_logprob.to(dtype), grad_entropy.to(dtype)
    inv_t = 1.0 / temperature
    for start, stop in _chunk_bounds(weight.shape[0], chunk_size):
        w_c = weight[start:stop].to(dtype)
        z = h @ w_c.T
        z.mul_(inv_t).sub_(max_c)
        local = targets - start
        inside = (local >= 0) & (local < stop - start)
        shifted_y = z[rows[inside], local[inside]]
        p = torch.sub(z, log_s_c).exp_()
        dz = z.add_(gap_c).mul_(g_h[:, None]).add_(g_l[:, None]).mul_(p).neg_()
        del p
        inside_stats = tuple(v[inside] for v in row_stats)
        dz[rows[inside], local[inside]] = _target_dlogits(
            shifted_y, inside_stats, g_l[inside], g_h[inside]
        )
        dz.mul_(inv_t)
        if grad_h is not None:
            grad_h.addmm_(dz, w_c)
        if grad_w is not None:
            torch.mm(dz.T, h, out=grad_w[start:stop])
        del dz
    return grad_h, grad_w


def stream_stats_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_size: int,
) -> RowStats:
    """Triton twin of :func:`stream_stats_torch`: fp32 tiles from :func:`_mm_f32`."""
    state = _row_state(hidden.shape[0], hidden.device)
    for start, stop in _chunk_bounds(weight.shape[0], chunk_size):
        logits = _mm_f32(hidden, weight[start:stop].T)
        _fold_tile(logits, targets, state, start, temperature)
        del logits
    return _state_stats(state)


def stream_grad_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: RowStats,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton twin of :func:`stream_grad_torch`.

    The kernel reads an fp32 logits tile and writes dlogits in the input
    dtype on CUDA (in place for fp32), so the two gradient matmuls run on the
    tensor cores with bf16/fp16 operands, as an eager backward would; off
    CUDA it writes fp32 in place.
    """
    grad_h = (
        torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        if need_hidden
        else None
    )
    grad_w = torch.empty_like(weight) if need_weight else None
    row_stats = tuple(v.float().contiguous() for v in stats.for_grads())
    g_l = grad_logprob.float().contiguous()
    g_h = grad_entropy.float().contiguous()
    for start, stop in _chunk_bounds(weight.shape[0], chunk_size):
        w_c = weight[start:stop]
        logits = _mm_f32(hidden, w_c.T)
        # On CUDA, low-precision dlogits feed tensor-core matmuls. Elsewhere
        # (the CPU, the interpreter) they stay fp32: rounding them to bf16
        # put grad_weight at the edge of the 1e-2 bound on 1% of seeds.
        low_precision = hidden.dtype != torch.float32 and hidden.is_cuda
        dlogits = torch.empty_like(logits, dtype=hidden.dtype) if low_precision else logits
        _tile_dlogits(logits, dlogits, targets, row_stats, g_l, g_h, start, temperature)
        del logits
        if low_precision:
            if grad_h is not None:
                grad_h += _mm_f32(dlogits, w_c)
            if grad_w is not None:
                torch.mm(dlogits.T, hidden, out=grad_w[start:stop])
        else:
            if grad_h is not None:
                grad_h += dlogits @ w_c.float()
            if grad_w is not None:
                grad_w[start:stop] = dlogits.T @ hidden.float()
        del dlogits
    return grad_h, grad_w


@dataclass(frozen=True)
class TokenInputs:
    """The per-token [N] inputs of the loss terms, flat.

    ``segments`` (:func:`_segment_index`) gives every token its segment's
    ratio; None: its own. A block of rows cannot hold a segment's mean, so
    segments exist only where all N tokens are at hand (the ``vocab``
    schedule).
    """

    old: torch.Tensor
    advantages: torch.Tensor
    ref: torch.Tensor | None
    agg_weights: torch.Tensor
    cfg: LossConfig
    segments: torch.Tensor | None = None
    units: torch.Tensor | None = None
    """The off-policy mask's units (:func:`_segment_index`), vocab schedule only."""
    sampling: torch.Tensor | None = None
    """The off-policy mask's sampling log-probs (with ``units``)."""

    def block(self, start: int, stop: int) -> TokenInputs:
        return TokenInputs(
            self.old[start:stop],
            self.advantages[start:stop],
            None if self.ref is None else self.ref[start:stop],
            self.agg_weights[start:stop],
            self.cfg,
        )


@dataclass(frozen=True)
class RowsResult:
    """What the row schedule computes in one forward."""

    loss: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None


def rows_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_inputs: TokenInputs,
    temperature: float,
    rows: int,
    need_hidden: bool,
    need_weight: bool,
) -> RowsResult:
    """Loss, log-probs, entropies and both gradients, one block of rows at a time.

    Each block's whole-vocabulary logits are one [R, V] tile, so its
    log-softmax is exact at once and its dlogits follow in the same pass:
    three [N, H] x [H, V] matmuls in all, the fewest a loss with both
    gradients can do. The gradients are for a loss gradient of 1; the
    autograd Function scales them in the backward.
    """
    dtype = _compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    w = weight.to(dtype)
    inv_t = 1.0 / temperature
    logprob = torch.empty(n, dtype=dtype, device=hidden.device)
    entropy = torch.empty(n, dtype=dtype, device=hidden.device)
    loss = torch.zeros((), dtype=dtype, device=hidden.device)
    grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
    # Written by the first block's product (beta 0), then added to: no zero fill.
    grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
    for start, stop in _chunk_bounds(n, rows):
        h = hidden[start:stop].to(dtype)
        block_targets = targets[start:stop]
        local = torch.arange(stop - start, device=hidden.device)
        z = h @ w.T
        z.mul_(inv_t)
        row_max, top = z.max(dim=1)
        z.sub_(row_max[:, None])  # z - m from here on: see RowStats
        e = z.exp()
        gap_mass = -(e * z).sum(dim=1)
        # Every token's mass but one top token's (exactly 1: exp(0)).
        e[local, top] = 0.0
        rest = e.sum(dim=1)
        e[local, top] = 1.0
        shifted_y = z[local, block_targets]
        stats = _row_stats(row_max, rest, gap_mass, shifted_y)
        p = e.div_(1.0 + rest[:, None])
        del e
        block_logprob, block_entropy = stats.logprob, stats.entropy
        logprob[start:stop], entropy[start:stop] = block_logprob, block_entropy
        block_inputs = token_inputs.block(start, stop)
        if not (need_hidden or need_weight):
            loss += _block_loss(block_logprob, block_entropy, block_inputs)
            continue
        block_loss, g_l, g_h = _token_grads(block_logprob, block_entropy, block_inputs)
        loss += block_loss
        dz = z.add_(stats.mean_gap[:, None]).mul_(g_h[:, None]).add_(g_l[:, None]).mul_(p).neg_()
        del p
        dz[local, block_targets] = _target_dlogits(shifted_y, stats.for_grads(), g_l, g_h)
        dz.mul_(inv_t)
        if grad_h is not None:
            grad_h[start:stop] = dz @ w
        if grad_w is not None:
            grad_w.addmm_(dz.T, h, beta=float(start > 0))
        del dz, z
    if grad_w is not None and n == 0:
        grad_w.zero_()
    return RowsResult(loss, logprob, entropy, grad_h, grad_w)


def rows_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_inputs: TokenInputs,
    temperature: float,
    rows: int,
    need_hidden: bool,
    need_weight: bool,
) -> RowsResult:
    """Triton twin of :func:`rows_torch`: the two row kernels on an fp32 tile.

    On CUDA with low-precision inputs the dlogits are written in the input
    dtype and ``grad_weight`` accumulates in it, block by block, through
    cuBLAS (fp32 inside, one rounding per block), as Liger-Kernel's chunked
    losses accumulate; an fp32 accumulator would cost a [V, H] fp32 buffer.
    """
    n = hidden.shape[0]
    dev = hidden.device
    low_precision = hidden.dtype != torch.float32 and hidden.is_cuda
    logprob = torch.empty(n, dtype=torch.float32, device=dev)
    entropy = torch.empty(n, dtype=torch.float32, device=dev)
    loss = torch.zeros((), dtype=torch.float32, device=dev)
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_hidden else None
    grad_w_dtype = weight.dtype if low_precision else torch.float32
    # Written by the first block's product (beta 0), then added to: no zero
    # fill (the fill and its re-read: under 1% on an H200, benches/RESULTS.md).
    grad_w = torch.empty(weight.shape, dtype=grad_w_dtype, device=dev) if need_weight else None
    w_f32 = None if low_precision or weight.dtype == torch.float32 else weight.float()
    for start, stop in _chunk_bounds(n, rows):
        h = hidden[start:stop]
        block_targets = targets[start:stop]
        logits = _mm_f32(h, weight.T)
        state = _row_state(stop - start, dev)
        _fold_tile(logits, block_targets, state, 0, temperature)
        stats = _state_stats(state)
        block_logprob, block_entropy = stats.logprob, stats.entropy
        logprob[start:stop], entropy[start:stop] = block_logprob, block_entropy
        block_inputs = token_inputs.block(start, stop)
        if not (need_hidden or need_weight):
            loss += _block_loss(block_logprob, block_entropy, block_inputs)
            continue
        block_loss, g_l, g_h = _token_grads(block_logprob, block_entropy, block_inputs)
        loss += block_loss
        dlogits = torch.empty_like(logits, dtype=hidden.dtype) if low_precision else logits
        g_l, g_h = g_l.float().contiguous(), g_h.float().contiguous()
        grad_stats = tuple(v.contiguous() for v in stats.for_grads())
        _tile_dlogits(logits, dlogits, block_targets, grad_stats, g_l, g_h, 0, temperature)
        del logits
        if grad_h is not None:
            grad_h[start:stop] = (
                _mm_f32(dlogits, weight)
                if low_precision
                else dlogits @ (weight if w_f32 is None else w_f32)
            )
        if grad_w is not None:
            # dlogits are in the input dtype on CUDA, fp32 elsewhere.
            grad_w.addmm_(dlogits.T, h if low_precision else h.float(), beta=float(start > 0))
        del dlogits
    if grad_w is not None and n == 0:
        grad_w.zero_()
    return RowsResult(loss, logprob, entropy, grad_h, grad_w)


_ROWS = {"torch": rows_torch, "triton": rows_triton}


def _rows_pass(
    inputs, cfg, temperature, backend, rows, need_hidden, need_weight
) -> tuple[RowsResult, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The row schedule over ``inputs`` (the Function's tensor inputs, in
    order) and its gradients for d loss = 1, in the inputs' dtypes."""
    hidden, weight, targets, advantages, old, ref, agg_weights = inputs
    result = _ROWS[backend](
        hidden,
        weight,
        targets,
        TokenInputs(old, advantages, ref, agg_weights, cfg),
        temperature,
        rows,
        need_hidden,
        need_weight,
    )
    grad_h, grad_w = result.grad_hidden, result.grad_weight
    return result, (
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
    )


_STREAMS = {
    "torch": (stream_stats_torch, stream_grad_torch),
    "triton": (stream_stats_triton, stream_grad_triton),
}


# ---------------------------------------------------------------------------
# Per-token terms and aggregation (shared by both backends and the reference)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """Scalar hyper-parameters of the per-token GTPO loss."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.0
    entropy_coef: float = 0.0
    kl_estimator: str = "k3"
    """A canonical name of :data:`KL_ESTIMATORS` (:func:`kl_estimator_name`)."""
    policy_loss: str = "ppo"
    """One of :data:`POLICY_LOSSES`."""
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    """SAPO's gate temperatures (``policy_loss="sapo"``), of tokens with
    ``A > 0`` and the others."""
    kl_correction: bool = False
    """Weight the KL estimate by the token's own ratio ``pi / pi_old`` (DeepSeek-V3.2)."""
    off_policy_mask: float | None = None
    """DeepSeek-V3.2's delta: a unit's policy gradient is dropped where its
    advantage is negative and its mean ``s - l`` (``s``: the sampling
    log-probs) exceeds it."""
    top_entropy_quantile: float = 1.0
    """rho: only the share rho of trained tokens with the highest entropies
    keeps its policy gradient (arXiv 2506.01939); 1.0 keeps every token."""


def _kl_penalty(x: torch.Tensor, k3: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per token, the KL estimate ``estimator`` (canonical) at ``x = log pi -
    log pi_ref`` (not clamped), given the capped k3 value ``k3``."""
    base = estimator.removesuffix("+")
    if base == "k3":
        value = k3
    elif base == "k1":
        value = x
    elif base == "abs":
        value = x.abs()
    else:
        value = 0.5 * x.square()
    if base == estimator:
        return value
    # Straight-through: k2's gradient, the value named. k2 - sg[k2] is exactly 0.
    k2 = 0.5 * x.square()
    return (k2 - k2.detach()) + value.detach()


# Why each policy loss but PPO's takes no dual clip.
_DUAL_CLIP_CONFLICTS = {
    "cispo": "its weight is already clipped at 1 - eps_low and 1 + eps_high whatever the "
    "advantage's sign",
    "sapo": "its gate already bounds the loss of a negative advantage at -A * 4 / sapo_tau_neg",
}


def _check_dual_clip_for(policy_loss: str, dual_clip: float | None) -> None:
    reason = _DUAL_CLIP_CONFLICTS.get(policy_loss)
    if reason is not None and dual_clip is not None:
        raise InvalidInputError(
            f"dual_clip has no meaning with policy_loss={policy_loss!r}: {reason}; leave "
            "dual_clip None"
        )


def _check_kl_correction(kl_correction: Any) -> None:
    if not isinstance(kl_correction, bool):
        raise InvalidInputError(f"kl_correction must be a bool, got {kl_correction!r}")


def _check_sapo_taus(tau_pos: float, tau_neg: float) -> None:
    # Written so that NaN fails too.
    for name, tau in (("sapo_tau_pos", tau_pos), ("sapo_tau_neg", tau_neg)):
        if not 0 < tau < math.inf:
            raise InvalidInputError(
                f"{name} must be finite and > 0 (SAPO's temperature), got {tau}"
            )


def token_terms(
    logprob: torch.Tensor,
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    cfg: LossConfig,
    segment_log_ratio: torch.Tensor | None = None,
    unit_log_ratio: torch.Tensor | None = None,
    top_entropy: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token loss and its parts; differentiable in ``logprob`` and ``entropy``.

    ``segment_log_ratio`` (per token, detached: :func:`_segment_log_ratios`)
    replaces the value of each token's log-ratio and keeps its gradient, 1
    by its own ``logprob`` (GSPO-token); None: the token's own ``logprob -
    old_logprobs``. ``unit_log_ratio`` (per token, detached: the mean of
    ``logprob`` less the sampling log-probs over the token's off-policy-mask
    unit) is needed with ``cfg.off_policy_mask``. ``top_entropy`` (per
    token, a bool: :func:`_top_entropy_tokens`) is needed with
    ``cfg.top_entropy_quantile < 1``.
    """
    if segment_log_ratio is None:
        raw_log_ratio = logprob - old_logprobs
    else:
        # logprob - sg[logprob] is exactly 0 and has gradient 1.
        raw_log_ratio = segment_log_ratio + (logprob - logprob.detach())
    log_ratio = torch.clamp(raw_log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    if cfg.policy_loss == "cispo":
        # The clipped weight is detached and multiplies d log pi, so a token
        # outside the clip range keeps its gradient (the point of CISPO). Its
        # own log-ratio (unclamped) carries the gradient: the clamp at ±20
        # would take it away beyond. The value, -w * A, is PPO's surrogate at
        # r = w (what an on-policy step, w = r = 1, reports under both).
        low, high = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
        weight = torch.clamp(ratio, low, high).detach()
        pg = -weight * advantages * (1.0 + (raw_log_ratio - raw_log_ratio.detach()))
        terms = {"ratio": ratio, "clipped": (ratio < low) | (ratio > high)}
    elif cfg.policy_loss == "sapo":
        # A smooth gate instead of the clip: d pg / d l = -A * 4 s (1 - s) * r
        # (s the sigmoid), -A at r = 1 whatever tau, fading off-policy.
        # Nothing is clipped: clip_frac is 0, as verl reports for SAPO.
        # Filled on the device: ratio.new_tensor(tau) would copy from host
        # memory, which waits for the GPU, once per row block (the loss ran
        # 11-15% slower on an H100, benches/RESULTS.md).
        tau = torch.full_like(ratio, cfg.sapo_tau_neg).masked_fill_(
            advantages > 0, cfg.sapo_tau_pos
        )
        pg = -advantages * torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        terms = {"ratio": ratio, "clipped": torch.zeros_like(ratio, dtype=torch.bool)}
    else:
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
        pg = torch.maximum(unclipped, clipped)
        terms = {"ratio": ratio, "clipped": clipped > unclipped}
    if cfg.dual_clip is not None:
        floor = -advantages * cfg.dual_clip
        terms["dual_clipped"] = (advantages < 0) & (pg > floor)
        pg = torch.where(advantages < 0, torch.minimum(pg, floor), pg)
    if cfg.off_policy_mask is not None:
        # DeepSeek-V3.2's off-policy sequence masking (Eq. 9): a unit that
        # the policy has moved far from (mean s - l over it, a KL estimate
        # between the sampler and the policy, above delta) and whose
        # advantage is negative teaches nothing reliable:
        # its policy gradient is dropped. From detached values; the KL and
        # entropy terms stay (as DeepSeek's and TRL's).
        if unit_log_ratio is None:
            raise InvalidInputError("off_policy_mask needs each token's unit_log_ratio")
        masked = (advantages < 0) & (-unit_log_ratio.detach() > cfg.off_policy_mask)
        terms["off_policy_masked"] = masked
        pg = torch.where(masked, torch.zeros_like(pg), pg)
    if cfg.top_entropy_quantile != 1.0:
        # Beyond the 80/20 rule (arXiv 2506.01939): only the high-entropy
        # "forking" tokens carry the policy gradient. The KL and entropy
        # terms stay on every token (as TRL's top_entropy_quantile).
        if top_entropy is None:
            raise InvalidInputError("top_entropy_quantile < 1 needs each token's top_entropy")
        terms["top_entropy"] = top_entropy
        pg = torch.where(top_entropy, pg, torch.zeros_like(pg))
    loss = pg
    if ref_logprobs is not None:
        x = logprob - ref_logprobs
        d = torch.clamp(-x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k3 = torch.clamp(torch.exp(d) - d - 1.0, max=KL_CLAMP)
        # k3 whatever the estimator: the statistic stays comparable across runs.
        terms["ref_kl"] = k3
        penalty = _kl_penalty(x, k3, cfg.kl_estimator)
        if cfg.kl_correction:
            # The tokens were sampled from pi_old: E_old[r * k] is E_pi[k]. The
            # ratio is the token's own (the KL is per token, whatever segment
            # shares its PPO ratio), clamped as PPO's, and not detached: the
            # gradient of E_old[r * k] is E_pi[k * d log pi + d k], which for
            # k1 and k3 is the reverse KL's own gradient (TRL does the same).
            own = torch.clamp(logprob - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            penalty = torch.exp(own) * penalty
        if cfg.kl_estimator != "k3" or cfg.kl_correction:
            terms["kl_loss"] = penalty
        if cfg.beta != 0.0:
            loss = loss + cfg.beta * penalty
    if cfg.entropy_coef != 0.0:
        loss = loss - cfg.entropy_coef * entropy
    terms["loss"] = loss
    return terms


def aggregation_weights(
    mask: torch.Tensor,
    agg: str,
    max_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    global_tokens: int | None = None,
    global_sequences: int | None = None,
) -> torch.Tensor:
    """Weights ``w`` [B, T] with ``loss = sum(w * loss_t)`` for aggregation ``agg``.

    ``mask`` is [B, T] (rows are sequences). With ``n_b`` valid tokens in
    sequence ``b`` and ``S`` the number of sequences with ``n_b > 0``:

    * ``token_mean``: ``1 / sum_b n_b`` (verl ``token-mean``, DAPO).
    * ``seq_mean_token_mean``: ``1 / (S * n_b)`` (verl ``seq-mean-token-mean``,
      GRPO); empty sequences neither contribute nor count.
    * ``seq_mean_token_sum``: ``1 / S`` (verl ``seq-mean-token-sum``).
    * ``dr_grpo``: ``1 / (B * max_len)`` with ``max_len`` defaulting to the
      padded length ``T`` (TRL's ``dr_grpo``: a constant, not the token count).

    Degenerate denominators (no valid token at all) are clamped to 1 so the
    loss is 0, never NaN.

    For a batch split into micro-batches (gradient accumulation), give the
    whole batch's counts: ``global_tokens`` (trained tokens, for
    ``token_mean``) and ``global_sequences`` (sequences with a trained token
    for the ``seq_mean`` modes; all sequences for ``dr_grpo``, which then
    needs ``max_len``). The micro-batch losses then add up to the whole
    batch's loss; a mean of per-micro-batch losses would not.
    """
    valid = mask.to(dtype)
    if agg == "token_mean":
        if global_tokens is not None:
            return valid / max(float(global_tokens), 1.0)
        return valid / valid.sum().clamp(min=1.0)
    if agg == "seq_mean_token_mean":
        per_seq = valid.sum(dim=-1, keepdim=True)
        nonempty = (per_seq > 0).to(dtype).sum().clamp(min=1.0)
        if global_sequences is not None:
            nonempty = torch.tensor(max(float(global_sequences), 1.0), dtype=dtype)
        return valid / per_seq.clamp(min=1.0) / nonempty
    if agg == "seq_mean_token_sum":
        nonempty = (valid.sum(dim=-1) > 0).to(dtype).sum().clamp(min=1.0)
        if global_sequences is not None:
            nonempty = torch.tensor(max(float(global_sequences), 1.0), dtype=dtype)
        return valid / nonempty
    if agg == "dr_grpo":
        length = mask.shape[-1] if max_len is None else max_len
        sequences = mask.shape[0] if global_sequences is None else global_sequences
        return valid / float(max(sequences, 1) * length)
    raise UnknownNameError(f"unknown agg {agg!r}; valid: {', '.join(AGGREGATIONS)}")


def _segment_index(segment_ids: torch.Tensor) -> torch.Tensor:
    """Each token's segment as an int64 index in ``[0, N)``, flat: equal ids, equal index.

    Ids may be any integers. A sort finds the equal ones, so the number of
    segments never has to reach the host (``torch.unique`` would sync the
    device, which ``check_inputs=False`` promises not to do).
    """
    ids = segment_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(ids)
    sorted_ids = ids[order]
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    index = torch.empty_like(ids)
    index[order] = torch.cumsum(starts, 0) - 1
    return index


def _segment_log_ratios(
    logprob: torch.Tensor, old: torch.Tensor, used: torch.Tensor, segments: torch.Tensor
) -> torch.Tensor:
    """Per token, detached: the mean of ``logprob - old`` over the used tokens of
    its segment (``segments`` from :func:`_segment_index`), 0 for a segment with
    none; the log of GSPO's length-normalised sequence ratio.

    Tokens that are not ``used`` neither add to a mean nor count, and their
    values (NaN padding included) are dropped before they are summed.
    """
    diff = torch.where(used, logprob.detach() - old.to(logprob.dtype), 0.0)
    sums = torch.zeros_like(diff).index_add_(0, segments, diff)
    counts = torch.zeros_like(diff).index_add_(0, segments, used.to(diff.dtype))
    return (sums / counts.clamp(min=1.0))[segments]


def _top_entropy_tokens(entropy: torch.Tensor, used: torch.Tensor, rho: float) -> torch.Tensor:
    """Per token, whether it is a used token among the share ``rho`` of used
    tokens with the highest entropy: ``H_t >= H_(j)``, ``H_(j)`` the
    ``j = ceil((1 - rho) (n - 1))``-th smallest of the ``n`` used tokens'
    entropies (0-based; detached).

    That is the set that TRL's ``H >= torch.quantile(H, 1 - rho)`` keeps
    (linear interpolation lands in ``(H_(j-1), H_(j)]``), taken as the
    order statistic itself so that no interpolation's rounding decides a
    tie; ties at ``H_(j)`` are all kept. ``rho = 0`` keeps the tokens of
    the largest entropy, ``rho = 1`` every used token. No host sync.
    """
    h = entropy.detach()
    n = used.sum()
    j = torch.ceil((1.0 - rho) * (n - 1).to(torch.float64)).to(torch.int64).clamp(min=0)
    # Used tokens first, largest entropy first: the j-th smallest of n is at n - 1 - j.
    descending = torch.sort(torch.where(used, h, -math.inf), descending=True).values
    if descending.numel() == 0:
        return used.clone()
    # index_select, not descending[index]: a tensor index is read on the host.
    threshold = descending.index_select(0, (n - 1 - j).clamp(min=0).reshape(1))
    return used & (h >= threshold)


def _weighted_loss(
    logprob,
    entropy,
    old,
    advantages,
    ref,
    agg_weights,
    cfg,
    segments=None,
    units=None,
    sampling=None,
) -> torch.Tensor:
    """``sum_t w_t * loss_t`` in the accumulation dtype of ``logprob``.

    Inputs at weight-0 tokens are replaced by zeros first, so garbage there
    (NaN or inf old log-probs, padding) reaches neither the loss nor, through
    ``0 * NaN``, the gradients. With ``segments`` (:func:`_segment_index` of
    every token), each token's ratio is its segment's (GSPO-token), the
    segment's mean taken over its weight-nonzero tokens alone, as is the
    top-entropy selection of ``cfg.top_entropy_quantile``.
    """
    acc = logprob.dtype
    used = agg_weights != 0

    def clean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(used, x.to(acc), 0.0)

    old = clean(old)
    terms = token_terms(
        logprob,
        entropy,
        old,
        clean(advantages),
        None if ref is None else clean(ref),
        cfg,
        None if segments is None else _segment_log_ratios(logprob, old, used, segments),
        None if units is None else _segment_log_ratios(logprob, clean(sampling), used, units),
        _top_entropy_or_none(entropy, used, cfg),
    )
    return torch.where(used, agg_weights.to(acc) * terms["loss"], 0.0).sum()


def _top_entropy_or_none(entropy, used, cfg: LossConfig) -> torch.Tensor | None:
    rho = cfg.top_entropy_quantile
    return None if rho == 1.0 else _top_entropy_tokens(entropy, used, rho)


def _block_loss(logprob: torch.Tensor, entropy: torch.Tensor, inputs: TokenInputs) -> torch.Tensor:
    """The weighted loss of these tokens."""
    return _weighted_loss(
        logprob,
        entropy,
        inputs.old,
        inputs.advantages,
        inputs.ref,
        inputs.agg_weights,
        inputs.cfg,
        inputs.segments,
        inputs.units,
        inputs.sampling,
    )


def _token_grads(
    logprob: torch.Tensor, entropy: torch.Tensor, inputs: TokenInputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted loss of these tokens and its derivatives by each ``l_t`` and ``H_t``."""
    with torch.enable_grad():
        l_var = logprob.detach().requires_grad_(True)
        h_var = entropy.detach().requires_grad_(True)
        total = _block_loss(l_var, h_var, inputs)
        g_l, g_h = torch.autograd.grad(total, (l_var, h_var), allow_unused=True)
    g_l = torch.zeros_like(logprob) if g_l is None else g_l
    g_h = torch.zeros_like(entropy) if g_h is None else g_h
    return total.detach(), g_l, g_h


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = torch.where(mask, x.to(dtype), 0.0)
    return (x.sum() / mask.sum().clamp(min=1)).detach()


def _stats(terms: dict[str, torch.Tensor], logprob, entropy, old, mask) -> dict[str, torch.Tensor]:
    # In the loss's dtype: fp64 inputs get fp64 statistics, as they get an fp64 loss.
    dtype = logprob.dtype

    def mean(x: torch.Tensor) -> torch.Tensor:
        return _masked_mean(x, mask, dtype)

    stats = {
        "clip_frac": mean(terms["clipped"]),
        "approx_kl": mean(old - logprob),
        "entropy": mean(entropy),
        "ratio_mean": mean(terms["ratio"]),
    }
    if "dual_clipped" in terms:
        stats["dual_clip_frac"] = mean(terms["dual_clipped"])
    if "ref_kl" in terms:
        stats["ref_kl"] = mean(terms["ref_kl"])
    if "kl_loss" in terms:
        stats["kl_loss"] = mean(terms["kl_loss"])
    if "off_policy_masked" in terms:
        stats["off_policy_masked"] = mean(terms["off_policy_masked"])
    if "top_entropy" in terms:
        stats["top_entropy_frac"] = mean(terms["top_entropy"])
    return stats


# ---------------------------------------------------------------------------
# Autograd Function
# ---------------------------------------------------------------------------


class GTPOLossFunction(torch.autograd.Function):
    """The fused loss under one of two schedules (see the module docstring).

    * ``"rows"``: blocks of ``chunk_size`` rows over the whole vocabulary;
      both gradients are computed in the forward (three matmuls) and the
      backward only scales them.
    * ``"vocab"``: chunks of ``chunk_size`` vocabulary columns over all rows;
      statistics in the forward, the logits recomputed for the gradients in
      the backward (four matmuls, the smallest tile).

    Inputs are flat: ``hidden`` [N, H], ``weight`` [V, H], per-token [N]
    tensors (``agg_weights`` already holds the mask and the aggregation).
    ``want_grads`` is whether autograd will ask for gradients (grad mode was
    on at the call), which a Function cannot see inside its forward.
    ``segments`` (:func:`_segment_index`; ``vocab`` schedule only) gives each
    token its segment's importance ratio.
    Returns the scalar loss, then detached per-token log-probs and entropies.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
        agg_weights: torch.Tensor,
        cfg: LossConfig,
        temperature: float,
        backend: str,
        chunk_size: int,
        schedule: str = "vocab",
        want_grads: bool = True,
        segments: torch.Tensor | None = None,
        units: torch.Tensor | None = None,
        sampling: torch.Tensor | None = None,
    ):
        ctx.schedule = schedule
        ctx.cfg, ctx.temperature, ctx.backend = cfg, temperature, backend
        inputs = (hidden, weight, targets, advantages, old_logprobs, ref_logprobs, agg_weights)
        if schedule == "rows":
            # This schedule takes a block's gradients before the next block's
            # log-probs exist; some settings need every token's first.
            whole = _needs_every_token_first(
                segments is not None, units is not None, cfg.top_entropy_quantile
            )
            if whole:
                name, why = whole[0]
                raise InvalidInputError(
                    f"schedule='rows' cannot take {name}: {why}; use schedule='vocab' (what "
                    f"'auto' picks with {name})"
                )
            need_hidden = want_grads and ctx.needs_input_grad[0]
            need_weight = want_grads and ctx.needs_input_grad[1]
            result, ctx.grads = _rows_pass(
                inputs, cfg, temperature, backend, chunk_size, need_hidden, need_weight
            )
            # Only for a second backward through a retained graph (below).
            ctx.save_for_backward(*inputs)
            ctx.chunk_size = chunk_size
            ctx.mark_non_differentiable(result.logprob, result.entropy)
            return result.loss, result.logprob, result.entropy

        stats_fn, _ = _STREAMS[backend]
        stats = stats_fn(hidden, weight, targets, temperature, chunk_size)
        logprob, entropy = stats.logprob, stats.entropy
        loss = _weighted_loss(
            logprob,
            entropy,
            old_logprobs,
            advantages,
            ref_logprobs,
            agg_weights,
            cfg,
            segments,
            units,
            sampling,
        )
        ctx.save_for_backward(*inputs, segments, units, sampling, *stats)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(logprob, entropy)
        return loss, logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, *_unused: Any):
        # A backward called inside the caller's autocast region runs under it too.
        with _autocast_off(grad_loss.device.type):
            return GTPOLossFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: torch.Tensor):
        nones = (None,) * 14
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.schedule == "rows":
            # The gradients computed in the forward are for d loss = 1. They
            # are handed over once and forgotten: autograd may adopt them (or
            # a view of them) as .grad and add into them later, so a second
            # backward through a retained graph recomputes them, block by
            # block as the forward did, so that it adds exactly what the
            # first added (the vocabulary schedule's recompute differed in
            # the last bits: gradcheck called that non-reentrant).
            grads = ctx.grads
            ctx.grads = None
            if grads is None:
                grads = _rows_pass(
                    ctx.saved_tensors,
                    ctx.cfg,
                    ctx.temperature,
                    ctx.backend,
                    ctx.chunk_size,
                    need_hidden,
                    need_weight,
                )[1]
            grad_h, grad_w = grads
            # A Python float multiplies in fp32 and rounds once: the loss
            # gradient rounded to bf16 first (1/3 as 0.333984) biased every
            # gradient of an averaged micro-batch loss by 0.2%.
            scale = float(grad_loss)
            if scale != 1.0:
                for grad in (grad_h, grad_w):
                    if grad is not None:
                        grad.mul_(scale)
            return (grad_h, grad_w, *nones)
        if not (need_hidden or need_weight):
            return (None, None, *nones)

        hidden, weight, targets, advantages, old, ref, agg_weights, *rest = ctx.saved_tensors
        segments, units, sampling, *saved = rest
        _, grad_fn = _STREAMS[ctx.backend]
        stats = RowStats(*saved)
        inputs = TokenInputs(old, advantages, ref, agg_weights, ctx.cfg, segments, units, sampling)
        _, g_l, g_h = _token_grads(stats.logprob, stats.entropy, inputs)
        scale = grad_loss.to(stats.row_max.dtype)
        grad_h, grad_w = grad_fn(
            hidden,
            weight,
            targets,
            stats,
            g_l * scale,
            g_h * scale,
            ctx.temperature,
            ctx.chunk_size,
            need_hidden,
            need_weight,
        )
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return (grad_h, grad_w, *nones)


# ---------------------------------------------------------------------------
# Functional wrappers
# ---------------------------------------------------------------------------


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise UnknownNameError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    # The Triton kernels compute in fp32: fp64 inputs, whose results are
    # promised in fp64, go to the torch backend.
    if backend == "auto":
        use_triton = HAS_TRITON and device.type == "cuda" and dtype != torch.float64
        return "triton" if use_triton else "torch"
    if backend == "triton" and dtype == torch.float64:
        raise InvalidInputError(
            "backend='triton' computes in fp32 and cannot give the fp64 results fp64 inputs "
            "ask for; use backend='torch' (or 'auto') for fp64"
        )
    if backend == "triton":
        if not HAS_TRITON:
            raise InvalidInputError(
                "backend='triton' needs the triton package; it is not installed"
            )
        if device.type != "cuda" and not _interpreting():
            raise InvalidInputError(
                f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set before "
                "triton is imported; use backend='torch' on the CPU"
            )
    return backend


def _default_chunk(n: int, vocab: int, device: torch.device) -> int:
    budget = TILE_ELEMENTS.get(device.type, TILE_ELEMENTS["cpu"])
    return int(max(64, min(vocab, budget // max(n, 1))))


def _check_token_tensor(name: str, tensor: torch.Tensor | None, shape, device) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise InvalidInputError(
            f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} (hidden.shape[:-1])"
        )
    if tensor.device != device:
        raise InvalidInputError(f"{name} is on {tensor.device}, hidden is on {device}")


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InvalidInputError(f"{name} must be floating point, got {t.dtype}")
    if hidden.dim() not in (2, 3):
        raise InvalidInputError(
            f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise InvalidInputError(
            f"weight has shape {tuple(weight.shape)}, expected [V, {hidden.shape[-1]}] "
            f"(hidden has shape {tuple(hidden.shape)})"
        )
    if weight.shape[0] == 0:
        raise InvalidInputError("weight has an empty vocabulary (shape[0] == 0)")
    if weight.dtype != hidden.dtype:
        # The usual cause: fp32 master weights under autocast, whose last
        # hidden state is bf16. The loss does not cast for the caller.
        raise InvalidInputError(
            f"weight dtype {weight.dtype} differs from hidden {hidden.dtype}; cast one to "
            f"the other's (weight.to(hidden.dtype) computes in {hidden.dtype} and still "
            "sends the gradient to the original weight)"
        )
    if weight.device != hidden.device:
        raise InvalidInputError(f"weight is on {weight.device}, hidden is on {hidden.device}")
    if not (
        isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)
    ):
        raise InvalidInputError(
            f"temperature must be a positive finite number, got {temperature!r}"
        )


def _check_finite_hidden(hidden: torch.Tensor) -> None:
    finite = torch.isfinite(hidden).all(dim=-1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite)[0].tolist()
        raise InvalidInputError(f"hidden has a non-finite value at token index {tuple(bad)}")


def _check_finite_on_mask(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Per-token inputs must be finite where a token is trained on (one sync)."""
    for name, t in tensors.items():
        bad = ~torch.isfinite(t) & mask
        if bool(bad.any()):
            where = tuple(torch.nonzero(bad)[0].tolist())
            raise InvalidInputError(
                f"{name}[{', '.join(map(str, where))}] = {float(t[where])} is not finite "
                "on a trained token (mask is nonzero there)"
            )


def _check_top_entropy_quantile(rho: Any) -> None:
    # Written so that NaN fails too.
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
        raise InvalidInputError(
            f"top_entropy_quantile (the share rho of highest-entropy tokens that keep their "
            f"policy gradient) must be a number in [0, 1], got {rho!r}"
        )


def _check_integer_tensor(name: str, tensor: torch.Tensor) -> None:
    dtype = tensor.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise InvalidInputError(f"{name} must be an integer tensor, got {dtype}")


def _padding_to_token_0(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Target ids outside the vocabulary (padding such as -100) point at token
    0, without checking them or syncing the device."""
    _check_integer_tensor("target_ids", targets)
    return torch.where((targets < 0) | (targets >= vocab), 0, targets).to(torch.int64)


def _check_targets(targets: torch.Tensor, mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    _check_integer_tensor("target_ids", targets)
    bad = (targets < 0) | (targets >= vocab)
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        where = tuple(torch.nonzero(bad)[0].tolist())
        raise InvalidInputError(
            f"target_ids[{', '.join(map(str, where))}] = {int(targets[where])} is outside the "
            f"vocabulary [0, {vocab})"
        )
    # Masked-out positions may hold padding ids (-100): point them at token 0.
    return torch.where(bad | (targets < 0) | (targets >= vocab), 0, targets).to(torch.int64)


def gtpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    agg: str = "token_mean",
    max_len: int | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_inputs: bool = True,
    global_tokens: int | None = None,
    global_sequences: int | None = None,
    schedule: str = "auto",
    segment_ids: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    policy_loss: str = "ppo",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    kl_correction: bool = False,
    off_policy_mask: float | None = None,
    off_policy_units: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level GTPO loss of a linear LM head, without the [N, V] logits.

    Args:
        hidden: final hidden states, [N, H] (one sequence) or [B, T, H].
        weight: LM head, [V, H]; same dtype and device as ``hidden``.
        target_ids: sampled token per position, ``hidden.shape[:-1]``; masked-out
            positions may hold any id (e.g. -100). Everything here is per
            *position*: ``hidden[t]`` predicts ``target_ids[t]``, which is
            the sequence's token ``t + 1``. Per-token values (such as
            :func:`turnrl.broadcast_to_tokens` gives) shift left by one:
            pass ``hidden[:, :-1]`` with ``ids[:, 1:]``, ``adv[:, 1:]`` and
            ``mask[:, 1:]``.
        advantages, old_logprobs, mask: per position, ``hidden.shape[:-1]``;
            ``mask`` nonzero where the token is trained on.
        ref_logprobs: reference-policy log-probs for the KL term (needed when
            ``beta != 0``; when given, ``stats["ref_kl"]`` is reported).
        eps_low, eps_high: ratio clip range ``[1 - eps_low, 1 + eps_high]``
            (of the importance weight under ``cispo``; ``eps_low >= 1``
            leaves no lower bound; unused under ``sapo``).
        dual_clip: verl's ``clip_ratio_c`` (> 1): caps the loss of negative
            advantages at ``-A * dual_clip``. ``None`` turns it off. Refused
            with ``policy_loss="cispo"`` or ``"sapo"``.
        beta: KL coefficient. entropy_coef: entropy bonus coefficient.
        temperature: logits are divided by it (match the sampler's).
        agg: ``token_mean`` | ``seq_mean_token_mean`` | ``seq_mean_token_sum``
            | ``dr_grpo`` (see :func:`aggregation_weights`). An [N, H] input is
            one sequence.
        max_len: the constant length for ``dr_grpo`` (default: padded ``T``;
            give it when micro-batches are padded to different lengths).
        global_tokens, global_sequences: the whole batch's counts when this
            call sees one micro-batch of it (gradient accumulation), so that
            the micro-batch losses add up to the whole batch's loss; see
            :func:`aggregation_weights`. ``dr_grpo`` then needs ``max_len``.
        backend: ``auto`` (Triton on CUDA, torch otherwise) | ``triton`` | ``torch``.
        schedule: ``auto`` (``rows`` when gradients will be taken, except
            for fp16 or with ``segment_ids``; else ``vocab``) | ``rows`` (not
            for fp16: its gradients would be rounded before the loss scale
            is applied; nor with ``segment_ids``: a block's gradients would
            be needed before the other blocks' log-probs are known) | ``vocab``.
            ``rows`` streams blocks of rows over the whole vocabulary and
            computes both gradients in the forward: three matmuls, one
            [R, V] fp32 tile (Liger-Kernel's choice). ``vocab`` streams
            vocabulary chunks over all rows and recomputes the logits in the
            backward: four matmuls, the smallest tile, and nothing held
            between forward and backward but [N] vectors.
        chunk_size: rows per block (``rows``; default ``2**28 // V`` on CUDA,
            ``2**24 // V`` elsewhere) or vocabulary columns per tile
            (``vocab``; default ``2**26 // N`` on CUDA, ``2**24 // N``
            elsewhere).
        check_inputs: validate target ids of trained tokens, finiteness of
            ``hidden``, and of ``advantages``, ``old_logprobs`` (and
            ``ref_logprobs`` when ``beta != 0``) on trained tokens (one device
            sync each); shapes are always checked. Off, masked-out ids are
            still allowed and nothing syncs.
        segment_ids: None (the default): each token's importance ratio is
            its own, as PPO's. Given, an integer tensor of shape
            ``hidden.shape[:-1]``: tokens with equal ids form a segment
            (wherever they are, across rows too; ids may be any integers,
            and those of untrained tokens are ignored), and each trained
            token's ratio is its segment's, GSPO-token style (verl's
            ``gspo``; see the module's notes): the value is
            ``exp(mean(l - old))`` over the segment's trained tokens, the
            gradient flows to each token's own log-prob. A segment with no
            trained token adds nothing. GSPO's one ratio per row of a
            [B, T] input: ``torch.arange(B)[:, None].expand(B, T)``. Each
            call's segments are its own: under gradient accumulation a
            segment must not span micro-batches.
        kl_estimator: the per-token KL estimate ``beta`` weighs, of
            ``x = l - ref`` (verl's ``kl_loss_type``): ``k3`` (the
            default, verl's ``low_var_kl``, TRL's only one: ``exp(-x) + x -
            1`` with ``x`` clamped at ±20, capped at 10), ``k1`` (``x``), ``abs``
            (``|x|``), ``k2`` (``x**2 / 2``), or ``k1+``, ``abs+``, ``k3+``:
            the value of the one named with the gradient of ``k2``
            (straight-through; ``k2``'s gradient is the one whose mean is
            the reverse KL's gradient on-policy). Only ``k3`` is clamped and
            capped, as in verl. verl's names are taken too (see :func:`kl_estimator_name`).
        policy_loss: the policy-gradient term, one of :data:`POLICY_LOSSES`:
            ``ppo`` (the default: PPO's clipped surrogate, above) or
            ``cispo`` (MiniMax-M1, arXiv 2506.13585): ``pg_t = -sg(w_t) *
            A_t * log pi_t`` with the weight ``w_t = clip(r_t, 1 - eps_low,
            1 + eps_high)`` detached, so every trained token gets the
            gradient ``-w_t A_t d log pi_t``, a clipped one too (PPO gives a
            clipped token none). Its value is ``-w_t A_t``, PPO's surrogate
            at ``r_t = w_t`` (TRL and verl report ``-w_t A_t log pi_t``: the
            same gradient). ``r_t`` is the segment's ratio with
            ``segment_ids``. CISPO's ``eps_high`` is far larger than PPO's
            (ScaleRL: a cap of 5 on ``r``, ``eps_high=4``; ``eps_low=1``
            for no lower bound, as the paper). Or ``sapo`` (SAPO, Qwen,
            arXiv 2511.20347; TRL's ``loss_type="sapo"``, verl's ``sapo``):
            a smooth gate instead of the clip, ``pg_t = -A_t *
            sigmoid(tau_t (r_t - 1)) * 4 / tau_t``, whose gradient is
            ``-A_t * 4 s_t (1 - s_t) * r_t * d log pi_t`` (``s_t`` the
            sigmoid): the plain policy gradient at ``r_t = 1``, fading
            smoothly off-policy, never cut off. Its value at ``r_t = 1``
            is ``-2 A_t / tau_t``. ``eps_low``/``eps_high`` are unused and
            ``dual_clip`` refused; ``r_t`` is the clamped ratio (the
            segment's with ``segment_ids``), as verl's.
        sapo_tau_pos, sapo_tau_neg: SAPO's temperatures ``tau_t`` of tokens
            with ``A_t > 0`` and of the others (TRL's
            ``sapo_temperature_pos``/``_neg``, verl's ``tau_pos``/``tau_neg``;
            the paper's 1.0 and 1.05 by default): finite and > 0; the
            larger, the faster the gate closes off-policy. Used by
            ``policy_loss="sapo"`` alone.
        kl_correction: DeepSeek-V3.2's unbiased KL estimate (arXiv
            2512.02556, TRL's ``use_bias_correction_kl``): the tokens were
            sampled from ``pi_old``, so the KL estimate is weighted by the
            token's own ratio ``r_t = exp(clamp(l_t - old_t, -20, 20))``
            (its own even with ``segment_ids``: the KL is per token), not
            detached: ``beta * r_t * kl_t``. The gradient of its mean is then
            ``E_pi[kl_t d l_t + d kl_t]``, for ``k1`` and ``k3`` the reverse
            KL's own gradient (without it, ``k3``'s is not). On-policy
            (``r_t = 1``) the value is the same, the gradient is not: it
            gains ``beta * kl_t * d l_t``. ``stats["kl_loss"]`` is then the
            corrected estimate. Nothing without a KL term (``beta=0``).
        off_policy_mask: DeepSeek-V3.2's off-policy sequence masking (Eq. 9;
            TRL's ``off_policy_mask_threshold``), ``delta > 0`` (TRL's
            example: 0.5); None (the default) turns it off. A trained token
            whose advantage is negative, in a unit whose trained tokens'
            mean ``old - l`` (a KL estimate between ``pi_old`` and the
            policy, from detached values) is above ``delta``, gets no
            policy-gradient term (its KL and entropy terms stay);
            ``stats["off_policy_masked"]`` is the share of trained tokens
            so masked. ``old`` is ``sampling_logprobs``, or
            ``old_logprobs`` where that is None. Runs the ``vocab``
            schedule (``auto`` picks it; ``rows`` refuses it): a unit's mean
            needs every token's log-prob first.
        off_policy_units: the mask's units, an integer tensor as
            ``segment_ids`` (equal ids, one unit; untrained tokens'
            ignored); None: ``segment_ids`` when given, else each row of a
            [B, T] input (an [N, H] input is one). turnrl's trainer gives
            each assistant turn (the unit one generation sampled, the
            advantages' unit). Refused without ``off_policy_mask``.
        sampling_logprobs: the log-probs of the policy that sampled the
            tokens (the inference engine's, which differ from the trainer's
            ``old_logprobs``), for ``off_policy_mask`` alone (as TRL's
            ``sampling_per_token_logps``), so that the mask sees the
            engine's mismatch as well as the drift of later PPO epochs;
            finite on trained tokens. None: ``old_logprobs``. Refused
            without ``off_policy_mask``.
        top_entropy_quantile: rho in [0, 1], "Beyond the 80/20 Rule"
            (arXiv 2506.01939; TRL's ``top_entropy_quantile``; the paper's
            0.2): only the trained tokens whose entropy ``H_t`` is at least
            the ``1 - rho`` quantile of this call's trained tokens'
            entropies keep their policy-gradient term; the KL and entropy
            terms stay on every token (as TRL's). The quantile is TRL's
            ``torch.quantile(H, 1 - rho)`` with ``H >= threshold``, taken
            exactly as the order statistic it selects: the ``j = ceil((1 -
            rho) (n - 1))``-th smallest (0-based) of the ``n`` trained
            entropies, ties at it all kept; ``rho = 0`` keeps the
            largest-entropy tokens alone. It is over this call's tokens (a
            micro-batch in turnrl's trainer; TRL's is per forward, gathered
            across its processes). From detached entropies;
            ``stats["top_entropy_frac"]`` is the share of trained tokens
            kept. 1.0 (the default) changes nothing. Below 1 it runs the
            ``vocab`` schedule (``auto`` picks it; ``rows`` refuses it):
            the quantile needs every token's entropy first.

    fp64 inputs always run on the torch backend (``auto``); the Triton
    kernels compute in fp32, and ``backend="triton"`` refuses fp64. A
    caller's ``torch.autocast`` does not reach inside: the precision follows
    the dtypes of ``hidden`` and ``weight`` (cast them to run in bf16).

    Returns:
        ``(loss, stats)``: a scalar fp32 (fp64 for fp64 inputs) loss with
        gradients for ``hidden`` and ``weight``, and detached scalar tensors
        ``clip_frac`` (``cispo``: the share whose weight was clipped, on
        either side; ``sapo``: 0, it clips nothing, as verl reports),
        ``approx_kl`` (mean ``old - new`` log-prob, as verl's ``ppo_kl``),
        ``entropy``, ``ratio_mean`` (+ ``dual_clip_frac``, ``ref_kl``,
        ``kl_loss``, ``off_policy_masked``, ``top_entropy_frac``), all
        masked means over trained tokens.
        ``ref_kl`` (with ``ref_logprobs``) is k3's estimate whatever
        ``kl_estimator`` is, so that runs stay comparable; ``kl_loss`` (with
        ``ref_logprobs`` and another ``kl_estimator`` than ``k3``, or with
        ``kl_correction``) is the estimate ``beta`` weighs, verl's ``kl_loss``. With
        ``segment_ids``, ``clip_frac``, ``dual_clip_frac`` and ``ratio_mean``
        are of each trained token's segment ratio (as verl's ``gspo``
        reports its clip fraction), so a segment counts once per trained
        token; ``approx_kl`` stays the tokens' own.
    """
    _check_head(hidden, weight, temperature)
    token_shape = tuple(hidden.shape[:-1])
    for name, t in (
        ("target_ids", target_ids),
        ("advantages", advantages),
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
        ("segment_ids", segment_ids),
    ):
        _check_token_tensor(name, t, token_shape, hidden.device)
    if segment_ids is not None:
        _check_integer_tensor("segment_ids", segment_ids)
    if off_policy_mask is not None and (
        isinstance(off_policy_mask, bool)
        or not isinstance(off_policy_mask, (int, float))
        or not 0 < off_policy_mask < math.inf
    ):
        raise InvalidInputError(
            f"off_policy_mask (DeepSeek-V3.2's delta) must be a finite number above 0, or None, "
            f"got {off_policy_mask!r}"
        )
    _check_top_entropy_quantile(top_entropy_quantile)
    if off_policy_units is not None:
        if off_policy_mask is None:
            raise InvalidInputError(
                "off_policy_units are the units of off_policy_mask, which is None: give it"
            )
        _check_token_tensor("off_policy_units", off_policy_units, token_shape, hidden.device)
        _check_integer_tensor("off_policy_units", off_policy_units)
    if sampling_logprobs is not None:
        if off_policy_mask is None:
            raise InvalidInputError(
                "sampling_logprobs are for off_policy_mask alone, which is None: give it"
            )
        _check_token_tensor("sampling_logprobs", sampling_logprobs, token_shape, hidden.device)
    if agg not in AGGREGATIONS:
        raise UnknownNameError(f"unknown agg {agg!r}; valid: {', '.join(AGGREGATIONS)}")
    kl_estimator = kl_estimator_name(kl_estimator)
    policy_loss = check_policy_loss(policy_loss)
    _check_dual_clip_for(policy_loss, dual_clip)
    _check_sapo_taus(sapo_tau_pos, sapo_tau_neg)
    _check_kl_correction(kl_correction)
    # Written so that NaN fails too: a NaN clip range or coefficient made the
    # loss NaN while its gradients stayed finite.
    if not (eps_low >= 0 and eps_high >= 0):
        raise InvalidInputError(f"eps_low/eps_high must be >= 0, got {eps_low}, {eps_high}")
    for name, coef in (("beta", beta), ("entropy_coef", entropy_coef)):
        if not math.isfinite(coef):
            raise InvalidInputError(f"{name} must be finite, got {coef}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise InvalidInputError(f"dual_clip must be > 1 (verl's clip_ratio_c), got {dual_clip}")
    if beta != 0.0 and ref_logprobs is None:
        raise InvalidInputError("beta != 0 needs ref_logprobs")
    if max_len is not None and max_len <= 0:
        raise InvalidInputError(f"max_len must be positive, got {max_len}")
    for name, count in (("global_tokens", global_tokens), ("global_sequences", global_sequences)):
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count < 0
        ):
            raise InvalidInputError(f"{name} must be a non-negative int, got {count!r}")
    if agg == "dr_grpo" and global_sequences is not None and max_len is None:
        raise InvalidInputError(
            "dr_grpo over micro-batches needs max_len: each micro-batch's padded length differs"
        )
    resolved = _resolve_backend(backend, hidden.device, hidden.dtype)
    whole_pass = _needs_every_token_first(
        segment_ids is not None, off_policy_mask is not None, top_entropy_quantile
    )
    resolved_schedule = _resolve_schedule(schedule, hidden, weight, bool(whole_pass))

    mask_b = mask != 0
    if check_inputs:
        _check_finite_hidden(hidden)
        _check_finite_on_mask(mask_b, advantages=advantages, old_logprobs=old_logprobs)
        if ref_logprobs is not None and beta != 0.0:
            _check_finite_on_mask(mask_b, ref_logprobs=ref_logprobs)
        if sampling_logprobs is not None:
            _check_finite_on_mask(mask_b, sampling_logprobs=sampling_logprobs)
        targets = _check_targets(target_ids, mask_b, weight.shape[0])
    else:
        targets = _padding_to_token_0(target_ids, weight.shape[0])
    mask2d = mask_b if mask_b.dim() == 2 else mask_b[None, :]
    agg_weights = aggregation_weights(
        mask2d,
        agg,
        max_len,
        dtype=_compute_dtype(hidden.dtype),
        global_tokens=global_tokens,
        global_sequences=global_sequences,
    )

    h2 = hidden.reshape(-1, hidden.shape[-1])
    if not h2.is_contiguous():
        h2 = h2.contiguous()
    n = h2.shape[0]
    default_chunk = _default_rows if resolved_schedule == "rows" else _default_chunk
    chunk = (
        default_chunk(n, weight.shape[0], hidden.device)
        if chunk_size is None
        else _checked_chunk_size(chunk_size)
    )
    cfg = LossConfig(
        eps_low,
        eps_high,
        dual_clip,
        beta,
        entropy_coef,
        kl_estimator,
        policy_loss,
        sapo_tau_pos,
        sapo_tau_neg,
        kl_correction,
        None if off_policy_mask is None else float(off_policy_mask),
        float(top_entropy_quantile),
    )
    flat = dict(
        targets=targets.reshape(-1).contiguous(),
        advantages=advantages.reshape(-1),
        old=old_logprobs.reshape(-1),
        ref=None if ref_logprobs is None else ref_logprobs.reshape(-1),
    )
    segments = None if segment_ids is None else _segment_index(segment_ids)
    sampling = units = None
    if off_policy_mask is not None:
        chosen = old_logprobs if sampling_logprobs is None else sampling_logprobs
        sampling = chosen.reshape(-1)
        if off_policy_units is not None:
            units = _segment_index(off_policy_units)
        elif segments is not None:
            units = segments
        else:  # each row its own unit; an [N, H] input is one row
            rows = torch.arange(mask2d.shape[0], device=hidden.device)[:, None]
            units = rows.expand(mask2d.shape).reshape(-1)
    loss, logprob, entropy = _apply(
        h2,
        weight.contiguous(),
        flat,
        agg_weights.reshape(-1),
        cfg,
        temperature,
        resolved,
        chunk,
        resolved_schedule,
        segments,
        units,
        sampling,
    )
    with torch.no_grad():
        acc = logprob.dtype
        trained = mask_b.reshape(-1)
        old = flat["old"].to(acc)
        terms = token_terms(
            logprob,
            entropy,
            old,
            flat["advantages"].to(acc),
            None if flat["ref"] is None else flat["ref"].to(acc),
            cfg,
            None if segments is None else _segment_log_ratios(logprob, old, trained, segments),
            None
            if units is None
            else _segment_log_ratios(logprob, sampling.to(acc), trained, units),
            _top_entropy_or_none(entropy, trained, cfg),
        )
        stats = _stats(terms, logprob, entropy, old, trained)
    return loss, stats


def _apply(
    h2,
    weight,
    flat,
    agg_weights,
    cfg,
    temperature,
    backend,
    chunk,
    schedule,
    segments,
    units,
    sampling,
):
    with _autocast_off(h2.device.type):
        return GTPOLossFunction.apply(
            h2,
            weight,
            flat["targets"],
            flat["advantages"],
            flat["old"],
            flat["ref"],
            agg_weights,
            cfg,
            temperature,
            backend,
            chunk,
            schedule,
            torch.is_grad_enabled(),
            segments,
            units,
            sampling,
        )


def _needs_every_token_first(
    segmented: bool, masked: bool, top_entropy_quantile: float
) -> list[tuple[str, str]]:
    """The settings of a call whose per-token terms need every token's
    log-prob or entropy before any gradient, which only the vocabulary
    schedule has (the rows one takes a block's gradients before the next
    block's log-probs exist): each with why, as the rows schedule refuses it."""
    return [
        (name, why)
        for name, wanted, why in (
            (
                "off_policy_mask",
                masked,
                "a unit's mean log-ratio needs every token's log-prob before any block's gradients",
            ),
            (
                "top_entropy_quantile < 1",
                top_entropy_quantile != 1.0,
                "the entropy quantile needs every token's entropy before any block's gradients",
            ),
            (
                "segment_ids",
                segmented,
                "it computes a block's gradients before the other blocks' log-probs (and so "
                "its segments' ratios) are known",
            ),
        )
        if wanted
    ]


def _resolve_schedule(
    schedule: str, hidden: torch.Tensor, weight: torch.Tensor, whole_pass: bool = False
) -> str:
    if schedule not in SCHEDULES:
        raise UnknownNameError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    # See _needs_every_token_first (GTPOLossFunction refuses them on the rows one).
    if whole_pass and schedule == "auto":
        return "vocab"
    # fp16 gradients need the loss scale (GradScaler's 65536) applied before
    # they are rounded, or small ones underflow; the rows schedule computes
    # them in the forward, before the scale is known.
    if schedule == "rows" and hidden.dtype == torch.float16:
        raise InvalidInputError(
            "schedule='rows' computes fp16 gradients before the loss scale is known, so small "
            "ones underflow; use schedule='vocab' (what 'auto' picks for fp16) or bf16"
        )
    if schedule != "auto":
        return schedule
    # Without gradients both schedules do one matmul; the vocabulary one has
    # the smaller tile.
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return "rows" if grads and hidden.dtype != torch.float16 else "vocab"


def _default_rows(n: int, vocab: int, device: torch.device) -> int:
    budget = ROW_TILE_ELEMENTS.get(device.type, ROW_TILE_ELEMENTS["cpu"])
    return int(max(1, min(n, budget // max(vocab, 1))))


def _checked_chunk_size(chunk_size: Any) -> int:
    """``chunk_size`` as an int; a fraction would be truncated into another size."""
    if isinstance(chunk_size, float) and chunk_size.is_integer():
        chunk_size = int(chunk_size)
    try:
        if isinstance(chunk_size, bool):
            raise TypeError
        chunk = operator.index(chunk_size)  # ints, numpy's and torch's included
    except TypeError:
        chunk = 0
    if chunk <= 0:
        raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probs of ``target_ids`` under ``hidden @ weight.T / temperature``, chunked.

    For old-policy and reference log-probs: no autograd graph, no [N, V]
    logits. Returns fp32 (fp64 for fp64 inputs) of shape ``hidden.shape[:-1]``.
    Every target id must lie in ``[0, V)``.
    """
    _check_head(hidden, weight, temperature)
    _check_token_tensor("target_ids", target_ids, tuple(hidden.shape[:-1]), hidden.device)
    resolved = _resolve_backend(backend, hidden.device, hidden.dtype)
    _check_finite_hidden(hidden)
    targets = _check_targets(target_ids, None, weight.shape[0]).reshape(-1).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    chunk = (
        _default_chunk(h2.shape[0], weight.shape[0], hidden.device)
        if chunk_size is None
        else _checked_chunk_size(chunk_size)
    )
    stats_fn, _ = _STREAMS[resolved]
    with torch.no_grad(), _autocast_off(hidden.device.type):
        stats = stats_fn(h2, weight.contiguous(), targets, temperature, chunk)
    return stats.logprob.reshape(hidden.shape[:-1])


def torch_gtpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    agg: str = "token_mean",
    max_len: int | None = None,
    segment_ids: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    policy_loss: str = "ppo",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    kl_correction: bool = False,
    off_policy_mask: float | None = None,
    off_policy_units: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
) -> torch.Tensor:
    """Unfused reference: the whole [N, V] logits, eager autograd.

    Logits are computed in ``hidden``'s dtype and upcast to fp32 when that is
    bf16/fp16 (the usual eager recipe); fp64 inputs stay fp64.

    Written independently of the chunked path (log_softmax, gather, softmax
    entropy, verl's max/min clipping, a loop over the segments of
    ``segment_ids``) so the tests compare two derivations.
    """
    logits = hidden @ weight.T
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # what eager trainers (verl, TRL) do before log_softmax
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = mask != 0
    safe_targets = torch.where(valid, target_ids, torch.zeros_like(target_ids)).long()
    logprob = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    # Padding values at masked-out tokens (NaN, inf) would reach the gradients
    # through 0 * NaN even though torch.where drops them from the loss below.
    zero = torch.zeros((), dtype=logprob.dtype, device=logprob.device)
    advantages = torch.where(valid, advantages, zero)
    old_logprobs = torch.where(valid, old_logprobs, zero)
    if ref_logprobs is not None:
        ref_logprobs = torch.where(valid, ref_logprobs, zero)
    log_ratio = logprob - old_logprobs
    if segment_ids is not None:
        # GSPO-token, as verl writes it: sg[segment mean] + logprob - sg[logprob].
        for segment in torch.unique(segment_ids[valid]).tolist():
            members = valid & (segment_ids == segment)
            mean = (logprob - old_logprobs)[members].mean().detach()
            log_ratio = torch.where(members, mean + logprob - logprob.detach(), log_ratio)
    log_ratio = torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    policy_loss = check_policy_loss(policy_loss)
    _check_sapo_taus(sapo_tau_pos, sapo_tau_neg)
    _check_dual_clip_for(policy_loss, dual_clip)
    if policy_loss == "cispo":
        # -sg(w) * A * log pi, shifted by a constant so that its value is -w * A.
        is_weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high).detach()
        loss_t = -is_weight * advantages * torch.exp(logprob - logprob.detach())
    elif policy_loss == "sapo":
        # The paper's gate f(r) = sigmoid(tau (r - 1)) * 4 / tau, per token.
        temperature_t = torch.full_like(ratio, sapo_tau_neg)
        temperature_t[advantages > 0] = sapo_tau_pos
        loss_t = -advantages * torch.sigmoid(temperature_t * (ratio - 1)) * 4.0 / temperature_t
    else:
        pg_losses1 = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        clip_pg = torch.maximum(pg_losses1, pg_losses2)
        if dual_clip is not None:
            pg_losses3 = -advantages * dual_clip
            clip_pg = torch.where(advantages < 0, torch.minimum(pg_losses3, clip_pg), clip_pg)
        loss_t = clip_pg
    if off_policy_mask is not None:
        # DeepSeek-V3.2 Eq. 9, unit by unit: drop the policy-gradient term of
        # a negative-advantage token whose unit's mean log(pi_old / pi) > delta.
        if off_policy_units is None:
            off_policy_units = segment_ids
        if off_policy_units is None and valid.dim() == 1:
            off_policy_units = torch.zeros_like(valid, dtype=torch.int64)  # one sequence
        elif off_policy_units is None:
            rows = torch.arange(valid.shape[0], device=valid.device)
            off_policy_units = rows[:, None].expand(valid.shape)
        keep = torch.ones_like(valid)
        for unit in torch.unique(off_policy_units[valid]).tolist():
            members = valid & (off_policy_units == unit)
            behaviour = old_logprobs if sampling_logprobs is None else sampling_logprobs
            drift = (behaviour - logprob)[members].mean().detach()
            if drift > off_policy_mask:
                keep = keep & ~(members & (advantages < 0))
        loss_t = torch.where(keep, loss_t, torch.zeros_like(loss_t))
    _check_top_entropy_quantile(top_entropy_quantile)
    if top_entropy_quantile != 1.0:
        # The forking tokens: an entropy at least the (1 - rho) quantile of the
        # trained tokens' (torch.quantile's linear interpolation rounded up to
        # the sorted value it lands below: the same set under >=).
        trained_entropies = sorted(entropy.detach()[valid].tolist())
        if trained_entropies:
            position = (1.0 - top_entropy_quantile) * (len(trained_entropies) - 1)
            threshold = trained_entropies[math.ceil(position)]
            forking = valid & (entropy.detach() >= threshold)
            loss_t = torch.where(forking, loss_t, torch.zeros_like(loss_t))
    estimator = kl_estimator_name(kl_estimator)
    if beta != 0.0:
        # Schulman's estimators of KL(pi || pi_ref) at x = log(pi / pi_ref).
        # Only k3 has an exp to overflow: only its x is clamped, as verl does.
        x = logprob - ref_logprobs
        k2 = x**2 / 2
        if estimator in ("k1", "k1+"):
            kl = x
        elif estimator in ("abs", "abs+"):
            kl = torch.abs(x)
        elif estimator == "k2":
            kl = k2
        else:
            x3 = torch.clamp(x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            kl = torch.clamp(torch.exp(-x3) - 1 + x3, max=KL_CLAMP)
        if estimator.endswith("+"):
            kl = kl.detach() + (k2 - k2.detach())  # verl's straight-through
        if kl_correction:
            # DeepSeek-V3.2's importance weight: this token's own pi / pi_old,
            # with its gradient (TRL's coef_1 * per_token_kl).
            own_ratio = torch.exp(
                torch.clamp(logprob - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            )
            kl = own_ratio * kl
        loss_t = loss_t + beta * kl
    if entropy_coef != 0.0:
        loss_t = loss_t - entropy_coef * entropy
    loss_t = torch.where(valid, loss_t, torch.zeros_like(loss_t))
    m = valid.to(loss_t.dtype)
    if m.dim() == 1:
        m, loss_t = m[None], loss_t[None]
    if agg == "token_mean":
        return (loss_t * m).sum() / m.sum().clamp(min=1)
    if agg == "seq_mean_token_mean":
        counts = m.sum(-1)
        per_seq = (loss_t * m).sum(-1) / counts.clamp(min=1)
        return per_seq.sum() / (counts > 0).sum().clamp(min=1)
    if agg == "seq_mean_token_sum":
        counts = m.sum(-1)
        return (loss_t * m).sum() / (counts > 0).sum().clamp(min=1)
    if agg == "dr_grpo":
        return (loss_t * m).sum() / (m.shape[0] * (m.shape[1] if max_len is None else max_len))
    raise UnknownNameError(f"unknown agg {agg!r}; valid: {', '.join(AGGREGATIONS)}")

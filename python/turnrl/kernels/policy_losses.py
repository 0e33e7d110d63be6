"""The policy-gradient terms the GTPO loss takes
(:func:`turnrl.kernels.fused_linear_gtpo.gtpo_loss`'s ``policy_loss``), by
name; no torch, so that ``turnrl train`` checks a name before it loads anything.
"""

from __future__ import annotations

from turnrl.exceptions import UnknownNameError

__all__ = ["POLICY_LOSSES", "check_policy_loss"]

# ppo: PPO's clipped surrogate, max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));
# a token whose ratio is clipped has no gradient. cispo (MiniMax-M1, arXiv
# 2506.13585): the importance weight is clipped and detached instead,
# -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi, so every token keeps
# a gradient. sapo (SAPO, Qwen, arXiv 2511.20347): a smooth gate instead of
# the clip, -A * sigmoid(tau (r - 1)) * 4 / tau with tau = tau_pos if A > 0
# else tau_neg; its gradient fades off-policy and is never cut off.
POLICY_LOSSES = ("ppo", "cispo", "sapo")


def check_policy_loss(name: str) -> str:
    """``name`` if it is one of :data:`POLICY_LOSSES`; else :class:`UnknownNameError`."""
    if isinstance(name, str) and name in POLICY_LOSSES:
        return name
    raise UnknownNameError(f"unknown policy_loss {name!r}; valid: {', '.join(POLICY_LOSSES)}")

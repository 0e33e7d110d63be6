"""The per-token estimators of the KL to the reference policy that the GTPO
loss takes (:func:`turnrl.kernels.fused_linear_gtpo.gtpo_loss`'s
``kl_estimator``), by name; no torch, so that ``turnrl train`` checks a name
before it loads anything.
"""

from __future__ import annotations

from turnrl.exceptions import UnknownNameError

__all__ = ["KL_ESTIMATORS", "KL_ESTIMATOR_ALIASES", "kl_estimator_name"]

# Per-token estimators of the KL to the reference, KL(pi || pi_ref), from
# x = log pi - log pi_ref at a token sampled from pi (Schulman's "Approximating
# KL divergence"; verl's kl_loss_type): k1 = x, abs = |x|, k2 = x**2 / 2,
# k3 = exp(-x) + x - 1 (verl's low_var_kl). "+": a straight-through estimator,
# the value of the one named and the gradient of k2 (verl's "k3+").
KL_ESTIMATORS = ("k1", "k1+", "abs", "abs+", "k2", "k3", "k3+")
# verl's other names for them. k2's straight-through form is k2 itself.
KL_ESTIMATOR_ALIASES = {
    "kl": "k1",
    "kl+": "k1+",
    "mse": "k2",
    "mse+": "k2",
    "k2+": "k2",
    "low_var_kl": "k3",
    "low_var_kl+": "k3+",
}


def kl_estimator_name(name: str) -> str:
    """The canonical name (one of :data:`KL_ESTIMATORS`) of KL estimator ``name``.

    verl's names are taken too (:data:`KL_ESTIMATOR_ALIASES`: ``kl`` is
    ``k1``, ``mse`` is ``k2``, ``low_var_kl`` is ``k3``, each with its
    ``+`` form). verl's ``full`` is refused: it needs the reference's whole
    distribution at each token, and the loss gets the sampled tokens'
    reference log-probs alone.
    """
    if isinstance(name, str):
        if name in KL_ESTIMATORS:
            return name
        if name in KL_ESTIMATOR_ALIASES:
            return KL_ESTIMATOR_ALIASES[name]
        if name.removesuffix("+") == "full":
            raise UnknownNameError(
                f"kl_estimator {name!r} (verl's full KL) needs the reference policy's whole "
                "distribution at every token, and the loss gets only the sampled tokens' "
                f"reference log-probs; valid: {', '.join(KL_ESTIMATORS)}"
            )
    raise UnknownNameError(
        f"unknown kl_estimator {name!r}; valid: {', '.join(KL_ESTIMATORS)} "
        f"(or verl's {', '.join(KL_ESTIMATOR_ALIASES)})"
    )

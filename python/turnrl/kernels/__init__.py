"""Triton kernels of turnrl, installed as ``turnrl.kernels``.

One op per file, each with its torch reference and autograd Function beside
it (Liger-Kernel's layout). Importing this package needs neither torch nor
triton; each op module imports them itself, on first use of a name below.

``turnrl.kernels.gtpo_loss(...)`` is the fused GTPO loss; its kernels,
launchers, autograd Function and torch reference live in
``turnrl.kernels.fused_linear_gtpo``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["fused_logprobs", "gtpo_loss", "torch_gtpo_loss"]

_LAZY = {
    "fused_logprobs": "turnrl.kernels.fused_linear_gtpo",
    "gtpo_loss": "turnrl.kernels.fused_linear_gtpo",
    "torch_gtpo_loss": "turnrl.kernels.fused_linear_gtpo",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'turnrl.kernels' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

# Stubs of the Rust extension module turnrl._core, written by hand and
# checked with mypy.stubtest in the test suite.

from typing import Any, final

import numpy as np
import numpy.typing as npt

__version__: str

def compute_advantages(
    estimator: str,
    outcome: npt.NDArray[np.float64],
    group: npt.NDArray[np.int64],
    turn_rewards: npt.NDArray[np.float64],
    turn_offsets: npt.NDArray[np.int64],
    *,
    norm: str = "std",
    eps: float = 1e-6,
    gamma: float | None = None,
    lam: float | None = None,
    turn_norm: str = "position",
) -> npt.NDArray[np.float64]: ...
def validate_batch(
    outcome: npt.NDArray[np.float64],
    group: npt.NDArray[np.int64],
    turn_rewards: npt.NDArray[np.float64],
    turn_offsets: npt.NDArray[np.int64],
) -> None: ...
def broadcast_to_tokens(
    turn_adv: npt.NDArray[np.float64],
    turn_offsets: npt.NDArray[np.int64],
    token_turn: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]: ...
def estimators() -> list[tuple[str, str]]: ...

# Argument comparison and tier labelling (turnrl.args).

@final
class ArgComparison:
    @property
    def kind(self) -> str: ...
    @property
    def diffs(self) -> list[str]: ...
    @property
    def differing_leaves(self) -> int: ...
    @property
    def gold_leaves(self) -> int: ...
    @property
    def structural(self) -> bool: ...

@final
class TierLabels:
    @property
    def tiers(self) -> list[str | None]: ...
    @property
    def call_tiers(self) -> list[list[str]]: ...
    @property
    def matched_gold(self) -> list[int]: ...
    @property
    def soft_gold(self) -> list[int]: ...
    @property
    def gold_turn(self) -> list[int | None]: ...

def normalize_args(
    obj: Any, case_fold: bool = False, unordered_keys: list[str] | None = None
) -> Any: ...
def compare_args(
    pred: Any,
    gold: Any,
    case_fold: bool = False,
    unordered_keys: list[str] | None = None,
    soft_max_fraction: float = 0.5,
) -> ArgComparison: ...
def compare_args_batch(
    pairs: Any,
    case_fold: bool = False,
    unordered_keys: list[str] | None = None,
    soft_max_fraction: float = 0.5,
) -> list[ArgComparison]: ...
def label_tiers(
    turns: Any,
    gold_actions: Any,
    tool_kinds: dict[str, str],
    *,
    case_fold: bool = False,
    unordered_keys: list[str] | None = None,
    soft_max_fraction: float = 0.5,
) -> TierLabels: ...

# Stubs of the Rust extension module turnrl._core, written by hand and
# checked with mypy.stubtest in the test suite.

from collections.abc import Mapping, Sequence
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
def tier_sums(
    outcome: npt.NDArray[np.float64],
    turn_offsets: npt.NDArray[np.int64],
    turn_tiers: npt.NDArray[np.int64],
    n_tiers: int,
    success_threshold: float = 1.0,
) -> tuple[
    int,
    int,
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]: ...
def tier_correlations(
    trajectories: int,
    successes: int,
    present: npt.NDArray[np.int64],
    present_success: npt.NDArray[np.int64],
    turns: npt.NDArray[np.int64],
    turns_sq: npt.NDArray[np.int64],
    turns_success: npt.NDArray[np.int64],
    *,
    variable: str = "presence",
    confidence: float = 0.95,
) -> npt.NDArray[np.float64]: ...
def direction_check(
    advantages: npt.NDArray[np.float64],
    turn_tiers: npt.NDArray[np.int64],
    signs: npt.NDArray[np.int8],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...

@final
class ParsedMessage:
    @property
    def content(self) -> str: ...
    @property
    def reasoning(self) -> str | None: ...
    @property
    def tool_calls(self) -> list[dict[str, Any]]: ...
    @property
    def errors(self) -> list[str]: ...
    @property
    def error_offsets(self) -> list[int]: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __eq__(self, value: object, /) -> bool: ...

def parse_tool_calls(
    text: str, fmt: str = "auto", tools: Sequence[Mapping[str, Any]] | None = None
) -> ParsedMessage: ...
def parse_tool_calls_batch(
    texts: Sequence[str], fmt: str = "auto", tools: Sequence[Mapping[str, Any]] | None = None
) -> list[ParsedMessage]: ...

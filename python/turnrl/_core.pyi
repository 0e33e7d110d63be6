# Stubs of the Rust extension module turnrl._core, written by hand and
# checked with mypy.stubtest in the test suite.

from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any, TypedDict, final, type_check_only

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
    @property
    def call_offsets(self) -> list[int]: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __eq__(self, value: object, /) -> bool: ...

def parse_tool_calls(
    text: str, fmt: str = "auto", tools: Sequence[Mapping[str, Any]] | None = None
) -> ParsedMessage: ...
def parse_tool_calls_batch(
    texts: Sequence[str], fmt: str = "auto", tools: Sequence[Mapping[str, Any]] | None = None
) -> list[ParsedMessage]: ...

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
    obj: Any, case_fold: bool = False, unordered_keys: Iterable[str] | None = None
) -> Any: ...
def compare_args(
    pred: Any,
    gold: Any,
    *,
    case_fold: bool = False,
    unordered_keys: Iterable[str] | None = None,
    soft_max_fraction: float = 0.5,
) -> ArgComparison: ...
def compare_args_batch(
    pairs: Any,
    case_fold: bool = False,
    unordered_keys: Iterable[str] | None = None,
    soft_max_fraction: float = 0.5,
) -> list[ArgComparison]: ...
def label_tiers(
    turns: Any,
    gold_actions: Any,
    tool_kinds: dict[str, str],
    *,
    case_fold: bool = False,
    unordered_keys: Iterable[str] | None = None,
    soft_max_fraction: float = 0.5,
) -> TierLabels: ...

@final
class ReadProgress:
    def __new__(cls) -> ReadProgress: ...
    @property
    def bytes(self) -> int: ...

@type_check_only
class _RolloutColumns(TypedDict):
    """What read_rollouts returns: the fields of turnrl.RolloutBatch, which
    documents each. Names are dictionary encoded in first-seen order."""

    files: list[str]
    file_index: npt.NDArray[np.int32]
    line: npt.NDArray[np.int64]
    task_index: npt.NDArray[np.int64]
    task_names: list[str]
    group_index: npt.NDArray[np.int64]
    group_names: list[str]
    # Code of each record's meta["stop_reason"] in stop_reason_names; -1 when
    # meta is missing or not an object, or the key is missing or not a string.
    stop_reason_index: npt.NDArray[np.int64]
    stop_reason_names: list[str]
    sample: npt.NDArray[np.int64]
    outcome: npt.NDArray[np.float64]
    turn_offsets: npt.NDArray[np.int64]
    turn_rewards: npt.NDArray[np.float64]
    turn_tiers: npt.NDArray[np.int16]
    tier_names: list[str]
    skipped: int
    problems: list[str]

def read_rollouts(
    paths: list[str | PathLike[str]],
    *,
    workers: int | None = None,
    progress: ReadProgress | None = None,
) -> _RolloutColumns: ...
def check_rollout_line(line: str) -> None: ...

@final
class RolloutLineReader:
    def __new__(cls, paths: list[str | PathLike[str]]) -> RolloutLineReader: ...
    def next_lines(self) -> list[tuple[int, int, str]]: ...
    @property
    def skipped(self) -> int: ...
    @property
    def problems(self) -> list[str]: ...
    @property
    def files(self) -> list[str]: ...

@final
class RolloutFileWriter:
    def __new__(
        cls, path: str | PathLike[str], compression: str = "none", level: int | None = None
    ) -> RolloutFileWriter: ...
    def write_line(self, line: str) -> None: ...
    def write_lines(self, lines: list[str]) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def written(self) -> int: ...
    @property
    def is_open(self) -> bool: ...

# Stubs of the Rust extension module turnrl._core, written by hand and
# checked with mypy.stubtest in the test suite.

from os import PathLike
from typing import Any

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
def read_rollouts(
    paths: list[str | PathLike[str]], *, workers: int | None = None
) -> dict[str, Any]: ...
def check_rollout_line(line: str) -> None: ...

class RolloutLineReader:
    def __init__(self, paths: list[str | PathLike[str]]) -> None: ...
    def next_lines(self) -> list[tuple[int, int, str]]: ...
    @property
    def skipped(self) -> int: ...
    @property
    def problems(self) -> list[str]: ...
    @property
    def files(self) -> list[str]: ...

class RolloutFileWriter:
    def __init__(
        self, path: str | PathLike[str], compression: str = "none", level: int = 3
    ) -> None: ...
    def write_line(self, line: str) -> None: ...
    def write_lines(self, lines: list[str]) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def written(self) -> int: ...
    @property
    def is_open(self) -> bool: ...

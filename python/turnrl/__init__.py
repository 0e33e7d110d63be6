"""turnrl: multi-turn reinforcement learning for tool-calling LLM agents.

Per-turn reward tiers, turn-level advantages (GRPO, MT-GRPO, the GTPO
hybrid), Iterative Reward Calibration and a fused token-level GTPO loss, with
the hot paths in Rust (``turnrl._core``). ``import turnrl`` needs only numpy.
"""

from __future__ import annotations

from turnrl._core import __version__
from turnrl.advantages import (
    AdvantageBatch,
    broadcast_to_tokens,
    compute_advantages,
    estimator_names,
    get_estimator,
    register_estimator,
)
from turnrl.args import (
    ArgComparison,
    TierLabels,
    compare_args,
    compare_args_batch,
    label_tiers,
    normalize_args,
)
from turnrl.exceptions import InvalidInputError, TurnrlError, TurnrlIOError, UnknownNameError
from turnrl.parsing import (
    ParsedMessage,
    ToolCallFormat,
    parse_tool_calls,
    parse_tool_calls_batch,
)
from turnrl.rollouts import (
    RolloutBatch,
    RolloutWriter,
    iter_rollout_records,
    read_rollouts,
    read_taubench_results,
    rollout_record,
    write_taubench_buffer,
)

__all__ = [
    "AdvantageBatch",
    "ArgComparison",
    "InvalidInputError",
    "ParsedMessage",
    "RolloutBatch",
    "RolloutWriter",
    "TierLabels",
    "ToolCallFormat",
    "TurnrlError",
    "TurnrlIOError",
    "UnknownNameError",
    "__version__",
    "broadcast_to_tokens",
    "compare_args",
    "compare_args_batch",
    "compute_advantages",
    "estimator_names",
    "get_estimator",
    "iter_rollout_records",
    "label_tiers",
    "normalize_args",
    "parse_tool_calls",
    "parse_tool_calls_batch",
    "read_rollouts",
    "read_taubench_results",
    "register_estimator",
    "rollout_record",
    "write_taubench_buffer",
]

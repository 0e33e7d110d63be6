"""Random ``turnrl.rollout/1`` records for tests of what is read from them."""

from __future__ import annotations

from hypothesis import strategies as st

import turnrl
from turnrl.calibration import DEFAULT_TIERS


@st.composite
def labelled_records(draw):
    """Records as run_episode writes them: groups in any order, tier names
    known, new or None, user and tool turns between the assistant turns,
    meta's stop_reason one of run_episode's, another writer's, not a string
    or not there."""
    names = [*DEFAULT_TIERS, "custom", "x²", None]
    stops = ["user_stop", "max_steps", "context_length", "other ✈", None, 3, "-"]
    records = []
    for i in range(draw(st.integers(0, 12))):
        turns = []
        for _ in range(draw(st.integers(0, 6))):
            role = draw(st.sampled_from(["assistant", "assistant", "user", "tool"]))
            turn = {"role": role, "content": "."}
            if role == "assistant":
                turn["tier"] = draw(st.sampled_from(names))
                turn["reward"] = draw(st.sampled_from([-0.5, 0.0, 0.3, 1.0]))
            turns.append(turn)
        group = draw(st.sampled_from(["g/a", "g/b", "g/c"]))
        task = draw(st.sampled_from(["t1", "t2"]))
        outcome = draw(st.sampled_from([0.0, 0.5, 1.0]))
        stop = draw(st.sampled_from(stops))
        meta = {} if stop == "-" else {"steps": len(turns), "stop_reason": stop}
        records.append(turnrl.rollout_record(task, group, i, outcome, turns, meta))
    return records

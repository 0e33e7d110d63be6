"""Random ``turnrl.rollout/1`` records for tests of what is read from them."""

from __future__ import annotations

from hypothesis import strategies as st

import turnrl
from turnrl.calibration import DEFAULT_TIERS


@st.composite
def labelled_records(draw):
    """Records as run_episode writes them: groups in any order, tier names
    known, new or None, user and tool turns between the assistant turns."""
    names = [*DEFAULT_TIERS, "custom", "x²", None]
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
        records.append(turnrl.rollout_record(task, group, i, outcome, turns))
    return records

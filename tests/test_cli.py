"""The `turnrl` command and the embedded demo."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np

from turnrl.cli import main
from turnrl.demo import NAIVE_REWARDS, TIERS, generate, tier_report


def test_demo_plants_predictive_tiers():
    rollouts = generate(tasks=64, group_size=8, seed=1)
    assert rollouts.turn_offsets[-1] == len(rollouts.turn_tiers)
    assert set(np.unique(rollouts.turn_tiers)) <= set(range(len(TIERS)))
    rows = {row.tier: row for row in tier_report(rollouts, "gtpo_hybrid", NAIVE_REWARDS)}
    assert rows["gold"].r_pb > 0.2 and rows["error"].r_pb < -0.1
    assert rows["gold"].mean_advantage > 0 > rows["error"].mean_advantage
    assert rows["respond"].misaligned == 0  # zero reward: exempt
    assert sum(row.turns for row in rows.values()) == len(rollouts.turn_tiers)


def test_cli_demo_prints_a_table_per_estimator(capsys):
    assert main(["demo", "--tasks", "16", "--estimators", "grpo", "gtpo_hybrid"]) == 0
    out = capsys.readouterr().out
    assert out.count("misaligned turns:") == 2
    for tier in TIERS:
        assert f"  {tier} " in out


def test_console_script_is_installed():
    exe = shutil.which("turnrl") or str(
        __import__("pathlib").Path(sys.executable).parent / "turnrl"
    )
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("turnrl ")

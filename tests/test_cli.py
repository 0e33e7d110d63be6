"""The `turnrl` command and the embedded demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from turnrl.calibration import DEFAULT_TIERS, TierStats, calibrate
from turnrl.cli import main
from turnrl.demo import generate


def test_demo_data_plants_predictive_tiers():
    rollouts = generate(tasks=64, group_size=8, seed=1)
    assert rollouts.turn_offsets[-1] == rollouts.num_turns
    assert set(np.unique(rollouts.turn_tiers)) <= set(range(len(DEFAULT_TIERS)))
    r = {c.tier: c.r for c in TierStats.from_rollouts(rollouts).correlations()}
    assert r["gold"] > 0.2 and r["error"] < -0.1 and abs(r["write"]) < 0.1
    report = calibrate(rollouts, "naive")
    assert report.rewards["gold"] > 0 > report.rewards["error"]
    assert report.best.misaligned < report.initial.misaligned


def test_cli_demo_prints_naive_and_calibrated(capsys):
    assert main(["demo", "--tasks", "32", "--estimators", "grpo", "gtpo_hybrid"]) == 0
    out = capsys.readouterr().out
    assert out.count("naive dense rewards: misaligned turns") == 2
    assert out.count("calibrated (round") == 2
    for tier in DEFAULT_TIERS:
        assert f"  {tier} " in out


def test_console_script_is_installed():
    exe = shutil.which("turnrl") or str(Path(sys.executable).parent / "turnrl")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("turnrl ")


def test_every_option_with_a_default_says_it_in_its_help():
    import argparse

    from turnrl.cli import build_parser

    def parsers(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = []
    for parser in parsers(build_parser()):
        for action in parser._actions:
            quiet = action.default in (None, False, argparse.SUPPRESS)
            if not action.option_strings or quiet or action.help == argparse.SUPPRESS:
                continue
            if "default" not in (action.help or ""):
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, missing


def test_vllm_gets_a_lora_rank_it_takes():
    import pytest

    from turnrl.cli import VLLM_LORA_RANKS, vllm_lora_rank
    from turnrl.exceptions import InvalidInputError

    for rank in range(1, 513):
        got = vllm_lora_rank(rank)
        assert got in VLLM_LORA_RANKS and got >= rank
        assert all(r < rank for r in VLLM_LORA_RANKS if r < got)  # the smallest that fits
    with pytest.raises(InvalidInputError, match="LoRA rank 600 is above vLLM's largest, 512"):
        vllm_lora_rank(600)

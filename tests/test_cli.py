"""The `turnrl` command and the embedded demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
    for option in ("--tasks", "--group-size"):  # no rollouts: NaN figures and numpy warnings
        with pytest.raises(SystemExit):
            main(["demo", option, "0"])
        assert f"argument {option}: must be at least 1, got '0'" in capsys.readouterr().err
    # numpy's generator takes no negative seed: refused while parsing, not a traceback.
    with pytest.raises(SystemExit):
        main(["demo", "--seed", "-1"])
    assert "argument --seed: must be at least 0, got '-1'" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("turnrl") or str(Path(sys.executable).parent / "turnrl")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("turnrl ")


def _run_turnrl(argv, before="", stdout_closed=True, buffered=False):
    """``turnrl ARGV`` in a new interpreter (``before`` run first), its stdout a pipe
    whose reader is gone (closed before the command can write) or that is read;
    ``buffered``: block-buffered, as a pipe is by default (without
    PYTHONUNBUFFERED, which a test runner may set), so that a print to it
    fails only at a flush."""
    code = f"import sys\n{before}\nfrom turnrl.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if not (buffered and k == "PYTHONUNBUFFERED")}
    run = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert run.stdout is not None and run.stderr is not None
    if stdout_closed:
        run.stdout.close()
        out = b""
    else:
        out = run.stdout.read()
    err = run.stderr.read().decode()
    return run.wait(), out, err


def test_a_closed_stdout_ends_the_command_quietly(tmp_path):
    """`turnrl rollouts stats ... | head` ended with "error: [Errno 32] Broken pipe"
    (exit 2), and output still buffered at exit with a BrokenPipeError traceback."""
    buffer = tmp_path / "b.jsonl"
    record = '{"schema": "turnrl.rollout/1", "task_id": "t", "group": "g", "sample": 0, '
    buffer.write_text(record + '"outcome": 1.0, "turns": []}\n')
    for argv in (
        ["rollouts", "stats", str(buffer), "--quiet"],
        ["rollouts", "stats", str(buffer), "--quiet", "--json"],
        ["demo", "--tasks", "4", "--group-size", "2"],
    ):
        code, _, err = _run_turnrl(argv)
        assert (code, err) == (141, ""), argv  # 128 + SIGPIPE, as a tool SIGPIPE ends
    # argparse's help ignores a failed write itself (and exits 0); nothing at exit either.
    assert _run_turnrl(["calibrate", "--help"])[2] == ""
    # A broken pipe that is not stdout's (a socket, say) is still an error.
    broken = "import turnrl.cli\ndef run(args): raise BrokenPipeError(32, 'Broken pipe')"
    code, out, err = _run_turnrl(
        ["rollouts", "stats", str(buffer)],
        before=f"{broken}\nturnrl.cli._stats = run",
        stdout_closed=False,
    )
    assert (code, out) == (2, b"")
    assert err == "turnrl rollouts stats: error: [Errno 32] Broken pipe\n"


def test_a_command_that_fails_with_its_stdout_closed_still_reports_its_failure(tmp_path):
    """The output a failing command had printed, buffered, failed to flush at its
    end with a BrokenPipeError, which replaced the failure: a traceback (a bug)
    went unseen and an error's status 2 became a quiet 141."""
    buffer = tmp_path / "b.jsonl"
    record = '{"schema": "turnrl.rollout/1", "task_id": "t", "group": "g", "sample": 0, '
    buffer.write_text(record + '"outcome": 1.0, "turns": []}\n')
    argv = ["rollouts", "stats", str(buffer)]
    command = "import turnrl.cli\nfrom turnrl.exceptions import InvalidInputError\n"
    for ending, expected in (
        ("raise RuntimeError('a bug')", 1),
        ("raise InvalidInputError('bad input')", 2),
        ("return 0", 141),
    ):
        run = f"def run(args):\n    print('some output')\n    {ending}\nturnrl.cli._stats = run"
        code, _, err = _run_turnrl(argv, before=command + run, buffered=True)
        assert code == expected, (ending, err)
        assert "BrokenPipeError" not in err
        if expected == 1:
            assert err.rstrip().endswith("RuntimeError: a bug")
        elif expected == 2:
            assert err == "turnrl rollouts stats: error: bad input\n"
        else:
            assert err == ""
    # Buffered output of a command that succeeds, flushed in main: quiet, 141.
    for quiet in (["--quiet"], ["--quiet", "--json"]):
        assert _run_turnrl([*argv, *quiet], buffered=True)[:3:2] == (141, "")


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


CONFIG_OPTIONS = {
    "model": "some/model",
    "env": "synthetic:airline",
    "lr": 2e-5,  # a float
    "steps": 3,  # an int
    "estimator": "mt_grpo",  # a choice
    "eval_every": 2,  # underscores stand for dashes
    "no-thinking": True,  # a switch
    "mask_truncated": False,  # a switch left off
    "no_skip_zero_advantage": True,  # a switch that stores False
    "report_to": ["tensorboard", "wandb"],  # a comma-separated option as a list
    "tasks": [0, 2, 5],
    "lora-targets": "q_proj,v_proj",
}
SAME_ON_THE_COMMAND_LINE = [
    "--model",
    "some/model",
    "--env",
    "synthetic:airline",
    "--lr",
    "2e-5",
    "--steps",
    "3",
    "--estimator",
    "mt_grpo",
    "--eval-every",
    "2",
    "--no-thinking",
    "--no-skip-zero-advantage",
    "--report-to",
    "tensorboard,wandb",
    "--tasks",
    "0,2,5",
    "--lora-targets",
    "q_proj,v_proj",
]


def _config_file(tmp_path: Path, suffix: str, values: dict) -> Path:
    import json

    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    elif suffix == ".yaml":
        yaml = __import__("pytest").importorskip("yaml")
        path.write_text(yaml.safe_dump(values))
    else:  # TOML by hand: no writer in the standard library
        lines = []
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, list):
                items = ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value)
                lines.append(f"{key} = [{items}]")
            else:
                lines.append(f"{key} = {value!r}")
        path.write_text("\n".join(lines) + "\n")
    return path


def _parsed(argv: list[str]):
    from turnrl.cli import build_parser, expand_config

    parser = build_parser()
    return parser.parse_args(expand_config(parser, argv))


def test_a_config_file_gives_what_the_same_command_line_gives(tmp_path):
    import pytest

    for suffix in (".toml", ".yaml", ".json"):
        path = _config_file(tmp_path, suffix, CONFIG_OPTIONS)
        from_file = vars(_parsed(["train", "--config", str(path), "--out", "o"]))
        by_hand = vars(_parsed(["train", *SAME_ON_THE_COMMAND_LINE, "--out", "o"]))
        assert from_file.pop("config") == str(path) and by_hand.pop("config") is None
        assert from_file == by_hand, suffix
    # The command line wins, before or after --config.
    for argv in (
        ["train", "--lr", "7e-6", f"--config={path}", "--out", "o"],
        ["train", "--config", str(path), "--out", "o", "--lr", "7e-6"],
    ):
        assert _parsed(argv).lr == pytest.approx(7e-6)
    # A command under a group, and a list for an option that takes several values.
    demo = _config_file(tmp_path, ".toml", {"estimators": ["grpo", "mt_grpo"], "tasks": 16})
    parsed = _parsed(["demo", "--config", str(demo)])
    assert parsed.estimators == ["grpo", "mt_grpo"] and parsed.tasks == 16
    collect = _config_file(
        tmp_path, ".json", {"env": "synthetic:airline", "samples": 3, "agent_model": "m"}
    )
    parsed = _parsed(["rollouts", "collect", "--config", str(collect), "--out", "x.jsonl"])
    assert parsed.samples == 3 and parsed.env == "synthetic:airline"


def test_config_files_that_cannot_be_used_say_why(tmp_path, capsys):
    def refused(values_or_text, suffix=".toml", command=("train",)):
        if isinstance(values_or_text, str):
            path = tmp_path / f"bad{suffix}"
            path.write_text(values_or_text)
        else:
            path = _config_file(tmp_path, suffix, values_or_text)
        assert main([*command, "--config", str(path), "--out", "o"]) == 2
        return capsys.readouterr().err

    err = refused({"lrr": 1e-5})
    assert "'lrr' is not an option of turnrl train (did you mean 'lr'?)" in err
    assert "no_thinking is a switch, true or false; got 'yes'" in refused({"no_thinking": "yes"})
    assert "lr takes a value like the command line's; got True" in refused({"lr": True})
    assert "line 2" in refused("lr = 1e-5\nsteps = = 3\n")  # the parser's own position
    assert "holds a list, not a mapping" in refused("[1, 2]", ".json")
    assert "give a .toml, .yaml, .yml or .json file, not .ini" in refused("lr=1", ".ini")
    assert "'config' is not an option" in refused({"config": "other.toml"})
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "bad.toml"), "train"]) == 2
    assert "--config goes after a command" in capsys.readouterr().err
    assert main(["rollouts", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "--config goes after a command" in capsys.readouterr().err


def test_the_readmes_config_file_is_one(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("```toml\n# run.toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "run.toml"
    path.write_text(block)
    parsed = _parsed(["train", "--config", str(path), "--lr", "5e-6"])
    assert (parsed.model, parsed.steps, parsed.lr, parsed.no_thinking) == (
        "Qwen/Qwen3-4B",
        100,
        5e-6,
        True,
    )
    assert parsed.report_to == ["tensorboard", "wandb"] and parsed.out == "runs/qwen3-4b"


def test_config_values_are_taken_as_the_command_line_takes_them(tmp_path, capsys):
    import json

    import pytest

    # Values that start with "-" are values, not options.
    values = {"entropy_coef": -1e-5, "tasks": "-5:", "run_name": "-exp"}
    path = _config_file(tmp_path, ".toml", values)
    parsed = _parsed(["train", "--config", str(path), "--model", "m", "--env", "e", "--out", "o"])
    assert (parsed.entropy_coef, parsed.tasks, parsed.run_name) == (-1e-5, "-5:", "-exp")
    # YAML's plain scalars as YAML 1.2 reads them: 5:10 is a range, not base-60 310.
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("tasks: 5:10\neval_tasks: 1:30\nsplit: off\nsteps: 1e3\nlr: 1.5e-5\n")
    parsed = _parsed(["train", "--config", str(path), "--model", "m", "--env", "e", "--out", "o"])
    assert (parsed.tasks, parsed.eval_tasks, parsed.split) == ("5:10", "1:30", "off")
    assert (parsed.steps, parsed.lr) == (1000, 1.5e-5)
    assert yaml.safe_load("tasks: 5:10")["tasks"] == 310  # what plain pyyaml would have given
    # null for the options that take none.
    path = tmp_path / "null.json"
    path.write_text('{"max_grad_norm": null, "report_to": null}')
    parsed = _parsed(["train", "--config", str(path), "--model", "m", "--env", "e", "--out", "o"])
    assert (parsed.max_grad_norm, parsed.report_to) == (None, [])
    # The options off by default take none too, so the command line can switch
    # off what a file set (and what --resume prints as none is a value they take).
    off = ["dual_clip", "off_policy_mask", "max_length", "micro_batch_tokens"]
    path = tmp_path / "null.json"
    path.write_text(json.dumps(dict.fromkeys(off)))
    parsed = _parsed(["train", "--config", str(path), "--model", "m", "--env", "e", "--out", "o"])
    assert [getattr(parsed, name) for name in off] == [None] * 4
    path.write_text('{"filter_groups": null, "rollout_correction": null}')
    parsed = _parsed(["train", "--config", str(path), "--model", "m", "--env", "e", "--out", "o"])
    assert (parsed.filter_groups, parsed.rollout_correction) == ("none", "none")
    # --norm none is a norm (no normalisation), not --norm's default: null is refused
    # there, not taken as none.
    path.write_text('{"norm": null}')
    for command in (["train", "--model", "m", "--env", "e", "--out", "o"], ["calibrate", "b"]):
        assert main([command[0], "--config", str(path), *command[1:]]) == 2
        assert capsys.readouterr().err.endswith(
            f"--config {path}: norm takes a value like the command line's; got None\n"
        )
    values = {"dual_clip": 3.0, "off_policy_mask": 0.5, "max_length": 512}
    values |= {"micro_batch_tokens": 1e3, "filter_groups": "outcome"}
    path = _config_file(tmp_path, ".toml", {**values, "rollout_correction": "token_mask"})
    train = ["train", "--config", str(path), "--model", "m", "--env", "e", "--out", "o"]
    parsed = _parsed(train)
    assert [getattr(parsed, name) for name in off] == [3.0, 0.5, 512, 1000]
    nones = [f"--{name.replace('_', '-')}" for name in [*off, "filter_groups"]]
    parsed = _parsed(
        [*train, *(a for option in nones for a in (option, "none")), "--dual-clip", "None"]
    )
    assert [getattr(parsed, name) for name in off] == [None] * 4
    assert (parsed.filter_groups, parsed.rollout_correction) == ("none", "token_mask")
    for option, bad in [("--dual-clip", "nones"), ("--max-length", "0"), ("--filter-groups", "x")]:
        with pytest.raises(SystemExit):
            _parsed([*train, option, bad])
        assert f"argument {option}: " in capsys.readouterr().err
    # The choices' none is the option's None once the command runs: nothing
    # filtered for --max-sampling-rounds, no correction for the transformers engine.
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    assert main([*argv, "--filter-groups", "none", "--max-sampling-rounds", "2"]) == 2
    assert "--max-sampling-rounds limits the rounds --filter-groups samples" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--rollout-correction", "none", "--user", "llm"]) == 2
    err = capsys.readouterr().err
    assert "--rollout-correction" not in err and "--user-model" in err  # refused further on
    # A file starting with a byte-order mark.
    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf{"lr": 3e-5}')
    assert (
        _parsed(["train", "--config", str(path), "--model", "m", "--env", "e", "--out", "o"]).lr
        == 3e-5
    )


def test_collect_and_train_take_each_others_names_for_shared_settings(tmp_path):
    # A command line moved from one command to the other keeps working.
    collect = ["rollouts", "collect", "--env", "e", "--agent-model", "m", "--out", "o"]
    parsed = _parsed([*collect, "--group-size", "3", "--max-new-tokens", "7", "--temperature", "0"])
    assert (parsed.samples, parsed.max_tokens, parsed.agent_temperature) == (3, 7, 0.0)
    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    parsed = _parsed([*train, "--samples", "3", "--max-tokens", "7", "--agent-temperature", "0.5"])
    assert (parsed.group_size, parsed.max_new_tokens, parsed.temperature) == (3, 7, 0.5)
    path = _config_file(tmp_path, ".toml", {"samples": 2, "max_tokens": 9})
    parsed = _parsed(["train", "--config", str(path), *train[1:]])
    assert (parsed.group_size, parsed.max_new_tokens) == (2, 9)


def test_config_values_the_options_refuse_name_the_file_and_key(tmp_path, capsys):
    def refused(values, *extra):
        path = _config_file(tmp_path, ".json", values)
        assert main(["train", "--config", str(path), "--out", "o", *extra]) == 2
        err = capsys.readouterr().err
        assert str(path) in err
        return err

    assert "steps: not an integer: '2.5'" in refused({"steps": 2.5})
    assert "estimator: 'foo' is not one of grpo" in refused({"estimator": "foo"})
    assert "model takes one value, not a list" in refused({"model": ["a", "b"]})
    assert "tasks is an empty list" in refused({"tasks": []})
    assert "'eval_every' and 'eval-every' are one option" in refused(
        {"eval_every": 2, "eval-every": 5}
    )
    assert "'group_size' and 'samples' are one option" in refused({"group_size": 2, "samples": 5})
    latin = tmp_path / "latin.toml"
    latin.write_bytes('run_name = "caf\xe9"\n'.encode("latin-1"))
    assert main(["train", "--config", str(latin), "--out", "o"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    # An abbreviation argparse would take, but whose file would go unread.
    good = _config_file(tmp_path, ".toml", {"model": "m", "env": "e"})
    assert main(["train", "--conf", str(good), "--out", "o"]) == 2
    assert "spell --config in full" in capsys.readouterr().err


def test_top_p_and_top_k_are_parsed_checked_and_kept_from_rollout_correction(tmp_path, capsys):
    """--top-p and --top-k, from the line and a config file, for train and collect;
    out-of-range values refused while parsing (in a config file too, naming it),
    and --rollout-correction under either before any model loads (there is none
    here): its sampler log-probs are not asked for there."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    collect = ["rollouts", "collect", "--env", "e", "--agent-model", "m", "--out", "o"]
    for command in (train, collect):
        parsed = _parsed(command)
        assert (parsed.top_p, parsed.top_k) == (None, None)
        parsed = _parsed([*command, "--top-p", "0.95", "--top-k", "20"])
        assert (parsed.top_p, parsed.top_k) == (0.95, 20)
        assert _parsed([*command, "--top-p", "1", "--top-k", "0"]).top_k == 0
        # vLLM's and SGLang's word for off.
        assert _parsed([*command, "--top-k=-1"]).top_k == 0
        for option, value, why in [
            ("--top-p", "0", "must be above 0 and at most 1, got '0'"),
            ("--top-p", "1.5", "must be above 0 and at most 1, got '1.5'"),
            ("--top-p", "nan", "must be a finite number"),
            ("--top-k", "-3", "must be a positive integer, or 0 (or vLLM's -1) for off, got '-3'"),
            ("--top-k", "x", "not an integer: 'x'"),
        ]:
            with pytest.raises(SystemExit):
                _parsed([*command, f"{option}={value}"])
            assert f"argument {option}: {why}" in capsys.readouterr().err
    path = _config_file(tmp_path, ".toml", {"top_p": 0.8, "top_k": 20})
    parsed = _parsed(["train", "--config", str(path), *train[1:]])
    assert (parsed.top_p, parsed.top_k) == (0.8, 20)
    path = _config_file(tmp_path, ".json", {"top-k": 20.0})  # a whole float, as for --steps
    assert _parsed(["train", "--config", str(path), *train[1:]]).top_k == 20
    path = _config_file(tmp_path, ".json", {"top_p": 1.5})
    assert main(["train", "--config", str(path), *train[1:]]) == 2
    assert f"--config {path}: top_p: must be above 0 and at most 1" in capsys.readouterr().err

    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run"), "--engine", "vllm"]
    argv += ["--rollout-correction", "token_mask"]
    assert main([*argv, "--top-k", "20"]) == 2
    assert capsys.readouterr().err == (
        "turnrl train: error: --rollout-correction weighs each token by the trainer's softmax "
        "over the sampler's, and under --top-k 20 the sampler draws from a truncated, "
        "renormalised distribution whose log-probs are not asked for: leave --top-k out, or "
        "--rollout-correction\n"
    )
    assert main([*argv, "--top-p", "0.9", "--top-k", "20"]) == 2
    assert "under --top-p 0.9 and --top-k 20 the sampler" in capsys.readouterr().err
    # Off, they leave the correction as it was (refused here for the missing model only).
    assert main([*argv, "--top-p", "1", "--top-k", "0"]) != 0
    assert "--rollout-correction weighs" not in capsys.readouterr().err


def test_min_p_and_repetition_penalty_are_parsed_checked_and_kept_from_rollout_correction(
    tmp_path, capsys
):
    """--min-p and --repetition-penalty as --top-p and --top-k: from the line and
    a config file, for train and collect; out-of-range values refused while
    parsing (in a config file too, naming it), and --rollout-correction and a
    one-epoch --off-policy-mask under either before any model loads (the
    sampler's log-probs are not asked for: a renormalised floor, penalised logits)."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    collect = ["rollouts", "collect", "--env", "e", "--agent-model", "m", "--out", "o"]
    for command in (train, collect):
        parsed = _parsed(command)
        assert (parsed.min_p, parsed.repetition_penalty) == (None, None)
        parsed = _parsed([*command, "--min-p", "0.05", "--repetition-penalty", "1.1"])
        assert (parsed.min_p, parsed.repetition_penalty) == (0.05, 1.1)
        parsed = _parsed([*command, "--min-p", "0", "--repetition-penalty", "0.9"])
        assert (parsed.min_p, parsed.repetition_penalty) == (0.0, 0.9)
        assert _parsed([*command, "--min-p", "1"]).min_p == 1.0
        for option, value, why in [
            ("--min-p", "-0.1", "must be at least 0 and at most 1, got '-0.1'"),
            ("--min-p", "1.5", "must be at least 0 and at most 1, got '1.5'"),
            ("--min-p", "nan", "must be a finite number"),
            ("--repetition-penalty", "0", "must be above 0, got '0'"),
            ("--repetition-penalty", "-1.1", "must be above 0, got '-1.1'"),
            ("--repetition-penalty", "inf", "must be a finite number"),
        ]:
            with pytest.raises(SystemExit):
                _parsed([*command, f"{option}={value}"])
            assert f"argument {option}: {why}" in capsys.readouterr().err
    path = _config_file(tmp_path, ".toml", {"min_p": 0.1, "repetition_penalty": 1.2})
    parsed = _parsed(["train", "--config", str(path), *train[1:]])
    assert (parsed.min_p, parsed.repetition_penalty) == (0.1, 1.2)
    path = _config_file(tmp_path, ".json", {"repetition-penalty": 1})  # a whole number
    assert (
        _parsed(["rollouts", "collect", "--config", str(path), *collect[2:]]).repetition_penalty
        == 1.0
    )
    path = _config_file(tmp_path, ".json", {"min_p": 2})
    assert main(["train", "--config", str(path), *train[1:]]) == 2
    assert f"--config {path}: min_p: must be at least 0 and at most 1" in capsys.readouterr().err

    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run"), "--engine", "vllm"]
    correction = [*argv, "--rollout-correction", "token_mask"]
    assert main([*correction, "--repetition-penalty", "1.1"]) == 2
    assert capsys.readouterr().err == (
        "turnrl train: error: --rollout-correction weighs each token by the trainer's softmax "
        "over the sampler's, and under --repetition-penalty 1.1 the sampler draws from a "
        "penalised distribution whose log-probs are not asked for: leave --repetition-penalty "
        "out, or --rollout-correction\n"
    )
    assert main([*correction, "--min-p", "0.05"]) == 2
    assert "under --min-p 0.05 the sampler draws from a truncated, renormalised distribution" in (
        capsys.readouterr().err
    )
    assert main([*correction, "--top-k", "20", "--repetition-penalty", "1.1"]) == 2
    assert (
        "under --top-k 20 and --repetition-penalty 1.1 the sampler draws from a truncated, "
        "renormalised and penalised distribution"
    ) in capsys.readouterr().err
    mask = [*argv, "--off-policy-mask", "0.5"]
    for sampling in (["--min-p", "0.05"], ["--repetition-penalty", "0.9"]):
        assert main([*mask, *sampling]) == 2, sampling
        err = capsys.readouterr().err
        assert "--off-policy-mask drops the turns" in err, sampling
        assert f"under {' '.join(sampling)} no engine keeps the sampler's log-probs" in err
        assert f"leave {sampling[0]} out" in err, sampling
    assert "(its distribution is penalised)" in err
    # Off, they leave the correction and the mask as they were (refused here for
    # the missing model only).
    for refused in (correction, mask):
        assert main([*refused, "--min-p", "0", "--repetition-penalty", "1"]) != 0
        err = capsys.readouterr().err
        assert "--rollout-correction weighs" not in err and "--off-policy-mask drops" not in err


def test_help_needs_no_config_file(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as done:
        main(["train", "--config", str(tmp_path / "missing.toml"), "--help"])
    assert done.value.code == 0 and "--config FILE" in capsys.readouterr().out


def test_max_grad_norm_zero_is_refused_naming_none(capsys):
    import pytest

    # Hugging Face's Trainer takes 0 for no clipping; here that is none.
    with pytest.raises(SystemExit):
        _parsed(["train", "--model", "m", "--env", "e", "--out", "o", "--max-grad-norm", "0"])
    assert "must be above 0, got '0' (none: no clipping)" in capsys.readouterr().err


def test_norm_takes_every_group_normalisation_the_core_has(capsys):
    import pytest

    import turnrl
    from turnrl.advantages import probe_batch
    from turnrl.cli import _estimator_params

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    calibrate = ["calibrate", "buffer.jsonl"]
    for norm in ("std", "mean", "none", "rloo", "batch"):
        for argv in (train, calibrate):
            params = _estimator_params(_parsed([*argv, "--norm", norm]))
            assert params["norm"] == norm
            # Every name offered is one the core runs.
            turnrl.compute_advantages("gtpo_hybrid", *probe_batch(), **params)
    with pytest.raises(SystemExit):
        _parsed([*train, "--norm", "group"])
    assert "choose from std, mean, none, rloo, batch" in capsys.readouterr().err.replace("'", "")


def test_micro_batch_tokens_warmup_and_a_cosine_too_short_are_refused_before_the_model(
    tmp_path, capsys
):
    """--micro-batch-tokens below 1 and a negative --warmup-steps are refused
    while parsing (from a config file too, whose 4000.0 is an integer as for the
    other integer options), and a new run's cosine schedule with no optimizer
    step after its warmup before any model loads, naming the options (the
    trainer and the schedule refused them only after the model had loaded)."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed([*train, "--micro-batch-tokens", "3000"]).micro_batch_tokens == 3000
    assert _parsed([*train, "--warmup-steps", "0"]).warmup_steps == 0
    for option, bad, why in (
        ("--micro-batch-tokens", "0", "must be at least 1"),
        ("--micro-batch-tokens", "-5", "must be at least 1"),
        ("--warmup-steps", "-1", "must be at least 0"),
    ):
        with pytest.raises(SystemExit):
            _parsed([*train, option, bad])
        assert f"argument {option}: {why}, got '{bad}'" in capsys.readouterr().err
    path = _config_file(
        tmp_path, ".json", {"micro_batch_tokens": 4e3, "warmup_steps": 1e1, "max_length": 4e3}
    )
    parsed = _parsed(["train", "--config", str(path), *train[1:]])
    assert (parsed.micro_batch_tokens, parsed.warmup_steps, parsed.max_length) == (4000, 10, 4000)
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    path = _config_file(tmp_path, ".toml", {"micro_batch_tokens": 0})
    assert main([*argv, "--config", str(path)]) == 2
    assert "micro_batch_tokens: must be at least 1, got '0'" in capsys.readouterr().err
    cosine = [*argv, "--lr-schedule", "cosine", "--warmup-steps", "4", "--steps", "2"]
    assert main([*argv, "--lr-schedule", "linear", "--warmup-steps", "2", "--steps", "2"]) == 2
    assert "--lr-schedule linear decays the rate after --warmup-steps 2, " in (
        capsys.readouterr().err
    )
    for epochs in ("1", "2"):
        assert main([*cosine, "--ppo-epochs", epochs]) == 2
        assert capsys.readouterr().err == (
            "turnrl train: error: --lr-schedule cosine decays the rate after --warmup-steps 4, "
            f"and the run takes {2 * int(epochs)} optimizer steps (--steps 2 x --ppo-epochs "
            f"{epochs}): give fewer --warmup-steps or more --steps\n"
        )
    assert not (tmp_path / "run").exists()
    # Three epochs leave two steps after the warmup; a constant schedule has no decay.
    for more in (["--ppo-epochs", "3"], ["--lr-schedule", "constant"]):
        main([*cosine, *more])
        assert "--lr-schedule cosine decays" not in capsys.readouterr().err, more


def test_truncation_is_one_of_the_named_modes_and_max_length_a_row_length(capsys):
    import pytest

    argv = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed(argv).truncation == "right" and _parsed(argv).max_length is None
    parsed = _parsed([*argv, "--max-length", "2", "--truncation", "left"])
    assert parsed.truncation == "left" and parsed.max_length == 2
    with pytest.raises(SystemExit):
        _parsed([*argv, "--truncation", "middle"])
    assert "argument --truncation: invalid choice: 'middle'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parsed([*argv, "--max-length", "1"])
    assert "argument --max-length: must be at least 2, got '1'" in capsys.readouterr().err


def test_a_truncation_mode_without_max_length_is_refused_naming_both(tmp_path, capsys):
    """Without --max-length no row is cut: --truncation left or error would do
    nothing, silently. Refused before any model loads (there is none here)."""
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    for mode in ("left", "error"):
        assert main([*argv, "--truncation", mode]) == 2
        assert capsys.readouterr().err == (
            f"turnrl train: error: --truncation {mode} says what --max-length does to a "
            "longer row, and no row is cut without it: add --max-length N\n"
        )
        # From a config file too.
        path = _config_file(tmp_path, ".toml", {"truncation": mode})
        assert main([*argv, "--config", str(path)]) == 2
        assert "--truncation " + mode + " says what --max-length does" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_builtin_estimators_parameters_are_the_cores():
    """The --gamma/--lam table the unused-option notes come from, against what
    changes each built-in's advantages."""
    from turnrl.advantages import compute_advantages, probe_batch
    from turnrl.cli import _BUILTIN_TAKES

    batch = probe_batch()
    for estimator in ("grpo", "mt_grpo", "gtpo_hybrid"):
        default = compute_advantages(estimator, *batch)
        for name, value in (("gamma", 0.5), ("lam", 2.0)):
            moved = compute_advantages(estimator, *batch, **{name: value})
            assert (name in _BUILTIN_TAKES[estimator]) == (not np.allclose(moved, default))


def test_an_estimator_option_the_estimator_does_not_use_is_noted(tmp_path, capsys):
    """calibrate --estimator grpo --gamma 0.5 ran as if --gamma were not given,
    unsaid; so did train. A note, not a refusal: a config file may set them for
    another estimator."""
    buffer = tmp_path / "b.jsonl"
    records = (
        f'{{"schema": "turnrl.rollout/1", "task_id": "t", "group": "g", "sample": {k}, '
        f'"outcome": {k % 2}, "turns": [{{"role": "assistant", "tier": "read"}}]}}\n'
        for k in range(4)
    )
    buffer.write_text("".join(records))
    calibrate = ["calibrate", str(buffer), "--quiet", "--gamma", "0.5", "--lam", "2"]
    assert main([*calibrate, "--estimator", "grpo"]) == 0
    assert capsys.readouterr().err == (
        "turnrl calibrate: note: --gamma 0.5 is not used: --estimator grpo has no gamma "
        "(it is gtpo_hybrid's)\n"
        "turnrl calibrate: note: --lam 2 is not used: --estimator grpo has no lam "
        "(it is mt_grpo and gtpo_hybrid's)\n"
    )
    assert main([*calibrate, "--estimator", "mt_grpo"]) == 0
    assert capsys.readouterr().err == (
        "turnrl calibrate: note: --gamma 0.5 is not used: --estimator mt_grpo has no gamma "
        "(it is gtpo_hybrid's)\n"
    )
    assert main(calibrate) == 0  # gtpo_hybrid takes both
    assert "note" not in capsys.readouterr().err
    # train too (here refused for another option after the note, before any model).
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run"), "--truncation", "left"]
    assert main([*argv, "--estimator", "grpo", "--lam", "0.3"]) == 2
    assert capsys.readouterr().err.startswith(
        "turnrl train: note: --lam 0.3 is not used: --estimator grpo has no lam"
    )


def test_train_notes_loss_options_its_run_has_no_term_for(tmp_path, capsys):
    """--kl-estimator without --beta and --rollout-correction-cap without
    --rollout-correction are noted (not refused: a shared --config file may
    set them), before the run is refused here for another option."""
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run"), "--truncation", "left"]
    assert main([*argv, "--kl-estimator", "k1", "--rollout-correction-cap", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "turnrl train: note: --kl-estimator k1 is not used: it estimates the KL that --beta "
        "weighs, and --beta is 0\n"
        "turnrl train: note: --rollout-correction-cap 3 is not used: it caps "
        "--rollout-correction, which is off\n"
    )
    # With their terms, or at their defaults, nothing is said.
    given = ["--beta", "0.1", "--kl-estimator", "k1", "--rollout-correction-cap", "2"]
    for extra in (
        [],
        given,
        ["--rollout-correction-cap", "3", "--engine", "vllm", "--rollout-correction", "token_mask"],
    ):
        assert main([*argv, *extra]) == 2
        assert "note" not in capsys.readouterr().err


def _commands(parser, words=()):
    """(command words, parser) of each command that takes options, e.g. rollouts stats."""
    from turnrl.cli import _subparsers

    below = _subparsers(parser)
    if below is None:
        return [(list(words), parser)]
    return [
        leaf for name, child in below.choices.items() for leaf in _commands(child, (*words, name))
    ]


def test_options_are_taken_spelled_in_full_only(capsys):
    from turnrl.cli import build_parser

    # An abbreviation would pick --group-size here, and a new --group-... option would
    # make it ambiguous.
    with pytest.raises(SystemExit) as done:
        main(["demo", "--group", "4"])
    assert done.value.code == 2
    assert "unrecognized arguments: --group 4" in capsys.readouterr().err
    parser = build_parser()
    assert not parser.allow_abbrev
    for words, command in _commands(parser):
        assert not command.allow_abbrev, words
        given = list(words)  # what the command needs, so that only the abbreviation is wrong
        for action in command._actions:
            if action.required:
                given += ["x"] if not action.option_strings else [action.option_strings[0], "x"]
        names = {name for action in command._actions for name in action.option_strings}
        for name in sorted(names):
            prefix = name[:-1]
            if not name.startswith("--") or len(prefix) < 3 or prefix in names:
                continue
            with pytest.raises(SystemExit):
                parser.parse_args([*given, prefix])
            assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err, (words, name)


def test_train_importance_level_is_parsed_from_the_line_and_from_a_config_file(tmp_path, capsys):
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed(train).importance_level == "token"
    for level in ("token", "turn", "sequence"):
        assert _parsed([*train, "--importance-level", level]).importance_level == level
    path = _config_file(tmp_path, ".toml", {"importance_level": "turn", "eps_low": 3e-4})
    parsed = _parsed(["train", "--config", str(path), "--model", "m", "--env", "e", "--out", "o"])
    assert (parsed.importance_level, parsed.eps_low) == ("turn", 3e-4)
    with pytest.raises(SystemExit):
        _parsed([*train, "--importance-level", "segment"])
    assert "invalid choice: 'segment'" in capsys.readouterr().err


def test_train_policy_loss_is_parsed_and_cispo_with_dual_clip_is_refused(tmp_path, capsys):
    """--policy-loss ppo|cispo, from the line and a config file; an unknown one
    is refused while parsing, and cispo with --dual-clip (which has no meaning
    for it) before any model loads (there is none here)."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed(train).policy_loss == "ppo"
    for name in ("ppo", "cispo", "sapo"):
        assert _parsed([*train, "--policy-loss", name]).policy_loss == name
    path = _config_file(tmp_path, ".toml", {"policy_loss": "cispo", "eps_high": 4.0})
    parsed = _parsed(["train", "--config", str(path), *train[1:]])
    assert (parsed.policy_loss, parsed.eps_high) == ("cispo", 4.0)
    with pytest.raises(SystemExit):
        _parsed([*train, "--policy-loss", "gspo"])
    assert "argument --policy-loss: invalid choice: 'gspo'" in capsys.readouterr().err
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    want = (
        "turnrl train: error: --dual-clip caps PPO's loss of a negative advantage, and "
        "--policy-loss cispo clips its weight on both sides whatever the sign: leave "
        "--dual-clip out\n"
    )
    assert main([*argv, "--policy-loss", "cispo", "--dual-clip", "3"]) == 2
    assert capsys.readouterr().err == want
    path = _config_file(tmp_path, ".toml", {"policy_loss": "cispo", "dual_clip": 3.0})
    assert main([*argv, "--config", str(path)]) == 2
    assert capsys.readouterr().err == want
    assert not (tmp_path / "run").exists()


def test_gpu_memory_shares_and_the_rank_timeout_are_refused_out_of_range(capsys):
    """--vllm-gpu-memory (train and collect) is a share of a GPU, above 0 and at
    most 1, and --dist-timeout a positive number of minutes, refused while
    parsing (argparse took any float, which vLLM or torch.distributed refused
    only after the model had loaded)."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    collect = ["rollouts", "collect", "--env", "e", "--agent-model", "m", "--out", "o"]
    parsed = _parsed([*train, "--vllm-gpu-memory", "0.9", "--dist-timeout", "30"])
    assert (parsed.vllm_gpu_memory, parsed.dist_timeout) == (0.9, 30.0)
    assert _parsed(train).vllm_gpu_memory == 0.4
    assert _parsed([*collect, "--vllm-gpu-memory", "1"]).vllm_gpu_memory == 1.0
    for argv, option, bad in [
        (train, "--vllm-gpu-memory", "1.5"),
        (train, "--vllm-gpu-memory", "0"),
        (train, "--vllm-gpu-memory", "nan"),
        (collect, "--vllm-gpu-memory", "2"),
        (train, "--dist-timeout", "0"),
        (train, "--dist-timeout", "-5"),
    ]:
        with pytest.raises(SystemExit):
            _parsed([*argv, option, bad])
        assert f"argument {option}: must be " in capsys.readouterr().err, (option, bad)


def test_train_min_lr_ratio_is_a_share_and_needs_a_decaying_schedule(tmp_path, capsys):
    """--min-lr-ratio is parsed as a share of --lr and refused, before any model
    loads, under --lr-schedule constant (nothing decays to it)."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    parsed = _parsed(train)
    assert (parsed.lr_schedule, parsed.min_lr_ratio) == ("constant", 0.0)
    parsed = _parsed([*train, "--lr-schedule", "linear", "--min-lr-ratio", "0.1"])
    assert (parsed.lr_schedule, parsed.min_lr_ratio) == ("linear", 0.1)
    for bad in ("-0.1", "1.5", "nan"):
        with pytest.raises(SystemExit):
            _parsed([*train, "--min-lr-ratio", bad])
        assert "argument --min-lr-ratio: must be " in capsys.readouterr().err
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run"), "--min-lr-ratio", "0.1"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "turnrl train: error: --min-lr-ratio is the floor a decaying schedule falls to, and "
        "--lr-schedule constant does not fall: add --lr-schedule linear or cosine\n"
    )
    assert not (tmp_path / "run").exists()


def test_train_refuses_more_mini_batches_than_a_step_has_rollouts(tmp_path, capsys):
    """Each rollout is in one part, so parts past a step's rollouts (--tasks-per-step
    x --group-size) held none, every step: fewer optimizer steps than asked for,
    unsaid, and a learning-rate schedule counting them never ran its course.
    Refused before any model loads, from a config file too."""
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    argv += ["--tasks-per-step", "2", "--group-size", "3"]
    want = (
        "turnrl train: error: --mini-batches 7 cuts each step's rollouts into 7 parts, and a "
        "step has 6 (--tasks-per-step 2 x --group-size 3): the parts past them would never "
        "take an optimizer step, which the learning-rate schedule counts; give --mini-batches "
        "6 or fewer\n"
    )
    assert main([*argv, "--mini-batches", "7"]) == 2
    assert capsys.readouterr().err == want
    path = _config_file(tmp_path, ".toml", {"mini_batches": 7})
    assert main([*argv, "--config", str(path)]) == 2
    assert capsys.readouterr().err == want
    assert not (tmp_path / "run").exists()
    # As many as the rollouts pass this check (and fail later, on the missing model).
    assert main([*argv, "--mini-batches", "6"]) == 2
    assert "--mini-batches" not in capsys.readouterr().err


def test_train_under_torchrun_refuses_more_mini_batches_than_the_busiest_rank_has(
    tmp_path, capsys, monkeypatch
):
    """Under torchrun each rank cuts its own share into the parts and part k of
    every rank is one optimizer step: parts past the busiest rank's share
    (the step's tasks dealt out in turn: rank 0's, --tasks-per-step over the
    ranks rounded up, x --group-size) are empty on every rank, every step.
    Refused before any model loads, naming the bound and the share."""
    import turnrl.cli

    class Started(Exception):
        """Got past the checks to joining the process group."""

    def start(args):
        raise Started

    monkeypatch.setattr(turnrl.cli, "_start_data_parallel", start)
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    argv += ["--tasks-per-step", "3", "--group-size", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--mini-batches", "5"]) == 2
    assert capsys.readouterr().err == (
        "turnrl train: error: --mini-batches 5 cuts each rank's share of a step's rollouts into "
        "5 parts, and under torchrun's 2 ranks the busiest rank's share is 4 (2 of "
        "--tasks-per-step 3, dealt out in turn, x --group-size 2): the parts past it would "
        "never take an optimizer step, which the learning-rate schedule counts; give "
        "--mini-batches 4 or fewer\n"
    )
    assert not (tmp_path / "run").exists()
    with pytest.raises(Started):
        main([*argv, "--mini-batches", "4"])
    monkeypatch.setenv("WORLD_SIZE", "3")  # a task a rank: 2 rollouts each
    assert main([*argv, "--mini-batches", "3"]) == 2
    assert "the busiest rank's share is 2 (1 of --tasks-per-step 3" in capsys.readouterr().err
    with pytest.raises(Started):
        main([*argv, "--mini-batches", "2"])
    # Fewer tasks than ranks: refused here too, in the CLI's spelling, before
    # any rank loads the model (train_loop refuses it only after).
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main([*argv, "--mini-batches", "1"]) == 2
    assert capsys.readouterr().err == (
        "turnrl train: error: --tasks-per-step 3 gives some of torchrun's 4 ranks no task, "
        "and each rank collects whole groups: give --tasks-per-step 4 or more, or start "
        "fewer ranks\n"
    )
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the step's 6 rollouts
    with pytest.raises(Started):
        main([*argv, "--mini-batches", "6"])


def test_train_sapo_temperatures_are_parsed_and_refused_where_they_do_nothing(tmp_path, capsys):
    """--sapo-tau-pos/--sapo-tau-neg, from the line and a config file, must be
    finite and > 0 (refused while parsing), and are refused without
    --policy-loss sapo (they would change nothing), as --dual-clip is with
    it, before any model loads (there is none here)."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o", "--policy-loss", "sapo"]
    parsed = _parsed(train)
    assert (parsed.policy_loss, parsed.sapo_tau_pos, parsed.sapo_tau_neg) == ("sapo", None, None)
    parsed = _parsed([*train, "--sapo-tau-pos", "0.5", "--sapo-tau-neg", "2"])
    assert (parsed.sapo_tau_pos, parsed.sapo_tau_neg) == (0.5, 2.0)
    path = _config_file(tmp_path, ".toml", {"policy_loss": "sapo", "sapo_tau_neg": 3.0})
    parsed = _parsed(["train", "--config", str(path), *train[1:7]])
    assert (parsed.policy_loss, parsed.sapo_tau_neg) == ("sapo", 3.0)
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            _parsed([*train, "--sapo-tau-neg", bad])
        assert "argument --sapo-tau-neg: must be" in capsys.readouterr().err
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    assert main([*argv, "--sapo-tau-pos", "2", "--sapo-tau-neg", "2"]) == 2
    assert capsys.readouterr().err == (
        "turnrl train: error: --sapo-tau-pos, --sapo-tau-neg: SAPO's temperatures, for "
        "--policy-loss sapo alone (this run's is ppo)\n"
    )
    path = _config_file(tmp_path, ".toml", {"policy_loss": "cispo", "sapo_tau_neg": 2.0})
    assert main([*argv, "--config", str(path)]) == 2
    assert "--sapo-tau-neg: SAPO's temperatures, for --policy-loss sapo alone (this run's " in (
        capsys.readouterr().err
    )
    assert main([*argv, "--policy-loss", "sapo", "--dual-clip", "3"]) == 2
    assert capsys.readouterr().err == (
        "turnrl train: error: --dual-clip caps PPO's loss of a negative advantage, and "
        "--policy-loss sapo's gate already bounds it: leave --dual-clip out\n"
    )
    assert not (tmp_path / "run").exists()


def test_train_kl_estimator_is_kept_by_its_canonical_name_and_full_is_refused(tmp_path, capsys):
    """verl's names are taken as turnrl's; ``full`` and a misspelt name are
    refused while parsing, before any model loads, from a config file too."""
    import pytest

    from turnrl.kernels.kl_estimators import KL_ESTIMATORS

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed(train).kl_estimator == "k3"
    for name in KL_ESTIMATORS:
        assert _parsed([*train, "--kl-estimator", name]).kl_estimator == name
    assert _parsed([*train, "--kl-estimator", "low_var_kl+"]).kl_estimator == "k3+"
    with pytest.raises(SystemExit):
        _parsed([*train, "--kl-estimator", "full"])
    err = capsys.readouterr().err
    assert (
        "argument --kl-estimator: kl_estimator 'full' (verl's full KL) needs the reference" in err
    )
    with pytest.raises(SystemExit):
        _parsed([*train, "--kl-estimator", "k4"])
    assert "unknown kl_estimator 'k4'; valid: k1, k1+, abs, abs+, k2, k3, k3+" in (
        capsys.readouterr().err
    )
    path = _config_file(tmp_path, ".toml", {"kl_estimator": "mse"})
    assert _parsed(["train", "--config", str(path), *train[1:]]).kl_estimator == "k2"
    path = _config_file(tmp_path, ".toml", {"kl_estimator": "k4"})
    assert main(["train", "--config", str(path), *train[1:]]) == 2
    assert "kl_estimator: unknown kl_estimator 'k4'" in capsys.readouterr().err


def test_resume_notes_spell_a_switched_off_setting_as_the_options_do():
    """A setting switched off (None) reads ``none``, as ``--max-grad-norm none``
    is typed, not Python's ``None``; one a side lacks reads ``default``; equal
    ones are not named."""
    from turnrl.cli import _setting_changes

    before = {"--max-grad-norm": 1.0, "--dual-clip": None, "--beta": 0.0}
    after = {"--max-grad-norm": None, "--dual-clip": 3.0, "--beta": 0.0, "--agg": "token_mean"}
    assert _setting_changes(before, after, "loss ") == [
        "loss --max-grad-norm 1.0 -> none",
        "loss --dual-clip none -> 3.0",
        "loss --agg default -> token_mean",
    ]


def test_train_kl_correction_is_parsed_and_refused_without_beta(tmp_path, capsys):
    """--kl-correction, from the line and a config file; without --beta (no KL
    term for it to weight) it is refused before any model loads."""
    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed(train).kl_correction is False
    assert _parsed([*train, "--kl-correction", "--beta", "0.1"]).kl_correction is True
    path = _config_file(tmp_path, ".toml", {"kl_correction": True, "beta": 0.1})
    parsed = _parsed(["train", "--config", str(path), *train[1:]])
    assert (parsed.kl_correction, parsed.beta) == (True, 0.1)
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    want = (
        "turnrl train: error: --kl-correction weights the KL term by pi / pi_old, and there is "
        "none without --beta: add --beta (above 0)\n"
    )
    for extra in ([], ["--beta", "0"]):
        assert main([*argv, "--kl-correction", *extra]) == 2
        assert capsys.readouterr().err == want
    path = _config_file(tmp_path, ".toml", {"kl_correction": True})
    assert main([*argv, "--config", str(path)]) == 2
    assert capsys.readouterr().err == want
    assert not (tmp_path / "run").exists()


def test_train_top_entropy_quantile_takes_a_share(tmp_path, capsys):
    """--top-entropy-quantile RHO, from the line and a config file, 1.0 by
    default; outside [0, 1], NaN or an infinity refused while parsing (before
    any model loads)."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed(train).top_entropy_quantile == 1.0
    for text, want in (("0.2", 0.2), ("0", 0.0), ("1", 1.0)):
        assert _parsed([*train, "--top-entropy-quantile", text]).top_entropy_quantile == want
    path = _config_file(tmp_path, ".toml", {"top_entropy_quantile": 0.25})
    assert _parsed(["train", "--config", str(path), *train[1:]]).top_entropy_quantile == 0.25
    for bad in ("-0.1", "1.5", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            _parsed([*train, "--top-entropy-quantile", bad])
        assert "argument --top-entropy-quantile: " in capsys.readouterr().err, bad
    path = _config_file(tmp_path, ".toml", {"top_entropy_quantile": 2})
    argv = ["train", "--config", str(path), "--model", str(tmp_path / "nowhere")]
    assert main([*argv, "--env", "synthetic:airline", "--out", str(tmp_path / "run")]) == 2
    assert "top_entropy_quantile: must be at least 0 and at most 1, got '2'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_train_off_policy_mask_takes_a_positive_finite_delta(tmp_path, capsys):
    """--off-policy-mask DELTA, from the line and a config file; 0, a negative,
    NaN or an infinity are refused while parsing."""
    import pytest

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed(train).off_policy_mask is None
    assert _parsed([*train, "--off-policy-mask", "0.5"]).off_policy_mask == 0.5
    path = _config_file(tmp_path, ".toml", {"off_policy_mask": 0.25})
    assert _parsed(["train", "--config", str(path), *train[1:]]).off_policy_mask == 0.25
    for bad in ("0", "-0.5", "nan", "inf"):
        with pytest.raises(SystemExit):
            _parsed([*train, "--off-policy-mask", bad])
        assert "argument --off-policy-mask: must be" in capsys.readouterr().err, bad
    # The transformers engine (the default) samples from the trained model: with
    # one epoch there is nothing to compare, refused before any model loads.
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run"), "--off-policy-mask", "0.5"]
    assert main(argv) == 2
    assert "--off-policy-mask drops the turns the policy has moved away from" in (
        capsys.readouterr().err
    )
    for more in (["--ppo-epochs", "2"], ["--engine", "vllm"]):
        main([*argv, *more])
        assert "--off-policy-mask drops" not in capsys.readouterr().err, more


def test_train_off_policy_mask_refused_under_truncated_sampling_at_one_epoch(tmp_path, capsys):
    """Under --top-p < 1 or a --top-k no engine asks for sampler log-probs, so
    with one --ppo-epochs the mask compares the policy with itself: refused
    before the model loads, as with the transformers engine."""
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run"), "--off-policy-mask", "0.5"]
    argv += ["--engine", "vllm"]
    for sampling in (["--top-p", "0.9"], ["--top-k", "20"], ["--top-p", "0.9", "--top-k", "5"]):
        assert main([*argv, *sampling]) == 2, sampling
        err = capsys.readouterr().err
        assert "--off-policy-mask drops the turns" in err, sampling
        assert sampling[0] in err, sampling
    # Switched off explicitly, or a second epoch to drift in: not this refusal.
    for more in (["--top-p", "1", "--top-k", "0"], ["--top-k", "20", "--ppo-epochs", "2"]):
        main([*argv, *more])
        assert "--off-policy-mask drops" not in capsys.readouterr().err, more
    # A served model's log-probs are kept at temperature 1 alone.
    server = [*argv[:-2], "--engine", "server", "--agent-url", "http://127.0.0.1:9/v1"]
    assert main([*server, "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "--off-policy-mask drops the turns" in err and "--temperature 0.7" in err
    for more in (["--temperature", "1"], ["--temperature", "0.7", "--ppo-epochs", "2"]):
        main([*server, *more])
        assert "--off-policy-mask drops" not in capsys.readouterr().err, more


def test_mini_batches_is_a_count_and_a_second_one_is_off_policy(tmp_path, capsys):
    """--mini-batches (1 by default) is an integer of at least 1, from a config
    file too, where null is not taken (it is a count, nothing to switch off);
    a new run's schedule counts it among its optimizer steps, and a second
    mini-batch, whose policy has moved, lifts the refusal of a one-epoch
    --off-policy-mask, as a second epoch does."""
    import pytest

    from turnrl.exceptions import InvalidInputError

    train = ["train", "--model", "m", "--env", "e", "--out", "o"]
    assert _parsed(train).mini_batches == 1
    assert _parsed([*train, "--mini-batches", "4"]).mini_batches == 4
    for bad, why in (("0", "must be at least 1"), ("-2", "must be at least 1")):
        with pytest.raises(SystemExit):
            _parsed([*train, "--mini-batches", bad])
        assert f"argument --mini-batches: {why}, got '{bad}'" in capsys.readouterr().err
    for bad in ("1.5", "two", "none"):
        with pytest.raises(SystemExit):
            _parsed([*train, "--mini-batches", bad])
        assert f"argument --mini-batches: not an integer: '{bad}'" in capsys.readouterr().err
    path = _config_file(tmp_path, ".json", {"mini_batches": 2.0})
    assert _parsed(["train", "--config", str(path), *train[1:]]).mini_batches == 2
    path = _config_file(tmp_path, ".json", {"mini-batches": 3})
    assert _parsed(["train", "--config", str(path), *train[1:]]).mini_batches == 3
    for value, why in ((0, "mini_batches: must be at least 1, got '0'"), (None, "takes a value")):
        path = _config_file(tmp_path, ".json", {"mini_batches": value})
        with pytest.raises(InvalidInputError, match=why):
            _parsed(["train", "--config", str(path), *train[1:]])

    argv = ["train", "--model", str(tmp_path / "nowhere"), "--env", "synthetic:airline"]
    argv += ["--user", "scripted", "--out", str(tmp_path / "run")]
    cosine = [*argv, "--lr-schedule", "cosine", "--warmup-steps", "4", "--steps", "2"]
    assert main([*cosine, "--mini-batches", "2"]) == 2
    assert capsys.readouterr().err == (
        "turnrl train: error: --lr-schedule cosine decays the rate after --warmup-steps 4, "
        "and the run takes 4 optimizer steps (--steps 2 x --ppo-epochs 1 x --mini-batches 2): "
        "give fewer --warmup-steps or more --steps\n"
    )
    # Three mini-batches leave two optimizer steps after the warmup.
    main([*cosine, "--mini-batches", "3"])
    assert "--lr-schedule cosine decays" not in capsys.readouterr().err

    # The transformers engine keeps no sampler log-probs: one epoch of one
    # mini-batch compares the policy with itself; a second mini-batch does not.
    mask = [*argv, "--off-policy-mask", "0.5"]
    assert main(mask) == 2
    err = capsys.readouterr().err
    assert "with one --ppo-epochs and one --mini-batches the policy is compared with itself" in err
    assert "(or --mini-batches 2 or more)" in err
    main([*mask, "--mini-batches", "2"])
    assert "--off-policy-mask drops" not in capsys.readouterr().err

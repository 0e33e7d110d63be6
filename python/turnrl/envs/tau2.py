"""Loading tau2-bench domains from a user's checkout.

Layout: ``data/tau2/domains/<domain>/{db.json, tasks.json, split_tasks.json,
policy.md}``. The reward follows the task's ``reward_basis``: ``DB`` (state
equal to the gold actions' replay) and ``COMMUNICATE`` (each
``communicate_info`` string in some agent message, lower-cased, commas
stripped from the message). ``NL_ASSERTION`` checks need an LLM judge:
the assertions are in the task's ``facts``, and
:func:`turnrl.envs.run_episode` scores them when given ``nl_judge``
(:mod:`turnrl.envs.judge`); ``Episode.reward`` alone leaves them out.

Both domains run tau2's own tool semantics (:mod:`turnrl.envs.airline_tau2`,
:mod:`turnrl.envs.retail_tau2`) on records shaped as tau2's models dump them.

The agent is shown what tau2-bench's LLM agent is shown: a system message
that puts the policy after the agent's instructions
(:func:`agent_system_prompt`), then the orchestrator's greeting as an
assistant message (``EpisodeRules.greeting``) before the user's first line.
The user simulator is shown what tau2's is: each task's
``user_system_prompt`` holds tau2's user guidelines (:func:`user_guidelines`)
and then the task's scenario as tau2 renders it (:func:`scenario_text`,
also the task's ``instruction``).
"""

from __future__ import annotations

import ast
import textwrap
import warnings
from pathlib import Path
from typing import Any

from turnrl.envs import retail_tau2
from turnrl.envs._base import TAU2_BENCH_RULES, Action, Domain, Task, read_json, read_text
from turnrl.envs.airline_tau2 import TAU2_TOOLS
from turnrl.envs.users import TAU2_USER_GUIDELINES, tau2_user_system_prompt
from turnrl.exceptions import InvalidInputError

SPLITS = ("train", "test", "base")
_DB_CACHE: dict[str, dict[str, Any]] = {}

#: Where a tau2-bench checkout defines its LLM agent's prompt text.
AGENT_SOURCE = Path("src", "tau2", "agent", "llm_agent.py")
#: The instruction text, in turnrl's words, for a checkout without
#: :data:`AGENT_SOURCE` (a data-only copy): what tau2's agent is told.
BUILTIN_AGENT_INSTRUCTION = (
    "You are a customer service agent. Help the user within the rules of the <policy> below.\n"
    "A turn is one of two things:\n"
    "- a message to the user, or\n"
    "- a tool call.\n"
    "Never both in one turn.\n"
    "\n"
    "Be helpful, and keep to the policy at all times. Any JSON you write must be valid."
)
#: How the system message puts the instruction and the policy together.
BUILTIN_SYSTEM_TEMPLATE = (
    "<instructions>\n{agent_instruction}\n</instructions>\n<policy>\n{domain_policy}\n</policy>"
)
_PROMPT_NAMES = {"AGENT_INSTRUCTION": "instruction", "SYSTEM_PROMPT": "template"}


def _string_value(node: ast.AST) -> str | None:
    """A string literal, or one with ``.strip()`` (``lstrip``, ``rstrip``)
    called on it with no arguments, as tau2 writes its prompts; else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (
        isinstance(node, ast.Call)
        and not node.args
        and not node.keywords
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("strip", "lstrip", "rstrip")
    ):
        inner = _string_value(node.func.value)
        return None if inner is None else getattr(inner, node.func.attr)()
    return None


def read_agent_prompt(root: Path) -> tuple[str, str] | None:
    """``(AGENT_INSTRUCTION, SYSTEM_PROMPT)`` of the checkout's
    :data:`AGENT_SOURCE`, read with ``ast`` (never imported or run); None
    when the checkout has no such file. A file that does not define both
    as string literals, or whose template does not place them, is an
    :class:`InvalidInputError` naming it."""
    path = root / AGENT_SOURCE
    if not path.is_file():
        return None
    try:
        tree = ast.parse(read_text(path), filename=str(path))
    except SyntaxError as e:
        raise InvalidInputError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from e
    found: dict[str, str] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in _PROMPT_NAMES:
            text = _string_value(value)
            if text is None:
                raise InvalidInputError(
                    f"{path}:{stmt.lineno}: {target.id} is not a string literal; "
                    "turnrl reads the agent's prompt text without running tau2's code"
                )
            found[target.id] = text
    missing = [name for name in _PROMPT_NAMES if name not in found]
    if missing:
        raise InvalidInputError(
            f"{path}: no module-level {' or '.join(missing)}; turnrl reads tau2's agent "
            "prompt from them"
        )
    instruction, template = found["AGENT_INSTRUCTION"], found["SYSTEM_PROMPT"]
    try:  # what the template's fields and braces allow does not depend on the values
        template.format(agent_instruction=instruction, domain_policy="")
    except (KeyError, IndexError, ValueError) as e:
        raise InvalidInputError(
            f"{path}: SYSTEM_PROMPT is not a template of "
            f"{{agent_instruction}} and {{domain_policy}} ({type(e).__name__}: {e})"
        ) from e
    return instruction, template


def agent_system_prompt(policy: str, root: Path) -> str:
    """The system message tau2-bench's LLM agent gets for ``policy``: the
    checkout's own instruction text and template when it has
    :data:`AGENT_SOURCE`, else :data:`BUILTIN_AGENT_INSTRUCTION` in
    :data:`BUILTIN_SYSTEM_TEMPLATE`. Both place ``{agent_instruction}`` and
    ``{domain_policy}`` with ``str.format``, as tau2 does. A checkout whose
    file cannot be read so (another tau2 layout) gets the built-in text with
    a warning naming the file: its data still loads."""
    try:
        read = read_agent_prompt(root)
    except InvalidInputError as e:
        warnings.warn(
            f"{e}; the agent is shown turnrl's built-in tau2 instructions instead",
            stacklevel=2,
        )
        read = None
    instruction, template = read or (BUILTIN_AGENT_INSTRUCTION, BUILTIN_SYSTEM_TEMPLATE)
    return template.format(agent_instruction=instruction, domain_policy=policy)


#: Where a tau2-bench checkout keeps its user simulator's guidelines (the
#: ones for a user without tools of its own, as in airline and retail).
USER_GUIDELINES_SOURCE = Path("data", "tau2", "user_simulator", "simulation_guidelines.md")
# tau2 puts a runtime persona's extra guidelines here; its default persona
# adds none, so the place is emptied.
_PERSONA_PLACE = "<PERSONA_GUIDELINES>"


def read_user_guidelines(root: Path) -> str | None:
    """The text of the checkout's :data:`USER_GUIDELINES_SOURCE` as tau2 shows
    it to its default user simulator (a ``<PERSONA_GUIDELINES>`` place
    emptied); None when the checkout has no such file (a data-only copy).
    One that is there but cannot be read as UTF-8 text is an
    :class:`InvalidInputError` naming it."""
    path = root / USER_GUIDELINES_SOURCE
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{path}: cannot be read as text ({type(e).__name__}: {e})") from e
    return text.replace(_PERSONA_PLACE, "")


def user_guidelines(root: Path) -> str:
    """The guidelines tau2-bench's user simulator is shown: the checkout's
    own (:func:`read_user_guidelines`), else turnrl's wording of them,
    :data:`turnrl.envs.users.TAU2_USER_GUIDELINES`. A file that is there but
    unreadable gets the built-in text with a warning naming it."""
    try:
        text = read_user_guidelines(root)
    except InvalidInputError as e:
        warnings.warn(
            f"{e}; the user simulator is shown turnrl's built-in tau2 guidelines instead",
            stacklevel=2,
        )
        text = None
    return TAU2_USER_GUIDELINES if text is None else text


_LEG_ORDER = ("flight_number", "origin", "destination", "date", "price")
_METHOD_ORDER = {
    "credit_card": ("source", "id", "brand", "last_four"),
    "gift_card": ("source", "id", "amount"),
    "certificate": ("source", "id", "amount"),
}


def _ordered(record: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    out = {k: record[k] for k in order if k in record}
    out.update((k, v) for k, v in record.items() if k not in out)
    return out


def _airline_model_shape(tables: dict[str, Any]) -> dict[str, Any]:
    """Records in the field order and defaults of tau2's data models (as it dumps them)."""
    reservations = {}
    for rid, r in tables.get("reservations", {}).items():
        r = dict(r)
        r["flights"] = [_ordered(f, _LEG_ORDER) for f in r.get("flights", [])]
        r.setdefault("status", None)
        reservations[rid] = r
    users = {}
    for uid, u in tables.get("users", {}).items():
        u = dict(u)
        methods = {}
        for k, m in u.get("payment_methods", {}).items():
            m = _ordered(m, _METHOD_ORDER.get(m.get("source"), ()))
            if m.get("source") in ("gift_card", "certificate") and isinstance(m.get("amount"), int):
                m["amount"] = float(m["amount"])  # tau2's model types these amounts float
            methods[k] = m
        u["payment_methods"] = methods
        users[uid] = u
    return {**tables, "reservations": reservations, "users": users}


def _indented(text: str) -> str:
    # tau2 indents each field with textwrap.indent: a tab before every line
    # that is not blank.
    return textwrap.indent(text, "\t")


def scenario_text(scenario: Any, where: str = "user_scenario") -> str:
    """A tau2 ``user_scenario`` as tau2-bench renders it for its user
    simulator (``str(task.user_scenario)``): ``Persona:`` and the persona
    when it has one, then ``Instructions:`` and the instructions, each
    indented by a tab. Structured instructions read ``Domain: ...``, then
    ``Reason for call:``, ``Known info:`` and ``Unknown info:`` (those two
    when not null) and ``Task instructions:``, each over its text indented
    by a tab; plain-string instructions are their text. A scenario tau2's
    data model would refuse is an :class:`InvalidInputError` naming
    ``where``."""
    if not isinstance(scenario, dict):
        raise InvalidInputError(f"{where}: expected an object, got {type(scenario).__name__}")

    def text(value: Any, name: str, optional: bool) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            kind = "text or null" if optional else "text"
            raise InvalidInputError(f"{where}: {name} must be {kind}, got {value!r}")
        return value

    inst = scenario.get("instructions")
    if isinstance(inst, dict):
        fields = {
            key: text(inst.get(key), f"instructions.{key}", optional)
            for key, optional in (
                ("domain", False),
                ("reason_for_call", False),
                ("known_info", True),
                ("unknown_info", True),
                ("task_instructions", False),
            )
        }
        lines = [
            f"Domain: {fields['domain']}",
            f"Reason for call:\n{_indented(fields['reason_for_call'] or '')}",
        ]
        for key, title in (("known_info", "Known info"), ("unknown_info", "Unknown info")):
            if fields[key] is not None:
                lines.append(f"{title}:\n{_indented(fields[key] or '')}")
        lines.append(f"Task instructions:\n{_indented(fields['task_instructions'] or '')}")
        instructions = "\n".join(lines)
    elif isinstance(inst, str):
        instructions = inst
    else:
        raise InvalidInputError(
            f"{where}: instructions must be text or an object of domain, reason_for_call, "
            f"known_info, unknown_info and task_instructions, got {inst!r}"
        )
    out = []
    persona = text(scenario.get("persona"), "persona", True)
    if persona is not None:
        out += ["Persona:", _indented(persona)]
    out += ["Instructions:", _indented(instructions)]
    return "\n".join(out)


def _user_id(task: dict[str, Any]) -> str:
    for a in (task.get("evaluation_criteria") or {}).get("actions") or []:
        uid = (a.get("arguments") or {}).get("user_id")
        if isinstance(uid, str):
            return uid
    text = str((task.get("user_scenario") or {}).get("instructions"))
    marker = "user id is "
    if marker in text:
        return text.split(marker, 1)[1].split()[0].rstrip(".,")
    return ""


def _task(raw: Any, where: str, domain: str, split: str, guidelines: str) -> Task:
    if not isinstance(raw, dict) or "id" not in raw:
        raise InvalidInputError(f"{where}: a task must be an object with an id")
    crit = raw.get("evaluation_criteria") or {}
    actions = []
    for j, a in enumerate(crit.get("actions") or []):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            raise InvalidInputError(f"{where}: evaluation_criteria.actions[{j}] has no name")
        if a.get("requestor", "assistant") != "assistant":
            continue
        actions.append(Action(a["name"], a.get("arguments") or {}))
    basis = tuple(crit.get("reward_basis") or ("DB", "COMMUNICATE"))
    scenario = scenario_text(raw.get("user_scenario"), f"{where}: user_scenario")
    return Task(
        id=f"{domain}/{split}/{raw['id']}",
        user_id=_user_id(raw),
        instruction=scenario,
        actions=tuple(actions),
        communicate_info=tuple(str(c) for c in crit.get("communicate_info") or ()),
        reward_basis=basis,
        facts={
            "tau2_id": raw["id"],
            "nl_assertions": list(crit.get("nl_assertions") or []),
            "description": raw.get("description"),
        },
        user_system_prompt=tau2_user_system_prompt(guidelines, scenario),
    )


def load(domain: str, root: Path, split: str | None) -> Domain:
    """``tau2:<domain>`` from ``root`` (a tau2-bench checkout)."""
    if domain not in ("airline", "retail"):
        raise InvalidInputError(f"tau2: unknown domain {domain!r}; known: ['airline', 'retail']")
    split = split or "test"
    if split not in SPLITS:
        raise InvalidInputError(f"tau2:{domain}: unknown split {split!r}; known: {list(SPLITS)}")
    base = root / "data" / "tau2" / "domains" / domain
    db_path = base / "db.json"
    key = f"{db_path.resolve()}:{db_path.stat().st_mtime_ns if db_path.exists() else 0}"
    tables = _DB_CACHE.get(key)
    if tables is None:
        tables = read_json(db_path)
        if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
            raise InvalidInputError(f"{db_path}: expected an object of tables keyed by id")
        if domain == "airline":
            tables = _airline_model_shape(tables)
        else:
            tables = retail_tau2.shape_tables(tables)
        _DB_CACHE[key] = tables
    raw_tasks = read_json(base / "tasks.json")
    if not isinstance(raw_tasks, list):
        raise InvalidInputError(f"{base / 'tasks.json'}: expected a list of tasks")
    splits = read_json(base / "split_tasks.json")
    if split not in splits:
        raise InvalidInputError(f"{base / 'split_tasks.json'}: no split {split!r}")
    wanted = [str(i) for i in splits[split]]
    guidelines = user_guidelines(root)
    by_id = {}
    for i, raw in enumerate(raw_tasks):
        t = _task(raw, f"{base / 'tasks.json'}: task {i}", domain, split, guidelines)
        by_id[str(raw["id"])] = t
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise InvalidInputError(
            f"{base / 'split_tasks.json'}: {split} names unknown tasks {missing}"
        )
    tools = TAU2_TOOLS if domain == "airline" else retail_tau2.TAU2_TOOLS
    policy = read_text(base / "policy.md")
    return Domain(
        name=f"tau2:{domain}",
        tables=tables,
        tools=tools,
        tasks=[by_id[i] for i in wanted],
        policy=policy,
        system_prompt=agent_system_prompt(policy, root),
        unknown_tool=lambda name: f"Error: Tool '{name}' not found.",
        text_with_calls_counts=True,
        # tau2-bench's orchestrator: a transfer is an ordinary tool call (the
        # user simulator then says ###TRANSFER###), 100 steps, 10 tool errors,
        # and the agent's chat opens with the orchestrator's greeting.
        terminate_tools=(),
        rules=TAU2_BENCH_RULES,
    )

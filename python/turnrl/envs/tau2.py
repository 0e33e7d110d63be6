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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from turnrl.envs import retail_tau2
from turnrl.envs._base import TAU2_BENCH_RULES, Action, Domain, Task, read_json, read_text
from turnrl.envs.airline_tau2 import TAU2_TOOLS
from turnrl.exceptions import InvalidInputError

SPLITS = ("train", "test", "base")
_DB_CACHE: dict[str, dict[str, Any]] = {}


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


def _instruction(scenario: dict[str, Any]) -> str:
    """The user simulator's instruction text from a tau2 ``user_scenario``."""
    inst = scenario.get("instructions")
    if isinstance(inst, str):
        parts = [inst]
    else:
        inst = inst or {}
        parts = []
        for key, title in (
            ("domain", "Domain"),
            ("reason_for_call", "Reason for call"),
            ("known_info", "Known info"),
            ("unknown_info", "Unknown info"),
            ("task_instructions", "Task instructions"),
        ):
            if inst.get(key):
                parts.append(f"{title}:\n{inst[key]}")
    if scenario.get("persona"):
        parts.insert(0, f"Persona:\n{scenario['persona']}")
    return "\n\n".join(parts)


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


def _task(raw: Any, where: str, domain: str, split: str) -> Task:
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
    return Task(
        id=f"{domain}/{split}/{raw['id']}",
        user_id=_user_id(raw),
        instruction=_instruction(raw.get("user_scenario") or {}),
        actions=tuple(actions),
        communicate_info=tuple(str(c) for c in crit.get("communicate_info") or ()),
        reward_basis=basis,
        facts={
            "tau2_id": raw["id"],
            "nl_assertions": list(crit.get("nl_assertions") or []),
            "description": raw.get("description"),
        },
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
    by_id = {}
    for i, raw in enumerate(raw_tasks):
        t = _task(raw, f"{base / 'tasks.json'}: task {i}", domain, split)
        by_id[str(raw["id"])] = t
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise InvalidInputError(
            f"{base / 'split_tasks.json'}: {split} names unknown tasks {missing}"
        )
    tools = TAU2_TOOLS if domain == "airline" else retail_tau2.TAU2_TOOLS
    return Domain(
        name=f"tau2:{domain}",
        tables=tables,
        tools=tools,
        tasks=[by_id[i] for i in wanted],
        policy=read_text(base / "policy.md"),
        unknown_tool=lambda name: f"Error: Tool '{name}' not found.",
        text_with_calls_counts=True,
        # tau2-bench's orchestrator: a transfer is an ordinary tool call (the
        # user simulator then says ###TRANSFER###), 100 steps, 10 tool errors.
        terminate_tools=(),
        rules=TAU2_BENCH_RULES,
    )

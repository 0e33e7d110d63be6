"""Domains, tasks, episodes and the tau-bench reward."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Any, Literal

from turnrl.envs._db import Json, Store, copy_json
from turnrl.exceptions import InvalidInputError, TurnrlIOError

__all__ = [
    "Action",
    "Domain",
    "Episode",
    "EpisodeRules",
    "RewardResult",
    "Task",
    "ToolSpec",
    "pass_hat_k",
]

RESPOND = "respond"
STOP_TOKEN = "###STOP###"
# tau2-bench's user simulator also ends a conversation with these.
TRANSFER_TOKEN = "###TRANSFER###"
OUT_OF_SCOPE_TOKEN = "###OUT-OF-SCOPE###"
# What the agent "said" first in both benchmarks' chats, before the user's
# opening line: tau2-bench's orchestrator puts it in the agent's chat too.
AGENT_GREETING = "Hi! How can I help you today?"
ToolKind = Literal["read", "write"]


@dataclass(frozen=True)
class EpisodeRules:
    """How an episode of a domain ends, as its benchmark's own loop ends it.

    * ``max_steps``: the default step limit of :func:`turnrl.envs.run_episode`.
    * ``step_unit``: what a step is. ``"assistant"`` (tau-bench): one assistant
      message. ``"message"`` (tau2-bench's orchestrator): every user message,
      every assistant message, and every execution of an assistant message's
      tool calls; the limits are checked after each step that does not wait
      for tools, and a limit reached there ends the episode with reward 0,
      even when the user stopped in that same step.
    * ``max_errors``: tool errors after which the episode ends with reward 0
      (tau2-bench: 10); None for no limit.
    * ``stop_tokens``: a user message holding one ends the episode.
    * ``stop_on_opening``: whether that holds for the user's first message
      too. tau2-bench's orchestrator checks every user message; tau-bench
      checks only the replies (its agent loop never looks at what ``reset``
      returns), so there the agent answers an opening that holds one.
    * ``greeting``: an assistant message the agent is shown before the user's
      opening line (tau2-bench's orchestrator starts every chat with
      :data:`AGENT_GREETING`), or None (tau-bench: the chat starts with the
      user). It is no turn of the record: never trained, never labelled,
      and no step (tau2 counts it as none).
    """

    max_steps: int = 30
    step_unit: Literal["assistant", "message"] = "assistant"
    max_errors: int | None = None
    stop_tokens: tuple[str, ...] = (STOP_TOKEN,)
    greeting: str | None = None
    stop_on_opening: bool = False


TAU_BENCH_RULES = EpisodeRules()
TAU2_BENCH_RULES = EpisodeRules(
    max_steps=100,
    step_unit="message",
    max_errors=10,
    stop_tokens=(STOP_TOKEN, TRANSFER_TOKEN, OUT_OF_SCOPE_TOKEN),
    greeting=AGENT_GREETING,
    stop_on_opening=True,
)


@dataclass(frozen=True)
class Action:
    """One gold action: a tool name and its keyword arguments."""

    name: str
    kwargs: Mapping[str, Any]

    def as_call(self) -> dict[str, Any]:
        """The action as a ``{"name", "arguments"}`` tool call (a copy)."""
        return {"name": self.name, "arguments": copy_json(dict(self.kwargs))}


@dataclass(frozen=True)
class Task:
    """One task: what the simulated user wants, and what solving it must do.

    ``outputs`` are strings an agent message must contain (tau-bench);
    ``communicate_info`` the same for tau2-bench, and ``reward_basis`` which
    checks count (``"DB"``, ``"COMMUNICATE"``; tau-bench tasks use both).
    ``instruction`` is what the simulated user is told to do (tau-bench: the
    task's instruction; tau2-bench: its ``user_scenario`` rendered as tau2
    renders it). ``user_system_prompt`` is the whole system message the
    benchmark's own LLM user simulator is shown for the task, where it
    differs from tau-bench's layout (tau2-bench tasks), else None:
    :class:`turnrl.envs.LLMUser` then fills its template with ``instruction``
    (tau-bench's, unless given its own). It holds the instruction: a task
    made from a tau2 task with another ``instruction`` (``dataclasses.replace``)
    needs its own ``user_system_prompt`` too (None, or
    :func:`turnrl.envs.users.tau2_user_system_prompt`), or the user is still
    shown the old scenario.
    """

    id: str
    user_id: str
    instruction: str
    actions: tuple[Action, ...]
    outputs: tuple[str, ...] = ()
    communicate_info: tuple[str, ...] = ()
    reward_basis: tuple[str, ...] = ("DB", "OUTPUTS")
    facts: Mapping[str, Any] = field(default_factory=dict)
    user_system_prompt: str | None = None

    @property
    def gold_actions(self) -> list[dict[str, Any]]:
        """Gold actions as ``{"name", "arguments"}`` dicts (copies)."""
        return [a.as_call() for a in self.actions]


@dataclass(frozen=True)
class RewardResult:
    """The episode reward and its parts.

    ``db_match`` is None when the task's reward does not check the database;
    ``missing_outputs`` lists required outputs no agent message contained.
    """

    reward: float
    db_match: bool | None
    outputs: dict[str, bool]
    missing_outputs: list[str]
    #: tau2-bench's natural-language assertions and whether a judge found each
    #: met; None where none were judged.
    nl_assertions: dict[str, bool] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form, for logs and rollout records."""
        out: dict[str, Any] = {
            "reward": self.reward,
            "db_match": self.db_match,
            "outputs": dict(self.outputs),
            "missing_outputs": list(self.missing_outputs),
        }
        if self.nl_assertions is not None:
            out["nl_assertions"] = dict(self.nl_assertions)
        return out


ToolFn = Callable[..., str]


@dataclass(frozen=True)
class ToolSpec:
    """A tool: its implementation, schema, and whether it can change the database.

    ``fn(store, **arguments)`` returns the observation string or raises; the
    episode turns exceptions into ``Error: ...``. ``invoke_name`` is the name
    tau-bench's argument errors mention (``BookReservation.invoke``).

    The benchmark's own call passes arguments of its own beside the agent's;
    an agent argument of the same name fails there, before the tool runs, with
    Python's text naming the called function. ``call_keywords`` maps each
    keyword the call passes to the module-qualified function Python names
    (tau-bench: ``data``, naming ``tau_bench.envs.airline.tools.
    book_reservation.BookReservation.invoke``); ``wrapper_params`` maps the
    parameters of a wrapper the arguments go through to its name (tau2-bench:
    ``self`` and ``tool_name`` of ``Environment.make_tool_call``).
    """

    name: str
    kind: ToolKind
    fn: ToolFn
    description: str
    params: Mapping[str, Mapping[str, Any]]
    required: tuple[str, ...]
    invoke_name: str
    checkout_schema: Mapping[str, Any] | None = None
    call_keywords: Mapping[str, str] = field(default_factory=dict)
    wrapper_params: Mapping[str, str] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        """OpenAI function schema, with the read/write tag as ``kind`` beside it.

        The schema read from the user's checkout when there was one (the exact
        text the benchmark shows its agents), else our own.
        """
        if self.checkout_schema is not None:
            return {**copy_json(dict(self.checkout_schema)), "kind": self.kind}
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": copy_json(dict(self.params)),
                    "required": list(self.required),
                },
            },
            "kind": self.kind,
        }


def _argument_error(spec: ToolSpec, arguments: Mapping[str, Any]) -> str | None:
    """The TypeError text Python gives the benchmark's call of the tool
    (tau-bench's ``invoke(data=..., **arguments)``, tau2-bench's
    ``make_tool_call(name, requestor=..., **arguments)``), in Python's order:
    a clash with the call's own keywords wherever it is, then the first clash
    with a wrapper's parameters, then the first unknown argument, then the
    missing ones."""
    for key in arguments:
        if key in spec.call_keywords:
            return f"{spec.call_keywords[key]}() got multiple values for keyword argument '{key}'"
    for key in arguments:
        if key in spec.wrapper_params:
            return f"{spec.wrapper_params[key]}() got multiple values for argument '{key}'"
    where = f"{spec.invoke_name}()"
    for key in arguments:
        if key not in spec.params:
            return f"{where} got an unexpected keyword argument '{key}'"
    missing = [p for p in spec.params if p not in arguments]
    if not missing:
        return None
    quoted = [f"'{m}'" for m in missing]
    if len(quoted) == 1:
        names = quoted[0]
    elif len(quoted) == 2:
        names = f"{quoted[0]} and {quoted[1]}"
    else:
        names = ", ".join(quoted[:-1]) + f", and {quoted[-1]}"
    plural = "argument" if len(missing) == 1 else "arguments"
    return f"{where} missing {len(missing)} required positional {plural}: {names}"


def _normalize_taubench(text: str) -> str:
    return text.lower().replace(",", "")


class Episode:
    """One attempt at a task: a private database state plus the agent's actions.

    ``call`` runs a tool and returns its observation; errors come back as text.
    ``say`` records a message to the user. ``done`` turns true after a
    terminating tool (tau-bench's transfer to a human) or ``hear`` of a stop
    token of the domain's :class:`EpisodeRules`.
    """

    def __init__(self, domain: Domain, task: Task) -> None:
        self.domain = domain
        self.task = task
        self.store = Store(domain.tables)
        self.actions: list[Action] = []
        self._said: list[str] = []
        self.done = False
        self.last_error = False

    def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> str:
        """Run tool ``name``; the caller's ``arguments`` are never modified."""
        if arguments is None:
            arguments = {}
        args = copy_json(dict(arguments)) if isinstance(arguments, Mapping) else arguments
        self.actions.append(Action(name, args if isinstance(args, dict) else {}))
        # The tool gets its own copy: tools keep parts of their arguments in
        # the database (a booking's payment list), which must not alias the
        # record of the call.
        tool_args = copy_json(args) if isinstance(args, dict) else args
        obs, self.last_error = self.domain._invoke(self.store, name, tool_args)
        if name in self.domain.terminate_tools:
            self.done = True
        return obs

    def say(self, text: str) -> None:
        """Record an agent message to the user (checked for required outputs)."""
        message = "" if text is None else str(text)
        self.actions.append(Action(RESPOND, {"content": message}))
        self._said.append(message)

    def say_with_calls(self, text: str) -> None:
        """Record text the agent sent together with tool calls. It is not a
        message to the user and adds no action, but where the domain's reward
        reads every agent text (tau2-bench's communicate check) it counts."""
        if text and self.domain.text_with_calls_counts:
            self._said.append(str(text))

    def hear(self, text: str) -> None:
        """Record the user's reply; a stop token of the domain's rules in it
        (``###STOP###``; in tau2-bench domains also ``###TRANSFER###`` and
        ``###OUT-OF-SCOPE###``) ends the episode."""
        if any(token in (text or "") for token in self.domain.rules.stop_tokens):
            self.done = True

    @property
    def agent_messages(self) -> list[str]:
        """Everything the agent said to the user, in order (and, in tau2-bench
        domains, the text it sent together with tool calls)."""
        # Only what `say` recorded: a tool call that happens to be named
        # "respond" was answered "Unknown action" and said nothing.
        return list(self._said)

    def reward(self) -> RewardResult:
        """tau-bench's reward: database equal to the gold replay, and every output said."""
        return self.domain.score(self.task, self.store, self.agent_messages)


class Domain:
    """A set of tools over a database, a policy, and tasks with gold actions.

    ``system_prompt`` is the system message the benchmark's agent is shown:
    the policy itself unless given (tau-bench), the policy wrapped in
    tau2-bench's agent instructions for ``tau2:*`` domains.
    """

    def __init__(
        self,
        name: str,
        tables: dict[str, dict[str, Json]],
        tools: Sequence[ToolSpec],
        tasks: Sequence[Task],
        policy: str,
        terminate_tools: Iterable[str] = ("transfer_to_human_agents",),
        unknown_tool: Callable[[str], str] = lambda name: f"Unknown action {name}",
        text_with_calls_counts: bool = False,
        rules: EpisodeRules = TAU_BENCH_RULES,
        system_prompt: str | None = None,
    ) -> None:
        self.name = name
        self._system_prompt = system_prompt
        self.rules = rules
        # tau2-bench checks every assistant message with text for the
        # information to communicate, those that also call tools included;
        # tau-bench only its respond actions.
        self.text_with_calls_counts = text_with_calls_counts
        self.tables = tables
        self.policy = policy
        self.tasks = list(tasks)
        self.terminate_tools = frozenset(terminate_tools)
        self._specs = {t.name: t for t in tools}
        self._unknown_tool = unknown_tool
        self._gold: dict[str, Store] = {}

    @property
    def system_prompt(self) -> str:
        """The agent's system message: :func:`turnrl.envs.run_episode` sends it,
        and training re-renders chats with it (``turnrl.train.build_batch``'s
        ``system``)."""
        return self.policy if self._system_prompt is None else self._system_prompt

    @property
    def tools(self) -> list[dict[str, Any]]:
        """OpenAI function schemas, each with ``kind`` ("read" or "write") beside it."""
        return [t.schema() for t in self._specs.values()]

    def openai_tools(self) -> list[dict[str, Any]]:
        """Schemas without the ``kind`` tag, to send to a chat completions API."""
        return [{k: v for k, v in t.items() if k != "kind"} for t in self.tools]

    @property
    def tool_kinds(self) -> dict[str, str]:
        """Tool name -> "read" | "write"."""
        return {n: t.kind for n, t in self._specs.items()}

    def task(self, ref: int | str | Task) -> Task:
        """A task by index, id, or itself."""
        if isinstance(ref, Task):
            return ref
        if isinstance(ref, int):
            if not 0 <= ref < len(self.tasks):
                raise InvalidInputError(
                    f"{self.name}: task index {ref} out of range (0..{len(self.tasks) - 1})"
                )
            return self.tasks[ref]
        for t in self.tasks:
            if t.id == ref:
                return t
        raise InvalidInputError(f"{self.name}: no task with id {ref!r}")

    def new_episode(self, task: int | str | Task) -> Episode:
        """A fresh episode on the task; costs an empty overlay, not a database copy."""
        return Episode(self, self.task(task))

    def _invoke(self, store: Store, name: str, args: Any) -> tuple[str, bool]:
        spec = self._specs.get(name)
        if spec is None:
            return self._unknown_tool(name), True
        if not isinstance(args, dict):
            return "Error: arguments must be a JSON object", True
        problem = _argument_error(spec, args)
        if problem is not None:
            return f"Error: {problem}", True
        try:
            obs = spec.fn(store, **args)
        except Exception as e:
            return f"Error: {e}", True
        obs = str(obs)
        return obs, obs.startswith("Error")

    def replay(self, task: int | str | Task) -> tuple[Store, list[str]]:
        """Run the gold actions on a fresh state: (final state, observations).

        Terminating tools are skipped, as tau-bench's reward does.
        """
        t = self.task(task)
        store = Store(self.tables)
        observations = []
        for action in t.actions:
            if action.name in self.terminate_tools or action.name == RESPOND:
                continue
            args = copy_json(dict(action.kwargs))
            observations.append(self._invoke(store, action.name, args)[0])
        return store, observations

    def gold_state(self, task: Task) -> Store:
        """The cached state after the task's gold actions."""
        store = self._gold.get(task.id)
        if store is None:
            store = self.replay(task)[0]
            self._gold[task.id] = store
        return store

    def score(self, task: Task, store: Store, agent_messages: Sequence[str]) -> RewardResult:
        """The reward of a final state and agent messages on ``task``."""
        reward = 1.0
        db_match: bool | None = None
        if "DB" in task.reward_basis:
            db_match = store.same_as(self.gold_state(task))
            if not db_match:
                reward = 0.0
        # tau-bench (outputs) and tau2 (communicate_info) match alike: the
        # string lower-cased, inside a lower-cased message with commas removed.
        required: list[str] = []
        if "OUTPUTS" in task.reward_basis:
            required += task.outputs
        if "COMMUNICATE" in task.reward_basis:
            required += task.communicate_info
        said = [_normalize_taubench(m) for m in agent_messages]
        outputs = {out: any(out.lower() in m for m in said) for out in required}
        missing = [o for o, found in outputs.items() if not found]
        if missing:
            reward = 0.0
        return RewardResult(reward, db_match, outputs, missing)


def pass_hat_k(results: Iterable[Any], k: int) -> float:
    """tau-bench's pass^k: mean over tasks of C(c, k) / C(n, k).

    ``results`` holds one entry per (task, trial): a dict or object with
    ``task_id`` and ``reward`` (and ``trial``), or a ``(task_id, reward)`` pair.
    ``n`` is the number of distinct trials (or, without trial ids, the number
    of results per task, which must then be equal); ``c`` the task's successes
    (reward within 1e-6 of 1).
    """
    successes: dict[Any, int] = {}
    counts: dict[Any, int] = {}
    trials: set[Any] = set()
    have_trials = True
    for i, r in enumerate(results):
        if isinstance(r, Mapping):
            task_id, reward, trial = r.get("task_id"), r.get("reward"), r.get("trial")
        elif isinstance(r, tuple):
            task_id, reward, trial = r[0], r[1], (r[2] if len(r) > 2 else None)
        else:
            task_id = getattr(r, "task_id", None)
            reward = getattr(r, "reward", None)
            trial = getattr(r, "trial", None)
        if task_id is None or reward is None:
            raise InvalidInputError(f"pass_hat_k: result {i} has no task_id or reward")
        ok = (1 - 1e-6) <= float(reward) <= (1 + 1e-6)
        successes[task_id] = successes.get(task_id, 0) + int(ok)
        counts[task_id] = counts.get(task_id, 0) + 1
        if trial is None:
            have_trials = False
        else:
            trials.add(trial)
    if not successes:
        raise InvalidInputError("pass_hat_k: no results")
    if have_trials:
        n = len(trials)
    else:
        sizes = set(counts.values())
        if len(sizes) != 1:
            raise InvalidInputError(
                f"pass_hat_k: tasks have different numbers of results {sorted(sizes)}; "
                "give trial ids"
            )
        n = sizes.pop()
    if not 1 <= k <= n:
        raise InvalidInputError(f"pass_hat_k: k={k} must be in 1..{n} (number of trials)")
    return sum(comb(c, k) / comb(n, k) for c in successes.values()) / len(successes)


def pass_hat_ks(trials: int) -> list[int]:
    """The k to show pass^k at for ``trials`` trials per task: 1, 2, 4, ... and ``trials``."""
    return sorted({1, trials} | {2**i for i in range(1, trials.bit_length())})


# --- reading data -------------------------------------------------------------


def read_json(path: Path) -> Any:
    """Parse a JSON file, naming the file in any error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise TurnrlIOError(f"{path}: not found") from e
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{path}: line {e.lineno} column {e.colno}: {e.msg}") from e


def read_text(path: Path) -> str:
    """Read a text file, naming it in any error."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise TurnrlIOError(f"{path}: not found") from e


def _literal(node: ast.AST, path: Path, what: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError as e:
        raise InvalidInputError(
            f"{path}:{getattr(node, 'lineno', '?')}: {what} is not a literal ({e})"
        ) from e


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name):
            return node.func.id
        if isinstance(node.func, ast.Attribute):
            return node.func.attr
    return None


def read_tool_schemas(tools_dir: Path) -> dict[str, dict[str, Any]]:
    """Tool schemas from a tau-bench checkout's ``tools/*.py`` (``get_info``'s literal).

    Read with ``ast``; a file whose ``get_info`` does not return a literal
    dict is skipped. Empty when the folder is absent.
    """
    schemas: dict[str, dict[str, Any]] = {}
    if not tools_dir.is_dir():
        return schemas
    for path in sorted(tools_dir.glob("*.py")):
        try:
            tree = ast.parse(read_text(path), filename=str(path))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "get_info":
                for stmt in node.body:
                    if isinstance(stmt, ast.Return) and stmt.value is not None:
                        try:
                            info = ast.literal_eval(stmt.value)
                        except ValueError:
                            continue
                        name = (
                            info.get("function", {}).get("name") if isinstance(info, dict) else None
                        )
                        if isinstance(name, str):
                            schemas[name] = info
    return schemas


def read_task_file(path: Path, prefix: str) -> list[Task]:
    """Tasks from a tau-bench ``tasks_*.py`` file, read with ``ast`` (never executed).

    The file holds ``NAME = [Task(user_id=..., instruction=..., actions=[Action(
    name=..., kwargs={...}), ...], outputs=[...]), ...]``; every field must be a
    literal.
    """
    source = read_text(path)
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as e:
        raise InvalidInputError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from e
    task_nodes: list[ast.Call] | None = None
    for stmt in tree.body:
        value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.List) and value.elts and _call_name(value.elts[0]) == "Task":
            task_nodes = value.elts  # type: ignore[assignment]
            break
    if task_nodes is None:
        raise InvalidInputError(f"{path}: no module-level list of Task(...) found")
    tasks = []
    for i, node in enumerate(task_nodes):
        if _call_name(node) != "Task" or node.args:
            raise InvalidInputError(f"{path}:{node.lineno}: task {i} is not Task(key=value, ...)")
        fields: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg == "actions":
                if not isinstance(kw.value, ast.List):
                    raise InvalidInputError(f"{path}:{kw.value.lineno}: actions is not a list")
                actions = []
                for a in kw.value.elts:
                    if _call_name(a) != "Action":
                        raise InvalidInputError(f"{path}:{a.lineno}: action is not Action(...)")
                    akw = {k.arg: _literal(k.value, path, f"Action {k.arg}") for k in a.keywords}  # type: ignore[union-attr]
                    if not isinstance(akw.get("name"), str) or not isinstance(
                        akw.get("kwargs", {}), dict
                    ):
                        raise InvalidInputError(f"{path}:{a.lineno}: Action needs name and kwargs")
                    actions.append(Action(akw["name"], akw.get("kwargs", {})))
                fields["actions"] = tuple(actions)
            elif kw.arg is not None:
                fields[kw.arg] = _literal(kw.value, path, f"Task {kw.arg}")
        for required in ("user_id", "instruction"):
            if not isinstance(fields.get(required), str):
                raise InvalidInputError(f"{path}:{node.lineno}: task {i} has no {required}")
        tasks.append(
            Task(
                id=f"{prefix}/{i}",
                user_id=fields["user_id"],
                instruction=fields["instruction"],
                actions=fields.get("actions", ()),
                outputs=tuple(fields.get("outputs") or ()),
                facts={"annotator": fields.get("annotator")},
            )
        )
    return tasks

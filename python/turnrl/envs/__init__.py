"""tau-bench compatible environments for tool-calling agents.

``load("taubench:airline", root=...)`` gives a :class:`Domain`: its policy
text, tool schemas (each tagged read/write), tasks with gold actions, and
``new_episode(task)``. An :class:`Episode` runs tools on its own copy-on-write
view of the database and scores itself exactly as tau-bench does.

Domains: ``taubench:airline`` (split test), ``taubench:retail`` (train, dev,
test), ``tau2:airline`` and ``tau2:retail`` (train, test, base), and
``synthetic:airline`` (generated from a seed; needs no data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from turnrl.envs._base import (
    Action,
    Domain,
    Episode,
    EpisodeRules,
    RewardResult,
    Task,
    ToolSpec,
    pass_hat_k,
)
from turnrl.envs.agents import AgentError, ContextLengthExceeded, OpenAIAgent
from turnrl.envs.judge import JudgeError, LLMJudge, NLJudge
from turnrl.envs.runner import run_episode
from turnrl.envs.users import LLMUser, ScriptedUser, UserSimulatorError
from turnrl.exceptions import InvalidInputError, UnknownNameError

__all__ = [
    "Action",
    "AgentError",
    "ContextLengthExceeded",
    "Domain",
    "Episode",
    "EpisodeRules",
    "JudgeError",
    "LLMJudge",
    "LLMUser",
    "NLJudge",
    "OpenAIAgent",
    "RewardResult",
    "ScriptedUser",
    "Task",
    "ToolSpec",
    "UserSimulatorError",
    "domain_names",
    "load",
    "pass_hat_k",
    "run_episode",
]

_NAMES = (
    "taubench:airline",
    "taubench:retail",
    "tau2:airline",
    "tau2:retail",
    "synthetic:airline",
)


# What synthetic:airline takes: the seed and turnrl.envs.synthetic.generate's sizes.
_SYNTHETIC_OPTIONS = ("seed", "n_users", "n_routes", "n_tasks")


def domain_names() -> list[str]:
    """Names ``load`` accepts."""
    return list(_NAMES)


def load(name: str, root: str | Path | None = None, split: str | None = None, **kw: Any) -> Domain:
    """Load a domain by name.

    ``root`` is a tau-bench checkout for ``taubench:*`` and a tau2-bench
    checkout for ``tau2:*`` (required for both; nothing is bundled). ``split``
    defaults to ``"test"``. ``synthetic:airline`` takes ``seed`` and the sizes
    documented in :func:`turnrl.envs.synthetic.generate`, and refuses other
    options as the other families do. ``taubench:*``
    takes ``schemas="auto"`` (use the checkout's own tool schemas when its
    ``tools/*.py`` are present) or ``"builtin"``. ``tau2:*`` refuses
    ``schemas``: tau2-bench builds its tool schemas by running its own code,
    which turnrl never runs, so its domains always show turnrl's schemas.
    """
    family, _, domain = name.partition(":")
    if name not in _NAMES:
        raise UnknownNameError(f"unknown environment {name!r}; known: {list(_NAMES)}")
    if family == "synthetic":
        from turnrl.envs import synthetic

        unknown = sorted(set(kw) - set(_SYNTHETIC_OPTIONS))
        if unknown:
            raise InvalidInputError(
                f"{name}: unexpected options {unknown}; it takes "
                f"{', '.join(_SYNTHETIC_OPTIONS[:-1])} and {_SYNTHETIC_OPTIONS[-1]}"
            )
        return synthetic.load(split=split, **kw)
    if family == "tau2" and "schemas" in kw:
        # No value could be honoured: tau2-bench's schemas exist only once its
        # code has run (they are built from its tool functions' signatures).
        raise InvalidInputError(
            f"{name}: schemas={kw['schemas']!r} is for taubench:* domains only; tau2-bench "
            "builds its tool schemas by running its own code, which turnrl never runs, so "
            "tau2 domains always show turnrl's own schemas (leave schemas out)"
        )
    schemas = kw.pop("schemas", "auto")
    if kw:
        raise InvalidInputError(f"{name}: unexpected options {sorted(kw)}")
    if root is None:
        checkout = {"taubench": "tau-bench", "tau2": "tau2-bench"}.get(family, family)
        raise InvalidInputError(
            f"{name}: root (the path of a {checkout} checkout; --root of the turnrl commands) "
            "is required"
        )
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"{name}: root {root} is not a directory")
    if family == "taubench":
        from turnrl.envs import taubench

        return taubench.load(domain, root, split, schemas=schemas)
    from turnrl.envs import tau2

    return tau2.load(domain, root, split)

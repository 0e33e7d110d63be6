"""Loading tau-bench (v1) domains from a user's checkout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from turnrl.envs import airline, retail
from turnrl.envs._base import Domain, read_json, read_task_file, read_text, read_tool_schemas
from turnrl.exceptions import InvalidInputError

SPLITS = {"airline": ("test",), "retail": ("train", "dev", "test")}
TABLES = {
    "airline": ("flights", "reservations", "users"),
    "retail": ("orders", "products", "users"),
}
TOOLS = {"airline": airline.V1_TOOLS, "retail": retail.V1_TOOLS}

# Parsed tables are immutable once loaded (episodes write to overlays), so
# every domain loaded from the same files shares them.
_TABLE_CACHE: dict[tuple[str, ...], dict] = {}


def load_tables(data_dir: Path, names: tuple[str, ...]) -> dict:
    """The domain's JSON tables, parsed once per process and shared."""
    paths = [data_dir / f"{n}.json" for n in names]
    key = tuple(f"{p.resolve()}:{p.stat().st_mtime_ns}" if p.exists() else str(p) for p in paths)
    tables = _TABLE_CACHE.get(key)
    if tables is None:
        tables = {n: read_json(p) for n, p in zip(names, paths, strict=False)}
        for n, p in zip(names, paths, strict=False):
            if not isinstance(tables[n], dict):
                raise InvalidInputError(f"{p}: expected a JSON object keyed by id")
        _TABLE_CACHE[key] = tables
    return tables


def load(domain: str, root: Path, split: str | None, schemas: str = "auto") -> Domain:
    """``taubench:<domain>`` from ``root`` (a tau-bench checkout).

    ``schemas="auto"`` shows the agent the tool schemas of the checkout's
    ``tools/*.py`` when it has them (tau-bench's exact wording), else ours;
    ``"builtin"`` always uses ours. Tool behaviour is ours either way.
    """
    if schemas not in ("auto", "builtin"):
        raise InvalidInputError(f"taubench: schemas must be 'auto' or 'builtin', not {schemas!r}")
    if domain not in SPLITS:
        raise InvalidInputError(f"taubench: unknown domain {domain!r}; known: {sorted(SPLITS)}")
    split = split or "test"
    if split not in SPLITS[domain]:
        raise InvalidInputError(
            f"taubench:{domain}: unknown split {split!r}; known: {list(SPLITS[domain])}"
        )
    base = root / "tau_bench" / "envs" / domain
    tables = load_tables(base / "data", TABLES[domain])
    tasks = read_task_file(base / f"tasks_{split}.py", f"{domain}/{split}")
    tools = TOOLS[domain]
    if schemas == "auto":
        found = read_tool_schemas(base / "tools")
        tools = [dataclasses.replace(t, checkout_schema=found.get(t.name)) for t in tools]
    return Domain(
        name=f"taubench:{domain}",
        tables=tables,
        tools=tools,
        tasks=tasks,
        policy=read_text(base / "wiki.md"),
    )

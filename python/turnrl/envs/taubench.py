"""Loading tau-bench (v1) domains from a user's checkout."""

from __future__ import annotations

from pathlib import Path

from turnrl.envs import airline, retail
from turnrl.envs._base import Domain, read_json, read_task_file, read_text
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


def load(domain: str, root: Path, split: str | None) -> Domain:
    """``taubench:<domain>`` from ``root`` (a tau-bench checkout)."""
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
    return Domain(
        name=f"taubench:{domain}",
        tables=tables,
        tools=TOOLS[domain],
        tasks=tasks,
        policy=read_text(base / "wiki.md"),
    )

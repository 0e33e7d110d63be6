"""Plain recursive Python reference of turnrl's argument comparison rules.

Written independently of the Rust core (see python/turnrl/args.py for the
rules): the tests compare the two on random nested JSON, and the benchmark
uses it as the baseline. Canonical values are tuples:
``NULL`` | ("b", bool) | ("n", Decimal) | ("s", str) | ("l", items) |
("bag", ((orig_index, item), ...) sorted) | ("m", ((key, value), ...) sorted).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from fractions import Fraction
from typing import Any

NULL = None
# Unicode White_Space, which Rust's str::trim uses (str.strip() differs).
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
PLAIN_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def segment(seg: str | int, first: bool, wildcard: bool = False) -> str:
    if isinstance(seg, int):
        return "[*]" if wildcard else f"[{seg}]"
    if IDENTIFIER.fullmatch(seg):
        return seg if first else "." + seg
    return "[" + json.dumps(seg, ensure_ascii=False) + "]"


def format_path(segs: list[str | int]) -> str:
    out = "".join(segment(s, i == 0) for i, s in enumerate(segs))
    return out or "$"


def _is_path_entry(entry: str) -> bool:
    return entry == "$" or "." in entry or "[" in entry


def canon(v: Any, case_fold: bool = False, unordered: tuple[str, ...] = ()) -> Any:
    names = {e for e in unordered if not _is_path_entry(e)}
    paths = {e for e in unordered if _is_path_entry(e)}
    return _canon(v, case_fold, names, paths, None, "")


def _canon(v, case_fold, names, paths, key, wpath):
    if v is None:
        return NULL
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, int):
        return ("n", Decimal(v))
    if isinstance(v, float):
        return ("n", Decimal(repr(v)))
    if isinstance(v, str):
        t = v.strip(WHITE_SPACE)
        if not t:
            return NULL
        if PLAIN_DECIMAL.fullmatch(t):
            return ("n", Decimal(t))
        return ("s", t.lower() if case_fold else t)
    if isinstance(v, (list, tuple)):
        if not v:
            return NULL
        unordered = (key is not None and key in names) or (wpath or "$") in paths
        items = [_canon(x, case_fold, names, paths, None, wpath + "[*]") for x in v]
        if unordered:
            bag = sorted(enumerate(items), key=lambda p: sort_key(p[1]))
            return ("bag", tuple(bag))
        return ("l", tuple(items))
    if isinstance(v, dict):
        entries = []
        for k, x in v.items():
            c = _canon(x, case_fold, names, paths, k, wpath + segment(k, wpath == "", True))
            if c is not NULL:
                entries.append((k, c))
        if not entries:
            return NULL
        entries.sort(key=lambda e: e[0])
        return ("m", tuple(entries))
    raise TypeError(type(v))


def sort_key(c):
    if c is NULL:
        return (0,)
    tag = c[0]
    if tag == "b":
        return (1, c[1])
    if tag == "n":
        return (2, c[1])
    if tag == "s":
        return (3, c[1])
    if tag == "l":
        return (4, tuple(sort_key(x) for x in c[1]))
    if tag == "bag":
        return (4, tuple(sort_key(x) for _, x in c[1]))
    return (5, tuple((k, sort_key(x)) for k, x in c[1]))


def is_container(c) -> bool:
    return c is not NULL and c[0] in ("l", "bag", "m")


def leaf_count(c) -> int:
    if c is NULL or not is_container(c):
        return 1
    if c[0] == "m":
        return sum(leaf_count(x) for _, x in c[1])
    if c[0] == "l":
        return sum(leaf_count(x) for x in c[1])
    return sum(leaf_count(x) for _, x in c[1])


def _diff(p, g, path, acc):
    p_map = p is NULL or p[0] == "m"
    g_map = g is NULL or g[0] == "m"
    if p_map and g_map and not (p is NULL and g is NULL):
        pd = dict(p[1]) if p is not NULL else {}
        gd = dict(g[1]) if g is not NULL else {}
        for k in sorted(set(pd) | set(gd)):
            if k in pd and k in gd:
                _diff(pd[k], gd[k], [*path, k], acc)
            else:
                _record(acc, [*path, k], True)
        return
    if p is not NULL and g is not NULL and p[0] == "l" and g[0] == "l":
        for i in range(max(len(p[1]), len(g[1]))):
            if i < len(p[1]) and i < len(g[1]):
                _diff(p[1][i], g[1][i], [*path, i], acc)
            else:
                _record(acc, [*path, i], True)
        return
    if p is not NULL and g is not NULL and p[0] == "bag" and g[0] == "bag":
        # Greedy in original order: each gold item takes the first equal,
        # unused predicted item.
        p_items = sorted(p[1])
        g_items = sorted(g[1])
        used = [False] * len(p_items)
        lone_g = []
        for gi, gx in g_items:
            gk = sort_key(gx)
            for j, (_, px) in enumerate(p_items):
                if not used[j] and sort_key(px) == gk:
                    used[j] = True
                    break
            else:
                lone_g.append((gi, gx))
        lone_p = [item for j, item in enumerate(p_items) if not used[j]]
        paired = min(len(lone_p), len(lone_g))
        for k in range(paired):
            _diff(lone_p[k][1], lone_g[k][1], [*path, lone_g[k][0]], acc)
        for idx, _ in lone_g[paired:] + lone_p[paired:]:
            _record(acc, [*path, idx], True)
        return
    if is_container(p) or is_container(g):
        _record(acc, path, True)
        return
    if sort_key(p) != sort_key(g):
        _record(acc, path, False)


def _record(acc, path, structural):
    acc["diffs"].append(format_path(path))
    if structural:
        acc["structural"] = True
    else:
        acc["differing"] += 1


def compare_canon(p, g, soft_max_fraction: float = 0.5) -> dict[str, Any]:
    acc = {"diffs": [], "differing": 0, "structural": False}
    _diff(p, g, [], acc)
    leaves = leaf_count(g)
    if acc["structural"]:
        kind = "mismatch"
    elif acc["differing"] == 0:
        kind = "exact"
    # The fraction as the decimal it prints as (0.28 is 28/100).
    elif acc["differing"] < Fraction(repr(soft_max_fraction)) * leaves:
        kind = "soft"
    else:
        kind = "mismatch"
    return {
        "kind": kind,
        "diffs": acc["diffs"],
        "differing_leaves": acc["differing"],
        "gold_leaves": leaves,
        "structural": acc["structural"],
    }


def compare(
    pred: Any,
    gold: Any,
    case_fold: bool = False,
    unordered_keys: tuple[str, ...] = (),
    soft_max_fraction: float = 0.5,
) -> dict[str, Any]:
    """Reference of turnrl.compare_args: a dict of the result's fields."""
    return compare_canon(
        canon(pred, case_fold, unordered_keys),
        canon(gold, case_fold, unordered_keys),
        soft_max_fraction,
    )


def _decimal_public(d: Decimal) -> Any:
    sign, digits, exp = d.as_tuple()
    ds = "".join(map(str, digits)).lstrip("0")
    if not ds:
        return 0
    stripped = ds.rstrip("0")
    exp += len(ds) - len(stripped)
    ds = stripped
    neg = "-" if sign else ""
    if exp >= 0:
        n = int(ds) * 10**exp * (-1 if sign else 1)
        return n if -(2**63) <= n < 2**64 else str(n)
    frac = -exp
    if frac >= len(ds):
        plain = neg + "0." + "0" * (frac - len(ds)) + ds
    else:
        plain = neg + ds[: len(ds) - frac] + "." + ds[len(ds) - frac :]
    if len(ds) <= 17:
        x = float(plain)
        if Decimal(repr(x)) == d:
            return x
    return plain


def to_public(c) -> Any:
    """The canonical value as normalize_args returns it."""
    if c is NULL:
        return None
    tag = c[0]
    if tag == "b":
        return c[1]
    if tag == "n":
        return _decimal_public(c[1])
    if tag == "s":
        return c[1]
    if tag == "l":
        return [to_public(x) for x in c[1]]
    if tag == "bag":
        return [to_public(x) for _, x in c[1]]
    return {k: to_public(x) for k, x in c[1]}


def normalize(v: Any, case_fold: bool = False, unordered_keys: tuple[str, ...] = ()) -> Any:
    """Reference of turnrl.normalize_args."""
    return to_public(canon(v, case_fold, unordered_keys))


TIER_RANK = {"respond": 0, "read": 1, "write": 2, "soft": 3, "gold": 4, "error": 5}


def _result_text(content: Any) -> str:
    """A tool result's text: a string, or the text of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None
            for p in content
        ]
        return "".join(t for t in texts if isinstance(t, str))
    return ""


def label_tiers(turns, gold_actions, tool_kinds, soft_max_fraction=0.5):
    """Reference of turnrl.label_tiers (dict arguments only): (tiers, matched_gold)."""
    gold = [(a["name"], canon(a.get("arguments", a.get("kwargs")))) for a in gold_actions]
    gold_turn: list[int | None] = [None] * len(gold)
    soft_claimed = [False] * len(gold)
    # Results of each assistant turn's calls: the tool turns right after it.
    results: dict[int, list[str]] = {}
    current = None
    for t, turn in enumerate(turns):
        if turn["role"] == "assistant":
            current = t
            results[t] = []
        elif turn["role"] == "tool" and current is not None:
            results[current].append(_result_text(turn.get("content")))
        else:
            current = None
    tiers: list[str | None] = [None] * len(turns)
    for t, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        call_tiers = []
        for c, call in enumerate(turn.get("tool_calls") or []):
            result = results[t][c] if c < len(results[t]) else None
            if call["name"] not in tool_kinds:
                call_tiers.append("error")
                continue
            if result is not None and result.lstrip(WHITE_SPACE).startswith("Error"):
                call_tiers.append("error")
                continue
            args = canon(call.get("arguments"))
            tier = None
            best = None
            for g, (name, gargs) in enumerate(gold):
                if name != call["name"] or gold_turn[g] is not None:
                    continue
                r = compare_canon(args, gargs, soft_max_fraction)
                if r["kind"] == "exact":
                    gold_turn[g] = t
                    tier = "gold"
                    break
                if (
                    r["kind"] == "soft"
                    and not soft_claimed[g]
                    and (best is None or r["differing_leaves"] < best[1])
                ):
                    best = (g, r["differing_leaves"])
            if tier is None and best is not None:
                soft_claimed[best[0]] = True
                tier = "soft"
            call_tiers.append(tier or tool_kinds[call["name"]])
        tier = max(call_tiers, key=TIER_RANK.__getitem__, default="respond")
        if turn.get("errors"):
            tier = "error"
        tiers[t] = tier
    return tiers, [g for g, t in enumerate(gold_turn) if t is not None]

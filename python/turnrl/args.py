"""Deep comparison of tool-call arguments and reward-tier labelling.

Both sides are first brought to a canonical form (the Rust core does the
work, without the GIL):

* key order is irrelevant; keys themselves are compared exactly;
* ``None``, a missing key, ``""`` (or only white space), ``[]`` and ``{}`` are
  all "nothing": a key whose value is nothing counts as missing (in a list an
  empty element keeps its slot);
* strings are trimmed (Unicode white space) and, with ``case_fold=True``,
  lower-cased;
* ``5``, ``5.0``, ``"5"`` and ``" 5 "`` are equal, as exact decimals: a float
  counts as its shortest round-trip decimal, the one Python's ``repr``
  prints (ties go to the even digit), integers of any size keep every
  digit; numpy scalars and arrays count as the values their ``tolist()``
  gives. A string is numeric only as a plain decimal
  ``-?(0|[1-9][0-9]*)(\\.[0-9]+)?``: ``"05"``, ``"1e3"``, ``"5."``, ``".5"``,
  ``"+5"`` stay strings. Booleans are not numbers;
* list order matters, except for the lists named in ``unordered_keys``;
* nesting deeper than 256 levels is refused with an error naming the path.

Policy keywords (the same for every function here):

``case_fold`` (bool, default False)
    Lower-case string values (not keys) before comparing.
``unordered_keys`` (iterable of str, default empty)
    Lists compared as multisets. A bare name (``"payment_methods"``) matches
    a list under that key at any depth; an entry with ``.`` or ``[`` is a
    path in diff syntax with indices written ``[*]``
    (``"reservation.flights"``, ``"legs[*].seats"``); ``"$"`` is the root.
    A path written any other way (``"$.a"``, ``"legs[0]"``) could never
    match and is an error that suggests the right spelling.
``soft_max_fraction`` (float in [0, 1], default 0.5)
    A comparison whose structure agrees (key sets at every depth, list
    lengths, container kinds) is *soft* when strictly fewer than
    ``soft_max_fraction`` x (number of gold leaves) leaves differ, computed
    exactly with the fraction as the decimal it prints as (7 of 25 leaves is
    not fewer than 0.28 of them). 0.5 means "fewer than half of the gold
    values are wrong"; 0 disables soft matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from turnrl import _core
from turnrl._core import ArgComparison, TierLabels

__all__ = [
    "ArgComparison",
    "MatchKind",
    "Tier",
    "TierLabels",
    "compare_args",
    "compare_args_batch",
    "label_tiers",
    "normalize_args",
]

MatchKind = Literal["exact", "soft", "mismatch"]
Tier = Literal["gold", "soft", "read", "write", "error", "respond"]


def normalize_args(obj: Any, *, case_fold: bool = False, unordered_keys: Iterable[str] = ()) -> Any:
    """The canonical form of a JSON-like object.

    Keys sorted, empty values dropped (an empty root becomes ``None``),
    strings trimmed (and lower-cased under ``case_fold``), numeric strings
    turned into numbers, unordered lists sorted. A number comes back as an
    ``int`` when it is integral and fits 64 bits, as a ``float`` when the
    float is exactly that decimal, otherwise as its plain decimal string
    (``10**30`` -> ``"1000000000000000000000000000000"``), which compares
    equal to the number: no precision is lost. Idempotent, and
    ``compare_args(x, normalize_args(x))`` is exact.

    Raises:
        InvalidInputError: ``obj`` holds something that is not JSON (NaN,
            inf, a non-string key, a set, ...) or nests deeper than 256
            levels; the message names the path.
    """
    return _core.normalize_args(obj, case_fold, unordered_keys)


# The extension function itself: a Python layer around it cost a sixth of a
# call. Its docstring (help(compare_args)) documents it.
compare_args = _core.compare_args


def compare_args_batch(
    pairs: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]],
    *,
    case_fold: bool = False,
    unordered_keys: Iterable[str] = (),
    soft_max_fraction: float = 0.5,
) -> list[ArgComparison]:
    """:func:`compare_args` over many ``(pred, gold)`` pairs.

    Reads the pairs with the GIL, 256 at a time, and compares each chunk
    without it. Reading the Python objects is most of the cost and needs the
    GIL, so this is about as fast as a loop of :func:`compare_args` calls;
    use it to let other Python threads run meanwhile.
    """
    return _core.compare_args_batch(pairs, case_fold, unordered_keys, soft_max_fraction)


def label_tiers(
    turns: Sequence[Mapping[str, Any]],
    gold_actions: Sequence[Mapping[str, Any]],
    tool_kinds: Mapping[str, str],
    *,
    case_fold: bool = False,
    unordered_keys: Iterable[str] = (),
    soft_max_fraction: float = 0.5,
) -> TierLabels:
    """Label every assistant turn of a trajectory with a reward tier.

    Args:
        turns: the ``turns`` of a ``turnrl.rollout/1`` record. Assistant
            turns carry ``tool_calls`` (``[{"name", "arguments"}]``;
            arguments as a dict, a JSON string or missing) and optionally
            ``errors`` (parse errors). The ``tool`` turns right after an
            assistant turn are the results of its calls, in call order;
            their ``content`` is a string or OpenAI content parts (whose
            text parts are read). Other fields are ignored.
        gold_actions: the task's gold actions, ``{"name", "arguments"}``
            (tau-bench's ``"kwargs"`` is accepted too).
        tool_kinds: every tool of the domain, ``"read"`` or ``"write"``.

    Each call is labelled, in this order: ``error`` (a call that cannot be
    read: not a dict, no string name, arguments that are not a JSON object
    or hold NaN, infinity, non-string keys or too deep nesting; a tool not
    in ``tool_kinds``; or a result that starts with ``"Error"`` as
    tau-bench's do; such a call never stops the labelling of the others);
    ``gold`` (exact match to a gold
    action of the same name not yet matched: the first in task order is
    consumed, so each gold action is matched once); ``soft`` (soft match to
    a gold action not matched exactly and not yet soft-matched; it does not
    consume the action, so a later exact call is still ``gold``); else
    ``read`` / ``write`` by the tool's kind. A turn takes the highest of its
    calls' tiers by ``error > gold > soft > write > read``; a turn with
    parse ``errors`` is ``error``; one with neither calls nor errors is
    ``respond``.

    JSON-string arguments are read by Python's ``json``, so integers of any
    size keep every digit, as in dict arguments.

    Returns:
        :class:`TierLabels`: ``.tiers`` (one per turn, ``None`` for
        non-assistant turns), ``.call_tiers``, ``.matched_gold`` (indices of
        gold actions matched exactly), ``.soft_gold`` and ``.gold_turn``
        (per gold action, the turn that matched it, or ``None``).
    """
    return _core.label_tiers(
        turns,
        gold_actions,
        dict(tool_kinds),
        case_fold=case_fold,
        unordered_keys=unordered_keys,
        soft_max_fraction=soft_max_fraction,
    )

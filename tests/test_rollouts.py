"""Rollout buffers: the Rust reader against a plain json-module reader."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import turnrl
from turnrl.exceptions import InvalidInputError, TurnrlIOError
from turnrl.rollouts import DEFAULT_TIERS, NO_TIER, SCHEMA

from reference import reference_advantages

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# ---------------------------------------------------------------------------
# Reference reader: the contract of DESIGN.md "Rollout buffer file", written
# plainly with the json module.


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool) and -(2**63) <= x < 2**63


def _is_number(x):
    """A finite number the estimators take: at most 1e100 in size."""
    number = isinstance(x, (int, float)) and not isinstance(x, bool)
    return number and math.isfinite(x) and abs(x) <= 1e100


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def reference_check(raw: bytes):
    """The record of a line, or None when the line must be skipped."""
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    if obj.get("schema") != SCHEMA:
        return None
    if not isinstance(obj.get("task_id"), str) or not isinstance(obj.get("group"), str):
        return None
    if not _is_int(obj.get("sample")) or not _is_number(obj.get("outcome")):
        return None
    turns = obj.get("turns")
    if not isinstance(turns, list):
        return None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            return None
        if turn.get("tier") is not None and not isinstance(turn["tier"], str):
            return None
        if turn.get("reward") is not None and not _is_number(turn["reward"]):
            return None
    return obj


def reference_lines(path: Path):
    data = path.read_bytes()
    if data.startswith(ZSTD_MAGIC):
        data = zstandard.ZstdDecompressor().stream_reader(data).read()
    if data.endswith(b"\n"):
        data = data[:-1]
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.strip(b" \t\r\n"):
            yield number, raw


def reference_stop_reason(rec):
    """``meta["stop_reason"]`` when ``meta`` is an object and it a string, else None."""
    meta = rec.get("meta")
    if not isinstance(meta, dict):
        return None
    reason = meta.get("stop_reason")
    return reason if isinstance(reason, str) else None


def reference_read(paths):
    cols = {
        "task_id": [],
        "group": [],
        "stop_reason": [],
        "sample": [],
        "outcome": [],
        "turn_offsets": [0],
        "turn_rewards": [],
        "turn_tiers": [],
        "line": [],
        "file_index": [],
    }
    problems = []
    for file_index, path in enumerate(paths):
        for number, raw in reference_lines(Path(path)):
            rec = reference_check(raw)
            if rec is None:
                problems.append((str(path), number))
                continue
            cols["task_id"].append(rec["task_id"])
            cols["group"].append(rec["group"])
            cols["stop_reason"].append(reference_stop_reason(rec))
            cols["sample"].append(rec["sample"])
            cols["outcome"].append(float(rec["outcome"]))
            cols["line"].append(number)
            cols["file_index"].append(file_index)
            for turn in rec["turns"]:
                if turn["role"] == "assistant":
                    reward = turn.get("reward")
                    cols["turn_rewards"].append(0.0 if reward is None else float(reward))
                    cols["turn_tiers"].append(turn.get("tier"))
            cols["turn_offsets"].append(len(cols["turn_rewards"]))
    return cols, problems


def assert_same_as_reference(batch: turnrl.RolloutBatch, paths):
    ref, problems = reference_read(paths)
    assert batch.task_id == ref["task_id"]
    assert batch.group == ref["group"]
    np.testing.assert_array_equal(batch.sample, np.array(ref["sample"], dtype=np.int64))
    np.testing.assert_array_equal(batch.outcome, np.array(ref["outcome"], dtype=np.float64))
    np.testing.assert_array_equal(batch.turn_offsets, np.array(ref["turn_offsets"]))
    np.testing.assert_array_equal(batch.turn_rewards, np.array(ref["turn_rewards"], dtype=float))
    np.testing.assert_array_equal(batch.line, np.array(ref["line"]))
    np.testing.assert_array_equal(batch.file_index, np.array(ref["file_index"]))
    tiers = [None if c == NO_TIER else batch.tier_names[c] for c in batch.turn_tiers.tolist()]
    assert tiers == ref["turn_tiers"]
    assert tuple(batch.tier_names[:6]) == DEFAULT_TIERS
    # group_index is dense in first-seen order.
    first_seen = list(dict.fromkeys(ref["group"]))
    assert batch.group_names == first_seen
    np.testing.assert_array_equal(batch.group_index, [first_seen.index(g) for g in ref["group"]])
    # So are stop reasons, -1 where a record gives none.
    assert batch.stop_reason == ref["stop_reason"]
    reasons = list(dict.fromkeys(r for r in ref["stop_reason"] if r is not None))
    assert batch.stop_reason_names == reasons
    codes = [-1 if r is None else reasons.index(r) for r in ref["stop_reason"]]
    np.testing.assert_array_equal(batch.stop_reason_index, np.array(codes, dtype=np.int64))
    assert batch.stop_reason_index.dtype == np.int64
    assert batch.skipped == len(problems)
    got = [re.match(r"^(.*?):(\d+): \S", p) for p in batch.problems]
    assert [(m.group(1), int(m.group(2))) for m in got if m] == problems[:1000]
    assert batch.turn_offsets.dtype == np.int64 and batch.turn_rewards.dtype == np.float64
    assert batch.group_index.dtype == np.int64 and batch.outcome.dtype == np.float64


# ---------------------------------------------------------------------------
# Generated buffers

texts = st.text(max_size=12)
tiers = st.one_of(st.sampled_from([*DEFAULT_TIERS, "probe", "ünïcode ✈"]), st.none())
rewards = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(-5, 5),
    st.none(),
)


@st.composite
def turn(draw):
    role = draw(st.sampled_from(["assistant", "assistant", "tool", "user"]))
    t = {"role": role, "content": draw(texts)}
    if role == "assistant":
        if draw(st.booleans()):
            t["tool_calls"] = [{"name": draw(texts), "arguments": {"k": draw(texts)}}]
        if draw(st.booleans()):
            t["tier"] = draw(tiers)
        if draw(st.booleans()):
            t["reward"] = draw(rewards)
    elif role == "tool":
        t["name"] = draw(texts)
    return t


STOP_REASONS = ["user_stop", "transfer", "max_steps", "too_many_errors", "context_length"]


@st.composite
def meta(draw):
    """A record's ``meta``: often with a ``stop_reason``, sometimes one that is
    no string, nested objects (holding their own ``stop_reason``) before or
    after it, or no object at all."""
    kind = draw(st.sampled_from(["object"] * 6 + ["not_object"]))
    if kind == "not_object":
        return draw(st.sampled_from([None, "user_stop", ["stop_reason", "max_steps"], 3, True]))
    members = [("note", draw(texts))]
    if draw(st.booleans()):
        nested = {"stop_reason": draw(st.sampled_from(STOP_REASONS)), "r": [1, {"x": None}]}
        members.append(("reward_info", nested))
    if draw(st.integers(0, 3)):
        reason = draw(
            st.one_of(
                st.sampled_from(STOP_REASONS),
                st.text(max_size=8),
                st.sampled_from([None, 0, 1.5, True, ["user_stop"], {"stop_reason": "x"}]),
            )
        )
        members.insert(draw(st.integers(0, len(members))), ("stop_reason", reason))
    return dict(members)


@st.composite
def record(draw):
    rec = {
        "schema": SCHEMA,
        "task_id": draw(st.sampled_from(["a/1", "a/2", "ü/3"])),
        "group": draw(st.sampled_from(["g1", "g2", "g✈", ""])),
        "sample": draw(st.integers(-3, 2**40)),
        "outcome": draw(st.floats(allow_nan=False, allow_infinity=False, width=64)),
        "turns": draw(st.lists(turn(), max_size=6)),
    }
    if draw(st.integers(0, 7)):
        rec["meta"] = draw(meta())
    if draw(st.booleans()):
        rec["extra"] = [1, {"x": None}]
    return rec


def dumps(rec, ascii_: bool) -> str:
    return json.dumps(rec, ensure_ascii=ascii_)


RAW_METAS = [
    '{"stop_reason": "first", "stop_reason": "last"}',
    '{"stop_reason": "first", "stop_reason": 2}',
    '{"stop_re\\u0061son": "escaped key"}',
    '{"stop_reason": "user_stop"}, "meta": 5',
    '[], "meta": {"stop_reason": "second meta"}',
    '{"stop_reason": "\\ud83d\\ude00 \\"q\\" \\\\ \\u00e9\\n"}',
    '{"a": {"stop_reason": "inner"}, "stop_reason": "max_steps", "b": [{"c": "}"}]}',
    ' { "stop_reason" : "spaced" } ',
]


@st.composite
def line(draw):
    rec = draw(record())
    text = dumps(rec, draw(st.booleans()))
    kind = draw(
        st.sampled_from(
            ["ok"] * 6
            + ["truncated", "schema", "reward", "blank", "array", "missing", "float_sample"]
            + ["nan", "tier", "turn_not_object", "garbage", "raw_meta"]
        )
    )
    if kind == "truncated":
        return text[: draw(st.integers(1, len(text) - 1))]
    if kind == "schema":
        return dumps(
            {**rec, "schema": draw(st.sampled_from(["turnrl.rollout/2", "", None]))}, False
        )
    if kind == "reward":
        turns = [*rec["turns"], {"role": "assistant", "reward": draw(st.sampled_from(["1", []]))}]
        return dumps({**rec, "turns": turns}, False)
    if kind == "blank":
        return draw(st.sampled_from(["", "   ", "\t"]))
    if kind == "array":
        return "[1, 2]"
    if kind == "missing":
        key = draw(st.sampled_from(["task_id", "group", "sample", "outcome", "turns", "schema"]))
        return dumps({k: v for k, v in rec.items() if k != key}, False)
    if kind == "float_sample":
        return dumps({**rec, "sample": 1.5}, False)
    if kind == "nan":
        return dumps({**rec, "outcome": float("nan")}, False)
    if kind == "tier":
        return dumps({**rec, "turns": [{"role": "assistant", "tier": 3}]}, False)
    if kind == "turn_not_object":
        return dumps({**rec, "turns": ["assistant"]}, False)
    if kind == "garbage":
        return draw(st.sampled_from(["{", "}", "null", '"x"', "{}", "é"]))
    if kind == "raw_meta":  # what json.dumps does not write: keys twice, escaped keys
        raw = draw(st.sampled_from(RAW_METAS))
        head = dumps({k: v for k, v in rec.items() if k != "meta"}, False)[:-1]
        return head + ', "meta": ' + raw + "}"
    return text


def write_file(path: Path, lines, *, compress: bool, crlf: bool, final_newline: bool) -> Path:
    sep = "\r\n" if crlf else "\n"
    data = sep.join(lines) + (sep if final_newline else "")
    raw = data.encode("utf-8")
    if compress:
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.lists(
        st.tuples(
            st.lists(line(), max_size=12),
            st.booleans(),
            st.booleans(),
            st.booleans(),
        ),
        min_size=1,
        max_size=3,
    ),
    workers=st.sampled_from([None, 1, 2]),
)
def test_reader_matches_reference(tmp_path_factory, files, workers):
    d = tmp_path_factory.mktemp("buf")
    paths = [
        write_file(d / f"f{i}.jsonl", lines, compress=z, crlf=crlf, final_newline=nl)
        for i, (lines, z, crlf, nl) in enumerate(files)
    ]
    batch = turnrl.read_rollouts(paths, workers=workers)
    assert_same_as_reference(batch, paths)
    # The record reader keeps and skips the same lines.
    it = turnrl.iter_rollout_records(paths)
    records = list(it)
    assert [r["task_id"] for r in records] == batch.task_id
    assert it.skipped == batch.skipped
    assert it.problems == batch.problems


def test_big_file_is_read_in_parallel_blocks_like_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3000):
        turns = []
        for k in range(int(rng.integers(0, 12))):
            turns.append({"role": "assistant", "tier": DEFAULT_TIERS[k % 6], "reward": k / 10})
            turns.append({"role": "tool", "name": "t", "content": "x" * int(rng.integers(0, 3000))})
        rec = {
            "schema": SCHEMA,
            "task_id": f"t{i % 50}",
            "group": f"g{i // 8}",
            "sample": i % 8,
            "outcome": float(i % 2),
            "turns": turns,
        }
        lines.append(json.dumps(rec) if i % 97 else json.dumps(rec)[:-3])
    path = write_file(tmp_path / "big.jsonl", lines, compress=False, crlf=False, final_newline=True)
    assert path.stat().st_size > 6 << 20  # more than two blocks
    zpath = write_file(tmp_path / "big.bin", lines, compress=True, crlf=False, final_newline=True)
    for p in (path, zpath):
        for workers in (1, None):
            assert_same_as_reference(turnrl.read_rollouts(p, workers=workers), [p])


def test_problem_text_names_file_line_and_reason(tmp_path):
    rec = turnrl.rollout_record("t", "g", 0, 1.0, [{"role": "assistant", "reward": "high"}])
    lines = [
        json.dumps(rec),
        '{"schema": "turnrl.rollout/1"',
        json.dumps({**rec, "schema": "x", "turns": []}),
    ]
    path = write_file(tmp_path / "p.jsonl", lines, compress=False, crlf=False, final_newline=False)
    batch = turnrl.read_rollouts(str(path))
    assert batch.num_trajectories == 0 and batch.skipped == 3
    assert batch.problems[0].startswith(f"{path}:1: bad record")
    assert "reward" in batch.problems[0]
    assert batch.problems[1].startswith(f"{path}:2: truncated JSON")
    assert batch.problems[2].startswith(f"{path}:3: schema is")


def test_problems_are_capped_but_all_counted(tmp_path):
    path = write_file(
        tmp_path / "bad.jsonl", ["oops"] * 1500, compress=False, crlf=False, final_newline=True
    )
    batch = turnrl.read_rollouts(path)
    assert batch.skipped == 1500
    assert len(batch.problems) == 1000
    assert batch.problems[-1].startswith(f"{path}:1000: ")


def test_missing_files_raise_io_errors_naming_the_path(tmp_path):
    with pytest.raises(TurnrlIOError, match=r"nope\.jsonl"):
        turnrl.read_rollouts(tmp_path / "nope.jsonl")
    with pytest.raises(TurnrlIOError, match=r"nope\.jsonl"):
        next(turnrl.iter_rollout_records(tmp_path / "nope.jsonl"))
    with pytest.raises(TurnrlIOError, match=r"no file matches"):
        turnrl.read_rollouts(str(tmp_path / "*.jsonl"))
    with pytest.raises(InvalidInputError):
        turnrl.read_rollouts([])
    with pytest.raises(InvalidInputError):
        turnrl.read_rollouts(tmp_path / "nope.jsonl", workers=0)


def _frames(records, per_frame):
    """zstd frames of ``per_frame`` records each, one JSON line per record."""
    frames = []
    for i in range(0, len(records), per_frame):
        text = "".join(json.dumps(r) + "\n" for r in records[i : i + per_frame])
        frames.append(zstandard.ZstdCompressor().compress(text.encode()))
    return frames


def _frame_texts(data):
    """The decoded text of each zstd frame of ``data``, and whether it has a checksum."""
    out = []
    while data:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        text = dobj.decompress(data)
        checksum = zstandard.get_frame_parameters(data).has_checksum
        consumed = len(data) - len(dobj.unused_data)
        out.append((text, checksum))
        data = data[consumed:]
    return out


def test_writer_zstd_frames_carry_checksums_and_damage_drops_the_frame(tmp_path):
    # Without a content checksum one changed byte read as changed outcomes
    # with no problem reported. Frames now end every 2 MiB of records, each
    # with a checksum, and a frame that fails it gives no line.
    records = [
        turnrl.rollout_record(f"task/{i}", f"g/{i}", i, float(i % 2), [], meta={"pad": "x" * 300})
        for i in range(12_000)
    ]
    path = tmp_path / "framed.jsonl.zst"
    with turnrl.RolloutWriter(path) as w:
        w.write_many(records)
    raw = path.read_bytes()
    frames = _frame_texts(raw)
    assert len(frames) >= 2 and all(checksum for _, checksum in frames)
    assert all(text.endswith(b"\n") for text, _ in frames)  # frames end at a record
    first = frames[0][0].count(b"\n")
    # The last byte is the last frame's checksum: its content decodes as
    # it was, only the check fails.
    bad = tmp_path / "damaged.jsonl.zst"
    bad.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    kept = sum(text.count(b"\n") for text, _ in frames[:-1])
    assert kept >= first
    for workers in (1, None):
        batch = turnrl.read_rollouts(bad, workers=workers)
        assert batch.num_trajectories == kept
        np.testing.assert_array_equal(batch.sample, np.arange(kept))
        assert batch.skipped == 1
        (problem,) = batch.problems
        assert problem.startswith(f"{bad}:{kept + 1}: zstd data truncated or damaged here (")
        assert "the frame that begins in this line fails zstd's checks" in problem
    it = turnrl.iter_rollout_records(bad)
    assert [r["sample"] for r in it] == list(range(kept))
    assert it.problems == batch.problems


def test_an_empty_zstd_buffer_is_one_empty_frame_zstd_reads(tmp_path):
    path = tmp_path / "empty.jsonl.zst"
    turnrl.RolloutWriter(path).close()
    raw = path.read_bytes()
    assert _frame_texts(raw) == [(b"", True)]  # not a 0-byte file, which zstd refuses
    assert zstandard.ZstdDecompressor().decompressobj().decompress(raw) == b""
    assert turnrl.read_rollouts(path).num_trajectories == 0


def test_a_file_of_one_frame_per_record_reads_whole(tmp_path):
    # What an appender compressing each record on its own writes: many tiny frames.
    records = [
        turnrl.rollout_record(f"t/{i}", f"g/{i % 7}", i, float(i % 2), []) for i in range(3000)
    ]
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    path = tmp_path / "tiny-frames.jsonl.zst"
    path.write_bytes(b"".join(compressor.compress(json.dumps(r).encode() + b"\n") for r in records))
    batch = turnrl.read_rollouts(path, workers=1)
    assert batch.skipped == 0
    np.testing.assert_array_equal(batch.sample, np.arange(3000))


def _valid_lines(text: bytes) -> int:
    """How many lines of ``text`` are records the reference reader keeps."""
    return sum(reference_check(line) is not None for line in text.splitlines())


def test_a_damaged_zstd_tool_frame_with_a_checksum_gives_no_line(tmp_path):
    # The zstd tool writes one frame with a checksum; it was checked only at
    # the frame's end, after every (wrong) line of it had been read.
    records = _records(200)
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    raw = zstandard.ZstdCompressor(write_checksum=True).compress(text)
    path = tmp_path / "tool.jsonl.zst"
    # A damaged byte that only the checksum catches: the same frame without
    # its checksum decodes, to other records that are still valid (which
    # the reader took as they were).
    unchecked = bytearray(raw[:-4])
    unchecked[4] &= ~0x04  # the frame header's checksum flag
    bad = None
    for pos in range(len(unchecked) - 1, 20, -1):
        for delta in (1, 2, 4, 8, 16, 32, 64, 128):
            candidate = bytearray(unchecked)
            candidate[pos] ^= delta
            try:
                out = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(candidate))
            except zstandard.ZstdError:
                continue
            if out != text and _valid_lines(out) == len(records):
                bad = bytearray(raw)
                bad[pos] ^= delta
                break
        if bad is not None:
            break
    assert bad is not None
    path.write_bytes(bytes(bad))
    batch = turnrl.read_rollouts(path)
    assert batch.num_trajectories == 0 and batch.skipped == 1
    assert batch.problems[0].startswith(f"{path}:1: zstd data truncated or damaged here (")
    assert list(turnrl.iter_rollout_records(path)) == []


def test_a_leading_skippable_frame_is_zstd(tmp_path):
    # pzstd starts its files with a skippable frame: magic 0x184D2A50..5F,
    # a 4-byte little-endian length, then that many bytes of payload.
    records = _records(30)
    for magic in (0x184D2A50, 0x184D2A5F):
        payload = b"\x00pzstd\xff" * 3
        skippable = struct.pack("<II", magic, len(payload)) + payload
        path = tmp_path / f"pzstd-{magic:x}.jsonl.zst"
        path.write_bytes(skippable + b"".join(_frames(records, 7)))
        for workers in (1, None):
            batch = turnrl.read_rollouts(path, workers=workers)
            assert batch.skipped == 0, batch.problems
            assert batch.num_trajectories == 30
            assert batch.task_id == [r["task_id"] for r in records]
        it = turnrl.iter_rollout_records(path)
        assert list(it) == records
        assert it.skipped == 0


@pytest.mark.parametrize("damage", ["truncated", "trailing garbage", "short garbage"])
def test_damaged_zstd_keeps_the_records_before_the_damage(tmp_path, damage):
    records = _records(30)
    frames = _frames(records, 10)
    if damage == "truncated":
        # Two whole frames, then half of the third: a frame's block is only
        # decoded whole, so the records of the first two survive.
        data, kept = frames[0] + frames[1] + frames[2][: len(frames[2]) // 2], 20
    elif damage == "trailing garbage":
        data, kept = b"".join(frames) + b"not a zstd frame\n", 30
    else:
        data, kept = b"".join(frames) + b"\x00\x01", 30
    path = tmp_path / "damaged.jsonl.zst"
    path.write_bytes(data)
    # A plain file cut inside its last line loses just that line, reported
    # at its number; damaged zstd is reported the same way.
    plain = tmp_path / "cut.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records[:kept])
    plain.write_text(text + json.dumps(records[kept % 30])[:25])
    for workers in (1, None):
        for p in (path, plain):
            batch = turnrl.read_rollouts(p, workers=workers)
            assert batch.num_trajectories == kept
            assert batch.task_id == [r["task_id"] for r in records[:kept]]
            np.testing.assert_array_equal(batch.line, np.arange(1, kept + 1))
            assert batch.skipped == 1
            assert len(batch.problems) == 1
            assert batch.problems[0].startswith(f"{p}:{kept + 1}: ")
            if p == path:
                assert "zstd data truncated or damaged" in batch.problems[0]
    damaged = turnrl.read_rollouts(path).problems[0]
    # Files after the damaged one are read as usual.
    good = tmp_path / "good.jsonl"
    good.write_text(text)
    again = tmp_path / "again.jsonl.zst"
    again.write_bytes(path.read_bytes())
    batch = turnrl.read_rollouts([path, good, again])
    assert batch.num_trajectories == 3 * kept and batch.skipped == 2
    assert [p.split(": ")[0] for p in batch.problems] == [
        f"{path}:{kept + 1}",
        f"{again}:{kept + 1}",
    ]
    it = turnrl.iter_rollout_records([path, good], with_source=True)
    got = list(it)
    assert [{k: v for k, v in r.items() if k != "_source"} for r in got] == 2 * records[:kept]
    assert it.skipped == 1
    assert it.problems == [damaged]


def _tier_buffer(path, names, per_line=100):
    """Tiny records whose assistant turns carry ``names`` in order, ``per_line`` a line."""
    lines = []
    for i in range(0, len(names), per_line):
        turns = [{"role": "assistant", "tier": n} for n in names[i : i + per_line]]
        lines.append(json.dumps(turnrl.rollout_record("t", "g", i, 1.0, turns)))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_more_tier_names_than_int16_codes_is_an_error_not_a_merge(tmp_path):
    # Codes are int16: the 6 default tiers and 32,762 more fit, each with its
    # own code; one more distinct name is an error naming it and its line.
    room = 2**15 - len(DEFAULT_TIERS)
    names = [f"t{k}" for k in range(room + 1)]
    fits = _tier_buffer(tmp_path / "fits.jsonl", names[:room])
    batch = turnrl.read_rollouts(fits)
    assert batch.tier_names == [*DEFAULT_TIERS, *names[:room]]
    np.testing.assert_array_equal(batch.turn_tiers, np.arange(6, 2**15, dtype=np.int16))
    over = _tier_buffer(tmp_path / "over.jsonl", names)
    for workers in (1, None):
        with pytest.raises(InvalidInputError, match=r"tier \"t32762\" .*int16") as e:
            turnrl.read_rollouts(over, workers=workers)
        assert str(e.value).startswith(f"{over}:328: ")
    # Across files too: the name past the limit is in the second file.
    more = _tier_buffer(tmp_path / "more.jsonl", ["read", "t0", "new"], per_line=2)
    with pytest.raises(InvalidInputError, match=rf"^{re.escape(str(more))}:2: tier \"new\""):
        turnrl.read_rollouts([fits, more])


def test_a_leading_byte_order_mark_is_skipped(tmp_path):
    bom = b"\xef\xbb\xbf"
    records = _records(7)
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    plain = tmp_path / "bom.jsonl"
    plain.write_bytes(bom + text)
    packed = tmp_path / "bom.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(bom + text))
    blank_first = tmp_path / "bom-blank.jsonl"
    blank_first.write_bytes(bom + b"\n" + text)
    for workers in (1, None):
        for p in (plain, packed):
            batch = turnrl.read_rollouts(p, workers=workers)
            assert batch.skipped == 0, batch.problems
            assert batch.task_id == [r["task_id"] for r in records]
            np.testing.assert_array_equal(batch.line, np.arange(1, 8))
        batch = turnrl.read_rollouts(blank_first, workers=workers)
        assert batch.skipped == 0
        np.testing.assert_array_equal(batch.line, np.arange(2, 9))
    it = turnrl.iter_rollout_records([plain, packed, blank_first], with_source=True)
    got = list(it)
    assert it.skipped == 0
    assert [{k: v for k, v in r.items() if k != "_source"} for r in got] == 3 * records
    # A BOM anywhere else is not skipped: its line is bad.
    inside = tmp_path / "bom-inside.jsonl"
    inside.write_bytes(text + bom + text)
    batch = turnrl.read_rollouts(inside)
    assert batch.num_trajectories == 13
    assert batch.problems[0].startswith(f"{inside}:8: ")


def test_globs_expand_sorted_and_order_is_kept(tmp_path):
    for i in (2, 0, 1):
        with turnrl.RolloutWriter(tmp_path / f"part-{i}.jsonl") as w:
            w.write(turnrl.rollout_record(f"task{i}", "g", i, 1.0, []))
    batch = turnrl.read_rollouts(str(tmp_path / "part-*.jsonl"))
    assert batch.task_id == ["task0", "task1", "task2"]
    batch = turnrl.read_rollouts([tmp_path / "part-2.jsonl", tmp_path / "part-0.jsonl"])
    assert batch.task_id == ["task2", "task0"]
    assert batch.files == [str(tmp_path / "part-2.jsonl"), str(tmp_path / "part-0.jsonl")]


# ---------------------------------------------------------------------------
# Writer


def _records(n):
    out = []
    for i in range(n):
        turns = [
            {"role": "user", "content": "réserve ✈"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "get_user_details", "arguments": {"user_id": f"u{i}"}}],
                "tier": "read",
                "reward": 0.1 * i,
            },
            {"role": "tool", "name": "get_user_details", "content": '{"name": "x"}'},
            {"role": "assistant", "content": "done", "tier": "respond", "reward": 0.0},
        ][: i % 5]
        out.append(turnrl.rollout_record(f"t{i % 3}", f"g{i % 3}", i, float(i % 2), turns))
    return out


@pytest.mark.parametrize(("name", "compress"), [("a.jsonl", None), ("a.jsonl.zst", "auto")])
def test_writer_round_trip(tmp_path, name, compress):
    records = _records(40)
    path = tmp_path / name
    with turnrl.RolloutWriter(path, compress) as w:
        assert w.write_many(records) == 40
    assert path.read_bytes().startswith(ZSTD_MAGIC) == name.endswith(".zst")
    assert list(turnrl.iter_rollout_records(path)) == records
    batch = turnrl.read_rollouts(path)
    assert batch.skipped == 0
    assert_same_as_reference(batch, [path])
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left


def test_two_writers_to_one_path_each_have_their_own_temporary_file(tmp_path):
    path = tmp_path / "shared.jsonl"
    records = _records(12)
    first, second = records[:6], records[6:]
    a = turnrl.RolloutWriter(path)
    b = turnrl.RolloutWriter(path, "zstd")
    for x, y in zip(first, second, strict=True):
        a.write(x)
        b.write(y)
    a.close()
    assert list(turnrl.iter_rollout_records(path)) == first
    b.close()  # closes last: its records are the file's
    assert list(turnrl.iter_rollout_records(path)) == second
    assert os.listdir(tmp_path) == ["shared.jsonl"]
    # A writer dropped unclosed removes its own temporary file only.
    kept = turnrl.RolloutWriter(path)
    dropped = turnrl.RolloutWriter(path)
    dropped.write(first[0])
    kept.write(first[1])
    del dropped
    kept.write(first[2])
    kept.close()
    assert list(turnrl.iter_rollout_records(path)) == first[1:3]
    assert os.listdir(tmp_path) == ["shared.jsonl"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.zst"])
def test_a_forked_child_leaves_the_parent_writer_alone(tmp_path, name):
    # A child that exits drops its copy of the writer; that used to remove
    # the parent's temporary file, so the parent's close() failed and every
    # record was lost.
    path = tmp_path / name
    records = _records(8)
    w = turnrl.RolloutWriter(path)
    w.write_many(records[:3])
    (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tmp-")]
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 0
        try:
            for attempt in (lambda: w.write(records[7]), w.close):
                try:
                    attempt()
                    code = 10
                except InvalidInputError as e:
                    if "forked copy" not in str(e):
                        code = 11
            w.abort()
            del w
            import gc

            gc.collect()
        except BaseException:
            code = 12
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert tmp.exists()
    w.write_many(records[3:5])
    w.close()
    assert list(turnrl.iter_rollout_records(path)) == records[:5]
    assert os.listdir(tmp_path) == [name]


def test_zstd_is_detected_by_magic_not_name(tmp_path):
    path = tmp_path / "plain-looking.jsonl"
    with turnrl.RolloutWriter(path, "zstd") as w:
        w.write_many(_records(5))
    assert path.read_bytes().startswith(ZSTD_MAGIC)
    assert turnrl.read_rollouts(path).num_trajectories == 5


def test_writer_refuses_bad_records_and_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    w = turnrl.RolloutWriter(path)
    w.write(_records(1)[0])
    with pytest.raises(InvalidInputError, match=r"record 1: .*outcome"):
        w.write({**_records(1)[0], "outcome": "1"})
    with pytest.raises(InvalidInputError, match="record 1"):
        w.write({**_records(1)[0], "outcome": math.inf})
    with pytest.raises(InvalidInputError, match=r"record 1: .*schema"):
        w.write({**_records(1)[0], "schema": "other"})
    assert path.read_text() == "old\n"  # nothing replaced before close
    w.close()
    assert w.closed and turnrl.read_rollouts(path).num_trajectories == 1
    with pytest.raises(RuntimeError), turnrl.RolloutWriter(path) as w2:
        w2.write(_records(1)[0])
        raise RuntimeError("boom")
    assert turnrl.read_rollouts(path).num_trajectories == 1
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_writer_refuses_zstd_levels_outside_zstd_range(tmp_path):
    path = tmp_path / "out.jsonl.zst"
    for level in (100, 23, -(2**17) - 1, 2**31, 2**70, -(2**70)):
        for compress in ("zstd", None):
            with pytest.raises(InvalidInputError, match=rf"zstd level {level} .* to 22"):
                turnrl.RolloutWriter(path, compress, level=level)
    for level in (3.0, True, "3"):
        with pytest.raises(InvalidInputError, match="level must be an integer"):
            turnrl.RolloutWriter(path, level=level)
    assert os.listdir(tmp_path) == []
    for level in (-5, 0, 1, 22):
        with turnrl.RolloutWriter(path, level=level) as w:
            w.write_many(_records(3))
        assert list(turnrl.iter_rollout_records(path)) == _records(3)


def test_writer_refuses_lone_surrogates_naming_the_record_and_field(tmp_path):
    path = tmp_path / "s.jsonl"
    good = _records(2)[1]
    with turnrl.RolloutWriter(path) as w:
        w.write(good)
        cases = [
            ({**good, "meta": {"note": "\ud800"}}, r"meta\.note"),
            ({**good, "turns": [{"role": "user", "content": "a\udfffb"}]}, r"turns\[0\]\.content"),
            ({**good, "meta": {"k\udc80": 1}}, r"meta: key 'k.udc80'"),
        ]
        for bad, where in cases:
            with pytest.raises(InvalidInputError, match=rf"^record 1: {where}: .*lone surrogate"):
                w.write(bad)
        assert w.written == 1
    assert list(turnrl.iter_rollout_records(path)) == [good]
    # What the writer refuses, the readers take: the escape decodes to one.
    line = json.dumps({**good, "meta": {"note": "\ud800"}})
    assert "\\ud800" in line
    path.write_text(line + "\n")
    assert turnrl.read_rollouts(path).skipped == 0
    (record,) = turnrl.iter_rollout_records(path)
    assert record["meta"]["note"] == "\ud800"


@pytest.fixture
def unlimited_int_digits():
    """Lifts Python's limit on int/str conversion for the test's own use."""
    if not hasattr(sys, "set_int_max_str_digits"):
        pytest.skip("this Python has no limit on integer string conversion")
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    yield
    sys.set_int_max_str_digits(old)


def test_record_iterator_reads_integers_past_the_digit_limit(tmp_path, unlimited_int_digits):
    # read_rollouts does not look into `meta` and keeps such lines; the record
    # iterator must keep the same lines, with the integers exact.
    digits = {n: "".join(str((7 * i + 3) % 10) for i in range(n)) for n in (641, 4301, 30000)}
    big = {n: int(d) for n, d in digits.items()}
    sys.set_int_max_str_digits(4300)  # Python's default, whatever this run had
    records = _records(4)
    lines = [json.dumps(records[0])]
    for d in digits.values():
        lines.append(
            json.dumps({**records[1], "meta": {"n": "BIG", "list": ["NEG"]}})
            .replace('"BIG"', d)
            .replace('"NEG"', "-" + d)
        )
    lines.append(json.dumps(records[2]))
    path = write_file(tmp_path / "big.jsonl", lines, compress=False, crlf=False, final_newline=True)
    batch = turnrl.read_rollouts(path)
    assert batch.num_trajectories == 5 and batch.skipped == 0
    it = turnrl.iter_rollout_records(path, with_source=True)
    got = list(it)
    assert it.skipped == 0
    assert [r["_source"]["line"] for r in got] == [1, 2, 3, 4, 5]
    assert got[0]["meta"] == records[0]["meta"] and got[-1]["turns"] == records[2]["turns"]
    for r, n in zip(got[1:4], digits, strict=True):
        assert r["meta"] == {"n": big[n], "list": [-big[n]]}


# ---------------------------------------------------------------------------
# Advantages on the columns


def test_compute_advantages_runs_on_the_columns(tmp_path):
    path = tmp_path / "a.jsonl"
    with turnrl.RolloutWriter(path) as w:
        w.write_many(_records(60))
    b = turnrl.read_rollouts(path)
    for est in ("grpo", "mt_grpo", "gtpo_hybrid"):
        got = turnrl.compute_advantages(
            est, b.outcome, b.group_index, b.turn_rewards, b.turn_offsets
        )
        want = reference_advantages(est, b.outcome, b.group_index, b.turn_rewards, b.turn_offsets)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(b.advantages(est), got)


# ---------------------------------------------------------------------------
# tau-bench results (format of tau_bench.types.EnvRunResult, model_dump'ed)

SYSTEM = "# Airline Agent Policy\nThe current time is 2024-05-15 15:00:00 EST."


def _tau_entry(task_id, trial, reward, *, args='{"user_id": "mia_li_3668"}'):
    return {
        "task_id": task_id,
        "reward": reward,
        "info": {
            "task": {
                "user_id": "mia_li_3668",
                "actions": [
                    {"name": "get_user_details", "kwargs": {"user_id": "mia_li_3668"}},
                ],
                "instruction": "You are mia_li_3668.",
                "outputs": [],
            },
            "source": "user",
            "user_cost": 0.0012,
            "reward_info": {
                "reward": reward,
                "info": {"r_actions": reward, "gt_data_hash": "abc"},
                "actions": [],
            },
        },
        "traj": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi, I want to book a flight."},
            {
                "content": None,
                "role": "assistant",
                "tool_calls": [
                    {
                        "function": {"arguments": args, "name": "get_user_details"},
                        "id": "call_abc",
                        "type": "function",
                    }
                ],
                "function_call": None,
            },
            {
                "role": "tool",
                "tool_call_id": "call_abc",
                "name": "get_user_details",
                "content": '{"user_id": "mia_li_3668", "name": {"first_name": "Mia"}}',
            },
            {
                "content": "Which flight would you like?",
                "role": "assistant",
                "tool_calls": None,
                "function_call": None,
            },
            {"role": "user", "content": "###STOP###"},
        ],
        "trial": trial,
    }


def test_taubench_results_convert_to_rollout_records(tmp_path):
    results = [
        _tau_entry(3, 0, 1.0),
        _tau_entry(5, 0, 0.0, args="{not json"),
        _tau_entry(3, 1, 0.0),
        {"task_id": 7, "reward": 0.0, "info": {"error": "boom", "traceback": "..."}, "traj": []},
    ]
    src = tmp_path / "tool-calling-gpt-4o-0.0_range_0--1_user-gpt-4o-llm_0315.json"
    src.write_text(json.dumps(results, indent=2))
    records = turnrl.read_taubench_results(src, env="airline", split="test")
    assert [r["task_id"] for r in records] == [
        "airline/test/3",
        "airline/test/5",
        "airline/test/3",
        "airline/test/7",
    ]
    assert [r["group"] for r in records] == [r["task_id"] for r in records]
    assert [r["sample"] for r in records] == [0, 0, 1, 0]
    assert [r["outcome"] for r in records] == [1.0, 0.0, 0.0, 0.0]
    first = records[0]
    assert [t["role"] for t in first["turns"]] == ["user", "assistant", "tool", "assistant", "user"]
    call = first["turns"][1]["tool_calls"][0]
    assert call == {
        "id": "call_abc",
        "name": "get_user_details",
        "arguments": {"user_id": "mia_li_3668"},
    }
    assert first["turns"][1]["tier"] is None and first["turns"][1]["reward"] == 0.0
    assert "tool_calls" not in first["turns"][3]
    assert first["turns"][2]["tool_call_id"] == "call_abc"
    assert first["meta"]["info"]["task"]["actions"][0]["name"] == "get_user_details"
    assert "system_prompt" not in first["meta"]
    assert records[1]["turns"][1]["tool_calls"][0]["arguments"] == "{not json"
    assert records[3]["turns"] == [] and records[3]["meta"]["info"]["error"] == "boom"
    kept = turnrl.read_taubench_results(src, keep_system=True)
    assert kept[0]["meta"]["system_prompt"] == SYSTEM and kept[0]["task_id"] == "3"

    out = tmp_path / "tau.jsonl.zst"
    assert turnrl.write_taubench_buffer(src, out, env="airline", split="test") == 4
    batch = turnrl.read_rollouts(out)
    assert batch.skipped == 0
    assert batch.task_id == [r["task_id"] for r in records]
    np.testing.assert_array_equal(batch.turn_offsets, [0, 2, 4, 6, 6])
    np.testing.assert_array_equal(batch.turn_tiers, [NO_TIER] * 6)
    np.testing.assert_array_equal(batch.group_index, [0, 1, 0, 2])
    assert list(turnrl.iter_rollout_records(out)) == records


def test_taubench_sample_falls_back_to_order_of_appearance():
    entries = [_tau_entry(1, 0, 1.0) for _ in range(3)]
    for e in entries:
        del e["trial"]
    records = turnrl.rollouts.taubench_to_records(entries)
    assert [r["sample"] for r in records] == [0, 1, 2]


def test_taubench_bad_input_names_the_entry(tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps([_tau_entry(1, 0, 1.0), {"task_id": 2, "reward": "x"}]))
    with pytest.raises(InvalidInputError, match=r"r.json: entry 1: 'reward'"):
        turnrl.read_taubench_results(src)
    src.write_text('[{"task_id": 1,')
    with pytest.raises(InvalidInputError, match=r"r.json:1:\d+: invalid JSON"):
        turnrl.read_taubench_results(src)
    with pytest.raises(TurnrlIOError, match=r"missing\.json"):
        turnrl.read_taubench_results(tmp_path / "missing.json")


def _stats_from_records(records: list[dict], threshold: float) -> dict:
    """buffer_stats' figures, worked out record by record."""
    from collections import Counter

    success = [r["outcome"] >= threshold for r in records]
    per_task = Counter(r["task_id"] for r in records)
    per_group = Counter(r["group"] for r in records)
    counts = [sum(t["role"] == "assistant" for t in r["turns"]) for r in records]
    tiers: dict[str, list] = {}
    for i, r in enumerate(records):
        for t in r["turns"]:
            if t["role"] == "assistant" and t.get("tier") is not None:
                tiers.setdefault(t["tier"], []).append((i, t["reward"]))
    total = sum(counts)
    stops: dict[str | None, list[bool]] = {}  # None: no reason
    for r, won in zip(records, success, strict=True):
        reason = r["meta"].get("stop_reason")
        stops.setdefault(reason if isinstance(reason, str) else None, []).append(won)
    pass_hat = None
    if len(set(per_task.values())) == 1:
        n = next(iter(per_task.values()))
        wins = Counter(r["task_id"] for r in records if r["outcome"] >= threshold)
        pass_hat = {
            k: sum(math.comb(wins[t], k) / math.comb(n, k) for t in per_task) / len(per_task)
            for k in range(1, n + 1)
        }
    return {
        "trajectories": len(records),
        "tasks": len(per_task),
        "groups": len(per_group),
        "group_size": (min(per_group.values()), max(per_group.values())),
        "mean_outcome": sum(r["outcome"] for r in records) / len(records),
        "success_rate": sum(success) / len(records),
        "pass_hat": pass_hat,
        "assistant_turns": total,
        "turns": (total / len(records), max(counts)),
        "unlabelled": total - sum(len(v) for v in tiers.values()),
        "tiers": {
            name: (
                len(v),
                len(v) / total,
                sum(reward for _, reward in v) / len(v),
                len({i for i, _ in v}),
                sum(success[i] for i in {i for i, _ in v}) / len({i for i, _ in v}),
            )
            for name, v in tiers.items()
        },
        "stop_reasons": {
            name: (len(v), len(v) / len(records), sum(v) / len(v)) for name, v in stops.items()
        },
    }


@settings(max_examples=60, deadline=None)
@given(
    records=st.deferred(lambda: __import__("test_calibration").labelled_records()),
    threshold=st.sampled_from([0.5, 1.0]),
)
def test_buffer_stats_are_the_records_figures(tmp_path_factory, records, threshold):
    from turnrl.rollouts import buffer_stats

    path = tmp_path_factory.mktemp("stats") / "b.jsonl"
    with turnrl.RolloutWriter(path) as writer:
        writer.write_many(records)
    stats = buffer_stats(turnrl.read_rollouts(path), threshold)
    assert json.loads(json.dumps(stats)) == stats  # plain JSON values
    assert stats["files"] == 1 and stats["skipped_lines"] == 0
    if not records:
        assert stats["trajectories"] == 0 and stats["success_rate"] is None
        return
    want = _stats_from_records(records, threshold)
    for key in ("trajectories", "tasks", "groups", "assistant_turns"):
        assert stats[key] == want[key], key
    assert (stats["group_size"]["min"], stats["group_size"]["max"]) == want["group_size"]
    assert stats["mean_outcome"] == pytest.approx(want["mean_outcome"])
    assert stats["success_rate"] == pytest.approx(want["success_rate"])
    assert stats["unlabelled_turns"] == want["unlabelled"]
    turns = stats["turns_per_trajectory"]
    assert (turns["mean"], turns["max"]) == pytest.approx(want["turns"])
    if want["pass_hat"] is None:
        assert stats["pass_hat_k"] is None
    else:
        n = max(want["pass_hat"])
        ks = sorted({1, n} | {2**i for i in range(1, n.bit_length())})
        assert list(stats["pass_hat_k"]) == [str(k) for k in ks]
        for k in ks:
            assert stats["pass_hat_k"][str(k)] == pytest.approx(want["pass_hat"][k])
    assert set(stats["tiers"]) == set(want["tiers"])
    for name, row in stats["tiers"].items():
        got = (row["turns"], row["turn_share"], row["mean_reward"], row["trajectories"])
        assert got == pytest.approx(want["tiers"][name][:4]), name
        assert row["success_rate"] == pytest.approx(want["tiers"][name][4]), name
    reasons, none = stats["stop_reasons"], stats["no_stop_reason"]
    assert set(reasons) | ({None} if none else set()) == set(want["stop_reasons"])
    for name, row in [*reasons.items(), *([(None, none)] if none else [])]:
        got = (row["trajectories"], row["share"], row["success_rate"])
        assert got == pytest.approx(want["stop_reasons"][name]), name
    counts = [row["trajectories"] for row in reasons.values()]
    assert counts == sorted(counts, reverse=True)  # most frequent first
    (one,) = stats["stop_reasons_per_file"]
    assert one == {
        "file": str(path),
        "trajectories": len(records),
        "stop_reasons": reasons,
        "no_stop_reason": none,
    }


def test_rollouts_stats_command(tmp_path, capsys):
    from turnrl.cli import main
    from turnrl.rollouts import buffer_stats

    path = tmp_path / "b.jsonl"
    turn = {"role": "assistant", "content": "x", "tier": "gold", "reward": 1.0}
    records = [
        turnrl.rollout_record(f"t{i % 2}", f"g{i % 2}", i // 2, float(i % 3 == 0), [turn])
        for i in range(4)
    ]
    with turnrl.RolloutWriter(path) as writer:
        writer.write_many(records)
    with open(path, "a") as f:
        f.write("{not json\n")
    assert main(["rollouts", "stats", str(path), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert f"skipped {path}:5:" in err
    assert "4 trajectories in 1 file(s) (1 bad lines skipped); 2 tasks, 2 groups of 2" in out
    assert "mean outcome 0.500, success rate 0.500; pass^1 0.500, pass^2 0.000" in out
    assert "4 assistant turns, 1.0 per trajectory (at most 1)" in out
    assert re.search(r"gold +4 +100\.0% +\+1\.000 +4 +0\.500", out)
    assert main(["rollouts", "stats", str(path), "--json", "--quiet"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == buffer_stats(turnrl.read_rollouts(path))
    with pytest.raises(SystemExit):
        main(["rollouts", "stats", str(path), "--success-threshold", "nan"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["rollouts", "stats", str(empty), "--quiet"]) == 0
    assert capsys.readouterr().out == "no trajectories in 1 file(s)\n"
    # A tau-bench results file (one JSON list) instead of a buffer: the command to convert it.
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"task_id": 0, "reward": 1.0, "info": {}, "traj": []}]))
    hint = f"{results} holds a JSON list, as tau-bench's results files do: convert one with "
    assert main(["rollouts", "stats", str(results), "--quiet"]) == 0
    assert hint + "turnrl rollouts import-taubench" in capsys.readouterr().out
    assert main(["calibrate", str(results), "--quiet"]) == 2
    assert hint + "turnrl rollouts import-taubench" in capsys.readouterr().err
    # tau-bench writes its results with indent=2: the list's "[" is a line of its own,
    # and no line is a record (the hint was given only for a list on one line).
    entries = [{"task_id": t, "reward": 1.0, "info": {}, "traj": []} for t in range(2)]
    results.write_text("\ufeff" + json.dumps(entries, indent=2))
    assert main(["rollouts", "stats", str(results), str(path), "--quiet"]) == 0
    assert "holds a JSON list" not in capsys.readouterr().out  # the buffer has records
    assert main(["rollouts", "stats", str(results), "--quiet"]) == 0
    assert hint + "turnrl rollouts import-taubench" in capsys.readouterr().out
    assert main(["calibrate", str(results), str(empty), "--quiet"]) == 2
    assert hint + "turnrl rollouts import-taubench" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 3), st.integers(-2, 2)), max_size=30),
)
def test_the_first_repeated_pair_is_found_as_a_loop_finds_it(pairs):
    from turnrl.rollouts import _first_repeat

    group = np.array([g for g, _ in pairs], dtype=np.int64)
    sample = np.array([s for _, s in pairs], dtype=np.int64)
    first_row: dict[tuple[int, int], int] = {}
    repeats = []
    for row, pair in enumerate(pairs):
        if pair in first_row:
            repeats.append((row, first_row[pair]))
        first_row.setdefault(pair, row)
    want = (len(repeats), *repeats[0]) if repeats else None
    assert _first_repeat(group, sample) == want


def test_rollouts_read_twice_are_said_to_count_twice(tmp_path, capsys):
    """A buffer passed with its .zst copy (or holding its lines twice) doubled
    every figure of stats and calibrate, unsaid. Warned, not refused: separate
    runs that wrote the same groups are rollouts too."""
    from turnrl.cli import main

    turn = {"role": "assistant", "content": "x", "tier": "gold", "reward": 1.0}
    records = [
        turnrl.rollout_record(f"t{i % 2}", f"g{i % 2}", i // 2, float(i % 3 == 0), [turn])
        for i in range(4)
    ]
    plain, packed = tmp_path / "b.jsonl", tmp_path / "b.jsonl.zst"
    for path in (plain, packed):
        with turnrl.RolloutWriter(path) as writer:
            writer.write_many(records)
    found = {
        "trajectories": 4,
        "group": "g0",
        "sample": 0,
        "at": f"{packed}:1",
        "first_at": f"{plain}:1",
    }
    warning = (
        "4 trajectories have the group and sample of an earlier one, the first group 'g0' "
        f"sample 0 at {packed}:1 (as at {plain}:1): the same rollouts read twice"
    )
    assert main(["rollouts", "stats", str(plain), str(packed), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"turnrl rollouts stats: warning: {warning}")
    assert "8 trajectories in 2 file(s)" in out  # counted twice, as said
    assert main(["rollouts", "stats", str(plain), str(packed), "--quiet", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["repeated_samples"] == found and warning in err
    report = tmp_path / "report.json"
    assert main(["calibrate", str(plain), str(packed), "--quiet", "--report", str(report)]) == 0
    assert f"turnrl calibrate: warning: {warning}" in capsys.readouterr().err
    assert any(w.startswith(warning) for w in json.loads(report.read_text())["warnings"])
    # One file holding its lines twice: named at its own lines.
    plain.write_text(plain.read_text() * 2)
    assert main(["rollouts", "stats", str(plain), "--quiet", "--json"]) == 0
    repeated = json.loads(capsys.readouterr().out)["repeated_samples"]
    assert repeated == {**found, "at": f"{plain}:5", "first_at": f"{plain}:1"}
    # Distinct pairs: nothing said.
    assert main(["rollouts", "stats", str(packed), "--quiet", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["repeated_samples"] is None and err == ""
    assert main(["calibrate", str(packed), "--quiet", "--report", str(report)]) == 0
    assert "group and sample" not in capsys.readouterr().err


def test_rollouts_stats_shows_how_episodes_ended(tmp_path, capsys):
    from turnrl.cli import main

    def write(name, ends):
        with turnrl.RolloutWriter(tmp_path / name) as writer:
            for i, (reason, outcome) in enumerate(ends):
                meta = {} if reason is None else {"steps": 3, "stop_reason": reason}
                writer.write(
                    turnrl.rollout_record(f"{name}{i}", f"{name}{i}", 0, outcome, [], meta)
                )
        return str(tmp_path / name)

    first = write(
        "a.jsonl",
        [("user_stop", 1.0), ("max_steps", 0.0), ("user_stop", 0.0), (None, 1.0)],
    )
    second = write(
        "b.jsonl",
        [("context_length", 0.0), ("user_stop", 1.0), ("context_length", 0.0), ("max_steps", 0.0)],
    )
    empty = write("c.jsonl", [])
    # A malformed meta is no reason, and the line is still read.
    with open(second, "a") as f:
        f.write(json.dumps(turnrl.rollout_record("t9", "g9", 0, 1.0, [])).replace("{}", "[1]"))
        f.write("\n")
    assert main(["rollouts", "stats", first, second, empty, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("9 trajectories in 3 file(s); 9 tasks, 9 groups of 1\n")
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("stop reason")))
    assert re.fullmatch(r"stop reason +traj\. +share +success", lines[at])
    table = [line.split() for line in lines[at + 1 : at + 5]]
    assert table == [
        ["user_stop", "3", "33.3%", "0.667"],
        ["max_steps", "2", "22.2%", "0.000"],
        ["context_length", "2", "22.2%", "0.000"],
        ["(none)", "2", "22.2%", "1.000"],
    ]
    assert lines[at + 5 :] == [
        "stop reasons per file:",
        f"  {first}: 4 trajectories; user_stop 2 (50.0%, success 0.500), max_steps 1 (25.0%, "
        "success 0.000), (none) 1 (25.0%, success 1.000)",
        f"  {second}: 5 trajectories; context_length 2 (40.0%, success 0.000), user_stop 1 "
        "(20.0%, success 1.000), max_steps 1 (20.0%, success 0.000), (none) 1 (20.0%, success "
        "1.000)",
        f"  {empty}: no trajectories",
    ]
    # One file: the table only, as its file's figures are the total.
    assert main(["rollouts", "stats", first, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stop reasons per file" not in out
    assert out.splitlines()[-1].split() == ["(none)", "1", "25.0%", "1.000"]
    assert main(["rollouts", "stats", first, second, empty, "--json", "--quiet"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown["stop_reasons"]) == ["user_stop", "max_steps", "context_length"]
    assert shown["stop_reasons"]["user_stop"] == {
        "trajectories": 3,
        "share": pytest.approx(1 / 3),
        "success_rate": pytest.approx(2 / 3),
    }
    assert shown["no_stop_reason"] == {
        "trajectories": 2,
        "share": pytest.approx(2 / 9),
        "success_rate": 1.0,
    }
    per_file = shown["stop_reasons_per_file"]
    assert [(f["file"], f["trajectories"]) for f in per_file] == [
        (first, 4),
        (second, 5),
        (empty, 0),
    ]
    assert per_file[2]["stop_reasons"] == {} and per_file[2]["no_stop_reason"] is None
    assert per_file[0]["no_stop_reason"]["trajectories"] == 1


def test_a_stop_reason_spelled_like_the_none_label_stays_apart(tmp_path, capsys):
    from turnrl.cli import main
    from turnrl.rollouts import buffer_stats

    path = tmp_path / "b.jsonl"
    ends = [("(none)", 0.0), ("(none)", 0.0), (None, 1.0), ('"x"', 1.0), ("x", 0.0)]
    with turnrl.RolloutWriter(path) as writer:
        for i, (reason, outcome) in enumerate(ends):
            meta = {} if reason is None else {"stop_reason": reason}
            writer.write(turnrl.rollout_record(f"t{i}", f"t{i}", 0, outcome, [], meta))
    stats = buffer_stats(turnrl.read_rollouts(path))
    assert {name: row["trajectories"] for name, row in stats["stop_reasons"].items()} == {
        "(none)": 2,
        '"x"': 1,
        "x": 1,
    }
    assert stats["no_stop_reason"] == {"trajectories": 1, "share": 0.2, "success_rate": 1.0}
    assert main(["rollouts", "stats", str(path), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("stop reason"))
    assert [line.split() for line in lines[at + 1 :]] == [
        ['"(none)"', "2", "40.0%", "0.000"],
        ['"\\"x\\""', "1", "20.0%", "1.000"],
        ["x", "1", "20.0%", "0.000"],
        ["(none)", "1", "20.0%", "1.000"],
    ]


@settings(max_examples=40, deadline=None)
@given(
    records=st.deferred(lambda: __import__("rollout_cases").labelled_records()),
    cut=st.integers(0, 12),
    threshold=st.sampled_from([0.5, 1.0]),
)
@example(  # the second file's tasks are not the first ones read
    records=[
        turnrl.rollout_record(task, task, i, outcome, [], {})
        for i, (task, outcome) in enumerate([("t1", 1.0), ("t2", 1.0), ("t2", 0.0)])
    ],
    cut=1,
    threshold=1.0,
)
def test_buffer_stats_per_file_are_each_files_figures(tmp_path_factory, records, cut, threshold):
    """per_file (what rollouts stats --plot compares) holds, for each file, the
    figures the totals would have of that file alone."""
    from turnrl.envs import pass_hat_k
    from turnrl.rollouts import buffer_stats

    folder = tmp_path_factory.mktemp("per-file")
    parts = [records[:cut], records[cut:], []]
    paths = [folder / f"{k}.jsonl" for k in range(len(parts))]
    for path, part in zip(paths, parts, strict=True):
        with turnrl.RolloutWriter(path) as writer:
            writer.write_many(part)
    stats = buffer_stats(turnrl.read_rollouts(paths), threshold)
    assert json.loads(json.dumps(stats)) == stats  # plain JSON values
    assert [one["file"] for one in stats["per_file"]] == [str(p) for p in paths]
    for one, part in zip(stats["per_file"], parts, strict=True):
        alone = buffer_stats(turnrl.read_rollouts(folder / Path(one["file"]).name), threshold)
        assert one["trajectories"] == len(part)
        if not part:
            assert one == {
                "file": one["file"],
                "trajectories": 0,
                "tasks": 0,
                "mean_outcome": None,
                "success_rate": None,
                "pass_hat_k": None,
                "assistant_turns": 0,
                "unlabelled_turns": 0,
                "tiers": {},
            }
            continue
        want = _stats_from_records(part, threshold)
        for key in ("trajectories", "tasks", "assistant_turns"):
            assert one[key] == want[key], key
        assert one["unlabelled_turns"] == want["unlabelled"]
        assert one["mean_outcome"] == pytest.approx(want["mean_outcome"])
        assert one["success_rate"] == pytest.approx(want["success_rate"])
        # The same figures as the file read alone (tiers in the order of all files).
        assert one["pass_hat_k"] == alone["pass_hat_k"]
        if want["pass_hat"] is None:
            assert one["pass_hat_k"] is None
        else:  # turnrl.envs' pass^k of the file's records
            results = [(r["task_id"], float(r["outcome"] >= threshold)) for r in part]
            for k, value in one["pass_hat_k"].items():
                assert value == pytest.approx(pass_hat_k(results, int(k))), k
        assert set(one["tiers"]) == set(alone["tiers"])
        for name, row in one["tiers"].items():
            assert row == pytest.approx(alone["tiers"][name]), name
            got = (row["turns"], row["turn_share"], row["mean_reward"], row["trajectories"])
            assert got == pytest.approx(want["tiers"][name][:4]), name
            assert row["success_rate"] == pytest.approx(want["tiers"][name][4]), name


def _stats_files(tmp_path: Path) -> list[str]:
    """Three buffers: a.jsonl (2 tasks x 2, tiers gold and read, two stop
    reasons and one without), b.jsonl (task t0 twice, t1 once: pass^k
    undefined; gold only, one stop reason) and an empty c.jsonl."""

    def write(name, rows):
        with turnrl.RolloutWriter(tmp_path / name) as writer:
            for i, (task, outcome, tiers, reason) in enumerate(rows):
                turns = [
                    {"role": "assistant", "content": ".", "tier": tier, "reward": 0.5}
                    for tier in tiers
                ]
                meta = {} if reason is None else {"stop_reason": reason}
                writer.write(turnrl.rollout_record(task, f"{name}/{task}", i, outcome, turns, meta))
        return str(tmp_path / name)

    return [
        write(
            "a.jsonl",
            [
                ("t0", 1.0, ["gold", "read"], "user_stop"),
                ("t0", 0.0, ["read", "read"], "max_steps"),
                ("t1", 1.0, ["gold"], "user_stop"),
                ("t1", 1.0, [], None),
            ],
        ),
        write(
            "b.jsonl",
            [
                ("t0", 1.0, ["gold"], "user_stop"),
                ("t0", 0.0, ["gold", "gold"], "user_stop"),
                ("t1", 0.0, ["gold"], "user_stop"),
            ],
        ),
        write("c.jsonl", []),
    ]


def _drawn(fig) -> dict:
    """What a buffer_stats_figure shows, read back from the figure: pass^k
    lines ({label: {k: value}}), the legend's texts there, and per bar panel
    its x tick labels and {series: heights} (NaN: no bar)."""
    axes = {ax.get_gid(): ax for ax in fig.axes}
    assert set(axes) == {"pass_hat_k", "tier_share", "tier_success", "stop_reasons"}
    pass_ax = axes["pass_hat_k"]
    drawn = {
        "pass_hat_k": {
            line.get_label(): dict(zip(line.get_xdata(), line.get_ydata(), strict=True))
            for line in pass_ax.lines
        },
        "pass_legend": [t.get_text() for t in pass_ax.get_legend().get_texts()]
        if pass_ax.get_legend()
        else [],
        "texts": {gid: [t.get_text() for t in ax.texts] for gid, ax in axes.items()},
    }
    for gid in ("tier_share", "tier_success", "stop_reasons"):
        ax = axes[gid]
        drawn[gid] = (
            [t.get_text() for t in ax.get_xticklabels()],
            {c.get_label(): [p.get_height() for p in c] for c in ax.containers},
        )
    return drawn


def _heights_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w), (got, want)


def test_the_stats_plot_draws_the_stats_figures(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from turnrl.rollouts import buffer_stats, buffer_stats_figure

    files = _stats_files(tmp_path)
    nan = float("nan")
    # One file: only "all", which is the file.
    stats = buffer_stats(turnrl.read_rollouts(files[0]))
    fig = buffer_stats_figure(stats)
    try:
        drawn = _drawn(fig)
        assert fig._suptitle.get_text() == f"Rollout buffer {files[0]}"
    finally:
        plt.close(fig)
    assert drawn["pass_hat_k"] == {"all": {1: 0.75, 2: 0.5}}
    assert stats["pass_hat_k"] == {"1": 0.75, "2": 0.5}
    assert drawn["tier_share"][0] == ["gold", "read"]
    _heights_equal(drawn["tier_share"][1]["all"], [2 / 5, 3 / 5])
    _heights_equal(drawn["tier_success"][1]["all"], [1.0, 0.5])
    assert drawn["stop_reasons"][0] == ["user_stop", "max_steps", "(none)"]
    _heights_equal(drawn["stop_reasons"][1]["all"], [0.5, 0.25, 0.25])

    # Several files: a line and bars per file, and a line of all files; pass^k
    # undefined for b (unequal trajectories per task), c (none) and all of them,
    # said in the legend.
    stats = buffer_stats(turnrl.read_rollouts(files))
    fig = buffer_stats_figure(stats)
    try:
        drawn = _drawn(fig)
        title = fig._suptitle.get_text().replace("\n", " ")
    finally:
        plt.close(fig)
    folder = f"{tmp_path}/".replace(os.sep, "/")
    assert title == f"3 rollout buffers in {folder}: a.jsonl, b.jsonl, c.jsonl"
    assert drawn["pass_hat_k"] == {"a.jsonl": {1: 0.75, 2: 0.5}}
    assert drawn["pass_legend"] == [
        "a.jsonl",
        "b.jsonl: undefined (unequal trajectories per task)",
        "c.jsonl: undefined (no trajectories)",
        "all files: undefined (unequal trajectories per task)",
    ]
    per_file = stats["per_file"]
    assert drawn["tier_share"][0] == list(stats["tiers"]) == ["gold", "read"]
    assert list(drawn["tier_share"][1]) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    for label, one in zip(("a.jsonl", "b.jsonl"), per_file, strict=False):
        tiers = one["tiers"]
        want = [tiers[t]["turn_share"] if t in tiers else 0.0 for t in ("gold", "read")]
        _heights_equal(drawn["tier_share"][1][label], want)
        want = [tiers[t]["success_rate"] if t in tiers else nan for t in ("gold", "read")]
        _heights_equal(drawn["tier_success"][1][label], want)
    _heights_equal(drawn["tier_share"][1]["b.jsonl"], [1.0, 0.0])  # b has no read turn
    _heights_equal(drawn["tier_success"][1]["b.jsonl"], [1 / 3, nan])  # ... so no success bar
    _heights_equal(drawn["tier_share"][1]["c.jsonl"], [nan, nan])  # no trajectories
    assert drawn["stop_reasons"][0] == ["user_stop", "max_steps", "(none)"]
    _heights_equal(drawn["stop_reasons"][1]["a.jsonl"], [0.5, 0.25, 0.25])
    _heights_equal(drawn["stop_reasons"][1]["b.jsonl"], [1.0, 0.0, 0.0])  # one reason only
    _heights_equal(drawn["stop_reasons"][1]["c.jsonl"], [nan, nan, nan])
    assert stats["stop_reasons_per_file"][1]["stop_reasons"]["user_stop"]["share"] == 1.0

    # No tier on any turn, and no stop reason: said in the panels, nothing drawn.
    bare = tmp_path / "bare.jsonl"
    with turnrl.RolloutWriter(bare) as writer:
        for i in range(2):
            turn = {"role": "assistant", "content": "."}
            writer.write(turnrl.rollout_record("t", "g", i, 1.0, [turn], {}))
    fig = buffer_stats_figure(buffer_stats(turnrl.read_rollouts(bare)))
    try:
        drawn = _drawn(fig)
    finally:
        plt.close(fig)
    assert drawn["pass_hat_k"] == {"all": {1: 1.0, 2: 1.0}}
    for gid in ("tier_share", "tier_success"):
        assert drawn["texts"][gid] == ["none of the 2 assistant turns has a tier"]
        assert drawn[gid][1] == {}
    assert drawn["stop_reasons"][0] == ["(none)"]
    _heights_equal(drawn["stop_reasons"][1]["all"], [1.0])
    # Nothing at all: every panel says so.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fig = buffer_stats_figure(buffer_stats(turnrl.read_rollouts(empty)))
    try:
        drawn = _drawn(fig)
    finally:
        plt.close(fig)
    assert drawn["pass_hat_k"] == {}
    assert drawn["texts"]["pass_hat_k"] == ["pass^k undefined\nall: undefined (no trajectories)"]
    assert drawn["texts"]["tier_share"] == ["no trajectories"]
    assert drawn["texts"]["stop_reasons"] == ["no trajectories"]
    with pytest.raises(InvalidInputError, match="per_file"):
        buffer_stats_figure({"files": 1})


def test_long_file_names_are_shortened_below_their_shared_folder():
    from turnrl.rollouts import _short_names

    assert _short_names(["runs/base/s.jsonl", "runs/rl/s.jsonl"]) == (
        "runs/",
        ["base/s.jsonl", "rl/s.jsonl"],
    )
    assert _short_names(["/a/b.jsonl"]) == ("/a/", ["b.jsonl"])
    assert _short_names(["b.jsonl", "c.jsonl"]) == ("", ["b.jsonl", "c.jsonl"])
    long = "x" * 40
    folder, names = _short_names([f"r/{long}-step-1.jsonl", f"r/{long}-step-2.jsonl"])
    assert folder == "r/"
    assert names == [f"{'x' * 15}…xxx-step-{k}.jsonl" for k in (1, 2)]
    assert all(len(n) == 32 for n in names)
    # Names that elide alike are numbered rather than shown the same.
    _, names = _short_names([f"r/{long}-a-{long}", f"r/{long}-b-{long}"])
    assert names[0].startswith("1: ") and names[1].startswith("2: ")


def test_rollouts_stats_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from turnrl.cli import main
    from turnrl.rollouts import buffer_stats

    files = _stats_files(tmp_path)
    plot = tmp_path / "plots" / "stats.png"
    assert main(["rollouts", "stats", *files, "--quiet", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {plot}\n") and "7 trajectories in 3 file(s)" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # With --json, stdout is the JSON alone; a PNG whatever the name ends with.
    for name in ("stats", "stats.txt"):
        args = ["rollouts", "stats", files[0], "--json", "--quiet", "--plot", str(tmp_path / name)]
        assert main(args) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out) == buffer_stats(turnrl.read_rollouts(files[0]))
        assert captured.err == f"wrote {tmp_path / name}\n"
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Outputs that cannot be written, or that are an input: refused (exit 2)
    # before anything is read.
    def reading(*args, **kwargs):
        raise AssertionError("read before the output was checked")

    monkeypatch.setattr("turnrl.rollouts.read_rollouts", reading)
    (tmp_path / "link.jsonl").symlink_to(files[0])
    before = Path(files[0]).read_bytes()
    monkeypatch.chdir(tmp_path)
    for target, message in (
        (str(tmp_path), f"--plot {tmp_path}: is a folder; give a file name"),
        (f"{files[1]}/x.png", f"--plot {files[1]}/x.png: {files[1]} is a file, not a folder"),
        ("a.jsonl", "--plot a.jsonl: the output cannot replace the input buffer"),
        ("link.jsonl", "--plot link.jsonl: the output cannot replace the input buffer"),
    ):
        assert main(["rollouts", "stats", *files, "--quiet", "--plot", target]) == 2, target
        captured = capsys.readouterr()
        assert captured.err == f"turnrl rollouts stats: error: {message}" + (
            f" ({files[0]})\n" if "replace" in message else "\n"
        )
        assert captured.out == ""
    assert Path(files[0]).read_bytes() == before
    monkeypatch.undo()

    # A save that fails leaves the old plot, and no temporary file.
    old = plot.read_bytes()

    def savefig(self, target, **kwargs):
        target.write(b"\x89PNG\r\n\x1a\n")  # the start of a PNG, as a failed save leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    assert main(["rollouts", "stats", *files, "--quiet", "--plot", str(plot)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert plot.read_bytes() == old
    assert [p.name for p in plot.parent.iterdir()] == ["stats.png"]

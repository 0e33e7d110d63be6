"""Rollouts through EngineAgent: batches started at once against gathered for a moment.

Concurrent episodes share one engine through :class:`turnrl.engines.EngineAgent`.
Started at once (``gather_window=0``, turnrl before this change), the first
request of a step runs alone while the rest queue behind it, and the episodes
stay split into cohorts that take turns at the engine on every later turn.
With the default ``gather_window`` the leader of a batch first waits until no
request has arrived for that long (at most ten windows), so the episodes
stay in one batch.

Each way runs the same episodes: ``--tasks`` x ``--samples`` episodes of
``synthetic:airline`` with the scripted user on ``--workers`` threads, through
``turnrl.collect.collect_rollouts``. Engines:

* ``fake`` (default): replies with ``--calls`` tool calls, then a text answer;
  each ``generate`` sleeps ``--decode-ms`` plus ``--per-chat-ms`` per chat, as
  decoding on a GPU costs about the same for one chat as for a few;
* ``tiny``: the tiny random Qwen3 of ``tests/tiny_qwen.py`` in
  ``TransformersEngine`` (CPU: the cost grows with the batch);
* ``qwen3-4b``: a random model of Qwen3-4B's shape on CUDA, bf16.

Prints, for each way, the ``generate`` calls, the mean batch, the wall time of
the rollouts (best of ``--repeats``) and its ratio to ``gather_window=0``.

    python benches/bench_engine_batching.py
    python benches/bench_engine_batching.py --engine qwen3-4b --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


class DecodeLikeEngine:
    """``--calls`` tool calls, then a text answer; a fixed cost per generate call."""

    def __init__(self, calls: int, decode_s: float, per_chat_s: float) -> None:
        self.calls, self.decode_s, self.per_chat_s = calls, decode_s, per_chat_s
        self.lock = threading.Lock()

    def generate(self, conversations, tools=None):
        time.sleep(self.decode_s + self.per_chat_s * len(conversations))
        replies = []
        for chat in conversations:
            made = sum(m["role"] == "assistant" for m in chat)
            call = {"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}
            replies.append(
                f"<tool_call>{json.dumps(call)}</tool_call>" if made < self.calls else "Done."
            )
        return replies


def make_engine(args: argparse.Namespace):
    if args.engine == "fake":
        return DecodeLikeEngine(args.calls, args.decode_ms / 1e3, args.per_chat_ms / 1e3)
    import torch
    from tiny_qwen import QWEN3_4B, qwen_tokenizer, random_qwen3, tiny_qwen3

    from turnrl.engines import TransformersEngine

    if args.engine == "tiny":
        model = tiny_qwen3()
    else:
        model = random_qwen3(**QWEN3_4B, device="cuda", dtype=torch.bfloat16)
    return TransformersEngine(model, qwen_tokenizer(), max_new_tokens=args.max_new_tokens)


def rollouts(engine, window: float, args: argparse.Namespace) -> tuple[float, list[int]]:
    from turnrl import envs
    from turnrl.collect import collect_rollouts
    from turnrl.engines import EngineAgent

    domain = envs.load("synthetic:airline", seed=0)
    agent = EngineAgent(engine, gather_window=window)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        collect_rollouts(
            domain,
            lambda: agent,
            envs.ScriptedUser,
            Path(scratch) / "rollouts.jsonl",
            tasks=list(range(args.tasks)),
            samples=args.samples,
            workers=args.workers,
            max_steps=args.max_steps,
            progress=False,
        )
        took = time.perf_counter() - started
    return took, list(agent.batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["fake", "tiny", "qwen3-4b"], default="fake")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3, help="fake: tool calls per episode")
    parser.add_argument("--decode-ms", type=float, default=200.0, help="fake: cost per call")
    parser.add_argument("--per-chat-ms", type=float, default=5.0, help="fake: cost per chat")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--windows", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    engine = make_engine(args)
    rollouts(engine, 0.0, args)  # warm-up
    print(
        f"engine {args.engine}: {args.tasks} tasks x {args.samples} samples on "
        f"{args.workers} workers"
    )
    print("| gather_window | generate calls | mean batch | rollouts s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    baseline = None
    for window in args.windows:
        best, batches = min(
            (rollouts(engine, window, args) for _ in range(args.repeats)), key=lambda r: r[0]
        )
        baseline = baseline or best
        mean = sum(batches) / len(batches)
        print(f"| {window:g} | {len(batches)} | {mean:.2f} | {best:.3f} | {baseline / best:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

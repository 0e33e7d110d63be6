"""Rollout decoding with ``TransformersEngine``: where a token's time goes.

``turnrl train`` without vLLM samples rollouts from the policy being trained
with ``TransformersEngine`` (Hugging Face ``generate``), on the PEFT model:
every linear layer carries its LoRA adapter unmerged. This measures, on the
same random model and the same prompts, the milliseconds per decoded token
(``--new-tokens`` tokens for each of ``--batch`` chats of about
``--prompt-tokens`` tokens, best of ``--repeats``):

* ``base``: the model without an adapter, ``generate`` as turnrl calls it;
* ``lora``: the PEFT model with a rank ``--lora-rank`` adapter on every linear
  layer, as ``turnrl train`` makes it;
* ``lora-static``: the same through ``TransformersEngine(cache_implementation=
  "static")``: transformers' static KV cache, which transformers compiles
  (``torch.compile``, CUDA graphs) on CUDA.

With ``--sequence``, then six calls of changing batch and prompt sizes, as
rollouts make them, through ``lora`` and a fresh ``lora-static`` engine
(recompiles included).

Then, for ``lora``, a profile of a few decoded tokens: the time the GPU was
busy against the wall time (a GPU busy a small share of the time waits on
Python launching kernels).

    python benches/bench_generate.py --shape tiny --device cpu
    python benches/bench_generate.py --shape qwen3-4b   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def random_model(shape: str, device: str):
    import torch
    from tiny_qwen import QWEN3_4B, random_qwen3

    shapes = {
        "tiny": {},
        "qwen3-0.6b": dict(
            hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8, head_dim=128
        ),
        "qwen3-4b": QWEN3_4B,
    }
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return random_qwen3(**{"max_positions": 40960, **shapes[shape]}, device=device, dtype=dtype)


def chats(batch: int, prompt_tokens: int) -> list[list[dict[str, str]]]:
    # About one token a word; each chat a little longer than the last, as in a
    # batch of episodes at different turns.
    words = "please change the flight of my reservation to the next day".split()
    out = []
    for row in range(batch):
        n = prompt_tokens - 8 * row
        text = " ".join(words[i % len(words)] for i in range(max(n, 8)))
        out.append(
            [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": text}]
        )
    return out


def timed(engine, conversations, repeats: int, sync) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        engine.generate(conversations)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["qwen3-0.6b", "qwen3-4b", "tiny"], default="tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--variants", nargs="+", default=["base", "lora", "lora-static"], help="which to time"
    )
    parser.add_argument("--profile-tokens", type=int, default=16)
    parser.add_argument(
        "--compile-dynamic",
        action="store_true",
        help="give the static engines transformers' CompileConfig(dynamic=True), so that the "
        "first compile is already the one for changing shapes",
    )
    parser.add_argument(
        "--agent-steps",
        type=int,
        default=0,
        help="then this many steps of EngineAgent calls from new threads each step, through a "
        "static-cache engine: seconds and reserved GPU memory per step",
    )
    parser.add_argument(
        "--caller-threads",
        action="store_true",
        help="with --agent-steps: generate on whichever thread leads each batch, not on "
        "turnrl's one generation thread",
    )
    parser.add_argument(
        "--sequence",
        action="store_true",
        help="then time lora against lora-static on six calls of changing batch and prompt "
        "sizes, as rollouts make them (the static engine's compiles included)",
    )
    args = parser.parse_args()

    import peft
    import torch
    from tiny_qwen import qwen_tokenizer

    from turnrl.engines import TransformersEngine

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    if args.compile_dynamic:
        import transformers
        from transformers import CompileConfig

        plain_config = transformers.GenerationConfig

        def dynamic_config(**kwargs):
            if kwargs.get("cache_implementation") == "static":
                kwargs["compile_config"] = CompileConfig(dynamic=True)
            return plain_config(**kwargs)

        # TransformersEngine imports GenerationConfig from transformers on each call.
        transformers.GenerationConfig = dynamic_config

    tokenizer = qwen_tokenizer()
    model = random_model(args.shape, args.device)
    conversations = chats(args.batch, args.prompt_tokens)
    # Random weights never sample the end token soon: every chat decodes
    # --new-tokens tokens. Greedy, so each variant decodes the same tokens.
    engine = TransformersEngine(model, tokenizer, max_new_tokens=args.new_tokens, temperature=0.0)
    prompt_lengths = [len(tokenizer(engine.prompt(c))["input_ids"]) for c in conversations]
    print(
        f"shape {args.shape} on {args.device}: {args.batch} chats of "
        f"{min(prompt_lengths)}-{max(prompt_lengths)} prompt tokens, {args.new_tokens} new "
        f"tokens each, LoRA rank {args.lora_rank} on every linear layer"
    )
    results: dict[str, float] = {}
    if "base" in args.variants:
        engine.generate(conversations[:1])  # warm-up
        results["base"] = timed(engine, conversations, args.repeats, sync)
    config = peft.LoraConfig(
        r=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    policy = peft.get_peft_model(model, config)
    lora = TransformersEngine(policy, tokenizer, max_new_tokens=args.new_tokens, temperature=0.0)

    def static_engine() -> TransformersEngine:
        """A fresh engine on the LoRA model with the static cache (whose compiled
        decoder transformers keeps on the model, not the engine)."""
        return TransformersEngine(
            policy,
            tokenizer,
            max_new_tokens=args.new_tokens,
            temperature=0.0,
            cache_implementation="static",
        )

    if "lora" in args.variants:
        lora.generate(conversations[:1])
        results["lora"] = timed(lora, conversations, args.repeats, sync)
    if "lora-static" in args.variants:
        static = static_engine()
        sync()
        start = time.perf_counter()
        static.generate(conversations)  # compiles
        sync()
        print(f"lora-static: first call (compiling) {time.perf_counter() - start:.1f} s")
        results["lora-static"] = timed(static, conversations, args.repeats, sync)
    if args.device.startswith("cuda"):
        print(f"peak GPU memory so far: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.sequence:
        # Rollout-like calls: batches of changing size, prompts that grow.
        shapes = [(8, 1.0), (5, 1.3), (8, 1.6), (3, 1.9), (16, 1.2), (8, 2.2)]
        print(f"{'call':<6} {'batch':>5} {'prompt':>6} {'lora s':>7} {'static s':>8} {'ratio':>6}")
        static = static_engine()
        totals = [0.0, 0.0]
        for call, (batch, scale) in enumerate(shapes):
            convs = chats(batch, int(args.prompt_tokens * scale))
            seconds = [timed(e, convs, 1, sync) for e in (lora, static)]
            totals = [t + s for t, s in zip(totals, seconds, strict=True)]
            print(
                f"{call:<6} {batch:>5} {int(args.prompt_tokens * scale):>6} {seconds[0]:>7.2f} "
                f"{seconds[1]:>8.2f} {seconds[0] / seconds[1]:>5.2f}x"
            )
        print(
            f"{'all':<6} {'':>5} {'':>6} {totals[0]:>7.2f} {totals[1]:>8.2f} "
            f"{totals[0] / totals[1]:>5.2f}x"
        )

    if args.agent_steps:
        # As turnrl train calls it: EngineAgent batching the requests of new
        # episode threads every step, at changing batch sizes and lengths.
        from concurrent.futures import ThreadPoolExecutor

        import turnrl.engines

        if args.caller_threads:  # as before turnrl ran them all on one thread
            turnrl.engines._is_static_cache = lambda name: False

        from turnrl.engines import EngineAgent

        agent = EngineAgent(static_engine())
        print(f"{'step':<5} {'chats':>5} {'seconds':>8} {'reserved GiB':>13}")
        for step in range(args.agent_steps):
            batch = 4 + (step * 3) % 9
            convs = chats(batch, args.prompt_tokens + 64 * step)
            sync()
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=batch) as pool:
                list(pool.map(lambda c: agent(c, None), convs))
            sync()
            reserved = torch.cuda.memory_reserved() / 2**30 if args.device != "cpu" else 0.0
            print(f"{step:<5} {batch:>5} {time.perf_counter() - start:>8.2f} {reserved:>13.2f}")

    base_time = results.get("base")
    print(f"{'variant':<12} {'s/call':>8} {'ms/token':>9} {'vs base':>8}")
    for name, seconds in results.items():
        ratio = f"{seconds / base_time:.2f}x" if base_time else "-"
        print(f"{name:<12} {seconds:>8.2f} {1000 * seconds / args.new_tokens:>9.1f} {ratio:>8}")

    if args.profile_tokens and args.device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        short = TransformersEngine(
            policy, tokenizer, max_new_tokens=args.profile_tokens, temperature=0.0
        )
        short.generate(conversations)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync()
            start = time.perf_counter()
            short.generate(conversations)
            sync()
            wall = time.perf_counter() - start
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events)
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
        print(
            f"profile of lora, {args.profile_tokens} tokens: wall {wall * 1000:.0f} ms (profiled), "
            f"GPU busy {gpu_us / 1000:.0f} ms ({gpu_us / 1e6 / wall:.0%}), "
            f"{launches} kernel launches ({launches / args.profile_tokens:.0f} a token)"
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

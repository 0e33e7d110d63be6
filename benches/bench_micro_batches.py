"""Micro-batches of multi-turn rows: in batch order against longest first and a token budget.

A multi-turn batch that is not packed holds one row per assistant turn, each
its prompt (the conversation so far) and its completion, so the rows of one
conversation grow turn by turn: ``--records`` conversations of ``--turns``
turns, the k-th turn's prompt ``--prompt`` + k x ``--grow`` tokens, each
completion ``--completion`` tokens. One GTPOTrainer step on it (behaviour
log-probs, then the update), three ways, from the same weights:

* ``in order``: ``--micro`` rows at a time in the batch's order (turnrl
  before this change; TRL's and verl's fixed micro-batch size do the same);
* ``longest first``: the same row count, rows sorted by length (the default);
* ``token budget``: ``micro_batch_tokens`` = ``--micro`` x the mean row length,
  rows longest first (verl's dynamic batch size).

With ``--zero-share``, that share of the conversations has advantage 0 on
every token (a group whose rollouts all scored alike): ``in order`` runs
them, as before; the other two skip them, as they add nothing to the loss.

Prints the padded tokens each way runs through the model, the time per step
(best of ``--repeats`` after a warm-up) and its ratio to ``in order``, and
how far the LoRA gradients agree with ``in order``'s.

    python benches/bench_micro_batches.py                 # CPU, a small Qwen3
    python benches/bench_micro_batches.py --device cuda --hidden 2560 --layers 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from turnrl.train import GTPOConfig, GTPOTrainer, TrainBatch, plan_micro_batches


def build_model(hidden: int, layers: int, vocab: int, device: str):
    import peft
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=max(hidden // 256, 1),
        head_dim=64 if hidden >= 128 else 32,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return peft.get_peft_model(model, lora)


def multi_turn_rows(args: argparse.Namespace) -> TrainBatch:
    """One row per turn, conversations in order, as ``build_batch`` lays them out."""
    gen = torch.Generator().manual_seed(0)
    lengths = [
        args.prompt + k * args.grow + args.completion
        for _ in range(args.records)
        for k in range(args.turns)
    ]
    width = max(lengths)
    ids = torch.randint(0, args.vocab, (len(lengths), width), generator=gen)
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    trained = torch.zeros(len(lengths), width, dtype=torch.bool)
    for r, n in enumerate(lengths):
        attention[r, :n] = 1
        trained[r, n - args.completion : n] = True
    advantages = torch.where(trained, torch.randn(len(lengths), width, generator=gen), 0.0)
    return TrainBatch(
        input_ids=ids,
        attention_mask=attention,
        loss_mask=trained,
        advantages=advantages,
        row_trajectory=np.repeat(np.arange(args.records), args.turns),
        turn_advantages=np.zeros(len(lengths)),
        turn_offsets=np.arange(len(lengths) + 1),
        outcome=np.zeros(args.records),
        truncated_rows=0,
    )


class InOrder(GTPOTrainer):
    """Fixed row count in the batch's order: the plan before longest-first."""

    def _micro_batches(self, batch, run=None):
        from turnrl.train import _MicroBatch

        size, device = self.config.micro_batch_size, self._device()
        return [
            _MicroBatch.take(batch, range(s, min(s + size, batch.num_rows)), device)
            for s in range(0, batch.num_rows, size)
        ]


def padded_tokens(batch: TrainBatch, plan: list[list[int]]) -> tuple[int, int]:
    """Padded tokens through the model in all, and in the largest micro-batch (its memory)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    sizes = [len(rows) * max(lengths[r] for r in rows) for rows in plan]
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--records", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=300)
    parser.add_argument("--grow", type=int, default=200)
    parser.add_argument("--completion", type=int, default=60)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--zero-share",
        type=float,
        default=0.0,
        help="share of conversations whose advantages are all 0 (a group that scored alike)",
    )
    args = parser.parse_args()

    batch = multi_turn_rows(args)
    silent = round(args.zero_share * args.records) * args.turns
    batch.advantages[:silent] = 0.0  # "in order" runs them; the others skip them
    lengths = batch.attention_mask.sum(dim=1).tolist()
    trained = ((batch.advantages[:, 1:] != 0) & batch.loss_mask[:, 1:]).sum(dim=1).tolist()
    budget = int(args.micro * np.mean(lengths))
    ways = {
        "in order": (InOrder, GTPOConfig(micro_batch_size=args.micro)),
        "longest first": (GTPOTrainer, GTPOConfig(micro_batch_size=args.micro)),
        "token budget": (GTPOTrainer, GTPOConfig(micro_batch_tokens=budget)),
    }
    plans = {
        "in order": [
            list(range(s, min(s + args.micro, batch.num_rows)))
            for s in range(0, batch.num_rows, args.micro)
        ],
        "longest first": plan_micro_batches(lengths, trained, rows=args.micro),
        "token budget": plan_micro_batches(lengths, trained, tokens=budget),
    }
    print(
        f"{batch.num_rows} rows ({args.records} conversations x {args.turns} turns), "
        f"{sum(lengths)} real tokens, lengths {min(lengths)}-{max(lengths)}; "
        f"{args.device}, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"--micro {args.micro}, budget {budget} tokens"
    )
    model = build_model(args.hidden, args.layers, args.vocab, args.device)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    results = {}
    for name, (cls, cfg) in ways.items():
        cfg.max_grad_norm = None
        cfg.backend = "torch" if args.device == "cpu" else "auto"
        times = []
        for repeat in range(args.repeats + 1):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            params = [p for p in model.parameters() if p.requires_grad]
            trainer = cls(model, torch.optim.SGD(params, lr=1.0), cfg)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.step(batch)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if repeat:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        step = {
            n: (start[n] - p.detach()).float() for n, p in model.named_parameters() if n in start
        }
        results[name] = (min(times), step, padded_tokens(batch, plans[name]), len(plans[name]))

    base_time, base_step, (base_padded, _), _ = results["in order"]
    print(
        "| way | micro-batches | padded tokens | largest micro-batch | s/step | speed-up "
        "| max grad diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (seconds, step, (padded, largest), count) in results.items():
        diff = max(
            float((step[n] - base_step[n]).abs().max() / base_step[n].abs().max().clamp(min=1e-12))
            for n in step
        )
        print(
            f"| {name} | {count} | {padded} ({padded / base_padded:.2f}) | {largest} | "
            f"{seconds:.3f} | "
            f"{base_time / seconds:.2f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()

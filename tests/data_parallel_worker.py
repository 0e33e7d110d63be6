"""One rank of tests/test_data_parallel.py's torchrun job (gloo, on the CPU).

Every scenario: the same records on every rank, each rank stepping on its
slice of them, its LoRA adapter initialised with its own seed (the trainer
must broadcast rank 0's). Rank 0 saves the trained weights and the stats.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/data_parallel_worker.py OUT_DIR
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_train import SYSTEM, TOOLS, _lora, _record
from tiny_qwen import qwen_tokenizer, tiny_qwen3

import turnrl.train
from turnrl.train import GTPOConfig, GTPOTrainer, TrainBatch, build_batch

# name: (config, records per group, each rank's slice of the records)
SCENARIOS = {
    "token_mean_kl_two_epochs": (
        dict(micro_batch_size=2, beta=0.05, entropy_coef=0.01, ppo_epochs=2, max_grad_norm=0.5),
        [3, 3],
        [slice(0, 3), slice(3, 6)],
    ),
    "dr_grpo_uneven": (
        # Gradients summed in many small buckets.
        dict(micro_batch_size=1, agg="dr_grpo", dual_clip=3.0, max_grad_norm=None, bucket=300),
        [2, 4],
        [slice(0, 2), slice(2, 6)],
    ),
    "seq_mean_one_rank_empty": (
        dict(micro_batch_size=3, agg="seq_mean_token_mean", max_grad_norm=None),
        [3, 3],
        [slice(0, 6), slice(6, 6)],
    ),
}


def scenario_records(group_sizes: list[int]) -> list[dict]:
    """Records of whole groups, each group's outcomes mixed, longer and shorter rows."""
    rng = random.Random(29)
    records = []
    for g, size in enumerate(group_sizes):
        records += [_record(rng, float(i % 2), f"g{g}", reasoning=i == 1) for i in range(size)]
    return records


def batch_of(records: list[dict], tok) -> TrainBatch:
    if not records:
        return TrainBatch.empty()
    return build_batch(records, tok, system=SYSTEM, tools=TOOLS, estimator="mt_grpo")


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok, base = qwen_tokenizer(), tiny_qwen3(seed=0)
    default_bucket = turnrl.train._BUCKET_ELEMENTS
    for name, (scenario, sizes, slices) in SCENARIOS.items():
        settings = dict(scenario)
        turnrl.train._BUCKET_ELEMENTS = settings.pop("bucket", default_bucket)
        records = scenario_records(sizes)
        model = _lora(base, seed=1 + rank)
        params = [p for p in model.parameters() if p.requires_grad]
        trainer = GTPOTrainer(
            model,
            torch.optim.AdamW(params, lr=1e-2),
            GTPOConfig(backend="torch", temperature=0.7, **settings),
        )
        stats = trainer.step(batch_of(records[slices[rank]], tok))
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, trained)
        if rank == 0:
            torch.save({"stats": stats, "trained": gathered}, out / f"{name}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

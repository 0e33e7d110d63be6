"""One rank of tests/test_data_parallel.py's torchrun job (gloo, on the CPU).

Every scenario: the same records on every rank, each rank stepping on its
slice of them, its LoRA adapter initialised with its own seed (the trainer
must broadcast rank 0's). Rank 0 saves the trained weights and the stats.
Then two steps of ``train_loop`` calibrating its tier rewards as it goes,
each rank's share of a step succeeding in other proportions (one task always
succeeds), under ``norm="batch"`` (whose std must be the whole step's): rank
0 saves every rank's calibrator. Then a step in which one rank's episodes
end before any reply, and a step filtering groups by outcome in which one
rank trains on nothing (both under ``norm="batch"``: a rank with nothing to
train still takes part in gathering the step's batch). Last, rank 1 fails in the
middle of a step: both ranks must raise (rank 0 must not wait for ever for
rank 1's gradients); each writes what it raised.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/data_parallel_worker.py OUT_DIR
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import random
import sys
from pathlib import Path

import peft
import torch
import torch.distributed as dist
from test_train import SYSTEM, TOOLS, _HalfGold, _record
from tiny_qwen import qwen_tokenizer, tiny_qwen3

import turnrl.train
from turnrl import envs
from turnrl.calibration import OnlineCalibrator
from turnrl.engines import EngineAgent
from turnrl.train import (
    Evaluation,
    GTPOConfig,
    GTPOTrainer,
    TrainBatch,
    _step_turn_advantages,
    build_batch,
    train_loop,
)

# name: (config, records per group, each rank's slice of the records[, the
# order of the records one process's step is to take])
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
    "seq_mean_reference_model": (
        dict(micro_batch_size=2, agg="seq_mean_token_mean", beta=0.1, ref="base"),
        [2, 4],
        [slice(0, 2), slice(2, 6)],
    ),
    "one_rank_without_signal": (
        # Rank 0's rows all have advantage 0: it runs nothing, rank 1 everything.
        dict(micro_batch_size=2, silent=3),
        [3, 3],
        [slice(0, 3), slice(3, 6)],
    ),
    "rollout_correction_with_sampler_logprobs": (
        # Sampler log-probs on every token: weights, and the gap's figures (a max among them).
        dict(micro_batch_size=2, rollout_correction="token_truncate", sampler=True),
        [2, 4],
        [slice(0, 2), slice(2, 6)],
    ),
    "one_rank_empty_and_a_weight_without_gradient": (
        dict(micro_batch_size=3, max_grad_norm=None, unused=True),
        [3, 3],
        [slice(0, 6), slice(6, 6)],
    ),
    "batch_norm_over_the_whole_step": (
        # norm="batch": the std is the step's, both ranks' outcomes and turns
        # (each rank's own would be another: 2 of 6 outcomes on rank 0).
        dict(micro_batch_size=2, norm="batch"),
        [2, 4],
        [slice(0, 2), slice(2, 6)],
    ),
    "two_mini_batches_of_each_ranks_groups": (
        # Rank 0's parts g0 | g1, rank 1's g2 | g3: the optimizer steps are on
        # g0 + g2 and g1 + g3, one process's parts of the records in that
        # order (``order``); dr_grpo's length is each part's longest row's.
        dict(micro_batch_size=2, agg="dr_grpo", mini_batches=2, ppo_epochs=2, max_grad_norm=0.5),
        [2, 2, 2, 2],
        [slice(0, 4), slice(4, 8)],
        [0, 1, 4, 5, 2, 3, 6, 7],
    ),
    "two_mini_batches_one_part_empty_on_a_rank": (
        # Rank 1's one group of one record is its first part (advantage 0:
        # skipped, its tokens counted), its second part empty; one process:
        # g0 + g3 | g1 + g2.
        dict(micro_batch_size=2, agg="seq_mean_token_sum", mini_batches=2),
        [2, 2, 2, 1],
        [slice(0, 6), slice(6, 7)],
        [0, 1, 6, 2, 3, 4, 5],
    ),
    "two_mini_batches_one_rank_empty": (
        dict(micro_batch_size=3, mini_batches=2, beta=0.05),
        [3, 3],
        [slice(0, 6), slice(6, 6)],
    ),
}


def one_process_records(name: str) -> list[dict]:
    """The records of scenario ``name`` in the order one process takes them
    for the ranks' step (that of its ``order``, where it has one: the
    ranks' k-th mini-batches together are one process's k-th)."""
    _, sizes, _, *order = SCENARIOS[name]
    records = scenario_records(sizes)
    return [records[i] for i in order[0]] if order else records


def scenario_records(group_sizes: list[int]) -> list[dict]:
    """Records of whole groups, each group's outcomes mixed, longer and shorter rows."""
    rng = random.Random(29)
    records = []
    for g, size in enumerate(group_sizes):
        records += [_record(rng, float(i % 2), f"g{g}", reasoning=i == 1) for i in range(size)]
    return records


def batch_of(
    records: list[dict], tok, silent: int = 0, sampler: bool = False, norm: str | None = None
) -> TrainBatch:
    """The records' batch (``mt_grpo``, under ``norm`` when given), the first
    ``silent`` records' advantages set to 0; with ``sampler``, sampler
    log-probs on the trained tokens near the tiny model's (about -12), a
    function of each token and its place in its row. Under torchrun with
    ``norm``, the advantages take the whole step (every rank's records) as
    the batch, as train_loop's do."""
    params = None if norm is None else {"norm": norm}
    step_advantages = None
    if params is not None and dist.is_initialized():
        # Every rank gathers, one without records included.
        step_advantages = _step_turn_advantages(
            records, "mt_grpo", params, device=torch.device("cpu")
        )
    if not records:
        return TrainBatch.empty()
    batch = build_batch(
        records,
        tok,
        system=SYSTEM,
        tools=TOOLS,
        estimator="mt_grpo",
        estimator_params=params,
        turn_advantages=step_advantages,
    )
    batch.advantages[torch.from_numpy(batch.row_trajectory < silent)] = 0.0
    if sampler:
        place = torch.arange(batch.input_ids.shape[1])[None, :]
        offset = ((batch.input_ids * 7 + place) % 9).float() * 0.1
        batch.sampler_logprobs = torch.where(batch.loss_mask, -12.4 + offset, torch.nan)
    return batch


def trainer_for(base, scenario: dict, seed: int) -> GTPOTrainer:
    """A LoRA policy (random, from ``seed``) and its trainer (AdamW, weight decay on)."""
    settings = dict(scenario)
    settings.pop("bucket", None)
    settings.pop("silent", None)
    settings.pop("sampler", None)
    settings.pop("norm", None)
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    if settings.pop("unused", False):
        # A trainable weight no loss reaches: one process leaves it alone (no
        # gradient, so AdamW skips it, weight decay included).
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(5)))
    ref = base if settings.pop("ref", None) == "base" else None
    params = [p for p in model.parameters() if p.requires_grad]
    return GTPOTrainer(
        model,
        # eps well above Adam's 1e-8: a first Adam step is lr * g / (|g| + eps),
        # so with eps 1e-8 a weight whose gradient is near 1e-8 turns the
        # last-bit differences of two reduction orders into a step 1e-4 of
        # the largest apart (seen with torch 2.15); 1e-3 keeps the step a
        # smooth function of the gradient that both runs compute alike.
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-3),
        GTPOConfig(backend="torch", temperature=0.7, **settings),
        ref_model=ref,
    )


def calibrating_loop(out: Path, rank: int, tok, base) -> None:
    """Two steps of train_loop with an OnlineCalibrator re-deriving after each, and
    an evaluation on three other tasks (two on one rank, one on the other) after the last."""
    domain = envs.load("synthetic:airline", seed=0)
    tasks = [task.id for task in domain.tasks[:2]]
    engine = _HalfGold(domain, always=tasks[:1])
    # norm="batch": the trained advantages' std must be the whole step's.
    online = OnlineCalibrator("naive", every=1, window=2, min_trajectories=1, norm="batch")
    evaluation = Evaluation(
        tasks=[task.id for task in domain.tasks[2:5]],
        every=5,
        samples=2,
        buffer_dir=out / "evaluating",
    )
    # Peak GPU memory as a CUDA rank would report it, each rank its own
    # (rank 1 the larger allocated, rank 0 the larger reserved): every rank
    # must report the largest of each.
    peaks = {"memory/max_allocated_gib": 1.0 + rank, "memory/max_reserved_gib": 4.0 - rank}
    peak_memory = turnrl.train._peak_memory
    turnrl.train._peak_memory = lambda device, reset=False: {} if reset else dict(peaks)
    history = train_loop(
        trainer_for(base, {"micro_batch_size": 4}, seed=1 + rank),
        domain,
        lambda: EngineAgent(engine),
        envs.ScriptedUser,
        tok,
        tasks=tasks,
        steps=2,
        tasks_per_step=2,
        group_size=4,
        tiers=online,
        estimator_params={"norm": "batch"},
        buffer_dir=out / "calibrating",
        evaluation=evaluation,
        progress=False,
    )
    turnrl.train._peak_memory = peak_memory
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, online.state_dict())
    histories: list = [None] * dist.get_world_size()
    dist.all_gather_object(histories, history)
    if rank == 0:
        (out / "calibrators.json").write_text(json.dumps(states))
        (out / "histories.json").write_text(json.dumps(histories))


class _SilentUser(envs.ScriptedUser):
    """Ends every episode before the agent says anything."""

    def reset(self, task):
        super().reset(task)
        return "###STOP###"


def silent_rank_loop(out: Path, rank: int, tok, base) -> None:
    """One step of train_loop in which rank 0's episodes all end before any reply:
    it has no turn to train, the other rank has."""
    domain = envs.load("synthetic:airline", seed=0)
    # tau-bench's rules let the agent answer an opening that stops; tau2's,
    # which end the episode there, are the ones under which this happens.
    domain.rules = dataclasses.replace(domain.rules, stop_on_opening=True)
    tasks = [task.id for task in domain.tasks[:2]]
    history = train_loop(
        trainer_for(base, {"micro_batch_size": 4}, seed=1 + rank),
        domain,
        lambda: EngineAgent(_HalfGold(domain, always=tasks[:1])),
        _SilentUser if rank == 0 else envs.ScriptedUser,
        tok,
        tasks=tasks,
        steps=1,
        tasks_per_step=2,
        group_size=2,
        # Rank 0, with nothing to train, still takes part in gathering the step's batch.
        estimator_params={"norm": "batch"},
        buffer_dir=out / "silent",
        progress=False,
    )
    if rank == 0:
        (out / "silent.json").write_text(json.dumps(history))


def filtering_loop(out: Path, rank: int, tok, base) -> None:
    """One step of train_loop filtering groups by outcome over two rounds: of two
    tasks, the one that always succeeds (no signal) lies on rank 0 in both rounds
    (a seed where it does), so rank 0 trains on nothing and rank 1 on two groups."""
    domain = envs.load("synthetic:airline", seed=0)
    pool = list(domain.tasks[:2])
    seed = next(
        s
        for s in range(100)
        if turnrl.train.step_tasks(pool, 0, 2, s, 0)[0].id
        == turnrl.train.step_tasks(pool, 0, 2, s, 1)[0].id
    )
    uniform = turnrl.train.step_tasks(pool, 0, 2, seed, 0)[0].id
    engine = _HalfGold(domain, always=[uniform])  # one a rank: every other episode succeeds
    history = train_loop(
        trainer_for(base, {"micro_batch_size": 4}, seed=1 + rank),
        domain,
        lambda: EngineAgent(engine),
        envs.ScriptedUser,
        tok,
        tasks=[task.id for task in pool],
        steps=1,
        tasks_per_step=2,
        group_size=2,
        seed=seed,
        # Rank 0, left with no group, still takes part in gathering the step's batch.
        estimator_params={"norm": "batch"},
        buffer_dir=out / "filtering",
        filter_groups="outcome",
        max_sampling_rounds=2,
        progress=False,
    )
    histories: list = [None] * dist.get_world_size()
    dist.all_gather_object(histories, history)
    if rank == 0:
        (out / "filtering.json").write_text(json.dumps({"uniform": uniform, "ranks": histories}))


def main(out: Path) -> None:
    # A short timeout: a rank left waiting fails the test instead of hanging it.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    tok, base = qwen_tokenizer(), tiny_qwen3(seed=0)
    default_bucket = turnrl.train._BUCKET_ELEMENTS
    for name, (scenario, sizes, slices, *_) in SCENARIOS.items():
        turnrl.train._BUCKET_ELEMENTS = scenario.get("bucket", default_bucket)
        records = scenario_records(sizes)
        trainer = trainer_for(base, scenario, seed=1 + rank)
        silent = scenario.get("silent", 0) - slices[rank].start
        sampler = scenario.get("sampler", False)
        norm = scenario.get("norm")
        share = records[slices[rank]]
        stats = trainer.step(batch_of(share, tok, silent=silent, sampler=sampler, norm=norm))
        trained = {
            n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
        }
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, trained)
        if rank == 0:
            torch.save({"stats": stats, "trained": gathered}, out / f"{name}.pt")

    calibrating_loop(out, rank, tok, base)
    silent_rank_loop(out, rank, tok, base)
    filtering_loop(out, rank, tok, base)

    trainer = trainer_for(base, {"micro_batch_size": 2}, seed=1)
    batch = batch_of(scenario_records([3, 3])[3 * rank : 3 * rank + 3], tok)
    if rank == 1:
        batch.advantages[batch.loss_mask] = float("nan")
    try:
        trainer.step(batch)
        raised = "nothing"
    except Exception as e:
        raised = f"{type(e).__name__}: {e}"
    (out / f"error-rank-{rank}.txt").write_text(raised)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

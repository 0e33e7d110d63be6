"""The fused GTPO loss never makes the host wait for the GPU (needs CUDA).

A synchronising call (``.item()``, a pageable host-to-device copy such as
``tensor.new_tensor(x)``, ``nonzero``) inside the rows schedule runs once per
row block: the host stops queueing work until the GPU catches up, and the GPU
then idles while Python queues the next block. On an H100 one such copy in
SAPO's per-token terms made the loss 14-15% slower at N = 8192
(benches/RESULTS.md).
``torch.cuda.set_sync_debug_mode("error")`` turns every such call into an
error, so each option below is run forward and backward under it.

The rows schedule's backward reads the loss gradient once as a float (its
one rounding of the stored bf16 gradients), so only its forward is checked.
The options that only the vocabulary schedule takes (GSPO-token segments,
off-policy masking, the top-entropy tokens) are checked on it. The top-entropy
threshold was read with a tensor index, a host read per call and per backward.
"""

from __future__ import annotations

import contextlib
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gtpo_cases import SEED, add_segments, fused_loss, make_case  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU (compiled kernels)"
)

# Each loss option alone, beside the case's defaults (KL k3 with beta, entropy
# bonus, dual clip); the rows schedule, 300 rows per block (four blocks).
OPTIONS = {
    "ppo": {},
    "cispo": dict(policy_loss="cispo", eps_low=1.0, eps_high=4.0, dual_clip=None),
    "sapo": dict(policy_loss="sapo", dual_clip=None),
    "kl-k1": dict(kl_estimator="k1"),
    "kl-k2": dict(kl_estimator="k2"),
    "kl-k3+": dict(kl_estimator="k3+"),
    "kl-correction": dict(kl_correction=True),
    "no-kl": dict(beta=0.0),
    "seq_mean_token_mean": dict(agg="seq_mean_token_mean"),
    "dr_grpo": dict(agg="dr_grpo", max_len=512),
    "global": dict(global_tokens=4000, global_sequences=8),
}


# Options the rows schedule does not take: the vocabulary schedule alone.
VOCAB_ONLY = {
    "segments": dict(segment_ids=True),
    "off-policy-mask": dict(off_policy_mask=0.5, off_policy_units=True),
    "top-entropy": dict(top_entropy_quantile=0.2),
}


def _loss_and_backward(case, check_backward: bool, **options) -> None:
    _, _, loss, stats = fused_loss(case, backend="triton", check_inputs=False, **options)
    # The statistics stay on the GPU: reading them is the caller's choice.
    assert all(value.device.type == "cuda" for value in stats.values())
    if check_backward:
        loss.backward()
        return
    with _synchronising_allowed():
        loss.backward()


@contextlib.contextmanager
def _synchronising_allowed():
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("default")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _case_and_options(name: str, schedule: str):
    case = make_case(SEED, (4, 300), 256, 8192, torch.bfloat16, "token_mean")
    options = dict({**OPTIONS, **VOCAB_ONLY}[name])
    if options.pop("segment_ids", False):
        add_segments(case, SEED)
        options["segment_ids"] = case.kwargs.pop("segment_ids")
    if options.pop("off_policy_units", False):
        options["off_policy_units"] = torch.arange(4)[:, None].expand(4, 300).contiguous()
        options["sampling_logprobs"] = case.old + 1.0  # the policy has moved: units masked
    for field in ("hidden", "weight", "targets", "advantages", "old", "mask", "ref"):
        setattr(case, field, getattr(case, field).cuda())
    options = {k: v.cuda() if torch.is_tensor(v) else v for k, v in options.items()}
    chunk = 300 if schedule == "rows" else 2048
    return case, dict(options, schedule=schedule, chunk_size=chunk)


@pytest.mark.parametrize(
    ("name", "schedule"),
    [(name, schedule) for name in OPTIONS for schedule in ("rows", "vocab")]
    + [(name, "vocab") for name in VOCAB_ONLY],
)
def test_the_loss_never_synchronises(name, schedule):
    case, options = _case_and_options(name, schedule)
    # The rows schedule's backward reads the loss gradient as a Python float,
    # once per call (one rounding of the bf16 gradients: see _backward), and
    # does no other work; the vocabulary schedule's backward is checked too.
    check_backward = schedule == "vocab"
    _loss_and_backward(case, check_backward, **options)  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loss_and_backward(case, check_backward, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")

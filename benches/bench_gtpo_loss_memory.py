"""Peak memory of the fused GTPO loss (torch backend) vs the unfused eager loss, on the CPU.

Method: each variant runs forward + backward once in a fresh subprocess. The
child builds the inputs, warms torch up on a tiny problem (thread pools,
oneDNN), records its resident set size (VmRSS) as the baseline, runs the
loss, then reads the peak resident set size (``resource.getrusage``
``ru_maxrss``). The delta is the peak memory beyond the inputs (gradients of
hidden and weight included: every variant must produce them). Variants:
``eager`` (the unfused loss), ``fused`` (``gtpo_loss``'s default schedule,
``rows`` when gradients are taken), ``fused-vocab`` (the ``vocab``
schedule) and ``fused-turn`` (one GSPO-token importance ratio per turn of
``--turn-len`` tokens, ``segment_ids``: the ``vocab`` schedule, which
segments need).

Why RSS and not tracemalloc: torch's CPU tensors come from c10's allocator
(``posix_memalign``), which tracemalloc never sees. Tensors this large are
mmap-backed by glibc and unmapped when freed, so RSS follows live tensor
bytes and the kernel's ``ru_maxrss`` is an exact high-water mark with no
sampling gaps. A fresh process per variant keeps one variant's peak from
hiding the other's.

Run: ``python benches/bench_gtpo_loss_memory.py`` (N=4096, H=512, V=32768,
fp32; about a minute on 2 cores). ``--tokens/--hidden/--vocab`` shrink it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from turnrl.kernels.fused_linear_gtpo import fused_logprobs, gtpo_loss, torch_gtpo_loss

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")

variant, n, h, v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
turn_len = int(sys.argv[5])
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
hidden = (torch.randn(n, h, generator=g)).requires_grad_(True)
weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_(True)
targets = torch.randint(0, v, (n,), generator=g)
adv = torch.randn(n, generator=g)
# Old/ref log-probs near the current ones, as in training (small tiles: this
# pass must not set the high-water mark).
lp = fused_logprobs(hidden.detach(), weight.detach(), targets, 0.9, backend="torch", chunk_size=256)
old = lp + 0.3 * torch.randn(n, generator=g)
ref = lp + 0.3 * torch.randn(n, generator=g)
mask = torch.rand(n, generator=g) > 0.1
kw = dict(beta=0.04, entropy_coef=0.01, dual_clip=3.0, temperature=0.9)

def run(hid, wei, tgt, a, o, r, m):
    if variant == "fused-turn":
        turns = torch.arange(tgt.shape[0]) // turn_len
        loss, _ = gtpo_loss(hid, wei, tgt, a, o, m, r, backend="torch", segment_ids=turns, **kw)
    elif variant.startswith("fused"):
        schedule = variant.split("-")[1] if "-" in variant else "auto"
        loss, _ = gtpo_loss(hid, wei, tgt, a, o, m, r, backend="torch", schedule=schedule, **kw)
    else:
        loss = torch_gtpo_loss(hid, wei, tgt, a, o, m, r, **kw)
    loss.backward()
    return loss

# warm-up at a tiny shape so library initialisation is outside the measurement
sh = hidden[:8].detach().clone().requires_grad_(True)
sw = weight[:64].detach().clone().requires_grad_(True)
run(sh, sw, targets[:8] % 64, adv[:8], old[:8], ref[:8], mask[:8])
base = rss_kib()
t0 = time.perf_counter()
loss = run(hidden, weight, targets, adv, old, ref, mask)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"variant": variant, "peak_delta_mib": (peak - base) / 1024,
                  "seconds": seconds, "loss": float(loss)}))
"""


def measure(variant: str, n: int, h: int, v: int, turn_len: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(n), str(h), str(v), str(turn_len)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--turn-len", type=int, default=256, help="tokens per turn of fused-turn")
    args = parser.parse_args()
    inputs_mib = (args.tokens + args.vocab) * args.hidden * 4 / 2**20
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(
        f"N={args.tokens} H={args.hidden} V={args.vocab} fp32; inputs {inputs_mib:.0f} MiB, "
        f"one [N, V] fp32 logits {logits_mib:.0f} MiB"
    )
    # "fused" is the default schedule (rows, since gradients are taken).
    results = [
        measure(variant, args.tokens, args.hidden, args.vocab, args.turn_len)
        for variant in ("eager", "fused", "fused-vocab", "fused-turn")
    ]
    for r in results:
        print(
            f"{r['variant']:>11}: peak beyond inputs {r['peak_delta_mib']:8.1f} MiB, "
            f"fwd+bwd {r['seconds']:6.2f} s, loss {r['loss']:.6f}"
        )
    eager = results[0]
    for r in results[1:]:
        ratio = r["peak_delta_mib"] / eager["peak_delta_mib"]
        print(f"ratio {r['variant']}/eager peak memory: {ratio:.3f} (goal <= 0.25)")


if __name__ == "__main__":
    main()

"""GPU benchmark of the fused GTPO loss at Qwen3-4B shapes (needs CUDA).

For each N in --tokens (default 8192 and 32768), with H=2560, V=151936 and
bf16 hidden states and LM head, times forward+backward with
``triton.testing.do_bench`` (median ms) and records the peak of
``torch.cuda.max_memory_allocated`` beyond the inputs, for:

* ``turnrl``: ``gtpo_loss(backend="triton")`` (per-token advantages), its
  default schedule (``rows``); ``vocab``: the ``vocab`` schedule;
  ``rowsR``: the ``rows`` schedule with R rows per block (``--row-blocks``);
  ``turn``: one GSPO-token importance ratio per turn of ``--turn-len``
  tokens (``segment_ids``; the ``vocab`` schedule, which segments need, so
  compare it with ``vocab``); ``seq``: one per row;
* the loss's options, each alone on the default schedule (``--no-options``
  leaves them out): ``cispo`` and ``sapo`` (``policy_loss``), ``kl-k3`` and
  ``kl-k2`` (``beta=0.04`` against reference log-probs, the two
  ``kl_estimator`` forms with different gradients), ``kl-corr``
  (``kl_correction``), ``entropy`` (``entropy_coef=0.01``), ``opmask``
  (``off_policy_mask=0.5``, one unit per row) and ``top-ent``
  (``top_entropy_quantile=0.2``);
* ``eager``: ``torch_gtpo_loss``, the whole [N, V] logits upcast to fp32;
* ``compile``: ``torch.compile`` of the same eager loss;
* ``liger``: ``LigerFusedLinearGRPOLoss`` when liger-kernel is installed,
  given per-sequence advantages (it takes no per-token ones), with its
  defaults; ``liger-nc`` without torch.compile; ``liger-b`` with the whole
  batch in one chunk.

Every variant computes gradients for hidden and weight. Two reference rows
follow: ``matmul``, one [N, H] x [H, V] bf16 product (any loss with both
gradients needs three), and ``fwd-only``, turnrl's forward without autograd. A variant that
runs out of memory (or fails, with the error on stderr) is reported as
OOM. Prints a table with ratios against eager and writes a CSV (--csv,
default benches/results/gpu_loss.csv).

Run: ``python benches/gpu_loss.py [--tokens 8192 32768] [--seq-len 1024]
[--turn-len 256] [--row-blocks ...] [--no-options]``.
Without CUDA it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import sys
from pathlib import Path

HIDDEN, VOCAB = 2560, 151936


def _inputs(n: int, seq_len: int, turn_len: int, torch):
    if n % seq_len:
        raise SystemExit(f"--tokens {n} is not a multiple of --seq-len {seq_len}")
    g = torch.Generator(device="cuda").manual_seed(0)
    b = n // seq_len
    dev, bf16 = "cuda", torch.bfloat16
    hidden = torch.randn(b, seq_len, HIDDEN, device=dev, dtype=bf16, generator=g)
    weight = (torch.randn(VOCAB, HIDDEN, device=dev, generator=g) / HIDDEN**0.5).to(bf16)
    targets = torch.randint(0, VOCAB, (b, seq_len), device=dev, generator=g)
    mask = torch.rand(b, seq_len, device=dev, generator=g) > 0.1
    seq_adv = torch.randn(b, device=dev, generator=g)
    # Per-token advantages: the sequence's value varied per turn-sized block.
    advantages = seq_adv[:, None] + 0.1 * torch.randn(b, seq_len, device=dev, generator=g)
    from turnrl.kernels.fused_linear_gtpo import fused_logprobs

    old = fused_logprobs(hidden, weight, targets, backend="triton")
    old = old + 0.05 * torch.randn(old.shape, device=dev, generator=g)
    ref = old + 0.05 * torch.randn(old.shape, device=dev, generator=g)
    rows = torch.arange(b, device=dev)[:, None]
    positions = torch.arange(seq_len, device=dev)[None, :]
    return dict(
        turn_ids=rows * seq_len + positions // turn_len,
        row_ids=rows.expand(b, seq_len),
        hidden=hidden,
        weight=weight,
        targets=targets,
        mask=mask,
        advantages=advantages,
        seq_adv=seq_adv,
        old=old,
        ref=ref,
    )


def _turnrl_loss(x, h, w, **options):
    from turnrl.kernels.fused_linear_gtpo import gtpo_loss

    loss, _ = gtpo_loss(
        h,
        w,
        x["targets"],
        x["advantages"],
        x["old"],
        x["mask"],
        backend="triton",
        check_inputs=False,
        **options,
    )
    return loss


def _option_variants():
    """Each loss option alone, on the default schedule."""

    def with_options(ref=False, units=False, **options):
        def loss(x, h, w):
            extra = dict(options)
            if ref:
                extra["ref_logprobs"] = x["ref"]
            if units:
                extra["off_policy_units"] = x["row_ids"]
            return _turnrl_loss(x, h, w, **extra)

        return loss

    return {
        "cispo": with_options(policy_loss="cispo", eps_low=1.0, eps_high=4.0),
        "sapo": with_options(policy_loss="sapo"),
        "kl-k3": with_options(ref=True, beta=0.04),
        "kl-k2": with_options(ref=True, beta=0.04, kl_estimator="k2"),
        "kl-corr": with_options(ref=True, beta=0.04, kl_correction=True),
        "entropy": with_options(entropy_coef=0.01),
        "opmask": with_options(units=True, off_policy_mask=0.5),
        "top-ent": with_options(top_entropy_quantile=0.2),
    }


def _variants(torch, row_blocks, options=True):
    from turnrl.kernels.fused_linear_gtpo import torch_gtpo_loss

    def turnrl(schedule="auto", chunk_size=None):
        return lambda x, h, w: _turnrl_loss(x, h, w, schedule=schedule, chunk_size=chunk_size)

    def eager(x, h, w):
        return torch_gtpo_loss(h, w, x["targets"], x["advantages"], x["old"], x["mask"])

    compiled = torch.compile(torch_gtpo_loss)

    def compiled_eager(x, h, w):
        return compiled(h, w, x["targets"], x["advantages"], x["old"], x["mask"])

    def segmented(ids):
        return lambda x, h, w: _turnrl_loss(x, h, w, segment_ids=x[ids])

    variants = {"turnrl": turnrl(), "vocab": turnrl("vocab")}
    variants.update(turn=segmented("turn_ids"), seq=segmented("row_ids"))
    for rows in row_blocks:
        variants[f"rows{rows}"] = turnrl("rows", rows)
    if options:
        variants.update(_option_variants())
    variants.update(eager=eager, compile=compiled_eager)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        print("liger-kernel not installed: skipping LigerFusedLinearGRPOLoss")
        return variants
    wanted = dict(
        beta=0.0,
        use_ref_model=False,
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        compiled=True,
    )
    accepted = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters

    def liger_variant(**overrides):
        options = {**wanted, **overrides}
        liger = LigerFusedLinearGRPOLoss(**{k: v for k, v in options.items() if k in accepted})

        def liger_loss(x, h, w):
            out = liger(
                _input=h,
                lin_weight=w,
                selected_token_ids=x["targets"],
                attention_mask=x["mask"].long(),
                advantages=x["seq_adv"],
                old_per_token_logps=x["old"],
            )
            return out[0] if isinstance(out, tuple) else out

        return liger_loss

    # Liger's defaults (torch.compile on, one sequence per chunk), then
    # without compile (torch 2.11 failed to compile it at N = 32768 on an
    # H100) and with all sequences in one chunk.
    variants["liger"] = liger_variant()
    variants["liger-nc"] = liger_variant(compiled=False)
    variants["liger-b"] = liger_variant(chunk_size=1 << 20)
    return variants


def _measure(fn, x, torch, triton):
    hidden = x["hidden"].detach().requires_grad_(True)
    weight = x["weight"].detach().requires_grad_(True)

    def step():
        hidden.grad = weight.grad = None
        fn(x, hidden, weight).backward()

    try:
        step()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(step, warmup=3, rep=20)
    except torch.OutOfMemoryError:
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        return None, None
    except Exception as exc:  # e.g. a Liger version with another signature
        print(f"{getattr(fn, '__name__', fn)} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        return None, None
    return ms, peak / 2**30


def _floors(x, torch, triton):
    """Reference points: one [N, H] x [H, V] bf16 product (a loss with gradients
    needs at least three) and turnrl's forward alone, without autograd."""
    h2 = x["hidden"].reshape(-1, HIDDEN)
    w = x["weight"]
    out = {}
    try:
        ms = triton.testing.do_bench(lambda: torch.mm(h2, w.T), warmup=3, rep=20)
        out["matmul"] = (ms, None)
    except torch.OutOfMemoryError:
        out["matmul"] = (None, None)
    torch.cuda.empty_cache()

    def forward():
        with torch.no_grad():
            _turnrl_loss(x, x["hidden"], w)

    forward()
    out["fwd-only"] = (triton.testing.do_bench(forward, warmup=3, rep=20), None)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--turn-len", type=int, default=256, help="tokens per turn of the turn variant"
    )
    parser.add_argument(
        "--row-blocks",
        type=int,
        nargs="*",
        default=[512, 1024, 2048, 4096],
        help="also time the rows schedule with these rows per block",
    )
    parser.add_argument(
        "--no-options",
        action="store_true",
        help="leave out the loss-option variants (cispo, sapo, kl-*, entropy, ...)",
    )
    parser.add_argument(
        "--csv", type=Path, default=Path(__file__).parent / "results" / "gpu_loss.csv"
    )
    args = parser.parse_args()
    try:
        import torch
        import triton
        import triton.testing
    except ImportError as exc:
        print(f"gpu_loss.py needs torch and triton: {exc}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "gpu_loss.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "CPU figures come from benches/bench_gtpo_loss_memory.py",
            file=sys.stderr,
        )
        return 2
    device = torch.cuda.get_device_name()
    variants = _variants(torch, args.row_blocks, options=not args.no_options)
    rows = []
    for n in args.tokens:
        x = _inputs(n, args.seq_len, args.turn_len, torch)
        results = {name: _measure(fn, x, torch, triton) for name, fn in variants.items()}
        results.update(_floors(x, torch, triton))
        eager_ms, eager_gib = results["eager"]
        for name, (ms, gib) in results.items():
            rows.append(
                {
                    "device": device,
                    "tokens": n,
                    "hidden": HIDDEN,
                    "vocab": VOCAB,
                    "variant": name,
                    "ms": ms,
                    "peak_gib": gib,
                    "speedup_vs_eager": (eager_ms / ms) if (ms and eager_ms) else None,
                    "memory_vs_eager": (gib / eager_gib) if (gib and eager_gib) else None,
                }
            )
        del x
        torch.cuda.empty_cache()

    def fmt(v, spec):
        return "OOM" if v is None else format(v, spec)

    print(f"{device}; H={HIDDEN} V={VOCAB} bf16, forward+backward")
    print(f"{'N':>6} {'variant':>8} {'ms':>9} {'peak GiB':>9} {'x eager':>8} {'mem/eager':>9}")
    for r in rows:
        print(
            f"{r['tokens']:>6} {r['variant']:>8} {fmt(r['ms'], '9.1f')} "
            f"{fmt(r['peak_gib'], '9.2f')} {fmt(r['speedup_vs_eager'], '8.2f')} "
            f"{fmt(r['memory_vs_eager'], '9.3f')}"
        )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

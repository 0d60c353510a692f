"""Forward-pass cost of int8 factor rows (dequantized on the fly) on SmolLM2 layer shapes.

For each shape, times y = layer(x) on ``--tokens`` tokens for the dense ``nn.Linear``, a
``LowRankLinear`` with all rows in the model dtype and the same factors with every row in
int8, interleaved in one process, and prints the time relative to dense.

    .venv/bin/python benchmarks/hybrid_speed.py                 # prefill-sized: 2048 tokens
    .venv/bin/python benchmarks/hybrid_speed.py --tokens 1 --repeats 2000   # decode-sized

Writes JSON (default ``bench-out/hybrid_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHAPES = {"q_proj/o_proj": (576, 576), "gate_proj/up_proj": (1536, 576),
          "down_proj": (576, 1536)}


def _interleaved_seconds(layers: dict, x, repeats: int, rounds: int = 7) -> dict[str, float]:
    """Median over ``rounds`` of the mean time of ``repeats`` calls, the layers taking turns
    in every round (robust to a shared, noisy machine)."""
    import statistics

    import torch

    samples: dict[str, list[float]] = {name: [] for name in layers}
    with torch.no_grad():
        for layer in layers.values():
            layer(x)
        for _ in range(rounds):
            for name, layer in layers.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    layer(x)
                samples[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank-fraction", type=float, default=0.5,
                   help="rank as a fraction of min(m, n)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output", default="bench-out/hybrid_speed.json")
    args = p.parse_args(argv)

    import torch
    from torch import nn

    from rankcut.core.hybrid import RowPlan
    from rankcut.nn.modules import LowRankLinear

    torch.manual_seed(0)
    rows = []
    for label, (m, n) in SHAPES.items():
        rank = int(args.rank_fraction * min(m, n))
        dense = nn.Linear(n, m, bias=False)
        w_u, w_v = torch.randn(m, rank) / rank**0.5, torch.randn(rank, n) / n**0.5
        low = LowRankLinear.from_factors(w_u, w_v)
        every = torch.ones(rank, dtype=torch.bool)
        hybrid = LowRankLinear.from_factors(w_u, w_v, plan=RowPlan(every, every))
        x = torch.randn(args.tokens, n)
        times = _interleaved_seconds({"dense": dense, "low-rank": low, "int8": hybrid}, x,
                                     args.repeats)
        rows.append({"shape": label, "m": m, "n": n, "rank": rank, **times})
    print(f"\n{'shape':<20}{'rank':>6}{'dense ms':>10}{'low-rank':>10}{'int8':>10}"
          f"{'int8/low-rank':>15}")
    for r in rows:
        print(f"{r['shape']:<20}{r['rank']:>6}{r['dense'] * 1e3:>10.2f}"
              f"{r['low-rank'] / r['dense']:>10.2f}{r['int8'] / r['dense']:>10.2f}"
              f"{r['int8'] / r['low-rank']:>15.2f}")
    print("(low-rank and int8 columns: time relative to dense)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

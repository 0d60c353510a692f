"""Cost of IO-SVD's KL output metric: seconds per calibration batch of one gradient pass.

Runs a whole-model gradient pass (the tests' reference, ``tests/whole_model.py``) on SmolLM2
(input statistics always on) without the output metric, with the one-pass sampled form, and
with the exact K-pass form for several K, all on the same batch in one process, so the
ratios are comparable.

    .venv/bin/python benchmarks/kl_cost.py --top-k 1 5 20

Prints a table and writes JSON (default ``bench-out/kl_cost.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/whole_model.py


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--top-k", nargs="+", type=int, default=[1, 5, 20])
    p.add_argument("--output", default="bench-out/kl_cost.json")
    args = p.parse_args(argv)

    import torch

    import rankcut
    from rankcut.calibration import data
    from rankcut.calibration.hooks import InputMomentHooks
    from tests.whole_model import OutputMetricHooks, calibration_gradients

    torch.manual_seed(3)
    model, tokenizer = rankcut.load_model(args.model)
    ids = data.calibration_batch(tokenizer, data.load_text("wiki", "calib"), args.batch_size,
                                 args.seqlen, 3)
    layers = rankcut.architecture.select_targets(model)
    variants = [("no output metric", None, 0), ("sample, K=5", "sample", 5)]
    variants += [(f"exact, K={k}", "exact", k) for k in args.top_k]
    rows = []
    for label, mode, k in variants:
        start = time.perf_counter()
        with InputMomentHooks(layers) as inputs:
            outputs = OutputMetricHooks(layers, k, mode, 0) if mode else None
            with outputs or contextlib.nullcontext():
                calibration_gradients(model, layers, ids, args.batch_size, input_hooks=inputs,
                                      output_hooks=outputs)
        rows.append({"variant": label, "seconds": time.perf_counter() - start})
    base = rows[0]["seconds"]
    print(f"\n{'variant':<20}{'s / batch':>12}{'vs none':>10}")
    for row in rows:
        row["ratio"] = row["seconds"] / base
        print(f"{row['variant']:<20}{row['seconds']:>12.1f}{row['ratio']:>10.2f}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch_size": args.batch_size, "seqlen": args.seqlen,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

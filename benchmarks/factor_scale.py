"""How large the low-rank factors are, per model: why block refinement's learning rate is
per tensor (``--block-lr-scale rms``, issue 20).

AdamW moves every entry by about the learning rate per step, whatever the entry's size, so
one learning rate is a different fraction of each factor. This compresses each model with
``--method`` at ``--ratio`` (README protocol's calibration text, ``--num-samples`` × 512
tokens, seed 3), takes every low-rank layer's two factors as block refinement trains them
(W_u m×r, W_v r×n, float32) and prints the deciles of their root mean squares; JSON too.

    python benchmarks/factor_scale.py [--models smollm2 gemma3-270m] [--method svd-llm]
        [--ratio 0.4] [--num-samples 32] [--json benchmarks/results/factor-scale.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import rankcut
from rankcut.architecture import text_tokenizer
from rankcut.calibration import data
from rankcut.compression.refine import TrainablePair
from rankcut.nn.modules import LowRankLinear


def rms(tensor) -> float:
    """Root mean square of ``tensor``'s entries."""
    return float(tensor.detach().double().square().mean().sqrt())


def factor_scales(model_name: str, method: str, ratio: float, samples: int) -> dict:
    """{model, w_u, w_v}: the RMS of every low-rank layer's factors after compression."""
    model, processor = rankcut.load_model(model_name)
    text = data.load_text("wiki", "calib")
    calib = data.calibration_batch(text_tokenizer(processor), text, samples, 512, 3)
    rankcut.compress(model, rankcut.make_config(method, ratio=ratio), calib)
    pairs = [TrainablePair.of(m) for m in model.modules() if isinstance(m, LowRankLinear)]
    return {"model": model_name, "w_u": [rms(p.weight_u) for p in pairs],
            "w_v": [rms(p.weight_v) for p in pairs]}


def summary(values: list[float]) -> dict:
    """Deciles 10/50/90 and the geometric mean of ``values``."""
    deciles = statistics.quantiles(values, n=10)
    return {"p10": deciles[0], "median": statistics.median(values), "p90": deciles[-1],
            "geomean": statistics.geometric_mean(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--json", default="benchmarks/results/factor-scale.json")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        scales = factor_scales(name, args.method, args.ratio, args.num_samples)
        rows.append({"model": name, "method": args.method, "ratio": args.ratio,
                     "layers": len(scales["w_u"]), "w_u": summary(scales["w_u"]),
                     "w_v": summary(scales["w_v"]),
                     "all": summary(scales["w_u"] + scales["w_v"])})
    print(f"{'model':<14} {'factor':<6} {'p10':>8} {'median':>8} {'p90':>8} {'geomean':>8}")
    for row in rows:
        for factor in ("w_u", "w_v", "all"):
            s = row[factor]
            print(f"{row['model']:<14} {factor:<6} {s['p10']:8.4f} {s['median']:8.4f} "
                  f"{s['p90']:8.4f} {s['geomean']:8.4f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Inference benchmark: prefill and decode tokens/s, KV-cache and weight bytes, dense vs
compressed SmolLM2-135M-Instruct, interleaved in one process (ratios are robust to a noisy
machine). Prints a table per checkpoint and writes JSON (default bench-out/speed.json).

    .venv/bin/python benchmarks/speed.py --checkpoints bench-out/io-svd-0.2 bench-out/io-svd-0.4
    .venv/bin/python benchmarks/speed.py --checkpoints DIR --device cuda --batch-sizes 1 16

Each checkpoint is a rankcut folder (``rankcut compress --output DIR``); the dense reference
is the original model (``--dense``, default the bundled SmolLM2). The decode target of the
project is a decode speedup of at least 85% of the weight-bytes ratio (dense bytes /
compressed bytes) at batch 1; the ``× / bytes`` column is that fraction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--dense", default="smollm2")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    p.add_argument("--prompt-lens", nargs="+", type=int, default=[128, 512])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output", default="bench-out/speed.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    import rankcut
    from rankcut.inference import compare_speed, print_speed_table, speedups

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    dense, _ = rankcut.load_model(args.dense, device=args.device)
    results = []
    for path in args.checkpoints:
        compressed = rankcut.from_pretrained(path, device=args.device)
        entry = compressed.config.quantization_config
        entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
        rows = []
        for batch in args.batch_sizes:
            for length in args.prompt_lens:
                rows += [r.as_dict() for r in compare_speed(
                    {"dense": dense, "compressed": compressed}, batch, length, args.new_tokens,
                    args.repeats)]
        figures = {"model": path, "method": entry["method"],
                   "target_ratio": entry.get("target_ratio"),
                   "achieved_ratio": entry.get("achieved_ratio"), "device": args.device,
                   "dtype": str(next(compressed.parameters()).dtype).removeprefix("torch."),
                   "torch_threads": torch.get_num_threads(), "rows": rows, **speedups(rows)}
        print_speed_table(figures)
        results.append(figures)
        del compressed
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

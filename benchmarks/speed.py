"""Inference benchmark: prefill and decode tokens/s, KV-cache and weight bytes, dense vs
compressed SmolLM2-135M-Instruct, interleaved in one process (ratios are robust to a noisy
machine). Prints a table per checkpoint and writes JSON (default bench-out/speed.json).

    .venv/bin/python benchmarks/speed.py --checkpoints bench-out/io-svd-0.2 bench-out/io-svd-0.4
    .venv/bin/python benchmarks/speed.py --checkpoints DIR --device cuda --batch-sizes 1 16
    .venv/bin/python benchmarks/speed.py --checkpoints DIR --memory   # + peak memory per model

Each checkpoint is a rankcut folder (``rankcut compress --output DIR``); the dense reference
is the original model (``--dense``, default the bundled SmolLM2). The decode target of the
project is a decode speedup of at least 85% of the weight-bytes ratio (dense bytes /
compressed bytes) at batch 1; the ``× / bytes`` column is that fraction.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
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
    p.add_argument("--memory", action="store_true",
                   help="also measure each model's peak RSS (CPU) or peak GPU memory in a "
                        "fresh process: load, then one generation at the largest shape")
    p.add_argument("--output", default="bench-out/speed.json")
    p.add_argument("--memory-worker", nargs=1, metavar="MODEL", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def memory_worker(args: argparse.Namespace, model_path: str) -> dict:
    """Loads one model, runs one generation at the largest shape; returns its peaks."""
    import torch

    import rankcut
    from rankcut.measure.inference import time_generation
    from rankcut.runner import peak_gpu_mb, peak_rss_mb

    before = current_rss_mb()
    if model_path == args.dense:
        model, _ = rankcut.load_model(model_path, device=args.device)
    else:
        model = rankcut.from_pretrained(model_path, device=args.device)
    gc.collect()
    loaded = current_rss_mb()
    ids = torch.randint(0, model.config.vocab_size, (max(args.batch_sizes), max(args.prompt_lens)),
                        generator=torch.Generator().manual_seed(0))
    time_generation(model, ids, args.new_tokens)
    return {"model": model_path, "batch_size": max(args.batch_sizes),
            "prompt_len": max(args.prompt_lens), "model_rss_mb": loaded - before,
            "rss_after_generation_mb": current_rss_mb(), "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb()}


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(argv: list[str], model_path: str) -> dict:
    """Runs ``memory_worker`` in a fresh process (its peak is its own)."""
    cmd = [sys.executable, __file__, *argv, "--memory-worker", model_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"memory run of {model_path} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    import torch

    import rankcut
    from rankcut.measure.inference import benchmark, print_speed_table

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args, args.memory_worker[0])))
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    dense, _ = rankcut.load_model(args.dense, device=args.device)
    results = []
    for path in args.checkpoints:
        compressed = rankcut.from_pretrained(path, device=args.device)
        entry = compressed.config.quantization_config
        entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
        figures = {"model": path, "method": entry["method"],
                   "target_ratio": entry.get("target_ratio"),
                   "achieved_ratio": entry.get("achieved_ratio"), "device": args.device,
                   "dtype": str(next(compressed.parameters()).dtype).removeprefix("torch."),
                   **benchmark({"dense": dense, "compressed": compressed}, args.batch_sizes,
                               args.prompt_lens, args.new_tokens, args.repeats)}
        print_speed_table(figures)
        results.append(figures)
        del compressed
    memory = []
    if args.memory:
        memory = [measure_memory(argv, path) for path in [args.dense, *args.checkpoints]]
        print(f"\n{'model':<28}{'RSS of the loaded model MiB':>28}{'RSS after generation':>22}"
              f"{'peak RSS MiB':>14}")
        for row in memory:
            print(f"{row['model']:<28}{row['model_rss_mb']:>28.0f}"
                  f"{row['rss_after_generation_mb']:>22.0f}{row['peak_rss_mb']:>14.0f}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "memory_worker"}
    out.write_text(json.dumps({"settings": settings, "results": results, "memory": memory},
                              indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""Peak memory and time of the default ``rankcut compress`` on the bundled SmolLM2.

Runs the default command (io-svd, ratio 0.2, the default calibration and evaluation) in a
fresh process per executor, in memory and with ``--stream``, reads each run's peak RSS
and compression time from its ``--json`` record, and compares the peaks with the targets
of issue 19: at most 3.0 GiB in memory and 1.5 GiB streamed.

    python benchmarks/compress_memory.py                     # both executors
    python benchmarks/compress_memory.py --modes stream --no-eval

Prints a table and writes JSON (default benchmarks/results/compress-memory.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGETS_GIB = {"resident": 3.0, "stream": 1.5}


def run(mode: str, args: argparse.Namespace) -> dict:
    """Runs the default ``rankcut compress`` (``--stream`` for ``mode == "stream"``) in a
    fresh process; returns its run record plus the benchmark's wall time."""
    out = Path(args.work) / f"{mode}-out"
    record = Path(args.work) / f"{mode}.json"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "rankcut.cli", "compress", "--output", str(out),
               "--json", str(record), *(["--stream"] if mode == "stream" else []),
               *(["--no-eval"] if not args.eval else []), *args.extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    figures = json.loads(record.read_text())
    figures["bench_wall_seconds"] = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=list(TARGETS_GIB),
                        default=list(TARGETS_GIB))
    parser.add_argument("--no-eval", dest="eval", action="store_false",
                        help="skip the perplexity runs (compression only)")
    parser.add_argument("--work", default="/tmp/rankcut-compress-memory")
    parser.add_argument("--json", default="benchmarks/results/compress-memory.json")
    parser.add_argument("extra", nargs="*", help="more `rankcut compress` arguments (after --)")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes:
        figures = run(mode, args)
        peak = figures["peak_rss_mb"] / 1024
        rows.append({"mode": mode, "peak_rss_gib": peak, "target_gib": TARGETS_GIB[mode],
                     "met": peak <= TARGETS_GIB[mode],
                     "compress_seconds": figures["compress_seconds"],
                     "wall_seconds": figures["wall_seconds"],
                     "dense_perplexity": figures["dense_perplexity"],
                     "perplexity": figures["perplexity"],
                     "achieved_ratio": figures["achieved_ratio"]})
    print(f"\n{'executor':<10}{'peak RSS':>11}{'target':>9}{'compress s':>12}{'ppl':>9}")
    for r in rows:
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        print(f"{r['mode']:<10}{r['peak_rss_gib']:>9.2f} G{'<= ' + str(r['target_gib']):>9}"
              f"{r['compress_seconds']:>12.0f}{ppl:>9}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2)
                               + "\n")


if __name__ == "__main__":
    main()

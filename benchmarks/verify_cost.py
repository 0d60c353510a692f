"""What verifying shard digests costs when a checkpoint loads (issue 18).

Compresses the bundled SmolLM2 with plain SVD at 0.2 (no data needed), saves it, then loads
it with ``rankcut.from_pretrained`` alternately with and without ``verify`` (the sha256 of
every shard), ``--repeats`` times each, in one process so both see the same machine state;
prints a table and writes JSON. The first (cold) load of each kind is included.

    python benchmarks/verify_cost.py [--repeats 5] [--json benchmarks/results/verify-cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import rankcut
from rankcut.io import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/verify-cost.json")
    args = parser.parse_args()
    model, tokenizer = rankcut.load_model("smollm2")
    rankcut.compress(model, rankcut.make_config("svd", ratio=0.2), None)
    with tempfile.TemporaryDirectory() as tmp:
        out = rankcut.save_pretrained(model, Path(tmp) / "ckpt", tokenizer)
        shard_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        seconds: dict[str, list[float]] = {"verify": [], "no-verify": [], "hash only": []}
        for _ in range(args.repeats):
            for kind in ("verify", "no-verify"):
                start = time.perf_counter()
                rankcut.from_pretrained(out, verify=kind == "verify")
                seconds[kind].append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.verify_shard_digests(out, checkpoint.validate_checkpoint(out, False))
            seconds["hash only"].append(time.perf_counter() - start)
    medians = {kind: statistics.median(values) for kind, values in seconds.items()}
    ratio = medians["verify"] / medians["no-verify"]
    print(f"SmolLM2 svd 0.2 checkpoint: {shard_bytes / 2**20:.0f} MiB of shards, "
          f"{args.repeats} loads each")
    print(f"{'load':<12}{'median s':>10}{'min s':>8}{'max s':>8}")
    for kind, values in seconds.items():
        print(f"{kind:<12}{medians[kind]:>10.3f}{min(values):>8.3f}{max(values):>8.3f}")
    print(f"verified / unverified load time: {ratio:.2f}x; hashing "
          f"{shard_bytes / 2**20 / medians['hash only']:.0f} MiB/s")
    result = {"shard_bytes": shard_bytes, "repeats": args.repeats, "seconds": seconds,
              "median_seconds": medians, "verify_over_no_verify": ratio,
              "hash_mib_per_s": shard_bytes / 2**20 / medians["hash only"]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

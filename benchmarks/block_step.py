"""Cost of one block-refinement training step in float32 and under bf16 autocast.

Builds one SmolLM2-135M decoder block with its seven layers cut to the ranks io-svd gave
block 5 at ρ = 0.4 (plain SVD factors: the cost depends on the shapes, not the values),
as the trainable pairs block refinement uses, and times forward, mean squared error and
backward on one batch (``--batch`` samples × ``--seqlen`` tokens) under
``training_precision(device, "float32")`` and ``(device, "bf16")``, the two taking turns
in every round; prints the median seconds per step and their ratio.

    .venv/bin/python benchmarks/block_step.py

Writes JSON (default ``bench-out/block_step.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

#: Ranks of block 5 of SmolLM2-135M at ρ = 0.4 under io-svd (its log, README protocol).
RANKS = {"self_attn.q_proj": 42, "self_attn.k_proj": 48, "self_attn.v_proj": 126,
         "self_attn.o_proj": 104, "mlp.gate_proj": 322, "mlp.up_proj": 343,
         "mlp.down_proj": 364}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--output", default="bench-out/block_step.json")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from rankcut.compression.refine import TrainablePair, cpu_has_bf16, training_precision
    from rankcut.loading import load_model

    model, _ = load_model(args.model)
    block = model.model.layers[5]
    for name, rank in RANKS.items():
        u, s, vh = torch.linalg.svd(block.get_submodule(name).weight.detach().float(),
                                    full_matrices=False)
        block.set_submodule(name, TrainablePair(u[:, :rank] * s[:rank], vh[:rank], None))
    for param in block.parameters():
        param.requires_grad_(False)
    params = [p for n, p in block.named_parameters() if "weight_" in n]
    for param in params:
        param.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seqlen, model.config.hidden_size, generator=generator)
    positions = torch.arange(args.seqlen)[None].expand(args.batch, -1)
    rotary = model.model.rotary_emb(x, positions)

    def step(precision: str) -> float:
        start = time.perf_counter()
        with training_precision("cpu", precision):
            out = block(x, position_embeddings=rotary, position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        F.mse_loss(out.float(), x).backward()
        for param in params:
            param.grad = None
        return time.perf_counter() - start

    samples = {"float32": [], "bf16": []}
    for precision in samples:
        step(precision)  # warm-up
    for _ in range(args.rounds):
        for precision, times in samples.items():
            times.append(step(precision))
    seconds = {precision: statistics.median(times) for precision, times in samples.items()}
    result = {"model": args.model, "batch": args.batch, "seqlen": args.seqlen,
              "threads": torch.get_num_threads(), "cpu_has_bf16": cpu_has_bf16(),
              "seconds_per_step": seconds,
              "bf16_speedup": seconds["float32"] / seconds["bf16"]}
    print("| precision | s / step |\n| --- | --- |")
    for precision, value in seconds.items():
        print(f"| {precision} | {value:.3f} |")
    print(f"bf16 speed-up {result['bf16_speedup']:.2f}x (native bf16: {result['cpu_has_bf16']})")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

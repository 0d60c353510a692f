"""Peak memory of streamed compression on a model made for the purpose.

Builds (once) a random-initialised Llama of about 1.1B parameters (TinyLlama's shape:
hidden 2048, 22 blocks, intermediate 5632, 32 heads with 4 KV heads; SmolLM2's 49,152-token
vocabulary and tokenizer, untied head) saved as fp32 safetensors shards, one block per
shard, written tensor by tensor so that building it needs little memory either. Then runs
``rankcut compress --stream`` on it for each method in a fresh process, reads the process's
peak RSS from the run's JSON, and compares it with the targets of issue 7: under 40% of the
model's fp32 size for both (issue 19; issue 7 allowed io-svd 60%).

    python benchmarks/streaming_memory.py --model /tmp/synthetic-1b --methods svd-llm io-svd

Prints a table and writes JSON (default benchmarks/results/streaming-memory.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

TARGETS = {"svd-llm": 0.40, "io-svd": 0.40}  # issue 19 (io-svd was 0.60 in issue 7)
GLOBAL = ("zero-sum", "io-svd")  # batched by --grad-batch-size
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, vocab_size=49152,
             max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)


def block_shapes(config: LlamaConfig, index: int) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of Llama decoder block ``index``."""
    h, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    p = f"model.layers.{index}."
    return {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inner, h), p + "mlp.up_proj.weight": (inner, h),
            p + "mlp.down_proj.weight": (h, inner), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,)}


def make_model(folder: Path, seed: int = 0) -> Path:
    """Writes the synthetic model to ``folder`` (skipped when it is already whole).

    Weights are N(0, 0.02²) from a generator seeded per shard, norms are ones; each shard
    is written as soon as it is drawn. The folder is renamed into place at the end.
    """
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    from rankcut.offline.assets import ensure_smollm2

    config = LlamaConfig(**SHAPE)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    h = config.hidden_size
    shards = [{"model.embed_tokens.weight": (config.vocab_size, h)}]
    shards += [block_shapes(config, i) for i in range(config.num_hidden_layers)]
    shards += [{"model.norm.weight": (h,), "lm_head.weight": (config.vocab_size, h)}]
    weight_map = {}
    for k, shapes in enumerate(shards):
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        tensors = {name: (torch.ones(shape) if len(shape) == 1 else
                          torch.randn(shape, generator=generator) * 0.02)
                   for name, shape in shapes.items()}
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"format": "pt"}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    source = ensure_smollm2()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def fp32_bytes(folder: Path) -> int:
    """Bytes of every tensor of the folder in fp32."""
    from rankcut.io.checkpoint import tensor_specs

    total = 0
    for _, shape in tensor_specs(folder).values():
        count = 1
        for d in shape:
            count *= d
        total += 4 * count
    return total


def run_method(model: Path, method: str, args: argparse.Namespace) -> dict:
    """Runs ``rankcut compress --stream`` in a fresh process; returns its figures."""
    out = Path(args.work) / f"{method}-out"
    figures_file = Path(args.work) / f"{method}.json"
    command = [sys.executable, "-m", "rankcut.cli", "compress", "--model", str(model),
               "--stream", "--method", method, "--ratio", str(args.ratio),
               "--num-samples", str(args.num_samples), "--seqlen", str(args.seqlen),
               "--batch-size", str(args.batch_size), "--output", str(out),
               *(["--grad-batch-size", str(args.batch_size)] if method in GLOBAL else []),
               "--json", str(figures_file)]
    command += ["--max-windows", "2"] if args.eval else ["--no-eval"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    figures = json.loads(figures_file.read_text())
    figures["bench_wall_seconds"] = time.perf_counter() - start
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/tmp/rankcut-synthetic-1b",
                        help="where the synthetic model is (built there when missing)")
    parser.add_argument("--methods", nargs="+", default=list(TARGETS))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="samples per forward pass (--grad-batch-size for io-svd)")
    parser.add_argument("--eval", action="store_true",
                        help="also compute streamed perplexity (its logits add to the peak)")
    parser.add_argument("--keep", action="store_true", help="keep the compressed outputs")
    parser.add_argument("--work", default="/tmp/rankcut-streaming-bench")
    parser.add_argument("--json", default="benchmarks/results/streaming-memory.json")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = make_model(Path(args.model))
    print(f"synthetic model: {model} ({time.perf_counter() - start:.0f} s)")
    size = fp32_bytes(model)
    rows = []
    for method in args.methods:
        figures = run_method(model, method, args)
        peak = figures["peak_rss_mb"] * 2**20
        rows.append({"method": method, "fp32_bytes": size, "peak_rss_bytes": int(peak),
                     "peak_fraction": peak / size, "target_fraction": TARGETS.get(method),
                     "compress_seconds": figures["compress_seconds"],
                     "wall_seconds": figures["wall_seconds"],
                     "dense_perplexity": figures["dense_perplexity"],
                     "perplexity": figures["perplexity"],
                     "achieved_ratio": figures["achieved_ratio"]})
    params = size // 4
    print(f"\nmodel: {params / 1e9:.2f}B parameters, fp32 {size / 2**30:.2f} GiB; "
          f"{args.num_samples} x {args.seqlen} calibration tokens, ratio {args.ratio}")
    print(f"{'method':<10}{'peak RSS':>12}{'of fp32':>9}{'target':>8}{'compress s':>12}")
    for r in rows:
        target = "-" if r["target_fraction"] is None else f"< {r['target_fraction']:.0%}"
        print(f"{r['method']:<10}{r['peak_rss_bytes'] / 2**30:>10.2f} G{r['peak_fraction']:>9.1%}"
              f"{target:>8}{r['compress_seconds']:>12.0f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "params": params,
                                           "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

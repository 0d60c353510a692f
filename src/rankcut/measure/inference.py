"""Inference: greedy generation streamed to the terminal, and prefill / decode speed.

Speed is measured the way users meet it: a prefill of ``batch_size × prompt_len`` random
tokens with the KV cache on, then ``new_tokens`` greedy decode steps of one token per
sequence, each step reusing the cache. Models are timed interleaved (dense, compressed,
dense, ...) in one process, and the median over repeats is kept, so a ratio between them is
robust to a shared, noisy machine.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64,
             chat: bool = True, stream: bool = True) -> str:
    """Greedy continuation of ``prompt``; printed token by token when ``stream``.

    Args:
        chat: wrap the prompt in the tokenizer's chat template (when it has one).

    Returns:
        The generated text (without the prompt).
    """
    from transformers import TextStreamer

    device = next(model.parameters()).device
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream \
        else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens,
                             streamer=streamer, pad_token_id=pad)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


@dataclass
class SpeedResult:
    """One model at one shape: medians over the repeats.

    Attributes:
        prefill_tokens_per_s: batch_size·prompt_len / prefill time.
        decode_tokens_per_s: batch_size·new_tokens / time of the decode steps.
        weight_bytes: parameters and buffers of the model.
        kv_cache_bytes: the cache after prefill and decode.
        peak_gpu_mb: peak CUDA memory of the run (None on the CPU).
    """

    model: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    weight_bytes: int
    kv_cache_bytes: int
    peak_gpu_mb: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied embedding counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache object (every tensor it references)."""
    seen, total = set(), 0

    def visit(value, depth=0):
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        elif isinstance(value, list | tuple) and depth < 4:
            for item in value:
                visit(item, depth + 1)
        elif hasattr(value, "__dict__") and depth < 4:
            for item in vars(value).values():
                visit(item, depth + 1)

    visit(cache)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model: nn.Module, ids: torch.Tensor, new_tokens: int
                    ) -> tuple[float, float, int]:
    """Times one prefill of ``ids`` and ``new_tokens`` greedy cached decode steps.

    Returns:
        (prefill seconds, decode seconds, bytes of the final KV cache).
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        _sync(device)
        prefill = time.perf_counter() - start
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode = time.perf_counter() - start
    return prefill, decode, cache_bytes(cache)


def compare_speed(models: dict[str, nn.Module], batch_size: int, prompt_len: int,
                  new_tokens: int, repeats: int = 3, vocab_size: int | None = None,
                  seed: int = 0) -> list[SpeedResult]:
    """Times every model on the same random prompt, interleaved, one warm-up each.

    Returns:
        One ``SpeedResult`` per model, in the order given.
    """
    first = next(iter(models.values()))
    vocab = vocab_size or first.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, prompt_len),
                        generator=torch.Generator().manual_seed(seed))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    cache: dict[str, int] = {}
    peaks: dict[str, float | None] = {}
    for model in models.values():  # warm-up: allocator, kernels, lazy init
        time_generation(model, ids[:, : min(prompt_len, 16)], min(new_tokens, 2))
    for _ in range(repeats):
        for name, model in models.items():
            device = next(model.parameters()).device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            prefill, decode, cache[name] = time_generation(model, ids, new_tokens)
            times[name].append((prefill, decode))
            peaks[name] = (torch.cuda.max_memory_allocated(device) / 2**20
                           if device.type == "cuda" else None)
    results = []
    for name, model in models.items():
        prefill = statistics.median(t[0] for t in times[name])
        decode = statistics.median(t[1] for t in times[name])
        results.append(SpeedResult(
            model=name, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
            prefill_tokens_per_s=batch_size * prompt_len / prefill,
            decode_tokens_per_s=batch_size * new_tokens / decode if new_tokens else 0.0,
            weight_bytes=weight_bytes(model), kv_cache_bytes=cache[name],
            peak_gpu_mb=peaks[name]))
        logger.info("%s b=%d L=%d: prefill %.0f tok/s, decode %.1f tok/s", name, batch_size,
                    prompt_len, results[-1].prefill_tokens_per_s,
                    results[-1].decode_tokens_per_s)
    return results


def check_bench_settings(batch_sizes: list[int], prompt_lens: list[int], new_tokens: int,
                         repeats: int) -> None:
    """Raises ConfigError for a batch size, prompt length or repeat count below 1, or a
    negative number of new tokens."""
    from ..errors import ConfigError

    for flag, values in (("batch-sizes", batch_sizes), ("prompt-lens", prompt_lens),
                         ("repeats", [repeats])):
        if min(values) < 1:
            raise ConfigError(f"--{flag} must be at least 1")
    if new_tokens < 0:
        raise ConfigError("--new-tokens must not be negative")


def benchmark(models: dict[str, nn.Module], batch_sizes: list[int], prompt_lens: list[int],
              new_tokens: int, repeats: int) -> dict:
    """Runs ``compare_speed`` at every batch size × prompt length (``models`` must include
    ``"dense"``).

    Returns:
        ``{"torch_threads", "rows": [SpeedResult dicts], "weight_byte_ratio", "speedups"}``.

    Raises:
        ConfigError: see ``check_bench_settings``.
    """
    check_bench_settings(batch_sizes, prompt_lens, new_tokens, repeats)
    rows = [result.as_dict() for batch in batch_sizes for length in prompt_lens
            for result in compare_speed(models, batch, length, new_tokens, repeats)]
    return {"torch_threads": torch.get_num_threads(), "rows": rows, **speedups(rows)}


def speedups(rows: list[dict]) -> dict:
    """Returns, from ``compare_speed`` rows (as dicts) that include a ``"dense"`` model,
    the weight-bytes ratio dense / compressed and one entry per shape and other model with
    its speedups over dense and its KV-cache bytes relative to dense."""
    dense = {(r["batch_size"], r["prompt_len"]): r for r in rows if r["model"] == "dense"}
    others = [r for r in rows if r["model"] != "dense"]
    byte_ratio = next(iter(dense.values()))["weight_bytes"] / others[0]["weight_bytes"]
    shapes = []
    for c in others:
        d = dense[(c["batch_size"], c["prompt_len"])]
        decode = (c["decode_tokens_per_s"] / d["decode_tokens_per_s"]
                  if d["decode_tokens_per_s"] else None)
        shapes.append({"model": c["model"], "batch_size": c["batch_size"],
                       "prompt_len": c["prompt_len"],
                       "prefill_speedup": c["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
                       "decode_speedup": decode,
                       "decode_vs_byte_ratio": decode / byte_ratio if decode else None,
                       "kv_cache_ratio": c["kv_cache_bytes"] / max(1, d["kv_cache_bytes"])})
    return {"weight_byte_ratio": byte_ratio, "speedups": shapes}


def print_speed_table(f: dict) -> None:
    """Prints one line per shape and model: tokens/s, speedups over dense, decode speedup
    relative to the weight-bytes ratio, and KV-cache bytes relative to dense."""
    print(f"\n{f['model']} on {f['device']} ({f['dtype']}, {f['torch_threads']} threads); "
          f"weight bytes dense / compressed = {f['weight_byte_ratio']:.3f}")
    print(f"{'model':<20}{'batch':>6}{'prompt':>8}{'prefill tok/s':>15}{'×':>7}"
          f"{'decode tok/s':>14}{'×':>7}{'× / bytes':>11}{'KV cache':>10}")
    dense = {(r["batch_size"], r["prompt_len"]): r for r in f["rows"] if r["model"] == "dense"}
    printed = set()
    for shape in f["speedups"]:
        key = (shape["batch_size"], shape["prompt_len"])
        d = dense[key]
        c = next(r for r in f["rows"] if r["model"] == shape["model"]
                 and (r["batch_size"], r["prompt_len"]) == key)
        if key not in printed:
            printed.add(key)
            print(f"{'dense':<20}{key[0]:>6}{key[1]:>8}{d['prefill_tokens_per_s']:>15.0f}"
                  f"{'':>7}{d['decode_tokens_per_s']:>14.1f}")
        print(f"{shape['model']:<20}{key[0]:>6}{key[1]:>8}{c['prefill_tokens_per_s']:>15.0f}"
              f"{shape['prefill_speedup']:>7.2f}{c['decode_tokens_per_s']:>14.1f}"
              f"{shape['decode_speedup'] or 0:>7.2f}{shape['decode_vs_byte_ratio'] or 0:>11.2f}"
              f"{shape['kv_cache_ratio']:>10.3f}")

"""Quality benchmark: perplexity of every method × ratio on SmolLM2-135M-Instruct.

Defaults follow the project's benchmark protocol: 64 calibration samples × 512 tokens of
the built-in wiki calibration part (seed 3); perplexity on the first 20 windows of 2048
tokens of the wiki test part. Each run is a separate process, so its peak RSS is its own.

    .venv/bin/python benchmarks/quality.py                       # svd, svd-llm × 0.2/0.4/0.6
    .venv/bin/python benchmarks/quality.py --methods svd-llm svd-llm:sequential --ratios 0.4

A method written ``name:flag`` turns on a boolean setting (e.g. ``svd-llm:sequential``);
``name:key=value`` sets any other (e.g. ``zero-sum:stages=3:rule=least-sensitive``).
``+update`` adds a parameter update after truncation, with its own settings
(``svd-llm+refit``, ``svd-llm+lora:steps=40``), or a block-wise update then lora
(``io-svd+block:lr=1e-3+lora``). ``recipe:best`` measures ``rankcut compress --recipe best``
(``recipe:best:block_epochs=2`` with a setting changed).
A vision-language model adds image-text calibration and the caption perplexity:

    .venv/bin/python benchmarks/quality.py --model smollm2-llava --methods io-svd \
        --ratios 0.2 0.4 --calib-images vqa --eval-images captions

Prints a table and writes JSON (default ``bench-out/quality.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--methods", nargs="+", default=["svd", "svd-llm"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--calib-file", default=None)
    p.add_argument("--eval-file", default=None)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--calib-images", default=None,
                   help="image-text calibration of a vision-language model (see rankcut compress)")
    p.add_argument("--image-samples", type=int, default=None,
                   help="windows that start with an image (default: half of --num-samples)")
    p.add_argument("--eval-images", default=None,
                   help="also the caption perplexity given the image (vision-language model)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--skip-dense", action="store_true", help="do not re-measure the dense model")
    p.add_argument("--stream", action="store_true",
                   help="compress with the streamed executor (rankcut compress --stream) into "
                        "a temporary folder and measure that checkpoint block by block")
    p.add_argument("--output", default="bench-out/quality.json")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "RATIO"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_setting(text: str) -> tuple[str, object]:
    """``"flag"`` → (flag, True); ``"key=3"`` → (key, 3); ``"key=word"`` → (key, "word")."""
    key, _, value = text.partition("=")
    if not value:
        return key, True
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def run_one(args: argparse.Namespace, method: str | None, ratio: float | None) -> dict:
    """Compresses (unless ``method`` is None: the dense baseline) and evaluates one model."""
    import torch

    import rankcut
    from rankcut.architecture import text_tokenizer
    from rankcut.calibration import data, image_data
    from rankcut.measure.evaluation import caption_perplexity
    from rankcut.runner import peak_gpu_mb, peak_rss_mb

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on a GPU too
    if args.stream:
        return run_one_streamed(args, method, ratio)
    model, processor = rankcut.load_model(args.model, device=args.device)
    tokenizer = text_tokenizer(processor)
    row: dict = {"method": method or "dense", "target_ratio": ratio or 0.0}
    if method is not None:
        config, update = method_configs(method, ratio)
        calib = None
        if config.needs_input_stats or config.needs_row_fisher or update is not None:
            text = data.load_text(args.calib_file or "wiki", "calib")
            calib = (image_data.mixed_calibration(processor, text, args.num_samples,
                                                  args.seqlen, args.seed, args.calib_images,
                                                  args.image_samples or args.num_samples // 2)
                     if args.calib_images else
                     data.calibration_batch(tokenizer, text, args.num_samples, args.seqlen,
                                            args.seed))
        report = rankcut.compress(model, config, calib, update=update)
        row.update(achieved_ratio=report.achieved_ratio,
                   achieved_byte_ratio=report.achieved_byte_ratio, compress_seconds=report.seconds,
                   kept_by_type=kept_by_type(report), stage_losses=report.stage_losses,
                   anchor_log=report.anchor_log,
                   update_log=report.update.log if report.update else [])
    test = data.eval_token_ids(tokenizer, data.load_text(args.eval_file or "wiki", "test"))
    result = rankcut.evaluate(model, test, seqlen=args.eval_seqlen, max_windows=args.max_windows)
    if args.eval_images:
        records = image_data.image_text_source(args.eval_images)
        row["caption_perplexity"] = caption_perplexity(model, processor, records).perplexity
    row.update(perplexity=result.perplexity, nonfinite_windows=result.nonfinite_windows,
               peak_rss_mb=peak_rss_mb(), device=args.device, peak_gpu_mb=peak_gpu_mb())
    return row


def method_configs(method: str, ratio: float):
    """(method config, update config or None) of a ``name:flag+update:key=value`` text,
    or of a recipe (``recipe:best``, with overrides: ``recipe:best:block_epochs=2``)."""
    import rankcut
    from rankcut.compression.update import make_update

    if method.startswith("recipe:"):
        _, name, *flags = method.split(":")
        return rankcut.recipe_configs(name, ratio, **dict(map(parse_setting, flags)))
    method_part, _, update_part = method.partition("+")
    name, *flags = method_part.split(":")
    config = rankcut.make_config(name, ratio=ratio, **dict(map(parse_setting, flags)))
    if not update_part:
        return config, None
    steps = [part.split(":") for part in update_part.split("+")]
    settings = {f"{name}_{key}": value for name, *flags in steps
                for key, value in map(parse_setting, flags)}
    return config, make_update("+".join(name for name, *_ in steps), **settings)


def run_one_streamed(args: argparse.Namespace, method: str | None, ratio: float | None) -> dict:
    """As :func:`run_one` through the streamed executor: the model never loaded whole; the
    checkpoint (in a temporary folder) is measured block by block."""
    import tempfile

    from transformers import AutoTokenizer

    from rankcut.calibration import data
    from rankcut.compression import streaming
    from rankcut.loading import resolve_model_source
    from rankcut.runner import peak_rss_mb

    if args.calib_images or args.eval_images:
        raise SystemExit("--stream measures text models here; drop --calib-images/--eval-images")
    source = resolve_model_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    test = data.eval_token_ids(tokenizer, data.load_text(args.eval_file or "wiki", "test"))
    row: dict = {"method": method or "dense", "target_ratio": ratio or 0.0, "stream": True}
    with tempfile.TemporaryDirectory(prefix="rankcut-quality-") as tmp:
        folder = source
        if method is not None:
            config, update = method_configs(method, ratio)
            text = data.load_text(args.calib_file or "wiki", "calib")
            calib = data.calibration_batch(tokenizer, text, args.num_samples, args.seqlen,
                                           args.seed)
            folder = str(Path(tmp) / "out")
            report = streaming.compress_streaming(source, folder, config, calib,
                                                  update=update, device=args.device)
            row.update(achieved_ratio=report.achieved_ratio,
                       achieved_byte_ratio=report.achieved_byte_ratio,
                       compress_seconds=report.seconds, kept_by_type=kept_by_type(report),
                       stage_losses=report.stage_losses, anchor_log=report.anchor_log,
                       update_log=report.update.log if report.update else [],
                       peak_rss_mb=peak_rss_mb())
        result = streaming.streamed_perplexity(folder, test, args.eval_seqlen, args.max_windows,
                                               device=args.device)
    row.setdefault("peak_rss_mb", peak_rss_mb())
    row.update(perplexity=result.perplexity, nonfinite_windows=result.nonfinite_windows,
               device=args.device)
    return row


def kept_by_type(report) -> dict[str, float]:
    """Fraction of each module type's parameters kept (the allocation picture)."""
    from rankcut.architecture import module_type

    dense: dict[str, int] = {}
    kept: dict[str, int] = {}
    for m in report.modules:
        kind = module_type(m.name)
        rows, cols = m.shape
        dense[kind] = dense.get(kind, 0) + rows * cols
        kept[kind] = kept.get(kind, 0) + (rows * cols if m.rank is None else m.rank * (rows + cols))
    return {kind: round(kept[kind] / dense[kind], 4) for kind in dense}


def spawn(argv: list[str], method: str, ratio: float) -> dict:
    """Runs one configuration in a fresh process and returns its JSON row."""
    cmd = [sys.executable, __file__, *argv, "--worker", method, str(ratio)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run {method} @ {ratio} failed")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_seconds"] = time.perf_counter() - start
    return row


def print_table(rows: list[dict]) -> None:
    captions = any("caption_perplexity" in r for r in rows)
    print(f"\n{'method':<34}{'target':>8}{'achieved':>10}{'bytes':>8}{'perplexity':>12}"
          + (f"{'caption ppl':>13}" if captions else "")
          + f"{'compress s':>12}{'peak RSS MiB':>14}", flush=True)
    for r in rows:
        caption = f"{_ppl(r.get('caption_perplexity', float('nan'))):>13}" if captions else ""
        print(f"{r['method']:<34}{r['target_ratio']:>8.2f}{r.get('achieved_ratio', 0.0):>10.4f}"
              f"{r.get('achieved_byte_ratio', 0.0):>8.4f}{_ppl(r['perplexity']):>12}{caption}"
              f"{r.get('compress_seconds', 0.0):>12.1f}{r['peak_rss_mb']:>14.0f}", flush=True)


def _ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        method, ratio = args.worker
        row = run_one(args, None if method == "dense" else method, float(ratio))
        print(json.dumps(row))
        return
    rows = [] if args.skip_dense else [spawn(argv, "dense", 0.0)]
    for method in args.methods:
        for ratio in args.ratios:
            rows.append(spawn(argv, method, ratio))
            print_table(rows[-1:])
    print_table(rows)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("worker", "output", "skip_dense")}
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

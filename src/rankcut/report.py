"""``rankcut report``: one HTML page with PNG plots from checkpoints and benchmark JSON.

Inputs, each a path:

- a rankcut checkpoint folder (``rankcut compress --output DIR``): its ``config.json``
  rankcut entry (method, settings, ratios, rank map), the tensor shapes and stored bytes by
  dtype of its safetensors shards (headers only, no weight is loaded), and, when present,
  ``rankcut_run.json`` (the compress figures) and ``rankcut_bench.json`` (``rankcut bench``);
- a quality-benchmark JSON (``benchmarks/quality.py``: ``{"settings", "rows": [...]}``);
- a speed-benchmark JSON (``benchmarks/speed.py``: ``{"settings", "results": [...]}``);
- a lone ``rankcut_bench.json`` or ``rankcut_run.json`` (or ``compress --json`` output).

The functions are in three layers: readers that turn each kind of input into plain
records, plotters that draw one ``matplotlib.figure.Figure`` each (Agg canvas, no pyplot
state), and ``write_report``, which writes ``index.html`` and the PNGs into a folder
atomically.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .architecture import block_number, module_type
from .errors import ReportError
from .io.checkpoint import BENCH_FILE, RUN_FILE
from .io.outputs import OUTPUT_MARKER
from .io.records import RunRecord, number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

MARKERS = "osD^v<>phX*"
# module types in the order of a decoder block (Llama-like, then OPT); others follow
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj",
              "down_proj", "fc1", "fc2")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ModuleRank:
    """One target module of a checkpoint.

    Attributes:
        name: qualified module name.
        kind: module type (``q_proj``, ``down_proj``, ...).
        block: decoder-block index parsed from the name (None when it has none).
        rank: stored rank; None for a module kept dense.
        full_rank: min(out, in) of the dense weight; None when the shards do not tell.
    """

    name: str
    kind: str
    block: int | None
    rank: int | None
    full_rank: int | None

    @property
    def kept_fraction(self) -> float | None:
        """Returns rank / full rank (1.0 for a dense module; None when the shape is unknown)."""
        if self.rank is None:
            return 1.0
        return self.rank / self.full_rank if self.full_rank else None


@dataclass(frozen=True)
class QualityPoint:
    """One compressed model's perplexity at one ratio."""

    method: str
    target_ratio: float | None
    achieved_ratio: float | None
    perplexity: float | None
    compress_seconds: float | None
    source: str


@dataclass(frozen=True)
class SpeedRow:
    """Dense vs one other model's tokens/s at one batch size and prompt length.

    Attributes:
        method: the compression method of the checkpoint.
        model: the benchmark's name of the compared model (``compressed``, or a variant).
    """

    source: str
    method: str
    model: str
    target_ratio: float | None
    weight_byte_ratio: float | None
    batch_size: int
    prompt_len: int
    prefill_dense: float
    prefill_compressed: float
    decode_dense: float
    decode_compressed: float

    @property
    def prefill_speedup(self) -> float | None:
        """Returns compressed / dense prefill tokens/s."""
        return _ratio(self.prefill_compressed, self.prefill_dense)

    @property
    def decode_speedup(self) -> float | None:
        """Returns compressed / dense decode tokens/s."""
        return _ratio(self.decode_compressed, self.decode_dense)

    @property
    def decode_vs_byte_ratio(self) -> float | None:
        """Returns the decode speedup divided by the weight-bytes ratio dense / compressed."""
        speedup = self.decode_speedup
        return _ratio(speedup, self.weight_byte_ratio) if speedup else None


@dataclass
class CheckpointRecord:
    """What the report shows of one checkpoint folder."""

    path: Path
    label: str
    method: str
    settings: dict
    target_ratio: float | None
    achieved_ratio: float | None
    achieved_byte_ratio: float | None
    run: RunRecord | None
    modules: list[ModuleRank]
    stored_bytes: dict[str, int]
    speed: list[SpeedRow]

    def quality_point(self) -> QualityPoint:
        """Returns the checkpoint's perplexity point (perplexity None without a run file)."""
        return QualityPoint(self.method, self.target_ratio, self.achieved_ratio,
                            self.figure("perplexity"), self.figure("compress_seconds"),
                            self.label)

    def figure(self, name: str) -> float | None:
        """A number of the checkpoint's run record (None without one, or when not a number)."""
        return number(getattr(self.run, name)) if self.run is not None else None


@dataclass
class InputRecord:
    """One path given to the report, its kind, and a one-line summary of what it held."""

    path: str
    kind: str
    summary: str


@dataclass
class ReportData:
    """Everything the page shows, gathered from all inputs."""

    inputs: list[InputRecord] = field(default_factory=list)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    quality: list[QualityPoint] = field(default_factory=list)
    dense: list[tuple[str, float]] = field(default_factory=list)
    speed: list[SpeedRow] = field(default_factory=list)

    def has_data(self) -> bool:
        """Returns whether any section has something to show."""
        return bool(self.checkpoints or self.speed or self.dense
                    or any(p.perplexity is not None for p in self.quality))


# --------------------------------------------------------------------------- readers


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def load_json(path: Path) -> Any:
    """Returns the parsed JSON of ``path``.

    Raises:
        ReportError: the file cannot be read or is not valid JSON.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON: {err}") from err


def _is_bench(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("rows"), list)
            and ("speedups" in data or "weight_byte_ratio" in data))


def json_kind(data: Any) -> str | None:
    """Returns the kind of a parsed input JSON: ``"speed"`` (benchmarks/speed.py),
    ``"bench"`` (rankcut_bench.json), ``"quality"`` (benchmarks/quality.py), ``"run"``
    (rankcut_run.json / ``compress --json``), or None for an unknown shape."""
    if not isinstance(data, dict):
        return None
    results, rows = data.get("results"), data.get("rows")
    if isinstance(results, list) and all(_is_bench(r) for r in results):
        return "speed"
    if _is_bench(data):
        return "bench"
    if isinstance(rows, list) and all(isinstance(r, dict) and isinstance(r.get("method"), str)
                                      and "perplexity" in r for r in rows):
        return "quality"
    if RunRecord.matches(data):
        return "run"
    return None


def quality_points(data: dict, source: str) -> tuple[list[QualityPoint], list[tuple[str, float]]]:
    """Returns the compressed rows of a quality-benchmark JSON as points, and its dense
    perplexities (rows whose method is ``dense``) as (source, value) pairs."""
    points, dense = [], []
    for row in data["rows"]:
        ppl = number(row.get("perplexity"))
        if row["method"] == "dense":
            if ppl is not None:
                dense.append((source, ppl))
            continue
        points.append(QualityPoint(row["method"], number(row.get("target_ratio")),
                                   number(row.get("achieved_ratio")), ppl,
                                   number(row.get("compress_seconds")), source))
    return points, dense


def run_point(run: RunRecord, source: str) -> tuple[list[QualityPoint], list[tuple[str, float]]]:
    """Returns the point and the dense perplexity (when measured) of a run record."""
    point = QualityPoint(run.label, number(run.target_ratio), number(run.achieved_ratio),
                         number(run.perplexity), number(run.compress_seconds), source)
    dense = number(run.dense_perplexity)
    return [point], [(source, dense)] if dense is not None else []


def speed_rows(figures: dict, source: str, method: str | None = None,
               target_ratio: float | None = None) -> list[SpeedRow]:
    """Returns one row per shape and non-dense model of ``rankcut bench`` /
    ``compare_speed`` figures (a ``rows`` list holding a ``dense`` row per shape and one
    row per other model and shape, e.g. ``compressed``).

    Raises:
        ReportError: a row lacks a field, or a shape has no dense row.
    """
    method = method or figures.get("method") or "compressed"
    target_ratio = target_ratio if target_ratio is not None else number(
        figures.get("target_ratio"))
    try:
        rows = [(row, (int(row["batch_size"]), int(row["prompt_len"])))
                for row in figures["rows"]]
        dense = {key: row for row, key in rows if row["model"] == "dense"}
        out = []
        for c, key in rows:
            if c["model"] == "dense":
                continue
            if key not in dense:
                raise ReportError(f"{source}: no dense row for batch {key[0]}, prompt {key[1]}")
            d = dense[key]
            byte_ratio = (_ratio(number(d.get("weight_bytes")), number(c.get("weight_bytes")))
                          or number(figures.get("weight_byte_ratio")))
            out.append(SpeedRow(
                source, str(method), str(c["model"]), target_ratio, byte_ratio, *key,
                float(d["prefill_tokens_per_s"]), float(c["prefill_tokens_per_s"]),
                float(d["decode_tokens_per_s"]), float(c["decode_tokens_per_s"])))
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{source}: speed figures are incomplete or malformed "
                          f"(missing or bad {err})") from err
    return out


def _method_label(method: str, update: Any) -> str:
    """Returns ``method`` or ``method+update`` when a parameter update ran."""
    if isinstance(update, dict) and update.get("name"):
        return f"{method}+{update['name']}"
    return str(method)


def full_rank(name: str, shapes: dict[str, list[int]]) -> int | None:
    """Returns min(out, in) of a module's dense weight, from its stored factors
    (``weight_u`` [m, r], ``weight_v`` [r, n], or their int8 parts) or its dense
    ``weight`` [m, n]; None when neither is there."""
    u, u8 = shapes.get(f"{name}.weight_u"), shapes.get(f"{name}.weight_u_int8")
    v, v8 = shapes.get(f"{name}.weight_v"), shapes.get(f"{name}.weight_v_int8")
    m = u[0] if u else (u8[1] if u8 else None)
    n = v[1] if v else (v8[1] if v8 else None)
    if m is None or n is None:
        weight = shapes.get(f"{name}.weight")
        if not weight or len(weight) != 2:
            return None
        m, n = weight
    return min(m, n)


def read_checkpoint(path: Path, label: str | None = None) -> CheckpointRecord:
    """Reads a rankcut checkpoint folder's entry, shapes, stored bytes and figure files.

    Raises:
        ReportError: the folder has no config.json, or a figure file is not valid JSON.
        CheckpointError: the folder is not a whole rankcut checkpoint.
    """
    from .io.checkpoint import bytes_by_dtype, tensor_specs, validate_checkpoint

    if not (path / "config.json").is_file():
        raise ReportError(f"{path} is a folder but not a rankcut checkpoint: it has no "
                          f"config.json")
    entry = validate_checkpoint(path)
    label = label or path.name
    figures = load_json(path / RUN_FILE) if (path / RUN_FILE).is_file() else None
    run = RunRecord.from_json(figures) if RunRecord.matches(figures) else None
    shapes = {name: shape for name, (_, shape) in tensor_specs(path).items()}
    modules = [ModuleRank(name, module_type(name), block_number(name), rank,
                          full_rank(name, shapes))
               for name, rank in (entry.get("rank_map") or {}).items()]
    method = _method_label(entry.get("method", "?"), entry.get("update"))
    speed = []
    if (path / BENCH_FILE).is_file():
        speed = speed_rows(load_json(path / BENCH_FILE), label, method,
                           number(entry.get("target_ratio")))
    return CheckpointRecord(
        path=path, label=label, method=method, settings=entry.get("settings") or {},
        target_ratio=number(entry.get("target_ratio")),
        achieved_ratio=number(entry.get("achieved_ratio")),
        achieved_byte_ratio=number(entry.get("achieved_byte_ratio")),
        run=run, modules=modules,
        stored_bytes=bytes_by_dtype(path), speed=speed)


def read_json_input(path: Path, data: ReportData) -> InputRecord:
    """Adds the records of one JSON input to ``data`` (mutates it).

    Returns:
        The input's listing entry.

    Raises:
        ReportError: the file is not valid JSON or of none of the known shapes.
    """
    content = load_json(path)
    kind = json_kind(content)
    source = path.name
    if kind == "quality":
        points, dense = quality_points(content, source)
        data.quality += points
        data.dense += dense
        return InputRecord(str(path), "quality benchmark JSON",
                           f"{len(points)} compressed rows, {len(dense)} dense")
    if kind == "run":
        points, dense = run_point(RunRecord.from_json(content), source)
        data.quality += points
        data.dense += dense
        return InputRecord(str(path), "compress figures JSON", f"method {points[0].method}")
    if kind == "bench":
        rows = speed_rows(content, source)
        data.speed += rows
        return InputRecord(str(path), "bench JSON", f"{len(rows)} shapes")
    if kind == "speed":
        rows = []
        for i, result in enumerate(content["results"], 1):
            name = Path(str(result.get("model") or f"result {i}")).name
            rows += speed_rows(result, f"{source}: {name}")
        data.speed += rows
        return InputRecord(str(path), "speed benchmark JSON",
                           f"{len(content['results'])} checkpoints, {len(rows)} shapes")
    raise ReportError(
        f"{path} is a JSON file of an unknown shape: expected a quality benchmark "
        f"({{\"rows\": [{{\"method\", \"perplexity\", ...}}]}}), a speed benchmark "
        f"({{\"results\": [...]}}), a {BENCH_FILE} or a {RUN_FILE}")


def _unique_label(name: str, taken: set[str]) -> str:
    label, n = name, 1
    while label in taken:
        n += 1
        label = f"{name} ({n})"
    taken.add(label)
    return label


def gather(paths: Sequence[str | Path]) -> ReportData:
    """Reads every input path into one ``ReportData``.

    Raises:
        ReportError: a path does not exist, is neither a folder nor a ``.json`` file, or
            is of an unknown kind (see ``read_checkpoint`` and ``read_json_input``).
    """
    data, labels = ReportData(), set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"report input not found: {raw}")
        if path.is_dir():
            ckpt = read_checkpoint(path, _unique_label(path.name or str(path), labels))
            data.checkpoints.append(ckpt)
            data.speed += ckpt.speed
            point = ckpt.quality_point()
            if point.perplexity is not None:
                data.quality.append(point)
            dense = ckpt.figure("dense_perplexity")
            if dense is not None:
                data.dense.append((ckpt.label, dense))
            record = InputRecord(str(path), "rankcut checkpoint",
                                 f"{ckpt.method}, {len(ckpt.modules)} target modules"
                                 + (f", {len(ckpt.speed)} bench shapes" if ckpt.speed else ""))
        elif path.suffix.lower() == ".json":
            record = read_json_input(path, data)
        else:
            raise ReportError(f"{raw} is neither a rankcut checkpoint folder nor a .json file")
        logger.info("read %s (%s): %s", record.path, record.kind, record.summary)
        data.inputs.append(record)
    return data


# --------------------------------------------------------------------------- plots


def new_figure(width: float = 9.0, height: float = 4.8) -> Figure:
    """Returns an empty ``Figure`` on its own Agg canvas (pyplot's state is untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> list:
    """Returns ``n`` distinct colours (tab10, or tab20 beyond ten)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _outside_legend(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def plot_perplexity(points: Sequence[QualityPoint],
                    dense: Sequence[tuple[str, float]] = ()) -> Figure:
    """Draws perplexity (log scale) against target ratio, one line per method, with a
    dashed line per distinct dense perplexity. Points without a perplexity or a ratio are
    left out."""
    by_method: dict[str, list[QualityPoint]] = {}
    for p in points:
        if p.perplexity is not None and p.target_ratio is not None:
            by_method.setdefault(p.method, []).append(p)
    fig = new_figure()
    ax = fig.add_subplot()
    colors = _colors(len(by_method))
    for i, (method, pts) in enumerate(sorted(by_method.items())):
        pts = sorted(pts, key=lambda p: p.target_ratio)
        ax.plot([p.target_ratio for p in pts], [p.perplexity for p in pts], label=method,
                color=colors[i], marker=MARKERS[i % len(MARKERS)], linewidth=1.5)
    for value in sorted({float(f"{v:.4g}") for _, v in dense}):
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=f"dense {value:g}")
    ax.set_yscale("log")
    ax.set_xlabel("target ratio (fraction of target-layer parameters removed)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Perplexity vs compression ratio")
    ax.grid(True, which="both", alpha=0.3)
    _outside_legend(ax)
    return fig


def _kind_key(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind), "") if kind in KIND_ORDER else (len(KIND_ORDER), kind)


def _by_kind(modules: Sequence[ModuleRank]) -> dict[str, list[ModuleRank]]:
    """Returns the modules grouped by type, the types in decoder-block order."""
    groups: dict[str, list[ModuleRank]] = {}
    for m in modules:
        groups.setdefault(m.kind, []).append(m)
    return {kind: groups[kind] for kind in sorted(groups, key=_kind_key)}


def plot_rank_per_layer(ckpt: CheckpointRecord) -> Figure:
    """Draws one checkpoint's allocation per decoder block, one line per module type: the
    kept fraction of full rank (1 = dense), or the rank when a shape is unknown."""
    from matplotlib.ticker import MaxNLocator

    fraction = all(m.kept_fraction is not None for m in ckpt.modules)
    groups = _by_kind([m for m in ckpt.modules if m.block is not None])
    fig = new_figure()
    ax = fig.add_subplot()
    for i, ((kind, mods), color) in enumerate(zip(groups.items(), _colors(len(groups)),
                                                  strict=True)):
        mods = sorted(mods, key=lambda m: m.block)
        ys = [m.kept_fraction if fraction else (m.rank or math.nan) for m in mods]
        ax.plot([m.block for m in mods], ys, label=kind, color=color,
                marker=MARKERS[i % len(MARKERS)], markersize=4, linewidth=1.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("kept fraction of full rank (1 = dense)" if fraction else "rank")
    if fraction:
        ax.set_ylim(0, 1.05)
    ax.set_title(f"{ckpt.label}: {ckpt.method}, target ratio {_fmt(ckpt.target_ratio, 3)}")
    ax.grid(True, alpha=0.3)
    _outside_legend(ax)
    return fig


def mean_kept_by_kind(ckpt: CheckpointRecord) -> dict[str, float]:
    """Returns {module type: mean kept fraction of full rank} over the modules whose shape
    is known."""
    out = {}
    for kind, mods in _by_kind(ckpt.modules).items():
        values = [m.kept_fraction for m in mods if m.kept_fraction is not None]
        if values:
            out[kind] = sum(values) / len(values)
    return out


def plot_rank_per_type(ckpts: Sequence[CheckpointRecord]) -> Figure:
    """Draws the mean kept fraction of full rank per module type, one bar per checkpoint
    in each group."""
    means = [mean_kept_by_kind(c) for c in ckpts]
    kinds = sorted({k for m in means for k in m}, key=_kind_key)
    fig = new_figure()
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(ckpts))
    for j, (ckpt, mean, color) in enumerate(zip(ckpts, means, _colors(len(ckpts)),
                                                strict=True)):
        offset = (j - (len(ckpts) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(kinds))],
               [mean.get(k, math.nan) for k in kinds], width, label=ckpt.label, color=color)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean kept fraction of full rank")
    ax.set_title("Rank allocation per module type")
    ax.grid(True, axis="y", alpha=0.3)
    _outside_legend(ax)
    return fig


def plot_bytes_by_dtype(ckpts: Sequence[CheckpointRecord]) -> Figure:
    """Draws each checkpoint's stored bytes as one bar stacked by dtype, in MiB."""
    totals: dict[str, int] = {}
    for c in ckpts:
        for dtype, size in c.stored_bytes.items():
            totals[dtype] = totals.get(dtype, 0) + size
    fig = new_figure(width=min(9.0, 4.5 + 1.2 * len(ckpts)))
    ax = fig.add_subplot()
    xs = list(range(len(ckpts)))
    bottom = [0.0] * len(ckpts)
    for dtype, color in zip(sorted(totals, key=totals.get, reverse=True),
                            _colors(len(totals)), strict=True):
        values = [c.stored_bytes.get(dtype, 0) / 2**20 for c in ckpts]
        ax.bar(xs, values, 0.6, bottom=bottom, label=dtype, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, top in zip(xs, bottom, strict=True):
        ax.annotate(f"{top:,.2f}", (x, top), ha="center", va="bottom", fontsize="small")
    ax.set_xticks(xs, [c.label for c in ckpts], rotation=15, ha="right")
    ax.set_ylabel("stored MiB")
    ax.set_title("Stored bytes by dtype")
    ax.grid(True, axis="y", alpha=0.3)
    _outside_legend(ax)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Writes ``fig`` to ``path`` as PNG (100 dpi, tight bounding box); returns ``path``."""
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def draw_plots(data: ReportData, folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Draws every plot the data allows into ``folder`` (writes PNG files).

    Returns:
        {section id: [(PNG file name, alt text), ...]} for the sections that have plots.
    """
    images: dict[str, list[tuple[str, str]]] = {}

    def add(section: str, name: str, fig: Figure, alt: str) -> None:
        save_png(fig, folder / name)
        images.setdefault(section, []).append((name, alt))

    if any(p.perplexity is not None and p.target_ratio is not None for p in data.quality):
        add("perplexity", "perplexity.png", plot_perplexity(data.quality, data.dense),
            "perplexity against target ratio, one line per method")
    ranked = [c for c in data.checkpoints if c.modules]
    for i, ckpt in enumerate(ranked, 1):
        add("rank-layers", f"rank-layers-{i}.png", plot_rank_per_layer(ckpt),
            f"rank allocation per decoder block of {ckpt.label}")
    with_fraction = [c for c in ranked if mean_kept_by_kind(c)]
    if with_fraction:
        add("rank-types", "rank-types.png", plot_rank_per_type(with_fraction),
            "mean kept fraction of full rank per module type")
    stored = [c for c in data.checkpoints if c.stored_bytes]
    if stored:
        add("bytes", "bytes.png", plot_bytes_by_dtype(stored), "stored bytes by dtype")
    return images


# --------------------------------------------------------------------------- HTML


CSS = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; }
td.text, th.text { text-align: left; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
p.note { color: #666; font-style: italic; }
code { font-size: 0.85em; word-break: break-all; }
summary { cursor: pointer; color: #444; }
"""


def _e(value: Any) -> str:
    """Returns ``str(value)`` HTML-escaped (quotes included)."""
    return html.escape(str(value), quote=True)


def _fmt(value: float | int | None, digits: int = 2) -> str:
    """Returns a number with thousands separators and ``digits`` decimals, '–' for None."""
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], text_columns: int = 1) -> str:
    """Returns an HTML table; every cell is escaped, the first ``text_columns`` left-aligned."""
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="text"' if i < text_columns else ""
        return f"<{tag}{cls}>{_e(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "\n".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>"
                     for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _images(items: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f'<img src="{_e(name)}" alt="{_e(alt)}">' for name, alt in items)


def inputs_html(data: ReportData) -> str:
    """Returns the list of inputs read."""
    items = "\n".join(f"<li><code>{_e(r.path)}</code>: {_e(r.kind)} ({_e(r.summary)})</li>"
                      for r in data.inputs)
    return f"<ul>\n{items}\n</ul>"


def _settings_text(settings: dict) -> str:
    """Returns ``key=value`` pairs of the settings that are set (None left out)."""
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}"
                     for k, v in sorted(settings.items()) if v is not None)


def checkpoints_html(data: ReportData) -> str:
    """Returns the table of checkpoints, or a note when there is none."""
    if not data.checkpoints:
        return _note("No rankcut checkpoint folder among the inputs.")
    rows = [(c.label, c.method, _settings_text(c.settings),
             _fmt(c.target_ratio, 4), _fmt(c.achieved_ratio, 4),
             _fmt(c.achieved_byte_ratio, 4), _fmt(c.figure("perplexity")),
             _fmt(c.figure("dense_perplexity")),
             _fmt(c.figure("compress_seconds"), 1),
             _fmt(sum(c.stored_bytes.values())), str(c.path)) for c in data.checkpoints]
    return _table(["checkpoint", "method", "settings", "target ratio", "achieved ratio",
                   "achieved byte ratio", "perplexity", "dense perplexity", "compress s",
                   "stored bytes", "path"], rows, text_columns=3)


def perplexity_html(data: ReportData, images: Sequence[tuple[str, str]]) -> str:
    """Returns the perplexity plot and its table, or a note when no input has one."""
    points = [p for p in data.quality if p.perplexity is not None]
    if not points:
        return _note("No perplexity figures in the inputs.")
    rows = [(p.method, _fmt(p.target_ratio, 3), _fmt(p.achieved_ratio, 4),
             _fmt(p.perplexity), _fmt(p.compress_seconds, 1), p.source)
            for p in sorted(points, key=lambda p: (p.method, p.target_ratio or 0.0))]
    rows += [("dense", "0", "–", _fmt(v), "–", source) for source, v in data.dense]
    table = _table(["method", "target ratio", "achieved ratio", "perplexity", "compress s",
                    "source"], rows)
    return (_images(images) + f"\n<details>\n<summary>Table of the {len(rows)} points</summary>\n"
            f"{table}\n</details>")


def speed_html(data: ReportData) -> str:
    """Returns the speed table (dense vs compressed tokens/s and speedups), or a note."""
    if not data.speed:
        return _note("No speed figures (rankcut_bench.json or speed benchmark JSON) in the "
                     "inputs.")
    rows = [(r.source, r.method, r.model, _fmt(r.target_ratio, 3), r.batch_size, r.prompt_len,
             _fmt(r.prefill_dense, 0), _fmt(r.prefill_compressed, 0), _fmt(r.prefill_speedup),
             _fmt(r.decode_dense, 1), _fmt(r.decode_compressed, 1), _fmt(r.decode_speedup),
             _fmt(r.weight_byte_ratio, 3), _fmt(r.decode_vs_byte_ratio))
            for r in data.speed]
    return _table(["source", "method", "model", "ratio", "batch", "prompt",
                   "prefill tok/s dense", "prefill tok/s model", "prefill ×",
                   "decode tok/s dense", "decode tok/s model", "decode ×",
                   "weight bytes dense / model", "decode × / byte ratio"], rows,
                  text_columns=3)


def render_html(data: ReportData, images: dict[str, list[tuple[str, str]]]) -> str:
    """Returns the whole page: inputs, checkpoints, perplexity, rank allocation per layer
    and per module type, bytes by dtype, speed. Every inserted string is escaped; the page
    needs nothing but the PNGs next to it (no script, no remote resource)."""

    def plots_or_note(anchor: str, note: str) -> str:
        return _images(images[anchor]) if images.get(anchor) else _note(note)

    sections = [
        _section("inputs", "Inputs", inputs_html(data)),
        _section("checkpoints", "Checkpoints", checkpoints_html(data)),
        _section("perplexity", "Perplexity vs ratio",
                 perplexity_html(data, images.get("perplexity", []))),
        _section("rank-layers", "Rank allocation per layer", plots_or_note(
            "rank-layers", "No rank map (no rankcut checkpoint) among the inputs.")),
        _section("rank-types", "Rank allocation per module type", plots_or_note(
            "rank-types", "No rank map with known module shapes among the inputs.")),
        _section("bytes", "Bytes by dtype", plots_or_note(
            "bytes", "No checkpoint weights among the inputs.")),
        _section("speed", "Speed", speed_html(data)),
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"generator\" content=\"rankcut {_e(__version__)} report\">\n"
            f"<title>rankcut report</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>rankcut report</h1>\n<p>Generated {_e(stamp)} by rankcut "
            f"{_e(__version__)} from {len(data.inputs)} input(s).</p>\n"
            + "\n".join(sections) + "\n</body>\n</html>\n")


# --------------------------------------------------------------------------- writing


def check_output(output: Path) -> None:
    """Refuses an output path that is a file, or a folder holding anything but a previous
    report (``index.html`` and PNGs), since writing the report replaces the folder.

    Raises:
        ReportError: the path cannot be (re)placed by a report.
    """
    if output.exists() and not output.is_dir():
        raise ReportError(f"--output {output} exists and is not a folder")
    if output.is_dir():
        foreign = sorted(p.name for p in output.iterdir() if p.name not in
                         ("index.html", OUTPUT_MARKER) and p.suffix.lower() != ".png")
        if foreign:
            raise ReportError(f"--output {output} is a folder that is not a rankcut report "
                              f"(it holds {foreign[0]}); refusing to replace it")


def write_report(paths: Sequence[str | Path], output: str | Path) -> Path:
    """Reads ``paths`` and writes the report folder ``output`` (``index.html`` and PNGs).

    Side effects: creates or replaces the folder ``output`` atomically: the page is built
    in a hidden temporary sibling that is renamed into place when complete, so an
    interrupted run leaves no half-written report and an existing one untouched.

    Returns:
        The path of ``index.html``.

    Raises:
        ReportError: a bad input (see ``gather``), no usable data in any input, or an
            output path that is not a report folder.
    """
    from .io.outputs import write_dir_atomically

    if not paths:
        raise ReportError("no input paths given")
    target = Path(output).resolve()
    check_output(target)
    data = gather(paths)
    if not data.has_data():
        raise ReportError("no usable data in the inputs: no checkpoint, no perplexity and no "
                          "speed figures (" + ", ".join(str(p) for p in paths) + ")")

    def write(tmp: Path) -> None:
        images = draw_plots(data, tmp)
        (tmp / "index.html").write_text(render_html(data, images), encoding="utf-8")

    write_dir_atomically(target, write, kind="report")
    return target / "index.html"

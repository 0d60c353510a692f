"""``rankcut report``: sections, PNGs, escaping, bad inputs, atomic writes, and that headless
Chromium renders the page (Chromium comes from ``make setup``; its absence is a failure)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from rankcut import report
from rankcut.cli import main
from rankcut.io.checkpoint import BENCH_FILE
from rankcut.io.outputs import OUTPUT_MARKER

from .conftest import tiny_model, tiny_tokenizer, word_text
from .test_cli import _compress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOLD = '<b>bold</b> & "q"'  # a method name that must come out escaped
SECTIONS = ("inputs", "checkpoints", "perplexity", "rank-layers", "rank-types", "bytes", "speed")


def _quality_json(path: Path) -> Path:
    rows = [{"method": "dense", "target_ratio": 0.0, "perplexity": 20.0},
            {"method": "zero-sum", "target_ratio": 0.2, "achieved_ratio": 0.2001,
             "perplexity": 30.5, "compress_seconds": 12.0},
            {"method": "zero-sum", "target_ratio": 0.4, "perplexity": 81.0},
            {"method": BOLD, "target_ratio": 0.2, "perplexity": 55.0},
            {"method": BOLD, "target_ratio": 0.4, "perplexity": 150.0},
            {"method": "svd", "target_ratio": 0.4, "perplexity": None}]
    path.write_text(json.dumps({"settings": {"model": "smollm2"}, "rows": rows}))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny checkpoints (io-svd 0.2 with perplexities and a bench file, svd 0.4
    without evaluation), a synthetic quality JSON, and a speed JSON built from the bench
    with a third model added."""
    root = tmp_path_factory.mktemp("report-inputs")
    model = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    calib = root / "calib.txt"
    calib.write_text(word_text(3000))
    io_svd, svd = root / "io-svd-0.2", root / "svd-0.4"
    assert _compress(model, calib, io_svd) == 0
    assert _compress(model, calib, svd, "--method", "svd", "--ratio", "0.4", "--no-eval") == 0
    assert main(["bench", str(io_svd), "--batch-sizes", "1", "--prompt-lens", "16",
                 "--new-tokens", "2", "--repeats", "1"]) == 0
    bench = json.loads((io_svd / BENCH_FILE).read_text())
    variant = {**bench["rows"][-1], "model": "compressed+latent-v"}  # a third contender
    bench["rows"].append(variant)
    speed = root / "speed.json"
    speed.write_text(json.dumps({"settings": {}, "results": [
        {**bench, "model": "bench-out/svd-llm-0.4", "method": "svd-llm", "target_ratio": 0.4}]}))
    return {"io_svd": io_svd, "svd": svd, "quality": _quality_json(root / "q.json"),
            "speed": speed, "model": model}


@pytest.fixture(scope="module")
def full_report(inputs, tmp_path_factory) -> Path:
    """The report of every input; returns its index.html."""
    out = tmp_path_factory.mktemp("report-out") / "report"
    paths = [inputs[k] for k in ("io_svd", "svd", "quality", "speed")]
    return report.write_report(paths, out)


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def _check_png(path: Path) -> np.ndarray:
    """Asserts ``path`` is a decodable, non-uniform PNG; returns its pixels."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0).shape[0] > 10, path
    return pixels


def test_report_has_every_section_plot_and_input(full_report, inputs):
    page = full_report.read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    assert 'class="note"' not in page  # every section has data
    for method in ("io-svd", "svd", "svd-llm", "zero-sum"):
        assert f">{method}<" in page
    for key in ("io_svd", "svd", "quality", "speed"):
        assert f"<code>{inputs[key]}</code>" in page
    srcs = _img_srcs(page)
    assert sorted(srcs) == ["bytes.png", "perplexity.png", "rank-layers-1.png",
                            "rank-layers-2.png", "rank-types.png"]
    for src in srcs:
        _check_png(full_report.parent / src)
    assert sorted(p.name for p in full_report.parent.iterdir()) == sorted(
        [*srcs, "index.html", OUTPUT_MARKER])  # the marker: a folder rankcut wrote
    speed = page[page.index('<section id="speed">'):]
    # header, the checkpoint's bench, the speed JSON's two contenders besides dense
    assert speed.count("<tr>") == 4
    assert "speed.json: svd-llm-0.4" in speed and ">compressed+latent-v<" in speed
    assert "prefill tok/s dense" in speed and "decode × / byte ratio" in speed
    assert ">20.00<" in page  # the dense row of the quality JSON
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_strings_are_escaped_and_empty_sections_have_a_note(inputs, tmp_path):
    from matplotlib._pylab_helpers import Gcf

    page = report.write_report([inputs["quality"]], tmp_path / "r").read_text()
    assert Gcf.get_num_fig_managers() == 0  # no figure left in pyplot's global registry
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;q&quot;" in page
    assert "<b>bold" not in page
    assert _img_srcs(page) == ["perplexity.png"]
    assert "No rankcut checkpoint folder among the inputs." in page
    assert "No speed figures" in page and "No checkpoint weights" in page
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page


def test_records_from_checkpoint(inputs):
    ckpt = report.read_checkpoint(inputs["io_svd"])
    assert ckpt.method == "io-svd" and ckpt.target_ratio == 0.2
    assert len(ckpt.modules) == 14 and {m.block for m in ckpt.modules} == {0, 1}
    assert all(0 < m.kept_fraction <= 1 for m in ckpt.modules)
    # hidden 48, MLP 112, k/v 2 heads × 12: full rank = min(out, in)
    assert {m.kind: m.full_rank for m in ckpt.modules} == {
        "q_proj": 48, "k_proj": 24, "v_proj": 24, "o_proj": 48, "gate_proj": 48,
        "up_proj": 48, "down_proj": 48}
    assert ckpt.stored_bytes["F32"] > 0
    assert len(ckpt.speed) == 1 and ckpt.speed[0].decode_speedup > 0
    assert ckpt.quality_point().perplexity > 1


def test_cli_prints_where_the_page_is_and_replaces_a_previous_report(inputs, tmp_path, capsys):
    out = tmp_path / "r"
    for _ in range(2):
        assert main(["report", str(inputs["quality"]), "--output", str(out)]) == 0
        assert f"report written to {out.resolve() / 'index.html'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folder left


def _bad(tmp_path: Path, inputs: dict, case: str) -> list[str]:
    if case == "missing":
        return [str(tmp_path / "nope.json")]
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return [str(tmp_path / "empty")]
    if case == "plain model":
        return [str(inputs["model"])]
    path = tmp_path / ("notes.txt" if case == "text file" else "x.json")
    path.write_text({"unknown json": '{"foo": 1}', "bad json": "{rows: [",
                     "no data": '{"settings": {}, "rows": []}', "text file": "hi"}[case])
    return [str(path)]


@pytest.mark.parametrize("case, message", [
    ("missing", "report input not found"),
    ("empty folder", "is a folder but not a rankcut checkpoint: it has no config.json"),
    ("plain model", "is not a rankcut checkpoint (no rankcut entry in config)"),
    ("unknown json", "is a JSON file of an unknown shape"),
    ("bad json", "is not valid JSON"),
    ("text file", "is neither a rankcut checkpoint folder nor a .json file"),
    ("no data", "no usable data in the inputs"),
])
def test_bad_inputs_are_clear_errors(inputs, tmp_path, capsys, case, message):
    out = tmp_path / "r"
    assert main(["report", *_bad(tmp_path, inputs, case), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankcut: error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_output_folder_that_is_not_a_report_is_refused(inputs, tmp_path, capsys):
    assert main(["report", str(inputs["quality"]), "--output", str(inputs["model"])]) == 2
    assert "is a folder that is not a rankcut report" in capsys.readouterr().err
    assert (inputs["model"] / "config.json").is_file()


def test_interrupted_run_leaves_no_half_written_report(inputs, tmp_path, monkeypatch):
    out = tmp_path / "r"
    before = report.write_report([inputs["quality"]], out).read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "render_html", interrupted)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(KeyboardInterrupt):
            report.write_report([inputs["quality"]], target)
    assert (out / "index.html").read_text() == before  # the old report is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing partial, no "fresh"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("Chromium is not installed (no chromium / chromium-browser on PATH): run "
                "`make setup`, which installs the Debian chromium package")


def _headless(page: Path, profile: Path, *flags: str) -> str:
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", *flags, page.resolve().as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_headless_chromium_renders_the_page(full_report, tmp_path):
    dom = _headless(full_report, tmp_path / "profile", "--dump-dom")
    assert "<h1>rankcut report</h1>" in dom and 'id="rank-types"' in dom
    assert sorted(_img_srcs(dom)) == sorted(_img_srcs(full_report.read_text()))
    shot = tmp_path / "shot.png"
    # a window taller than the whole page (about 3,500 px), so that no plot falls below the
    # fold when fonts or table rows differ between machines
    _headless(full_report, tmp_path / "profile", f"--screenshot={shot}",
              "--window-size=1200,8000")
    pixels = _check_png(shot)[..., :3]
    assert pixels.shape[:2] == (8000, 1200)
    inked = (pixels.mean(axis=2) < 0.95).any(axis=1)
    assert inked.mean() > 0.2  # not a blank white page
    assert not inked[-200:].any(), "the page is taller than the screenshot"
    # the plots' first colour (matplotlib's C0, #1f77b4) is on screen: the PNGs were painted
    c0 = np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=2) < 0.03
    assert c0.sum() > 20_000


def test_run_record_is_the_one_contract_between_compress_and_report():
    """compress writes a RunRecord's JSON; report reads it back through the same type. A
    record of an older rankcut (fewer fields) still reads, and a file that is no run
    record says what it lacks."""
    from dataclasses import fields

    from rankcut.io.records import RunRecord

    record = RunRecord(method="io-svd", target_ratio=0.2, perplexity=41.5, model="smollm2",
                       update={"name": "refit", "target": "compressed"}, processes=2)
    data = json.loads(json.dumps(record.to_json()))
    assert set(data) == {f.name for f in fields(RunRecord)}
    assert RunRecord.from_json(data) == record and record.label == "io-svd+refit"
    old = RunRecord.from_json({"method": "svd-llm", "target_ratio": 0.4, "perplexity": 479.9,
                               "an_old_key": 1, "compress_seconds": "n/a"})
    assert (old.label, old.achieved_ratio, old.compress_seconds) == ("svd-llm", None, None)
    anchored = RunRecord(method="svd-llm", target_ratio=0.4, perplexity=1.0,
                         settings={"objective": "anchored"}, update={"name": "refit"})
    assert anchored.label == "svd-llm+anchored+refit"
    with pytest.raises(ValueError, match="missing \\['perplexity'\\]"):
        RunRecord.from_json({"method": "svd", "target_ratio": 0.2})
    assert not RunRecord.matches([1, 2]) and not RunRecord.matches({"rows": []})

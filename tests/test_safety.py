"""The user's files are safe: outputs rankcut did not write are never replaced, one run per
output, checkpoints are verified (shard digests, rank map against shapes), and every argument
is checked before the model is loaded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from socket import gethostname

import pytest
import torch

import rankcut
from rankcut import loading
from rankcut.cli import main
from rankcut.errors import CheckpointError
from rankcut.io import checkpoint, outputs

from .conftest import tiny_model, tiny_tokenizer


def folder_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def compress_args(model_dir, output, *extra, evaluate: bool = False) -> list[str]:
    """A fast data-free compress of the tiny Llama (plain SVD, no evaluation by default)."""
    return ["compress", "--model", str(model_dir), "--method", "svd", "--ratio", "0.3",
            *([] if evaluate else ["--no-eval"]), "--device", "cpu",
            *(["--output", str(output)] if output else []), *extra]


@pytest.fixture
def no_model_load(monkeypatch):
    """Makes any model load fail the test: the error must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the argument was checked")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.fixture
def saved(tmp_path, calib_ids) -> Path:
    model = tiny_model("llama")
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    return rankcut.save_pretrained(model, tmp_path / "ckpt", tiny_tokenizer())


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("rankcut: error: "), err
    return err[-1]


# --- 1. the output folder ---------------------------------------------------------------


def test_a_folder_rankcut_did_not_write_is_refused_and_untouched(model_dir, tmp_path, capsys,
                                                                  no_model_load):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    (mine / "notes.txt").write_text("do not lose")
    before = folder_digest(mine)
    for extra in ([], ["--overwrite"]):
        assert main(compress_args(model_dir, mine, *extra)) == 2
        assert f"--output {mine} is a folder rankcut did not write (it holds holiday.jpg, " \
               "notes.txt); refusing to replace it" in error_line(capsys)
    assert folder_digest(mine) == before


def test_an_existing_file_is_refused_and_untouched(model_dir, tmp_path, capsys, no_model_load):
    target = tmp_path / "thesis.pdf"
    target.write_bytes(b"%PDF years of work")
    assert main(compress_args(model_dir, target, "--overwrite")) == 2
    assert f"--output {target} exists and is not a folder" in error_line(capsys)
    assert target.read_bytes() == b"%PDF years of work"


def test_the_input_model_can_never_be_the_output(model_dir, tmp_path, capsys, no_model_load):
    before = folder_digest(model_dir)
    link = tmp_path / "link-to-model"
    link.symlink_to(model_dir)
    for target in (model_dir, link, model_dir.parent):
        assert main(compress_args(model_dir, target, "--overwrite")) == 2
        assert "is the input model" in error_line(capsys)
    assert folder_digest(model_dir) == before


def test_a_previous_output_needs_overwrite_and_the_default_one_does_not(model_dir, tmp_path,
                                                                        capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(compress_args(model_dir, out)) == 0
    assert json.loads((out / outputs.OUTPUT_MARKER).read_text()) == {"kind": "checkpoint"}
    assert main(compress_args(model_dir, out)) == 2
    assert "holds a previous rankcut output; pass --overwrite to replace it" in \
        error_line(capsys)
    (out / "rank_map.json").write_text("{}")  # replaced below, so the rerun really wrote
    assert main(compress_args(model_dir, out, "--overwrite")) == 0
    assert json.loads((out / "rank_map.json").read_text())
    monkeypatch.chdir(tmp_path)  # the default ./rankcut-out: a rerun replaces it
    for _ in range(2):
        assert main(compress_args(model_dir, None)) == 0
    assert (tmp_path / "rankcut-out" / "config.json").is_file()


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(model_dir,
                                                                            tmp_path, capsys):
    out = tmp_path / "out"
    with outputs.output_lock(out):
        assert main(compress_args(model_dir, out)) == 2
        assert f"another rankcut run is writing {out}" in error_line(capsys)
        assert not out.exists()
    assert main(compress_args(model_dir, out)) == 0  # released


def test_leftovers_of_a_killed_save_are_removed_and_never_taken_for_a_checkpoint(
        saved, tmp_path, model_dir, caplog):
    leftover = tmp_path / ".out.partial-999999999"  # no such process
    leftover.mkdir()
    for item in saved.iterdir():
        (leftover / item.name).write_bytes(item.read_bytes())
    with pytest.raises(CheckpointError, match="unfinished folder of an interrupted save of out"):
        checkpoint.validate_checkpoint(leftover)
    with pytest.raises(rankcut.errors.ConfigError, match="name of rankcut's temporary folders"):
        outputs.check_output(leftover)
    with caplog.at_level(logging.WARNING):
        assert main(compress_args(model_dir, tmp_path / "out")) == 0
    assert not leftover.exists() and "left by an interrupted write" in caplog.text


def test_save_pretrained_never_replaces_a_foreign_folder(saved, tmp_path):
    model = rankcut.from_pretrained(saved)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2,3\n")
    with pytest.raises(CheckpointError, match="rankcut did not write it"):
        rankcut.save_pretrained(model, foreign)
    assert (foreign / "data.csv").read_text() == "1,2,3\n"
    rankcut.save_pretrained(model, saved)  # its own earlier output: replaced


# --- 2. shard digests -------------------------------------------------------------------


def _flip_a_tensor_byte(shard: Path) -> None:
    """Flips one byte inside the tensor data (past the safetensors header)."""
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))


def test_a_flipped_tensor_byte_is_caught_by_load_info_eval(saved, capsys, tmp_path):
    entry = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert set(entry[checkpoint.DIGESTS_KEY]) == {"model.safetensors"}
    assert main(["info", str(saved)]) == 0
    assert "shard digests: 1 shard(s) match the sha256 recorded at save time" in \
        capsys.readouterr().out
    _flip_a_tensor_byte(saved / "model.safetensors")
    message = (f"shard {saved / 'model.safetensors'} does not match the sha256 recorded when "
               "it was saved")
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        rankcut.from_pretrained(saved)
    assert main(["info", str(saved)]) == 2
    assert message in error_line(capsys)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    eval_args = ["eval", str(saved), "--eval-file", str(text), "--seqlen", "32",
                 "--max-windows", "1", "--device", "cpu"]
    assert main(eval_args) == 2
    assert message in error_line(capsys)
    assert main([*eval_args, "--no-verify"]) == 0  # the opt-out loads it as it is


def test_a_checkpoint_without_digests_loads_with_a_warning(saved, capsys, caplog):
    config = json.loads((saved / "config.json").read_text())
    del config["quantization_config"][checkpoint.DIGESTS_KEY]
    (saved / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        rankcut.from_pretrained(saved)
    assert "records no shard digests" in caplog.text
    assert main(["info", str(saved)]) == 0
    assert "shard digests: none recorded" in capsys.readouterr().out


def test_a_streamed_checkpoint_records_digests_too(tmp_path, calib_ids):
    from rankcut.compression import streaming

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
    out = tmp_path / "out"
    streaming.compress_streaming(src, out, rankcut.make_config("svd-llm", ratio=0.3), calib_ids,
                                 batch_size=4)
    entry = checkpoint.validate_checkpoint(out)
    shards = {p.name for p in out.glob("*.safetensors")}
    assert len(shards) > 1 and set(entry[checkpoint.DIGESTS_KEY]) == shards


# --- 3. metadata against the tensors ----------------------------------------------------


def _edit_rank(saved: Path, change) -> str:
    config = json.loads((saved / "config.json").read_text())
    ranks = config["quantization_config"]["rank_map"]
    name = next(n for n, r in ranks.items() if r)
    ranks[name] = change(ranks[name])
    (saved / "config.json").write_text(json.dumps(config))
    return name


def test_a_rank_that_disagrees_with_the_stored_factors_is_refused_at_load(saved):
    name = _edit_rank(saved, lambda r: r + 1)
    with pytest.raises(CheckpointError, match=f"{name} has rank .* in the rank map but its "
                                              "stored factors are"):
        rankcut.from_pretrained(saved)


def test_a_rank_map_json_that_disagrees_with_the_config_is_refused(saved):
    ranks = json.loads((saved / "config.json").read_text())["quantization_config"]["rank_map"]
    name = next(n for n, r in ranks.items() if r)
    (saved / "rank_map.json").write_text(json.dumps({**ranks, name: ranks[name] - 1}))
    with pytest.raises(CheckpointError, match=r"rank_map.json disagrees with the rank map"):
        checkpoint.validate_checkpoint(saved)


def test_a_rank_map_rank_above_min_m_n_is_refused_before_any_work(model_dir, tmp_path, capsys,
                                                                  calib_file):
    model = tiny_model("llama")
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    ranks = dict.fromkeys(targets, 4)
    ranks["model.layers.0.self_attn.k_proj"] = 49  # a 24x48 weight: at most 24
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps(ranks))
    args = ["compress", "--model", str(model_dir), "--method", "svd-llm", "--rank-map",
            str(path), "--calib-file", str(calib_file), "--num-samples", "4", "--seqlen", "16",
            "--no-eval", "--device", "cpu", "--output", str(tmp_path / "out")]
    assert main(args) == 2
    assert ("rank map gives model.layers.0.self_attn.k_proj rank 49, above min(m, n) = 24 of "
            "its 24x48 weight") in error_line(capsys)
    assert not (tmp_path / "out").exists()


# --- 4. arguments checked before the expensive part -------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "svd-llm", "--seqlen", "512"],
     "--seqlen 512 is above the model's 256 maximum positions"),
    (["--eval-seqlen", "1024"], "--eval-seqlen 1024 is above the model's 256 maximum "
                                "positions"),
    (["--max-windows", "0"], "--max-windows must be at least 1; got 0"),
    (["--num-samples", "-3"], "--num-samples must be at least 1; got -3"),
    (["--seqlen", "1"], "--seqlen must be at least 2; got 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
    (["--calib-file", "/nonexistent/calib.txt"],
     "--calib-file /nonexistent/calib.txt: file not found"),
    (["--eval-file", "/nonexistent/test.txt"], "--eval-file /nonexistent/test.txt: file not found"),
])
def test_bad_compress_arguments_are_refused_before_the_model_loads(model_dir, tmp_path, capsys,
                                                                    no_model_load, extra,
                                                                    message):
    # plain svd needs no data: a missing --calib-file is still an error, not ignored
    evaluate = "--eval-seqlen" in extra or "--max-windows" in extra
    assert main(compress_args(model_dir, tmp_path / "out", *extra, evaluate=evaluate)) == 2
    assert message in error_line(capsys)


def test_unwritable_output_and_json_paths_are_refused_before_the_model_loads(
        model_dir, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(compress_args(model_dir, blocker / "out")) == 2
    assert f"{blocker} is not a writable folder" in error_line(capsys)
    assert main(compress_args(model_dir, tmp_path / "out", "--json", str(blocker / "r.json"))) == 2
    assert f"{blocker} is not a writable folder" in error_line(capsys)
    assert main(compress_args(model_dir, tmp_path / "out", "--json", str(tmp_path))) == 2
    assert f"--json {tmp_path} is a folder" in error_line(capsys)


def test_a_min_rank_that_cannot_fit_the_budget_is_refused_before_calibration(
        model_dir, tmp_path, capsys, calib_file, monkeypatch):
    from rankcut.compression import engine

    def no_statistics(*args, **kwargs):
        raise AssertionError("statistics were gathered before min_rank was checked")

    monkeypatch.setattr(engine.BlockRun, "kwargs", no_statistics)  # the first capture
    args = ["compress", "--model", str(model_dir), "--method", "zero-sum", "--ratio", "0.5",
            "--min-rank", "20", "--calib-file", str(calib_file), "--num-samples", "4",
            "--seqlen", "16", "--no-eval", "--device", "cpu", "--output", str(tmp_path / "o")]
    assert main(args) == 2
    line = error_line(capsys)
    assert "min_rank 20 keeps at least" in line
    assert "that ratio 0.5 allows; lower min_rank or the ratio" in line


def test_an_unused_calibration_file_is_named_in_a_warning(model_dir, tmp_path, calib_file,
                                                          caplog):
    with caplog.at_level(logging.WARNING):
        assert main(compress_args(model_dir, tmp_path / "out", "--calib-file",
                                  str(calib_file))) == 0
    assert f"--calib-file {calib_file} is not used: method svd needs no calibration data" in \
        caplog.text


def test_eval_arguments_are_checked_before_the_model_loads(saved, tmp_path, capsys,
                                                           no_model_load):
    assert main(["eval", str(saved), "--max-windows", "0"]) == 2
    assert "--max-windows must be at least 1; got 0" in error_line(capsys)
    assert main(["eval", str(saved), "--eval-file", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: file not found" in error_line(capsys)


def test_the_output_lock_is_released_when_the_run_fails(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(compress_args(model_dir, out, "--include", "nothing.*")) == 2
    error_line(capsys)
    assert not out.exists() and not (tmp_path / ".out.rankcut-lock").exists()
    assert main(compress_args(model_dir, out)) == 0  # nothing left blocks the next run


def test_export_guards_its_output_and_verifies_its_input(saved, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.bin").write_bytes(b"\x00\x01")
    export = ["export", str(saved), "--dense", "--output"]
    assert main([*export, str(foreign)]) == 2
    assert "is a folder rankcut did not write (it holds keep.bin)" in error_line(capsys)
    assert (foreign / "keep.bin").read_bytes() == b"\x00\x01"
    assert main([*export, str(saved)]) == 2
    assert "is the input model" in error_line(capsys)
    dense = tmp_path / "dense"
    assert main([*export, str(dense)]) == 0
    assert json.loads((dense / outputs.OUTPUT_MARKER).read_text()) == {"kind": "dense"}
    assert main([*export, str(dense)]) == 2
    assert "pass --overwrite" in error_line(capsys)
    assert main([*export, str(dense), "--overwrite"]) == 0
    _flip_a_tensor_byte(saved / "model.safetensors")
    assert main([*export, str(tmp_path / "dense2")]) == 2
    assert "does not match the sha256" in error_line(capsys)
    assert not (tmp_path / "dense2").exists()


def orphaned_scratch(root: Path, prefix: str) -> Path:
    """The scratch folder of a process that ended without cleaning up (as a SIGKILL leaves
    it): a child process enters ``scratch_folder``, writes a work file and exits at once."""
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from rankcut.compression.workfolder import scratch_folder\n"
            f"with scratch_folder({prefix!r}, {str(root)!r}) as folder:\n"
            "    (folder / 'acts.safetensors').write_bytes(b'x' * 1000)\n"
            "    print(folder, flush=True)\n"
            "    os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    folder = Path(out.stdout.strip())
    assert (folder / "acts.safetensors").exists()
    return folder


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run(tmp_path):
    from rankcut.compression.workfolder import SCRATCH_OWNER, scratch_folder

    orphan = orphaned_scratch(tmp_path, "rankcut-work-")
    users = tmp_path / "rankcut-work-mine"  # the same prefix, not written by rankcut
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    live = tmp_path / "rankcut-work-live"  # a run still going (this process)
    live.mkdir()
    (live / SCRATCH_OWNER).write_text(json.dumps({"pid": os.getpid(), "host": gethostname()}))
    elsewhere = tmp_path / "rankcut-work-elsewhere"  # a run on another host sharing /tmp
    elsewhere.mkdir()
    (elsewhere / SCRATCH_OWNER).write_text(json.dumps({"pid": 2**22 + 1, "host": "other"}))
    with scratch_folder("rankcut-work-", tmp_path) as folder:
        assert folder.exists() and not orphan.exists()
    assert not folder.exists()
    assert (users / "notes.txt").read_text() == "keep me"
    assert live.exists() and elsewhere.exists()


def test_in_memory_compress_leaves_no_scratch_and_sweeps_a_killed_one(tmp_path, monkeypatch,
                                                                      calib_ids):
    import tempfile

    orphan = orphaned_scratch(tmp_path, "rankcut-work-")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_model("llama")
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    assert not orphan.exists()
    assert not list(tmp_path.glob("rankcut-work-*"))

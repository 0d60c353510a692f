"""Distributed calibration: two gloo processes give one process's ranks and factors.

One spawn of two CPU processes compresses a tiny Llama with every case below and saves
each rank's result; the tests compare them with the same runs in this process. The
helpers' no-op behaviour without a process group is checked here too, and the real CLI
under torchrun.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import rankcut
from rankcut.calibration import distributed
from rankcut.cli import main
from rankcut.compression import streaming
from rankcut.compression.update import make_update
from rankcut.core import fisher, linalg
from rankcut.errors import ConfigError

from .conftest import VOCAB, tiny_model

# case: (method, settings, calibration seed, ratio). 8 samples in batches of 3 make 3
# batches, so the second process has one batch fewer (and sits out the last KL draw step).
CASES = {
    "svd": ("svd", {}, 1, 0.3),
    "svd-llm": ("svd-llm", {}, 1, 0.3),
    "svd-llm-sequential": ("svd-llm", {"sequential": True}, 1, 0.3),
    "asvd": ("asvd", {}, 1, 0.3),
    "fwsvd": ("fwsvd", {}, 1, 0.3),
    "svd-llm-v2": ("svd-llm-v2", {}, 1, 0.3),
    "zero-sum": ("zero-sum", {"grad_batch_size": 3}, 1, 0.3),
    "zero-sum-3-stages": ("zero-sum", {"stages": 3, "grad_batch_size": 3}, 2, 0.6),
    "zero-sum-some-grad-samples": ("zero-sum", {"grad_samples": 6, "grad_batch_size": 3}, 1,
                                   0.3),
    "io-svd-sample": ("io-svd", {"grad_batch_size": 3}, 1, 0.3),
    "io-svd-exact": ("io-svd", {"kl_mode": "exact", "score": "both", "grad_batch_size": 3}, 1,
                     0.3),
    "io-svd-classic": ("io-svd", {"remap": "classic", "grad_batch_size": 3}, 1, 0.3),
    "io-svd-loss-aware": ("io-svd", {"remap": "loss-aware", "grad_batch_size": 3}, 1, 0.3),
    # a tiny LLaVA on 4 text and 4 image-text samples (batches never mix the two kinds)
    "io-svd-images": ("io-svd", {"grad_batch_size": 3}, 5, 0.3),
    "svd-llm-images": ("svd-llm", {}, 5, 0.3),
    "svd-llm-anchored": ("svd-llm", {"objective": "anchored"}, 1, 0.3),
    # in io-svd's output metric: every process needs every layer's output whitening
    "io-svd-anchored": ("io-svd", {"objective": "anchored", "grad_batch_size": 3}, 1, 0.3),
    "svd-llm-refit": ("svd-llm", {}, 1, 0.3),
}
#: The cases above that end with a block-wise update: its name and settings.
CASE_UPDATES = {"svd-llm-refit": ("refit", {"target": "original"})}
#: Block refinement in two processes is data parallel (a step trains on one batch of each),
#: so it is compared with itself across the processes, not with one process: io-svd with the
#: KL weight (the metric is summed over the processes), 8 samples in batches of 2: global
#: batches 0 and 2 on process 0, 1 and 3 on process 1; batch 3 is the held-out slice.
BLOCK = dict(epochs=4, lr=1e-4, batch_size=2, held_out=2, weight="kl")


def _run(case: str) -> dict:
    """Compresses the tiny Llama as ``case`` says; returns ranks, stage losses, factors."""
    method, settings, seed, ratio = CASES[case]
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(seed))
    model = tiny_model("llama")
    if case.endswith("-images"):
        from .test_vlm_calibration import image_calibration, tiny_vlm

        model, ids = tiny_vlm("llava"), image_calibration("llava", seed=seed)
    name, settings_ = CASE_UPDATES.get(case, (None, {}))
    update = make_update(name, **settings_) if name else None
    report = rankcut.compress(model, rankcut.make_config(method, ratio=ratio, **settings), ids,
                              batch_size=3, update=update)
    return _result(model, report)


def _result(model, report) -> dict:
    factors = {name: [t.detach().clone() for t in module.factors()]
               for name, module in model.named_modules()
               if isinstance(module, rankcut.LowRankLinear)}
    return {"ranks": report.rank_map, "stage_losses": report.stage_losses,
            "int8": report.int8_layout, "factors": factors,
            "update_log": report.update.log if report.update else None}


def _refined() -> dict:
    """io-svd, then KL-weighted block refinement (``BLOCK``)."""
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama")
    report = rankcut.compress(model, rankcut.make_config("io-svd", ratio=0.5,
                                                         grad_batch_size=3),
                              ids, batch_size=3, update=make_update("block", **BLOCK))
    return _result(model, report)


def _errors() -> dict[str, str]:
    """The messages of the runs a distributed compress must refuse."""
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    refused = {"one batch": dict(batch_size=8),
               "update": dict(update=make_update("lora"))}
    messages = {}
    for key, kwargs in refused.items():
        try:
            rankcut.compress(tiny_model(), rankcut.make_config("svd-llm"), ids, **kwargs)
        except ConfigError as err:
            messages[key] = str(err)
    return messages


#: The cases also run streamed (``rankcut.compression.streaming``) by the two processes.
STREAMED = ["svd-llm", "svd-llm-sequential", "svd-llm-v2", "zero-sum-some-grad-samples",
            "io-svd-sample", "io-svd-exact", "io-svd-classic", "svd-llm-anchored",
            "io-svd-anchored", "svd-llm-refit"]


def _stream(case: str, out: Path) -> None:
    """Compresses the sharded tiny Llama in ``out``/src as ``case`` says, streamed."""
    method, settings, seed, ratio = CASES[case]
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(seed))
    name, update = CASE_UPDATES.get(case, (None, {}))
    streaming.compress_streaming(out / "src", out / f"streamed-{case}",
                                 rankcut.make_config(method, ratio=ratio, **settings), ids,
                                 batch_size=3,
                                 update=make_update(name, **update) if name else None)


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for case in CASES:
            torch.save(_run(case), Path(out) / f"{case}.{rank}.pt")
        torch.save(_refined(), Path(out) / f"refined.{rank}.pt")
        torch.save(_errors(), Path(out) / f"errors.{rank}.pt")
        for case in STREAMED:
            _stream(case, Path(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Runs every case in two gloo processes; returns the folder of their results."""
    out = tmp_path_factory.mktemp("distributed")
    tiny_model("llama").save_pretrained(out / "src", max_shard_size="20KB")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("case", STREAMED)
def test_two_streaming_processes_match_one(two_processes, case):
    """Streamed in two processes: one output, written by process 0, equal to one process's
    in-memory run; no work folder is left behind."""
    single = _run(case)
    model = rankcut.from_pretrained(two_processes / f"streamed-{case}")
    got = {name: module.factors() for name, module in model.named_modules()
           if isinstance(module, rankcut.LowRankLinear)}
    assert {n: m.rank for n, m in model.named_modules()
            if isinstance(m, rankcut.LowRankLinear)} == {
        n: r for n, r in single["ranks"].items() if r is not None}
    for name, factors in single["factors"].items():
        for mine, want in zip(got[name], factors, strict=True):
            scale = float(want.abs().max())
            torch.testing.assert_close(mine.float(), want.float(), atol=1e-5 * scale, rtol=0,
                                       msg=name)
    assert not list(two_processes.glob(f".streamed-{case}*"))


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(two_processes, case):
    single = _run(case)
    ranks = [torch.load(two_processes / f"{case}.{rank}.pt") for rank in (0, 1)]
    for result in ranks:
        assert result["ranks"] == single["ranks"]
        assert result["int8"] == single["int8"]
        assert result["stage_losses"] == pytest.approx(single["stage_losses"], abs=1e-6)
        assert result["factors"].keys() == single["factors"].keys()
    if case == "zero-sum-3-stages":
        assert len(single["stage_losses"]) == 3  # both correction stages were kept
    for name, (w_u, w_v) in single["factors"].items():
        for mine, theirs in zip(ranks[0]["factors"][name], ranks[1]["factors"][name],
                                strict=True):
            assert torch.equal(mine, theirs), f"{name}: the two processes differ"
        for got, want in zip(ranks[0]["factors"][name], (w_u, w_v), strict=True):
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0, msg=name)


def test_distributed_refusals_name_the_fix(two_processes):
    for rank in (0, 1):
        messages = torch.load(two_processes / f"errors.{rank}.pt")
        assert "in batches of 8 give 1 batch(es) for 2 processes" in messages["one batch"]
        assert "lora update trains the whole model at once and is not distributed" in \
            messages["update"]


def test_two_processes_refine_blocks_data_parallel(two_processes):
    """Block refinement under torchrun: both processes end with the same factors bit for
    bit; the first block's held-out error before refinement is the one process's (the
    same windows, the closed-form cut of the same ranks; a sum over processes in another
    order), and no block gets worse on it."""
    single = _refined()
    ranks = [torch.load(two_processes / f"refined.{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["update_log"] == ranks[1]["update_log"]
    for name, factors in ranks[0]["factors"].items():
        for mine, theirs in zip(factors, ranks[1]["factors"][name], strict=True):
            assert torch.equal(mine, theirs), f"{name}: the two processes differ"
    assert ranks[0]["ranks"] == single["ranks"]
    log = ranks[0]["update_log"]
    assert [e["block"] for e in log] == [0, 1]
    # block 1's inputs come from the refined block 0, which differs (data parallel steps)
    assert log[0]["error_before"] == pytest.approx(single["update_log"][0]["error_before"],
                                                   rel=1e-5)
    for mine in log:
        assert mine["error_after"] == min(mine["curve"]) <= mine["error_before"]
        assert len(mine["curve"]) == BLOCK["epochs"] + 1
    assert any(e["error_after"] < e["error_before"] for e in log)


def test_helpers_without_a_process_group_change_nothing():
    ids = torch.arange(40).view(10, 4)
    assert distributed.world() == (0, 1)
    assert [b.tolist() for b in distributed.my_batches(ids, 3)] == [
        b.tolist() for b in ids.split(3)]
    assert distributed.idle_steps(4) == 0
    assert distributed.mine(["a", "b", "c"]) == ["a", "b", "c"]
    tensor = torch.ones(3)
    distributed.sum_tensors([tensor])
    assert torch.equal(tensor, torch.ones(3))
    assert distributed.sum_numbers(1.5, 7) == (1.5, 7)
    moment = linalg.SecondMoment.zeros(2)
    moment.update(torch.ones(3, 2))
    distributed.sum_moments({"q": moment, "k": moment})
    assert moment.count == 3 and torch.equal(moment.xx, torch.full((2, 2), 3.0,
                                                                   dtype=torch.float64))
    assert distributed.lockstep(torch.ones(2), lambda x: x * 2).tolist() == [2.0, 2.0]
    assert distributed.lockstep(None, lambda x: x * 2) is None
    held = {"a": [torch.zeros(2)]}
    assert distributed.share(held, {"a": [(2,)]})["a"] is held["a"]
    distributed.barrier()


def test_launched_without_a_launcher_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.launched("cpu") as device:
        assert device == "cpu" and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed.launched("cpu") as device:
        assert device == "cpu" and not dist.is_initialized()


@pytest.mark.parametrize("mode", fisher.KL_MODES)
def test_seeds_from_given_draws_equal_the_generators(mode):
    logits = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    direct = list(fisher.kl_seeds(logits, 3, mode, torch.Generator().manual_seed(4)))
    replay = torch.Generator().manual_seed(4)
    given = list(fisher.kl_seeds(logits, 3, mode,
                                 draw=lambda p: fisher.kl_draws(p, mode, replay)))
    assert len(given) == len(direct) == (3 if mode == "exact" else 1)
    assert all(torch.equal(a, b) for a, b in zip(direct, given, strict=True))


# Loaded at start-up by the torchrun workers: records the rank of every checkpoint save.
_SAVE_SPY = """
import os

if "LOCAL_RANK" in os.environ:
    from rankcut.io import checkpoint

    _save = checkpoint.save_pretrained

    def save_pretrained(*args, **kwargs):
        with open({path!r}, "a") as log:
            log.write(os.environ["RANK"] + "\\n")
        return _save(*args, **kwargs)

    checkpoint.save_pretrained = save_pretrained
"""


def test_cli_under_torchrun_writes_once_and_matches_one_process(model_dir, calib_file,
                                                                 tmp_path):
    args = ["compress", "--model", str(model_dir), "--method", "io-svd", "--ratio", "0.3",
            "--calib-file", str(calib_file), "--num-samples", "8", "--seqlen", "32",
            "--batch-size", "3", "--eval-file", str(calib_file), "--eval-seqlen", "32",
            "--max-windows", "2", "--device", "cpu"]
    src = str(Path(rankcut.__file__).parents[1])
    spy, writes = tmp_path / "spy", tmp_path / "writes.txt"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(_SAVE_SPY.format(path=str(writes)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(spy), src, os.environ.get("PYTHONPATH", "")])}
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--log-dir", str(logs), "--redirects", "3",
               "-m", "rankcut.cli", *args, "--output", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert writes.read_text().split() == ["0"]  # only process 0 saved the checkpoint
    stdout = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(stdout) == [0, 1]
    assert "ratio (target / achieved)" in stdout[0] and stdout[1] == ""
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / d / "rankcut_run.json").read_text())
                for d in ("two", "one"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert two["achieved_ratio"] == one["achieved_ratio"]
    for d in ("two", "one"):
        assert rankcut.from_pretrained(tmp_path / d) is not None  # loads
    rank_maps = [json.loads((tmp_path / d / "rank_map.json").read_text()) for d in ("two", "one")]
    assert rank_maps[0] == rank_maps[1]
    tensors = [load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("two", "one")]
    assert tensors[0].keys() == tensors[1].keys()
    for key, want in tensors[1].items():
        scale = float(want.abs().max()) or 1.0
        torch.testing.assert_close(tensors[0][key], want, atol=1e-5 * scale, rtol=0, msg=key)


def test_cli_stream_under_torchrun_matches_one_process(model_dir, calib_file, tmp_path):
    args = ["compress", "--model", str(model_dir), "--method", "io-svd", "--ratio", "0.3",
            "--calib-file", str(calib_file), "--num-samples", "8", "--seqlen", "32",
            "--batch-size", "3", "--eval-file", str(calib_file), "--eval-seqlen", "32",
            "--max-windows", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(rankcut.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "rankcut.cli", *args, "--stream",
               "--output", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / d / "rankcut_run.json").read_text())
                for d in ("two", "one"))
    assert two["processes"] == 2 and two["streamed"]
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    # streamed (1 thread) vs in-memory (default threads) evaluation of the same dense model:
    # float32 rounding only, ~1e-6 relative on the perplexity; 1e-5 leaves 10x
    assert two["dense_perplexity"] == pytest.approx(one["dense_perplexity"], rel=1e-5)
    rank_maps = [json.loads((tmp_path / d / "rank_map.json").read_text()) for d in ("two", "one")]
    assert rank_maps[0] == rank_maps[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

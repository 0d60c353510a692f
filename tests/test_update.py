"""SVD-LLM's parameter update: closed-form refit of W_u and sequential LoRA (peft)."""

from __future__ import annotations

import json

import pytest
import torch

import rankcut
from rankcut.calibration.data import as_calibration
from rankcut.cli import main
from rankcut.compression.blockpass import PairedMoments
from rankcut.compression.update import (
    LoRAUpdateConfig,
    RefitConfig,
    distill_loss,
    lora_teacher,
    lora_update,
    make_update,
    refit_factor,
)
from rankcut.errors import ConfigError
from rankcut.methods import make_config
from rankcut.nn.modules import LowRankLinear

from .conftest import VOCAB, tiny_model, tiny_tokenizer
from .test_cli import _compress


def _problem(seed: int, m=10, n=16, r=4, tokens=400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x_o = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x_c = x_o + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    moments = PairedMoments.zeros(n)
    moments.oo += x_o.T @ x_o
    moments.oc += x_o.T @ x_c
    moments.cc += x_c.T @ x_c
    moments.count = tokens
    u, s, vh = torch.linalg.svd(w)
    return w, u[:, :r] * s[:r], vh[:r], moments, x_o, x_c


def _error(w, w_u, w_v, x_o, x_c):
    return float((x_o @ w.T - x_c @ (w_u @ w_v).T).square().sum(1).mean())


@pytest.mark.parametrize("seed", range(5))
def test_refit_never_increases_the_layer_error(seed):
    w, w_u, w_v, moments, x_o, x_c = _problem(seed)
    new_u, before, after, base = refit_factor(w, w_u, w_v, moments)
    assert base == pytest.approx(float((x_o @ w.T).square().sum(1).mean()), rel=1e-9)
    assert before == pytest.approx(_error(w, w_u, w_v, x_o, x_c), rel=1e-9)
    assert after == pytest.approx(_error(w, new_u, w_v, x_o, x_c), rel=1e-9)
    assert after < before  # the SVD factors are not optimal on shifted inputs
    # refitting the refit changes nothing: it is already the least-squares optimum
    again, before2, after2, _ = refit_factor(w, new_u, w_v, moments)
    assert after2 <= before2 + 1e-12 and before2 == pytest.approx(after, rel=1e-9)


def test_refit_keeps_the_old_factor_when_the_solution_is_worse():
    w, w_u, w_v, moments, *_ = _problem(0)
    optimum, _, best, _ = refit_factor(w, w_u, w_v, moments, damping=0.0)
    # a huge ridge pulls the solution towards zero, far from the optimum already held
    kept, before, after, _ = refit_factor(w, optimum, w_v, moments, damping=0.9)
    assert kept is optimum and after == before == pytest.approx(best, rel=1e-9)


def test_refit_update_on_a_tiny_model(calib_ids):
    model, plain = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        reference = tiny_model("llama")(input_ids=calib_ids).logits
    rankcut.compress(plain, make_config("svd-llm", ratio=0.5), calib_ids)
    report = rankcut.compress(model, make_config("svd-llm", ratio=0.5), calib_ids,
                              update=RefitConfig(target="original"))
    log = report.update.log
    assert len(log) == sum(isinstance(m, LowRankLinear) for m in model.modules()) > 0
    assert all(e["error_after"] <= e["error_before"] for e in log)
    assert any(e["error_after"] < 0.999 * e["error_before"] for e in log)
    assert report.rank_map == {m.name: m.rank for m in report.modules}
    assert model.config.quantization_config["update"]["name"] == "refit"
    with torch.no_grad():  # the refitted model's outputs are closer to the original's
        gaps = [(m(input_ids=calib_ids).logits - reference).square().mean() for m in (model, plain)]
    assert gaps[0] < gaps[1]


def _layer_io(model, names, ids):
    """{layer: (its input, its output)} on one forward pass of ``ids``."""
    seen, handles = {}, []
    for name in names:
        def keep(module, args, output, name=name):
            seen[name] = (args[0].detach().double(), output.detach().double())
        handles.append(model.get_submodule(name).register_forward_hook(keep))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("target", ["compressed", "original"])
def test_refit_errors_are_those_of_the_final_model(calib_ids, target):
    """Each layer is refitted on the inputs it really gets once the layers before it (in
    its own block too: q/k/v before o_proj, gate/up before down_proj) are refitted; its
    target is the original layer on those inputs, or the original model's layer output."""
    model, original = tiny_model("llama"), tiny_model("llama")
    report = rankcut.compress(model, make_config("svd-llm", ratio=0.5), calib_ids,
                              update=RefitConfig(target=target))
    names = [entry["module"] for entry in report.update.log]
    got = _layer_io(model, names, calib_ids)
    in_original = _layer_io(original, names, calib_ids)
    for entry in report.update.log:
        name = entry["module"]
        if target == "original":
            wanted = in_original[name][1]
        else:
            weight = original.get_submodule(name).weight.double()
            wanted = got[name][0] @ weight.T
        error = (wanted - got[name][1]).square().sum(-1).mean().item()
        assert error == pytest.approx(entry["error_after"], rel=2e-3, abs=1e-7), name


def test_plan_round_trip_keeps_int8_layout():
    from rankcut.core.hybrid import RowPlan

    torch.manual_seed(0)
    u, v = torch.randn(12, 6), torch.randn(6, 10)
    plan = RowPlan(u_int8=torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool),
                   v_int8=torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.bool))
    layer = LowRankLinear.from_factors(u, v, plan=plan)
    rebuilt = LowRankLinear.from_factors(*layer.factors(), plan=layer.plan)
    assert rebuilt.layout == layer.layout
    for key, value in layer.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key


def _lora(calib_ids, seed=0):
    model = tiny_model("llama")
    update = LoRAUpdateConfig(rank=2, steps=3, batch_size=2, lr=1e-2, seed=seed)
    report = rankcut.compress(model, make_config("svd-llm", ratio=0.5), calib_ids, update=update)
    return model, report


def test_lora_trains_both_factors_and_keeps_the_layout(calib_ids, tmp_path):
    before = tiny_model("llama")
    rankcut.compress(before, make_config("svd-llm", ratio=0.5), calib_ids)
    state = torch.random.get_rng_state()
    model, report = _lora(calib_ids)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert [(e["stage"], e["step"]) for e in report.update.log] == [
        ("u", 0), ("u", 1), ("u", 2), ("v", 0), ("v", 1), ("v", 2)]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in report.update.log)
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    reference = dict(before.named_modules())
    assert lowrank and all(m.rank == reference[n].rank for n, m in lowrank.items())
    changed_u = any(not torch.equal(m.weight_u, reference[n].weight_u) for n, m in lowrank.items())
    changed_v = any(not torch.equal(m.weight_v, reference[n].weight_v) for n, m in lowrank.items())
    assert changed_u and changed_v
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert not any("lora" in n for n, _ in model.named_parameters())
    out = rankcut.save_pretrained(model, tmp_path / "lora", tiny_tokenizer())
    reloaded, _ = rankcut.load_model(out)
    ids = calib_ids[:2, :16]
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_lora_is_deterministic(calib_ids):
    a, _ = _lora(calib_ids)
    b, _ = _lora(calib_ids)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_distill_loss_is_the_kl_over_the_top_k_and_the_rest():
    """With all V tokens kept it is the full KL divergence (zero, with no gradient, when
    the student equals the teacher); with K < V, the KL over the K tokens and one bucket
    for the rest, written out by hand here."""
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    probs, index = p.topk(11, dim=-1)
    same = teacher.clone().requires_grad_()
    loss = distill_loss(same, probs, index)
    loss.backward()
    assert abs(loss.item()) < 1e-5 and same.grad.abs().max() < 1e-6
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert kl > 0.1
    assert torch.allclose(distill_loss(student, probs, index), kl, atol=1e-5)
    probs, index = p.topk(3, dim=-1)
    top_q = q.gather(-1, index)
    rest_p, rest_q = 1 - probs.sum(-1), 1 - top_q.sum(-1)
    by_hand = ((probs * (probs / top_q).log()).sum(-1) + rest_p * (rest_p / rest_q).log()).mean()
    assert torch.allclose(distill_loss(student, probs, index), by_hand, atol=1e-5)
    assert float(by_hand) < float(kl)  # merging outcomes never raises a KL divergence


def test_lora_teacher_holds_the_uncompressed_models_top_k(calib_ids):
    model = tiny_model("llama")
    calibration = as_calibration(calib_ids)
    assert lora_teacher(model, make_update("lora"), calibration) is None
    assert lora_teacher(model, make_update("block"), calibration) is None
    teacher = lora_teacher(model, make_update("block+lora", lora_teacher_top_k=4), calibration)
    assert teacher.probs.shape == teacher.index.shape == (*calib_ids.shape, 4)
    assert teacher.index.dtype == torch.int32
    with torch.no_grad():
        logits = model(input_ids=calib_ids).logits
    values, index = torch.softmax(logits, -1).topk(4, dim=-1)
    assert torch.equal(teacher.index, index.int())
    assert torch.allclose(teacher.probs, values, atol=1e-6)
    assert bool((teacher.probs.sum(-1) < 1).all())  # the rest's mass is kept, not renormalized
    everything = lora_teacher(model, make_update("lora", teacher_top_k=1000), calibration)
    assert everything.probs.shape[-1] == VOCAB  # K is capped at the vocabulary
    assert torch.allclose(everything.probs.sum(-1), torch.ones(calib_ids.shape), atol=1e-5)


def test_lora_with_a_teacher_moves_the_model_towards_the_uncompressed_one(calib_ids):
    """Distilling lowers the KL divergence from the original model on the calibration
    text below the cut's; next-token LoRA with the same steps, fitting the random tokens
    themselves, raises it."""
    calibration = as_calibration(calib_ids)
    teacher = lora_teacher(tiny_model("llama"), make_update("lora", teacher_top_k=8),
                           calibration)

    def distilled_gap(update) -> float:
        model = tiny_model("llama")
        rankcut.compress(model, make_config("svd", ratio=0.5), calib_ids, update=update)
        with torch.no_grad():
            return float(distill_loss(model(input_ids=calib_ids).logits, teacher.probs,
                                      teacher.index))

    settings = dict(rank=2, steps=10, batch_size=4, lr=1e-2)
    cut = distilled_gap(None)
    plain = distilled_gap(LoRAUpdateConfig(**settings))
    distilled = distilled_gap(LoRAUpdateConfig(**settings, teacher_top_k=8))
    assert distilled < 0.5 * cut and cut < plain
    model = tiny_model("llama")
    report = rankcut.compress(model, make_config("svd", ratio=0.5), calib_ids,
                              update=LoRAUpdateConfig(**settings, teacher_top_k=8))
    assert report.update.settings["teacher_top_k"] == 8
    with pytest.raises(ConfigError, match="needs the uncompressed model's targets"):
        lora_update(model, calib_ids, LoRAUpdateConfig(teacher_top_k=8))
    with pytest.raises(ConfigError, match="teacher targets cover"):
        lora_update(model, calib_ids[:4], LoRAUpdateConfig(teacher_top_k=8), teacher)


def test_update_settings_are_validated():
    assert make_update("none") is None
    with pytest.raises(ConfigError, match="unknown update"):
        make_update("sgd")
    with pytest.raises(ConfigError, match="at least 1"):
        make_update("lora", steps=0)
    with pytest.raises(ConfigError, match="lr"):
        make_update("lora", lr=-1.0)
    with pytest.raises(ConfigError, match="teacher_top_k must be 0"):
        make_update("lora", teacher_top_k=-1)
    with pytest.raises(ConfigError, match="target"):
        make_update("refit", target="outputs")
    assert make_update("refit", target="original").target == "original"


def test_cli_update_refit_and_lora_flags(model_dir, calib_file, tmp_path, capsys):
    run = tmp_path / "run.json"
    assert _compress(model_dir, calib_file, tmp_path / "o", "--method", "svd-llm",
                     "--update", "refit", "--refit-target", "original", "--json", str(run)) == 0
    figures = json.loads(run.read_text())
    assert figures["update"]["name"] == "refit" and figures["update_log"]
    assert figures["update"]["target"] == "original"
    capsys.readouterr()
    assert main(["info", str(tmp_path / "o")]) == 0
    assert '"name": "refit"' in capsys.readouterr().out.split("parameter update: ")[1]
    assert _compress(model_dir, calib_file, tmp_path / "o2", "--method", "svd-llm",
                     "--lora-steps", "3") == 2
    assert "--update lora" in capsys.readouterr().err
    assert _compress(model_dir, calib_file, tmp_path / "o3", "--method", "svd-llm",
                     "--refit-target", "original") == 2
    assert "--refit-target needs --update refit" in capsys.readouterr().err

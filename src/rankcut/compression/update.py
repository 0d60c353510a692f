"""SVD-LLM's parameter update after truncation, usable after any method.

Two stages, each with a frozen config dataclass:

* ``refit``: layer by layer, the compressed model's own activations x_c are fed to each
  factorized layer and W_u is re-solved in closed form (W_v fixed) so the layer's outputs
  match the original layer's outputs: W x_c (SVD-LLM's objective, the default) or W x_o on
  the original model's activations (which also tries to undo the error of earlier layers).
  It runs block by block over the engine's executor (``refit_blocks``), in memory and
  streamed alike, with the original weights and both activation streams in the work folder.
* ``lora``: sequential low-rank fine-tuning with ``peft``: LoRA on every W_u (W_v frozen),
  merge; then on every W_v (W_u frozen), merge.

Both keep ranks and int8 layouts; int8 rows are quantized again from the updated factors.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import distributed
from ..calibration.blocks import run_block
from ..calibration.data import Calibration, as_calibration
from ..errors import ConfigError
from ..methods import setting
from ..nn.modules import LowRankLinear
from .engine import BlockRun, UpdateReport, save_block
from .workfolder import load_tensors, save_tensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitConfig:
    """Closed-form refit of W_u on the compressed model's activations.

    Attributes:
        damping: ridge λ, relative to the mean diagonal of the rank-space second moment.
        target: ``"compressed"`` fits W x_c, the original layer applied to the compressed
            model's own inputs (SVD-LLM); ``"original"`` fits W x_o, the original layer's
            outputs in the original model.
    """

    name: ClassVar[str] = "refit"
    damping: float = setting(1e-6, "ridge λ, relative to the mean diagonal of the rank-space "
                                   "second moment")
    target: str = setting("compressed", "fit the original layer applied to the compressed "
                                        "model's inputs, or its outputs in the original model",
                          ("compressed", "original"))

    def __post_init__(self) -> None:
        if not 0.0 <= self.damping < 1.0:
            raise ConfigError(f"refit damping must be in [0, 1); got {self.damping!r}")
        if self.target not in ("compressed", "original"):
            raise ConfigError(f"refit target must be 'compressed' or 'original'; "
                              f"got {self.target!r}")

    def settings(self) -> dict[str, Any]:
        """Returns the stage name and settings as a JSON-ready dict."""
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class LoRAUpdateConfig:
    """Sequential LoRA: W_u first (W_v frozen), merge, then W_v (W_u frozen), merge.

    Attributes:
        rank: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by alpha / rank).
        steps: optimizer steps per stage (two stages).
        batch_size: calibration samples per step, drawn with a seeded generator.
        lr: AdamW learning rate.
        seed: seed of the LoRA initialization and of the batch draws.
    """

    name: ClassVar[str] = "lora"
    rank: int = setting(8, "LoRA rank")
    alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by alpha / rank)")
    steps: int = setting(20, "optimizer steps per LoRA stage")
    batch_size: int = setting(4, "calibration samples per LoRA step")
    lr: float = setting(3e-4, "LoRA learning rate")
    seed: int = setting(0, "seed of the LoRA initialization and of the batch draws")

    def __post_init__(self) -> None:
        for key in ("rank", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"lora {key} must be at least 1; got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"lora lr must be positive; got {self.lr!r}")

    def settings(self) -> dict[str, Any]:
        """Returns the stage name and settings as a JSON-ready dict."""
        return {"name": self.name, **asdict(self)}


UpdateConfig = RefitConfig | LoRAUpdateConfig
UPDATES: dict[str, type] = {RefitConfig.name: RefitConfig, LoRAUpdateConfig.name: LoRAUpdateConfig}


def make_update(name: str | None, **settings: Any) -> UpdateConfig | None:
    """Builds the update config called ``name`` (None or ``"none"``: no update).

    Raises:
        ConfigError: unknown update or setting, or a value out of range.
    """
    if name in (None, "none"):
        return None
    if name not in UPDATES:
        raise ConfigError(f"unknown update {name!r}; choose one of none, {', '.join(UPDATES)}")
    given = {k: v for k, v in settings.items() if v is not None}
    try:
        return UPDATES[name](**given)
    except TypeError as exc:
        raise ConfigError(f"update {name!r}: {exc}") from None


def apply_update(run: BlockRun, config: UpdateConfig, calibration: torch.Tensor | Calibration,
                 batch_size: int = 8) -> UpdateReport:
    """Runs ``config``'s update on the blocks ``run`` compressed.

    Args:
        run: the block run of the compression (``pipeline.compress_blocks``; for a refit it
            must have kept its blocks and originals: ``refit=True``).
        config: ``RefitConfig`` or ``LoRAUpdateConfig`` (in memory only: it trains the
            whole model).
        calibration: [num_samples, seqlen] token ids, or a ``Calibration`` (with images:
            refit only).
        batch_size: samples per forward pass (refit).

    Raises:
        ConfigError: no calibration, or image samples for the LoRA update.
    """
    if calibration is None or calibration.numel() == 0:
        raise ConfigError(f"the {config.name} update needs calibration token ids")
    calibration = as_calibration(calibration)
    if isinstance(config, RefitConfig):
        log = refit_blocks(run, config, calibration, batch_size)
    elif calibration.has_images:
        raise ConfigError("the lora update trains on text only; drop --calib-images or use "
                          "--update refit")
    else:
        log = lora_update(run.sm.model, calibration.input_ids, config)
    return UpdateReport(config.settings(), log)


# ---------------------------------------------------------------- closed-form refit


@dataclass
class PairedMoments:
    """Second moments of a layer's compressed-model inputs x_c and, when the target is the
    original model's stream, of its original inputs x_o.

    Attributes:
        cc: Σ x_c x_cᵀ (n×n float64).
        oo, oc: Σ x_o x_oᵀ and Σ x_o x_cᵀ; None when the target is the compressed stream
            itself (x_o = x_c), where both equal ``cc``.
        count: tokens.
    """

    cc: torch.Tensor
    oo: torch.Tensor | None = None
    oc: torch.Tensor | None = None
    count: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu",
              paired: bool = True) -> PairedMoments:
        """Empty moments for inputs of dimension ``n`` (``paired=False``: x_o = x_c)."""
        def zero():
            return torch.zeros(n, n, dtype=torch.float64, device=device)
        return cls(zero(), zero(), zero()) if paired else cls(zero())

    def update(self, x_c: torch.Tensor, x_o: torch.Tensor | None = None) -> None:
        """Adds one batch of inputs (``x_o``: the same tokens in the original model, needed
        when paired). Mutates self."""
        c = x_c.reshape(-1, x_c.shape[-1]).to(self.cc.device, torch.float32)
        self.cc.add_(c.T @ c)
        if self.oo is not None:
            o = x_o.reshape(-1, x_o.shape[-1]).to(self.cc.device, torch.float32)
            self.oo.add_(o.T @ o)
            self.oc.add_(o.T @ c)
        self.count += c.shape[0]

    def target_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (Σ x_o x_oᵀ, Σ x_o x_cᵀ), which are Σ x_c x_cᵀ when unpaired."""
        return (self.cc, self.cc) if self.oo is None else (self.oo, self.oc)


def refit_factor(weight: torch.Tensor, w_u: torch.Tensor, w_v: torch.Tensor,
                 moments: PairedMoments, damping: float = 1e-6
                 ) -> tuple[torch.Tensor, float, float, float]:
    """Solves min_U Σ‖W x_o − U W_v x_c‖² in float64 (ridge λ·mean diag), W_v fixed.

    With A = W_v Σcc W_vᵀ and B = W Σoc W_vᵀ the solution is U = B (A + λI)⁻¹. The
    error of a U is tr(W Σoo Wᵀ) − 2⟨U, B⟩ + ⟨U A, U⟩; the refit is kept only when it
    is not larger than the error of the current W_u, so it never increases the error.

    Returns:
        (the new W_u, or the given one when the refit would not lower the error, the mean
        error per token before, after, the mean of ‖W x_o‖² per token). Pure.
    """
    device = moments.cc.device
    w, u, v = (t.detach().to(device, torch.float64) for t in (weight, w_u, w_v))
    n = max(1, moments.count)
    oo, oc = moments.target_moments()
    a = v @ (moments.cc / n) @ v.T
    b = w @ (oc / n) @ v.T
    base = float(torch.einsum("ij,jk,ik->", w, oo / n, w))

    def error(candidate: torch.Tensor) -> float:
        return base - 2 * float((candidate * b).sum()) + float(((candidate @ a) * candidate).sum())

    lam = damping * float(a.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=device)
    chol, info = torch.linalg.cholesky_ex(a + lam * eye)
    if info.item() != 0:
        solution = torch.linalg.lstsq(a + lam * eye, b.T).solution.T
    else:
        solution = torch.cholesky_solve(b.T, chol).T
    before, after = error(u), error(solution)
    if not torch.isfinite(solution).all() or after > before:
        return w_u, before, before, base
    return solution, before, after, base


def refit_blocks(run: BlockRun, config: RefitConfig, calibration: Calibration,
                 batch_size: int) -> list[dict]:
    """Refits W_u of every factorized layer in the decoder blocks, block by block in forward
    order, over the executor of ``run`` (the compression's block run).

    A layer's input is the compressed stream x_c *after* the layers before it (earlier
    blocks, and earlier layers of its own block such as q/k/v before o_proj) were refitted.
    Its target is the original layer applied to that input (``target="compressed"``) or,
    with ``target="original"``, the original layer's output on the original model's
    stream (the block is also run with the original layers, rebuilt from the work
    folder). Layers that read the same input (q/k/v, gate/up) are refitted together from
    one pass. Both streams and each block's recorded original inputs are work files, so
    memory holds one block and one batch.

    Side effects: the refitted blocks replace the compressed ones (in the model, and in the
    work folder's shards); every block is committed (a rerun resumes).

    Returns:
        One {module, error_before, error_after, relative_after} entry per refitted layer.
    """
    sm, work = run.sm, run.work
    refit = BlockRun(sm, work, None, run.targets, distributed.my_batches(calibration,
                                                                        batch_size))
    refit.compressed = True
    log = list(work.progress.get("refit_log", []))
    _finish_refit_moves(work)
    first = not work.done("refit")
    refit.kwargs(write_inputs=first)
    if first and config.target == "original":  # both streams start at the same inputs
        for b in range(len(refit.batches)):
            save_tensors(work.file("acts-original", 0, b), {"h": refit.acts(0, b)})
    ranks = {r["name"]: r["rank"] for r in work.progress["results"]}
    for index in tqdm(range(work.done("refit"), len(sm.blocks)), desc="refit blocks",
                      unit="block"):
        block = refit.block(index)
        names = [n for n in run.by_block.get(index, [])
                 if isinstance(sm.model.get_submodule(n), LowRankLinear)]
        if config.target == "original":
            _original_stream(refit, block, index, names)
        for group in _shared_input_groups(block, names, sm.model, (refit.acts(index, 0),
                                          refit.kwargs()[0]), refit.sources[index]):
            moments = _paired_moments(refit, block, index, group, config.target == "original")
            for name in group:
                original = load_tensors(work.file("originals", name))["w"]
                log.append(_refit_layer(sm.model, name, original, moments[name], config))
        refit.forward(block, index)
        save_block(work, "refitted", sm, index, ranks)
        work.commit(refit=index + 1, refit_log=log)
        _finish_refit_moves(work)
        for kind in ("acts", "acts-original", "seen"):
            work.drop(kind, index)
        sm.release(block)
    for kind in ("acts", "acts-original"):
        work.drop(kind)
    return log


def _finish_refit_moves(work) -> None:
    """Moves the committed refitted blocks over the compressed ones (a run killed between a
    commit and its move finishes it) and drops an uncommitted one."""
    work.move_files("refitted", "blocks",
                    lambda shard: int(shard.stem.split("-")[1]) < work.done("refit"))


def _original_layers(work, block_names: list[str], model: nn.Module) -> dict[str, nn.Linear]:
    """The original dense layers of ``block_names`` (weights from the work folder, biases
    as the factorized layers kept them)."""
    layers = {}
    for name in block_names:
        low_rank = model.get_submodule(name)
        weight = load_tensors(work.file("originals", name), low_rank.weight_u.device)["w"]
        layer = nn.Linear(low_rank.in_features, low_rank.out_features,
                          bias=low_rank.bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if low_rank.bias is not None:
            layer.bias = nn.Parameter(low_rank.bias.detach().clone(), requires_grad=False)
        layers[name] = layer
    return layers


def _original_stream(run: BlockRun, block: nn.Module, index: int, names: list[str]) -> None:
    """Runs ``block`` with its original layers on the original stream: writes each named
    layer's input per batch (seen/<block>/<batch>; an input several layers share, under
    the first of them) and the block's outputs as the next block's original inputs."""
    model, work = run.sm.model, run.work
    compressed = {name: model.get_submodule(name) for name in names}
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            seen[name] = args[0]  # the tensor itself: shared inputs are told by identity
        return record

    _swap(model, _original_layers(work, names, model))
    handles = _hooked(model, names, hook)
    try:
        with torch.no_grad():
            for b in range(len(run.batches)):
                hidden = load_tensors(work.file("acts-original", index, b), run.sm.device)["h"]
                out = run.run(block, index, b, hidden)
                save_tensors(work.file("acts-original", index + 1, b), {"h": out})
                distinct: dict[str, torch.Tensor] = {}  # a shared input (q/k/v) once
                for name, tensor in seen.items():
                    if not any(tensor is kept for kept in distinct.values()):
                        distinct[name] = tensor
                save_tensors(work.file("seen", index, b), distinct)
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
        _swap(model, compressed)


def _hooked(model: nn.Module, names: list[str], make_hook):
    """Registers ``make_hook(name)`` as a forward hook on each named module; returns the
    handles."""
    return [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in names]


def _shared_input_groups(block, names: list[str], model, batch, source) -> list[list[str]]:
    """Runs ``block`` on one batch and groups ``names`` in call order by shared input
    tensor (q/k/v together, gate/up together). The tensors are kept until grouped: an id
    alone could be reused by a later input once the earlier tensor is freed."""
    order: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def record(module, args, output):
            order.append((name, args[0]))
        return record

    handles = _hooked(model, names, hook)
    try:
        with torch.no_grad():
            run_block(block, [batch], source)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for position, (name, tensor) in enumerate(order):
        if position and tensor is order[position - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _paired_moments(run: BlockRun, block, index: int, names: list[str], paired: bool
                    ) -> dict[str, PairedMoments]:
    """Runs ``block`` on the compressed stream and accumulates the inputs of the layers
    ``names``, paired (``paired``) with their original inputs recorded for the same batch.
    Returns {layer: PairedMoments}."""
    model = run.sm.model
    layers = {name: model.get_submodule(name) for name in names}
    moments = {name: PairedMoments.zeros(layer.in_features, layer.weight_u.device,
                                         paired=paired)
               for name, layer in layers.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):  # the group's first layer holds a shared input
            moments[name].update(args[0].detach(), current.get(name, current.get(names[0])))
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for b in range(len(run.batches)):
                if paired:
                    current = load_tensors(run.work.file("seen", index, b), run.sm.device)
                run.run(block, index, b)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        model.set_submodule(name, module)


def _refit_layer(model, name, weight: torch.Tensor, moments: PairedMoments,
                 config: RefitConfig) -> dict:
    """Refits one layer's W_u (``weight``: the original layer's) and swaps the rebuilt
    layer in; returns its log entry."""
    layer: LowRankLinear = model.get_submodule(name)
    w_u, w_v = layer.factors()
    new_u, before, after, scale = refit_factor(weight, w_u, w_v, moments, config.damping)
    if new_u is not w_u:
        rebuilt = LowRankLinear.from_factors(new_u, w_v, layer.bias, dtype=w_u.dtype,
                                             plan=layer.plan)
        model.set_submodule(name, rebuilt.to(w_u.device))
    relative = after / max(scale, 1e-300)
    logger.info("refit %s: error %.4g -> %.4g (relative %.4f)", name, before, after, relative)
    return {"module": name, "error_before": before, "error_after": after,
            "relative_after": relative}


# ---------------------------------------------------------------- sequential LoRA


def lora_update(model: nn.Module, calibration: torch.Tensor,
                config: LoRAUpdateConfig) -> list[dict]:
    """Sequential LoRA on the factors of every ``LowRankLinear`` (peft). Mutates ``model``.

    Each factorized layer is temporarily an ``nn.Sequential(W_v, W_u)`` of two linears;
    stage ``u`` trains LoRA adapters on every W_u (everything else frozen) and merges them,
    stage ``v`` does the same for every W_v. Batches are drawn from ``calibration`` with a
    seeded generator; the mean next-token loss of every step is logged. Parameter
    ``requires_grad`` flags and the global RNG state are restored afterwards.

    Returns:
        One {stage, step, loss} entry per optimizer step.
    """
    factored = {name: module for name, module in model.named_modules()
                if isinstance(module, LowRankLinear)}
    if not factored:
        raise ConfigError("the lora update needs a compressed model (no low-rank layers)")
    flags = {p: p.requires_grad for p in model.parameters()}
    for name, module in factored.items():
        model.set_submodule(name, _as_pair(module))
    log: list[dict] = []
    try:
        for number, (stage, index) in enumerate((("u", 1), ("v", 0))):
            targets = [f"{name}.{index}" for name in factored]
            log += _train_stage(model, targets, calibration, config, stage, number)
    finally:
        for name, module in factored.items():
            pair = model.get_submodule(name)
            if isinstance(pair, nn.Sequential):
                model.set_submodule(name, LowRankLinear.from_factors(
                    pair[1].weight.detach(), pair[0].weight.detach(), module.bias,
                    dtype=module.weight_u.dtype, plan=module.plan).to(module.weight_u.device))
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return log


def _as_pair(layer: LowRankLinear) -> nn.Sequential:
    """W_u W_v as two plain linears (dequantized, float32 for training)."""
    w_u, w_v = layer.factors()
    # built on the meta device, then filled: no random initialization, no RNG consumed
    down = nn.Linear(layer.in_features, layer.rank, bias=False, device="meta")
    up = nn.Linear(layer.rank, layer.out_features, bias=layer.bias is not None, device="meta")
    down, up = down.to_empty(device=w_v.device), up.to_empty(device=w_u.device)
    with torch.no_grad():
        down.weight.copy_(w_v.float())
        up.weight.copy_(w_u.float())
        if layer.bias is not None:
            up.bias.copy_(layer.bias.float())
    return nn.Sequential(down, up)


def _train_stage(model, targets, ids, config: LoRAUpdateConfig, stage: str,
                 number: int) -> list[dict]:
    """Injects LoRA adapters on ``targets``, trains them, merges them into the weights."""
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                      target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + number)
        wrapped = get_peft_model(model, lora)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    draws = torch.Generator().manual_seed(config.seed * 1000 + number)
    log = []
    for step in tqdm(range(config.steps), desc=f"lora {stage}", unit="step"):
        batch = ids[torch.randint(ids.shape[0], (config.batch_size,), generator=draws)]
        batch = batch.to(device)
        loss = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise ConfigError(f"lora stage {stage}: loss became non-finite at step {step}; "
                              "lower --lora-lr")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        log.append({"stage": stage, "step": step, "loss": value})
        logger.info("lora %s step %d/%d: loss %.4f", stage, step + 1, config.steps, value)
    with torch.no_grad():
        merged = wrapped.merge_and_unload()
    if merged is not model:
        raise RuntimeError("peft returned a different model object after merging")
    return log

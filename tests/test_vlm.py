"""Vision-language models: the language tower is found without per-architecture code,
compressed alone, and the checkpoint reloads through AutoModelForImageTextToText."""

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

import rankcut
from rankcut import architecture, methods
from rankcut.compression import pipeline
from rankcut.errors import UnsupportedModelError
from rankcut.io import checkpoint

from .conftest import VOCAB, tiny_config

IMAGE_TOKEN = VOCAB - 1
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              image_size=32, patch_size=8)


def tiny_vlm(layout: str):
    """A seeded tiny VLM whose vision tower has more blocks (3) than its language tower
    (2), so that picking the longest block list would pick the wrong tower."""
    torch.manual_seed(0)
    text = tiny_config("llama")
    if layout == "llava":
        config = LlavaConfig(vision_config=SiglipVisionConfig(**VISION), text_config=text,
                             image_token_index=IMAGE_TOKEN,
                             vision_feature_select_strategy="full")
        return LlavaForConditionalGeneration(config).eval()
    config = SmolVLMConfig(vision_config=VISION, text_config=text.to_dict(),
                           image_token_id=IMAGE_TOKEN, scale_factor=2)
    return SmolVLMForConditionalGeneration(config).eval()


def image_batch(model, layout: str):
    """input_ids with the image tokens the vision side fills, and pixel values."""
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, 32, 32, generator=generator)
    tokens = 16 if layout == "llava" else 4  # (32/8)² patches; SmolVLM shuffles 2×2 into 1
    ids = torch.randint(0, VOCAB - 1, (1, 24), generator=generator)
    ids[0, 2:2 + tokens] = IMAGE_TOKEN
    if layout == "smolvlm":
        pixels = pixels[:, None]  # [batch, images, 3, H, W]
    return {"input_ids": ids, "pixel_values": pixels}


@pytest.mark.parametrize("layout,tower", [("llava", "model.language_model"),
                                          ("smolvlm", "model.text_model")])
def test_language_tower_is_found_and_targeted_alone(layout, tower):
    model = tiny_vlm(layout)
    assert architecture.language_tower(model)[0] == tower
    prefix, blocks = architecture.find_decoder_blocks(model)
    assert prefix == f"{tower}.layers" and len(blocks) == 2
    targets = architecture.select_targets(model)
    assert len(targets) == 14 and all(n.startswith(prefix + ".") for n in targets)


def _tiny_qwen2_vl_or_gemma3(layout: str) -> nn.Module:
    """A tiny Qwen2-VL or Gemma 3 VLM (vision tower of 3 blocks, language tower of 2)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    if layout == "qwen2-vl":
        vision = dict(depth=3, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text,
                                                             vision_config=vision))
    config = Gemma3Config(text_config=dict(text, head_dim=8),
                          vision_config=SiglipVisionConfig(**VISION).to_dict(),
                          mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config)


@pytest.mark.parametrize("layout", ["qwen2-vl", "gemma3"])
def test_language_tower_of_qwen2_vl_and_gemma3_layouts(layout):
    model = _tiny_qwen2_vl_or_gemma3(layout)
    assert architecture.is_vision_language(model)
    assert architecture.language_tower(model)[0] == "model.language_model"
    prefix, blocks = architecture.find_decoder_blocks(model)
    assert prefix == "model.language_model.layers" and len(blocks) == 2
    targets = architecture.select_targets(model)
    assert len(targets) == 14 and all(n.startswith(prefix + ".") for n in targets)


class _Unknown(nn.Module):
    """A made-up VLM: a vision config, the language model under an unknown name."""

    def __init__(self):
        super().__init__()
        self.config = LlavaConfig(vision_config=SiglipVisionConfig(**VISION),
                                  text_config=tiny_config("llama"))
        self.llm = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])


def test_unknown_vlm_layout_names_what_was_searched():
    with pytest.raises(UnsupportedModelError, match="language_model, text_model"):
        architecture.find_decoder_blocks(_Unknown())


@pytest.mark.parametrize("layout", ["llava", "smolvlm"])
@pytest.mark.parametrize("method", ["svd-llm", "io-svd"])
def test_compress_changes_only_the_language_tower_and_reloads(tmp_path, calib_ids, layout,
                                                              method):
    model = tiny_vlm(layout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = pipeline.compress(model, methods.make_config(method, ratio=0.3), calib_ids,
                               batch_size=4)
    prefix, _ = architecture.find_decoder_blocks(model)
    assert set(report.rank_map) == set(architecture.select_targets(tiny_vlm(layout)))
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith(prefix + "."):
            assert torch.equal(after[key], value), key  # vision side, projector, head
    batch = image_batch(model, layout)
    with torch.no_grad():
        logits = model(**batch).logits
    checkpoint.save_pretrained(model, tmp_path / "vlm")
    assert rankcut.__name__  # imported: the quantizer is registered
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)
    assert torch.equal(checkpoint.from_pretrained(tmp_path / "vlm")(**batch).logits, logits)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["llava", "smolvlm"])
def test_cli_compress_of_the_test_vlm_equals_plain_smollm2_and_exports(tmp_path, layout):
    """Text-only calibration: the tower's factors and text perplexity are those of the
    plain SmolLM2 compressed the same way; the checkpoint loads with its processor and
    exports to a dense VLM."""
    from transformers import AutoProcessor

    from rankcut.cli import main
    from rankcut.offline import vlm_assets

    folder = vlm_assets.ensure_test_vlm(layout)
    tower = architecture.language_tower(AutoModelForImageTextToText.from_pretrained(folder))[0]
    common = ["--method", "svd-llm", "--ratio", "0.3", "--num-samples", "4", "--seqlen", "64",
              "--eval-seqlen", "128", "--max-windows", "2", "--device", "cpu"]
    runs = {"vlm": (str(folder), f"{tower}.layers.0.*"),
            "plain": ("smollm2", "model.layers.0.*")}
    figures = {}
    for key, (model, include) in runs.items():
        out = tmp_path / key
        assert main(["compress", "--model", model, "--include", include, *common,
                     "--output", str(out), "--json", str(tmp_path / f"{key}.json")]) == 0
        figures[key] = __import__("json").loads((tmp_path / f"{key}.json").read_text())
    assert figures["vlm"]["perplexity"] == pytest.approx(figures["plain"]["perplexity"], rel=0.02)
    vlm = checkpoint.from_pretrained(tmp_path / "vlm")
    plain = checkpoint.from_pretrained(tmp_path / "plain")
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        mine = vlm.get_submodule(f"{tower}.layers.0.{name}").factors()
        theirs = plain.get_submodule(f"model.layers.0.{name}").factors()
        for a, b in zip(mine, theirs, strict=True):
            # Two model classes feed layer 0: its statistics agree to float32 rounding, not bit
            # for bit (masks and positions are built by different code); 1e-5 of the factor's
            # scale is ~100 float32 ulps, far below what a wrong statistic would move.
            scale = float(b.detach().abs().max())
            torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0)
    assert AutoProcessor.from_pretrained(tmp_path / "vlm") is not None
    assert main(["export", str(tmp_path / "vlm"), "--dense", "--output", str(tmp_path / "d")]) == 0
    dense = AutoModelForImageTextToText.from_pretrained(tmp_path / "d")
    assert not hasattr(dense.config, "quantization_config")
    assert not any(isinstance(m, rankcut.LowRankLinear) for m in dense.modules())

"""Offline test VLMs: the real SmolLM2-135M-Instruct as the language tower of two VLM layouts.

No trained small VLM ships in any registry package, so the test models are assembled from real
parts (DESIGN.md section 5): SmolLM2's exact fp32 weights (:func:`offline.assets.ensure_smollm2`)
become the language tower of

- ``"llava"``: a ``LlavaForConditionalGeneration`` with a small SigLIP vision tower (64 px images,
  16 px patches, 16 image tokens per image); language tower ``model.language_model``;
  processor ``LlavaProcessor``;
- ``"smolvlm"``: a ``SmolVLMForConditionalGeneration`` (SmolVLM-256M's layout: vision model,
  pixel-shuffle connector, Llama text model) with 64 px tiles, 8 px patches, scale factor 2
  (16 image tokens per tile; an image is split into up to 2x2 tiles plus a global one);
  language tower ``model.text_model``; processor ``Idefics3Processor`` (the processor SmolVLM
  first shipped with; transformers' ``SmolVLMProcessor`` needs torchvision for its video part).

The vision side is **untrained**: every vision and projector tensor is drawn from a
``torch.Generator`` seeded with :data:`VISION_SEED` (same bytes on every run of one machine and
torch version): 1-D weights (LayerNorm scales) are ones, biases zeros, every other tensor
N(0, 1/fan_in), except the last projection into the text space, scaled so image tokens have the
RMS of SmolLM2's token embeddings. The added tokens (``<image>``, and for SmolVLM its tile
tokens) get rows appended after SmolLM2's 49,152: the mean SmolLM2 row plus small seeded noise,
so they stay improbable as outputs. SmolLM2's rows are untouched and the head stays tied, so
text-only logits on the original vocabulary are SmolLM2's up to float32 rounding (different
model classes run them; the build checks them within :data:`TEXT_LOGITS_RTOL`). The build's
reductions run in float64, so its bytes do not depend on the thread count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import AssetError
from .assets import COMPLETE_MARKER, build_folder, cache_dir, ensure_smollm2

logger = logging.getLogger(__name__)

VISION_SEED = 20240917
SMOLLM2_VOCAB = 49152
IMAGE_SIZE = 64
#: Image tokens per image (LLaVA: (64/16)^2 patches) or per tile (SmolVLM: (64/8)^2 / 2^2).
IMAGE_TOKENS = 16
#: Vision tower size shared by both layouts (SigLIP and SmolVLM's vision model).
VISION = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": IMAGE_SIZE}
NEW_ROW_NOISE = 0.1
CHECK_PROMPT = "The capital of France is Paris. The capital of Italy is"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
#: SmolLM2's ChatML template, extended to content lists with ``{"type": "image"}`` items.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLVLM_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                  *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))


@dataclass(frozen=True)
class VlmLayout:
    """Where a layout keeps its parts and which tokens its processor needs."""

    folder: str  #: cache folder name
    model_class: str  #: transformers class name
    text_prefix: str  #: state-dict prefix of the language tower (``lm_head`` sits beside it)
    projection: str  #: last projection into the text embedding space
    added_tokens: tuple[str, ...]


LAYOUTS = {
    "llava": VlmLayout("smollm2-llava", "LlavaForConditionalGeneration", "model.language_model.",
                       "model.multi_modal_projector.linear_2.weight", ("<image>",)),
    "smolvlm": VlmLayout("smollm2-smolvlm", "SmolVLMForConditionalGeneration", "model.text_model.",
                         "model.connector.modality_projection.proj.weight", SMOLVLM_TOKENS),
}


def _layout(name: str) -> VlmLayout:
    """Return the :class:`VlmLayout` called ``name`` or raise :class:`AssetError`."""
    if name not in LAYOUTS:
        raise AssetError(f"unknown test VLM layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _config_and_processor(name: str, text_config: dict, tokenizer):
    """Return the VLM config and its processor (image processor + ``tokenizer``) for a layout."""
    import transformers as tf
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if name == "llava":
        vision = tf.SiglipVisionConfig(**VISION, patch_size=16, vision_use_head=False)
        config = tf.LlavaConfig(vision_config=vision, text_config=text_config,
                                image_token_index=image_id, image_seq_length=IMAGE_TOKENS,
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                tie_word_embeddings=True)
        images = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=16,
                                      vision_feature_select_strategy="full",
                                      chat_template=CHAT_TEMPLATE)
        return config, processor
    vision = tf.SmolVLMVisionConfig(**VISION, patch_size=8)
    config = tf.SmolVLMConfig(vision_config=vision, text_config=text_config,
                              image_token_id=image_id, scale_factor=2, tie_word_embeddings=True,
                              pad_token_id=text_config["pad_token_id"])
    images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE_SIZE},
                                       max_image_size={"longest_edge": IMAGE_SIZE},
                                       do_image_splitting=True)
    processor = tf.Idefics3Processor(image_processor=images, tokenizer=tokenizer,
                                     image_seq_len=IMAGE_TOKENS, chat_template=CHAT_TEMPLATE)
    return config, processor


def _state_dict(model, layout: VlmLayout, text_weights: dict, generator) -> dict:
    """Return every tensor of the (meta-device) ``model``: SmolLM2's where they exist, else seeded.

    Tensors are drawn in ``model.state_dict()`` order from ``generator`` (see the module
    docstring for the rule).
    """
    import torch

    emb = text_weights["model.embed_tokens.weight"]
    # Reductions in float64: a float32 sum's rounding depends on how the CPU splits it over
    # threads, a float64 sum rounded back to float32 does not (its error is ~1e-16 relative),
    # so the written bytes are the same whatever the thread count.
    rms = emb.double().pow(2).mean().sqrt().item()
    mean_row = emb.double().mean(0).to(emb.dtype)
    out = {}
    for key, meta in model.state_dict().items():
        if key == "lm_head.weight":  # tied to the input embeddings
            out[key] = out[layout.text_prefix + "embed_tokens.weight"]
        elif key.startswith(layout.text_prefix):
            weight = text_weights["model." + key.removeprefix(layout.text_prefix)]
            if key.endswith("embed_tokens.weight"):
                noise = torch.randn(meta.shape[0] - emb.shape[0], emb.shape[1],
                                    generator=generator)
                weight = torch.cat([emb, mean_row + NEW_ROW_NOISE * rms * noise])
            out[key] = weight
        elif key.endswith("bias"):
            out[key] = torch.zeros(meta.shape)
        elif meta.dim() == 1:
            out[key] = torch.ones(meta.shape)
        else:
            scale = (rms if key == layout.projection else 1.0) / meta[0].numel() ** 0.5
            out[key] = torch.randn(meta.shape, generator=generator) * scale
    return out


def build_test_vlm(name: str, out: Path, smollm2: Path | None = None) -> Path:
    """Write the ``name`` test VLM (``"llava"`` or ``"smolvlm"``) as a Hugging Face folder.

    The folder holds ``config.json``, ``generation_config.json``, fp32 ``model.safetensors``,
    the tokenizer, ``processor_config.json`` and ``chat_template.jinja``; it loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor``. Two builds on one machine write
    identical bytes.

    Args:
        name: Layout name, a key of :data:`LAYOUTS`.
        out: Folder to write (created; files in it are overwritten). Not atomic: see
            :func:`ensure_test_vlm`.
        smollm2: SmolLM2 folder; defaults to :func:`offline.assets.ensure_smollm2` (which may
            download and convert it).

    Raises:
        AssetError: Unknown layout.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layout = _layout(name)
    smollm2 = smollm2 or ensure_smollm2()
    text = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.add_tokens(list(layout.added_tokens), special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    text_config = text.config.to_dict()
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        text_config.pop(key, None)  # machine-specific paths and names
    text_config["vocab_size"] = len(tokenizer)
    config, processor = _config_and_processor(name, text_config, tokenizer)
    with torch.device("meta"):  # shapes and names only: no init, no global RNG use
        model = getattr(transformers, layout.model_class)(config)
    generator = torch.Generator().manual_seed(VISION_SEED)
    model.load_state_dict(_state_dict(model, layout, text.state_dict(), generator),
                          strict=True, assign=True)
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)
    return out


#: How far the VLM's text-only logits may stray from SmolLM2's, relative to the largest
#: |logit|. The two are different model classes: the same weights, but the VLM builds its
#: embeddings, masks and positions through its own code, and the CPU's GEMM splits its sums
#: by thread count, so float32 rounding (eps 1.2e-7) differs by a few ulps per op across 30
#: blocks. Reported (issue 22): 3.05e-5 absolute on logits up to ~27 (about 1.1e-6 relative)
#: with 2 threads on an AVX-512 Xeon, 0 with 1 thread; 0 either way on AMD EPYC. 1e-4 relative
#: leaves ~90x headroom while any real mistake (a wrong or shifted weight row) moves logits by
#: O(1).
TEXT_LOGITS_RTOL = 1e-4


def text_logits_mismatch(want, got) -> float:
    """Return max |want - got| relative to max |want| (both float tensors of one shape)."""
    return (want - got).abs().max().item() / max(want.abs().max().item(), 1e-30)


def verify_test_vlm(folder: Path, smollm2: Path) -> None:
    """Check that ``folder`` loads completely and matches SmolLM2 on text.

    Raises:
        AssetError: Missing or unexpected weights on loading, or text-only logits on the first
            49,152 vocabulary columns further than :data:`TEXT_LOGITS_RTOL` (relative to the
            largest logit) from SmolLM2's.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    vlm, info = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32,
                                                            output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems:
        raise AssetError(f"test VLM {folder} does not load cleanly: {problems}")
    text = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(smollm2)(CHECK_PROMPT, return_tensors="pt")
    with torch.no_grad():
        want, got = text(**ids).logits, vlm(**ids).logits[..., :SMOLLM2_VOCAB]
    mismatch = text_logits_mismatch(want, got)
    if not mismatch <= TEXT_LOGITS_RTOL:
        raise AssetError(f"test VLM {folder}: text-only logits differ from SmolLM2's by "
                         f"{mismatch:.3g} of the largest logit (allowed {TEXT_LOGITS_RTOL:g})")


#: Bumped whenever the build's bytes change, so cached folders of an older recipe are rebuilt.
BUILD_RECIPE = 2


def build_marker(name: str) -> str:
    """Return the ``.complete`` marker text of the current build recipe of layout ``name``."""
    return f"{name} seed={VISION_SEED} recipe={BUILD_RECIPE}"


def _marker_text(folder: Path) -> str | None:
    try:
        return (folder / COMPLETE_MARKER).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def ensure_test_vlm(name: str) -> Path:
    """Return ``<cache>/smollm2-llava`` or ``<cache>/smollm2-smolvlm``, building it once.

    Side effects: may build SmolLM2 first; builds in a temporary folder beside the target,
    verifies it (:func:`verify_test_vlm`), writes a ``.complete`` marker and renames it into
    place, so an interrupted or failed build never looks complete. About 540 MB each.

    Raises:
        AssetError: Unknown layout, or the built model fails its check.
    """
    target = cache_dir() / _layout(name).folder
    marker = build_marker(name)
    if _marker_text(target) == marker:
        logger.info("using cached test VLM %s", target)
        return target
    if (target / COMPLETE_MARKER).is_file():
        logger.info("cached test VLM %s is from another build recipe; rebuilding it", target)
    smollm2 = ensure_smollm2()

    def build(tmp: Path) -> None:
        logger.info("building the %s test VLM in %s", name, tmp)
        build_test_vlm(name, tmp, smollm2)
        verify_test_vlm(tmp, smollm2)

    build_folder(target, marker, build)
    logger.info("test VLM ready at %s", target)
    return target

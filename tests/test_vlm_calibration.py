"""Image-text calibration of a vision-language model: batches go through the whole model,
the language tower's statistics and gradients see the image tokens, the loss counts only
labelled tokens, and the caption perplexity scores a record's text given its image."""

import pytest
import torch
import torch.nn.functional as F

from rankcut import architecture, methods
from rankcut.calibration.data import IGNORE, Calibration, as_calibration
from rankcut.cli import main
from rankcut.compression import pipeline, update
from rankcut.errors import CalibrationError, ConfigError
from rankcut.io import checkpoint

from .conftest import VOCAB, word_text
from .test_vlm import IMAGE_TOKEN, image_batch, tiny_vlm
from .whole_model import calibration_loss

SEQLEN = 32


def image_calibration(layout: str, texts: int = 4, images: int = 4, seed: int = 5
                      ) -> Calibration:
    """``texts`` random token windows, then ``images`` samples of an image (its tokens at
    2.., unlabelled with the two tokens before them) followed by labelled text."""
    generator = torch.Generator().manual_seed(seed)
    tokens = 16 if layout == "llava" else 4
    text = torch.randint(0, VOCAB - 1, (texts, SEQLEN), generator=generator)
    ids = torch.randint(0, VOCAB - 1, (images, SEQLEN), generator=generator)
    ids[:, 2:2 + tokens] = IMAGE_TOKEN
    labels = ids.clone()
    labels[:, :2 + tokens] = IGNORE
    shape = (1, 3, 32, 32) if layout == "llava" else (1, 1, 3, 32, 32)
    pixels = tuple({"pixel_values": torch.randn(shape, generator=generator)}
                   for _ in range(images))
    return Calibration.concat([text, Calibration(ids, labels, pixels)])


def test_batches_never_mix_text_and_image_samples():
    calib = image_calibration("llava", texts=5, images=4)
    batches = calib.split(3)
    assert [len(b) for b in batches] == [3, 2, 3, 1]
    assert [b.has_images for b in batches] == [False, False, True, True]
    assert set(batches[0].model_inputs("cpu")) == {"input_ids"}
    inputs = batches[2].model_inputs("cpu", torch.bfloat16)
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert inputs["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(inputs["input_ids"], calib.input_ids[5:8])
    other = Calibration.concat([calib[5:7], image_calibration("smolvlm", texts=0, images=2)])
    assert [len(b) for b in other.split(8)] == [2, 2]  # image tensors of another shape
    plain = as_calibration(calib.input_ids[:5])
    assert torch.equal(plain.labels, plain.input_ids) and plain.predicted == 5 * (SEQLEN - 1)
    assert calib.predicted == 5 * (SEQLEN - 1) + 4 * (SEQLEN - 1 - 17)


def test_loss_counts_only_labelled_tokens():
    model = tiny_vlm("llava")
    calib = image_calibration("llava", texts=0, images=3)
    with torch.no_grad():
        logits = model(**calib.model_inputs("cpu")).logits[:, :-1]
    mask = calib.targets != IGNORE
    expected = F.cross_entropy(logits[mask], calib.targets[mask])
    assert calibration_loss(model, calib, batch_size=2) == pytest.approx(float(expected),
                                                                         rel=1e-5)


def _weight(model, name):
    return model.get_submodule(name).to_dense().weight


@pytest.mark.parametrize("layout", ["llava", "smolvlm"])
@pytest.mark.parametrize("method", ["svd-llm", "zero-sum", "io-svd"])
def test_images_reach_the_tower_statistics_and_only_the_tower_changes(tmp_path, layout,
                                                                      method):
    config = methods.make_config(method, ratio=0.3)
    calib = image_calibration(layout)
    runs = {}
    for key, pixels_seed in (("images", 5), ("other images", 6)):
        model = tiny_vlm(layout)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        changed = image_calibration(layout, seed=pixels_seed)
        calib_run = Calibration(calib.input_ids, calib.labels, changed.images)
        report = pipeline.compress(model, config, calib_run, batch_size=3)
        runs[key] = (model, report)
    model, report = runs["images"]
    prefix, _ = architecture.find_decoder_blocks(model)
    assert all(name.startswith(prefix + ".") for name in report.rank_map)
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith(prefix + "."):
            assert torch.equal(after[key], value), key
    name = f"{prefix}.0.mlp.down_proj"
    factored = [n for n, r in report.rank_map.items() if r is not None]
    name = name if name in factored else factored[0]
    # the same ids with other pixels give other statistics: the images reach the tower
    assert not torch.allclose(_weight(model, name), _weight(runs["other images"][0], name))
    batch = image_batch(model, layout)
    with torch.no_grad():
        logits = model(**batch).logits
    checkpoint.save_pretrained(model, tmp_path / "vlm")
    with torch.no_grad():
        assert torch.equal(checkpoint.from_pretrained(tmp_path / "vlm")(**batch).logits, logits)


@pytest.mark.parametrize("method", ["asvd", "fwsvd", "svd-llm", "svd-llm-v2", "zero-sum",
                                    "io-svd"])
def test_include_adds_the_projector_with_image_statistics(tmp_path, method):
    """--include can add modules outside the decoder blocks (LLaVA's projector): their
    input statistics come from whole-model passes, so the pixels change their factors."""
    tower = "model.language_model.layers"
    include = [f"{tower}.*", "model.multi_modal_projector.*"]
    config = methods.make_config(method, ratio=0.3)
    calib, models_by_seed = image_calibration("llava"), {}
    for seed in (5, 6):
        model = tiny_vlm("llava")
        pixels = image_calibration("llava", seed=seed).images
        report = pipeline.compress(model, config, Calibration(calib.input_ids, calib.labels,
                                                              pixels),
                                   include=include, batch_size=3)
        models_by_seed[seed] = model, report.rank_map
        projector = [n for n in report.rank_map if n.startswith("model.multi_modal_projector")]
        assert projector == ["model.multi_modal_projector.linear_1",
                             "model.multi_modal_projector.linear_2"]
    (model, ranks), (other, other_ranks) = models_by_seed[5], models_by_seed[6]
    cut = [n for n in projector if ranks[n] is not None and other_ranks[n] is not None]
    assert cut, "neither run factorized a projector layer"
    for name in cut:
        assert not torch.allclose(_weight(model, name), _weight(other, name))
    batch = image_batch(model, "llava")
    with torch.no_grad():
        logits = model(**batch).logits
    checkpoint.save_pretrained(model, tmp_path / "vlm")
    with torch.no_grad():
        assert torch.equal(checkpoint.from_pretrained(tmp_path / "vlm")(**batch).logits, logits)


@pytest.mark.parametrize("method", ["zero-sum", "io-svd"])
def test_gradient_methods_on_vision_tower_layers(method):
    """Text-only batches do not run the vision tower: no loss gradient and no kept output
    reaches its layers there, and those batches are skipped for them."""
    include = ["model.vision_tower.encoder.layers.[01].*"]
    model = tiny_vlm("llava")
    report = pipeline.compress(model, methods.make_config(method, ratio=0.3),
                               image_calibration("llava"), include=include, batch_size=3)
    assert len(report.rank_map) == 12 and any(r is not None for r in report.rank_map.values())
    assert all(n.startswith("model.vision_tower.encoder.layers.") for n in report.rank_map)
    with torch.no_grad():
        assert torch.isfinite(model(**image_batch(model, "llava")).logits).all()


def test_a_vision_module_without_image_samples_is_a_clear_error():
    text_only = image_calibration("llava", texts=4, images=0)
    with pytest.raises(CalibrationError, match="no calibration sample reaches "
                                               "model.multi_modal_projector.linear_1"):
        pipeline.compress(tiny_vlm("llava"), methods.make_config("svd-llm", ratio=0.3),
                          text_only, include=["model.multi_modal_projector.*"])
    with pytest.raises(CalibrationError, match="vision_tower.head.* --exclude"):
        pipeline.compress(tiny_vlm("llava"), methods.make_config("svd-llm", ratio=0.3),
                          image_calibration("llava"), include=["model.vision_tower.*"])
    # the last of 3 vision layers runs, but LLaVA reads the one before it (layer -2)
    with pytest.raises(CalibrationError, match="layers.2.self_attn.k_proj does not reach the "
                                               "logits"):
        pipeline.compress(tiny_vlm("llava"), methods.make_config("io-svd", ratio=0.3),
                          image_calibration("llava"),
                          include=["model.vision_tower.encoder.layers.*"], batch_size=3)


def test_stages_with_a_target_before_the_blocks_are_refused_before_any_work():
    """The correction stages re-cut the blocks' layers and the LM head, not the vision
    side; both executors share the check, which runs before any statistics."""
    config = methods.make_config("zero-sum", ratio=0.3, stages=2)
    with pytest.raises(ConfigError, match=r"\(--stages > 1\) re-cut the layers of the decoder "
                                          r"blocks and the LM head, and "
                                          r"model.multi_modal_projector.linear_1 comes before"):
        pipeline.compress(tiny_vlm("llava"), config, image_calibration("llava"),
                          include=PROJECTOR)


def test_refit_runs_on_images_and_lora_refuses_them():
    calib = image_calibration("llava")
    model = tiny_vlm("llava")
    report = pipeline.compress(model, methods.make_config("svd-llm", ratio=0.3), calib,
                               batch_size=4, update=update.make_update("refit"))
    assert report.update.log and all(entry["error_after"] <= entry["error_before"] + 1e-9
                                     for entry in report.update.log)
    with pytest.raises(ConfigError, match="lora update trains on text only"):
        pipeline.compress(tiny_vlm("llava"), methods.make_config("svd", ratio=0.3), calib,
                          update=update.make_update("lora"))


PROJECTOR = ["model.language_model.layers.*", "model.multi_modal_projector.*"]
STREAMED_VLM_CASES = [
    ("llava", "svd-llm", None), ("llava", "io-svd", None), ("smolvlm", "svd-llm", None),
    ("smolvlm", "io-svd", None),
    # targets before the blocks: the projector, vision-tower layers
    ("llava", "svd-llm", PROJECTOR), ("llava", "zero-sum", PROJECTOR),
    ("llava", "svd-llm-v2", PROJECTOR),
    ("llava", "io-svd", ["model.vision_tower.encoder.layers.[01].*"]),
]


@pytest.mark.parametrize("layout,method,include", STREAMED_VLM_CASES,
                         ids=[f"{a}-{m}-{'outside' if i else 'blocks'}"
                              for a, m, i in STREAMED_VLM_CASES])
def test_streamed_image_calibration_equals_in_memory(tmp_path, layout, method, include):
    """A vision-language model streams from its shards (vision side loaded with the
    embeddings), image samples included, to the factors of the in-memory run; so do
    targets outside the blocks, which the blocks then see compressed."""
    from rankcut.compression import streaming

    tiny_vlm(layout).save_pretrained(tmp_path / "vlm", max_shard_size="50KB")
    assert len(list((tmp_path / "vlm").glob("*.safetensors"))) > 2
    config = methods.make_config(method, ratio=0.3)
    calib = image_calibration(layout)
    model = tiny_vlm(layout)
    expected = pipeline.compress(model, config, calib, batch_size=3, include=include)
    checkpoint.save_pretrained(model, tmp_path / "memory")
    report = streaming.compress_streaming(tmp_path / "vlm", tmp_path / "streamed", config, calib,
                                          batch_size=3, include=include)
    assert report.rank_map == expected.rank_map
    prefix = architecture.find_decoder_blocks(model)[0]
    outside = [n for n, r in report.rank_map.items() if r and not n.startswith(prefix + ".")]
    assert bool(outside) == bool(include)
    streamed = checkpoint.from_pretrained(tmp_path / "streamed").state_dict()
    for key, value in checkpoint.from_pretrained(tmp_path / "memory").state_dict().items():
        scale = max(1.0, value.float().abs().max().item()) if value.numel() else 1.0
        torch.testing.assert_close(streamed[key].float(), value.float(), atol=1e-5 * scale,
                                   rtol=0, msg=key)


@pytest.mark.slow
def test_cli_stream_with_image_calibration(tmp_path):
    """`compress --stream --calib-images --eval-images` on the LLaVA-layout test VLM: the
    processor comes from the model folder and is saved with the output, only tower modules
    are ranked, and the caption perplexity is measured block by block."""
    import json
    import shutil

    from transformers import AutoProcessor

    from rankcut.calibration import image_data
    from rankcut.measure.evaluation import caption_perplexity
    from rankcut.offline import vlm_assets

    captions = tmp_path / "captions"  # three captioned photos keep the evaluation short
    captions.mkdir()
    lines = []
    for record in image_data.image_text_source("captions")[:3]:
        shutil.copy(record["image"], captions / record["image"].name)
        lines.append(json.dumps({**record, "image": record["image"].name}) + "\n")
    (captions / "captions.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    assert main(["compress", "--model", "smollm2-llava", "--stream", "--method", "svd-llm",
                 "--ratio", "0.3", "--num-samples", "2", "--seqlen", "128", "--image-samples",
                 "1", "--calib-images", "captions", "--eval-images", str(captions),
                 "--eval-seqlen", "128", "--max-windows", "1", "--output", str(out),
                 "--json", str(tmp_path / "run.json")]) == 0
    figures = json.loads((tmp_path / "run.json").read_text())
    ranks = json.loads((out / "rank_map.json").read_text())
    tower = architecture.language_tower(tiny_vlm("llava"))[0]
    assert ranks and all(name.startswith(f"{tower}.layers.") for name in ranks)
    assert AutoProcessor.from_pretrained(out).image_processor is not None
    source = vlm_assets.ensure_test_vlm("llava")
    assert json.loads((out / "config.json").read_text())["model_type"] == json.loads(
        (source / "config.json").read_text())["model_type"]
    reloaded = checkpoint.from_pretrained(out)
    assert any(isinstance(m, rankcut_low_rank()) for m in reloaded.modules())
    # the streamed caption perplexity (one block at a time) is the in-memory one: the same
    # sums in another grouping, so float32 rounding only (1e-5 relative leaves ~10x)
    records = image_data.image_text_source(str(captions))
    assert len(records) == 3
    processor = AutoProcessor.from_pretrained(out)
    assert figures["caption_perplexity"] == pytest.approx(
        caption_perplexity(reloaded.eval(), processor, records).perplexity, rel=1e-5)
    assert figures["dense_caption_perplexity"] < figures["caption_perplexity"]


def rankcut_low_rank():
    from rankcut import LowRankLinear

    return LowRankLinear


def test_image_options_need_a_vision_language_model(model_dir, tmp_path, capsys):
    (tmp_path / "calib.txt").write_text(word_text(4000))
    common = ["compress", "--model", str(model_dir), "--calib-file", str(tmp_path / "calib.txt"),
              "--num-samples", "2", "--seqlen", "16", "--output", str(tmp_path / "o")]
    assert main([*common, "--calib-images", "captions", "--no-eval"]) == 2
    assert "--calib-images needs a vision-language model" in capsys.readouterr().err
    assert main([*common, "--stream", "--calib-images", "captions", "--no-eval"]) == 2
    assert "--calib-images needs a vision-language model" in capsys.readouterr().err
    assert main([*common, "--stream", "--eval-images", "captions", "--eval-seqlen", "64"]) == 2
    assert "--eval-images needs a vision-language model" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--eval-images", "captions", "--seqlen", "64"]) == 2
    assert "--eval-images needs a vision-language model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def llava_processor():
    from transformers import AutoProcessor

    from rankcut.offline import vlm_assets

    return AutoProcessor.from_pretrained(vlm_assets.ensure_test_vlm("llava"))


def test_image_samples_are_record_eos_then_their_window(llava_processor):
    from rankcut.calibration import data, image_data

    records = image_data.image_text_samples("captions", limit=3)
    text = data.load_text("wiki")
    tokenizer = llava_processor.tokenizer
    windows = data.calibration_batch(tokenizer, text, 5, 128, 3)
    calib = image_data.mixed_calibration(llava_processor, text, 5, 128, 3, "captions", 3)
    assert calib.shape == (5, 128)
    assert [image is not None for image in calib.images] == [True] * 3 + [False] * 2
    assert torch.equal(calib.input_ids[3:], windows[3:])
    assert torch.equal(calib.labels[3:], windows[3:])
    chosen = image_data.choose_records(image_data.image_text_samples("captions"), 3, 3)
    for row, record in enumerate(chosen):
        sample = image_data.encode_image_text(llava_processor, record)
        n = sample.ids.numel()
        assert (sample.ids == llava_processor.image_token_id).sum() == 16
        assert torch.equal(calib.input_ids[row, :n], sample.ids)
        assert calib.input_ids[row, n] == tokenizer.eos_token_id
        assert torch.equal(calib.input_ids[row, n + 1:], windows[row, :128 - n - 1])
        assert (calib.labels[row, :sample.prompt_tokens] == IGNORE).all()
        assert torch.equal(calib.labels[row, sample.prompt_tokens:],
                           calib.input_ids[row, sample.prompt_tokens:])
        caption = tokenizer.decode(sample.ids[sample.prompt_tokens:])
        assert caption.strip() == record["text"].strip()
        assert calib.images[row]["pixel_values"].shape == (1, 3, 64, 64)
    with pytest.raises(CalibrationError, match="--seqlen must be more than"):
        image_data.image_text_calibration(llava_processor, records, windows[:, :40])
    with pytest.raises(CalibrationError, match="3 image samples for 2 calibration samples"):
        image_data.image_text_calibration(llava_processor, records, windows[:2])
    with pytest.raises(CalibrationError, match="image-text source not found"):
        image_data.image_text_source("no/such/folder")
    with pytest.raises(CalibrationError, match="no image-text records to calibrate on"):
        image_data.image_text_calibration(llava_processor, [], windows)


def test_choose_records_is_seeded_and_keeps_file_order():
    from rankcut.calibration.image_data import choose_records

    records = [{"n": i} for i in range(10)]
    picked = choose_records(records, 4, seed=1)
    assert picked == choose_records(records, 4, seed=1) and len(picked) == 4
    assert [r["n"] for r in picked] == sorted(r["n"] for r in picked)
    assert choose_records(records, 20, seed=1) == records
    with pytest.raises(CalibrationError, match="at least 1"):
        choose_records(records, 0, seed=1)


def test_caption_perplexity_scores_the_text_given_the_image(llava_processor):
    from transformers import AutoModelForImageTextToText

    from rankcut.calibration import image_data
    from rankcut.measure.evaluation import caption_perplexity
    from rankcut.offline import vlm_assets

    model = AutoModelForImageTextToText.from_pretrained(vlm_assets.ensure_test_vlm("llava"))
    records = image_data.image_text_samples("captions", limit=2)
    nll, tokens = 0.0, 0
    for record in records:
        sample = image_data.encode_image_text(llava_processor, record)
        with torch.no_grad():
            logits = model(input_ids=sample.ids[None], **sample.images).logits[0]
        start = sample.prompt_tokens
        nll += float(F.cross_entropy(logits[start - 1:-1], sample.ids[start:], reduction="sum"))
        tokens += sample.ids.numel() - start
    result = caption_perplexity(model, llava_processor, records)
    assert result.tokens == tokens
    assert result.perplexity == pytest.approx(float(torch.tensor(nll / tokens).exp()), rel=1e-5)
    other = [dict(record, image=records[1 - i]["image"]) for i, record in enumerate(records)]
    assert caption_perplexity(model, llava_processor, other).perplexity != result.perplexity
    with pytest.raises(CalibrationError, match="no image-text record has any text"):
        caption_perplexity(model, llava_processor, [dict(records[0], text="")])


@pytest.mark.slow
def test_cli_io_svd_with_image_calibration_on_both_test_vlms(tmp_path):
    """The issue's acceptance run: io-svd at 0.2 with --calib-images on both layouts; only
    the tower's modules change, a plain transformers reload reproduces the caption
    perplexity exactly, and the text perplexity is within 2% of compressing the plain
    SmolLM2 with the same text windows (same method, ratio, seed)."""
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    import rankcut  # noqa: F401  (registers the quantizer for the plain reload)
    from rankcut.calibration import image_data
    from rankcut.measure.evaluation import caption_perplexity
    from rankcut.offline import vlm_assets

    common = ["--method", "io-svd", "--ratio", "0.2", "--num-samples", "8", "--seqlen", "256",
              "--seed", "3", "--eval-seqlen", "512", "--max-windows", "4", "--device", "cpu"]
    images = ["--calib-images", "captions", "--image-samples", "2", "--eval-images", "captions"]
    figures = {}
    for model in ("smollm2", "smollm2-llava", "smollm2-smolvlm"):
        extra = images if model != "smollm2" else []
        assert main(["compress", "--model", model, *common, *extra, "--output",
                     str(tmp_path / model), "--json", str(tmp_path / f"{model}.json")]) == 0
        figures[model] = json.loads((tmp_path / f"{model}.json").read_text())
    records = image_data.image_text_source("captions")
    for layout in ("llava", "smolvlm"):
        model, out = f"smollm2-{layout}", tmp_path / f"smollm2-{layout}"
        assert figures[model]["perplexity"] == pytest.approx(figures["smollm2"]["perplexity"],
                                                             rel=0.02)
        source = AutoModelForImageTextToText.from_pretrained(vlm_assets.ensure_test_vlm(layout))
        reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
        ranks = json.loads((out / "rank_map.json").read_text())
        tower = architecture.language_tower(tiny_vlm(layout))[0]
        assert all(name.startswith(f"{tower}.layers.") for name in ranks)
        factored = {f"{name}.weight" for name, rank in ranks.items() if rank is not None}
        written = reloaded.state_dict()
        for key, value in source.state_dict().items():
            if key not in factored:
                assert torch.equal(written[key], value), key
        processor = AutoProcessor.from_pretrained(out)
        assert (caption_perplexity(reloaded, processor, records).perplexity
                == figures[model]["caption_perplexity"])
        assert figures[model]["dense_caption_perplexity"] < figures[model]["caption_perplexity"]

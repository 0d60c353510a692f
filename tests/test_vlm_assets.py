"""Tests for the offline test VLMs (offline.vlm_assets) and image-text data
(calibration.image_data).

The first group needs nothing; the data group reads the scikit-image and easy-vqa wheels (fetched
once with pip); the model group builds the two test VLMs from the cached SmolLM2 on first use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from rankcut.calibration import image_data
from rankcut.errors import AssetError, CalibrationError
from rankcut.offline import vlm_assets

LANGUAGE_TOWER = {"llava": "language_model", "smolvlm": "text_model"}


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", (8, 8), color).save(path)
    return path


# --- fast: manifest, RECORD parsing, JSONL and folder readers --------------------------------


def test_photo_manifest_pins_every_photo_and_captions_it() -> None:
    manifest = image_data._photo_manifest()
    photos = manifest["photos"]
    names = [p["image"] for p in photos]
    assert len(names) == len(set(names)) == 17
    assert {"astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png"} <= set(names)
    for photo in photos:
        assert len(photo["sha256"]) == 64 and int(photo["sha256"], 16) >= 0
        assert 20 < len(photo["text"]) < 160 and photo["text"].endswith(".")
    assert manifest["prompt"] == image_data.DEFAULT_PROMPT


def test_record_hashes_turn_urlsafe_base64_into_hex() -> None:
    digest = hashlib.sha256(b"payload").digest()
    b64 = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    record = f"a/b.png,sha256={b64},7\npkg-1.0.dist-info/RECORD,,\n"
    assert image_data._record_hashes(record) == {"a/b.png": digest.hex()}


def test_jsonl_reader_resolves_paths_and_defaults_the_prompt(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rel = write_image(tmp_path / "img" / "a.png")
    absolute = write_image(tmp_path / "b.jpg")
    lines = [{"image": "img/a.png", "prompt": "What colour?", "text": "red"}, {},
             {"image": str(absolute), "text": "a red square"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join("" if not line else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    records = image_data.read_image_text_jsonl(path, allow_external_images=True)
    assert records == [
        {"image": rel, "prompt": "What colour?", "text": "red"},
        {"image": absolute, "prompt": image_data.DEFAULT_PROMPT, "text": "a red square"},
    ]
    refused = f"data.jsonl:3: image path '{absolute}' is absolute; image paths must stay inside"
    with pytest.raises(CalibrationError, match=re.escape(refused)):
        image_data.read_image_text_jsonl(path)


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("", "holds no records"),
    ('{"image": "a.png", "text": "x"}\n{"image": ', "data.jsonl:2: not valid JSON"),
    ('["a.png", "x"]', "data.jsonl:1: expected a JSON object"),
    ('{"image": "a.png", "prompt": "p"}', "data.jsonl:1: missing key(s) text"),
    ('{"text": "x"}', "data.jsonl:1: missing key(s) image"),
    ('{"image": "a.png", "text": 3}', "data.jsonl:1: text must be string(s)"),
    ('{"image": "gone.png", "text": "x"}', "data.jsonl:1: image"),
    ('{"image": "bad.png", "text": "x"}', "data.jsonl:1: cannot read image"),
])
def test_jsonl_reader_errors_name_file_and_line(tmp_path: Path, content, message) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        image_data.read_image_text_jsonl(path)


def test_missing_image_is_caught_even_without_image_checks(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "gone.png", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match="gone.png does not exist"):
        image_data.read_image_text_jsonl(path, check_images=False)


def test_folder_of_images_without_and_with_captions(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no captions.jsonl and no image files"):
        image_data.read_image_text(tmp_path)
    write_image(tmp_path / "b.PNG")
    write_image(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    records = image_data.read_image_text(tmp_path)
    assert [r["image"].name for r in records] == ["a.jpg", "b.PNG"]
    assert all(r["prompt"] == image_data.DEFAULT_PROMPT and r["text"] == "" for r in records)
    (tmp_path / "captions.jsonl").write_text('{"image": "b.PNG", "text": "red"}\n',
                                             encoding="utf-8")
    assert [(r["image"].name, r["text"]) for r in image_data.read_image_text(tmp_path)] == [
        ("b.PNG", "red")]


def test_folder_with_an_unreadable_image_fails(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(CalibrationError, match="cannot read image .*broken.png"):
        image_data.read_image_text(tmp_path)


def test_bad_kind_limit_and_layout_are_rejected() -> None:
    with pytest.raises(CalibrationError, match="unknown image-text set 'coco'"):
        image_data.image_text_samples("coco")
    with pytest.raises(CalibrationError, match="limit must be >= 0"):
        image_data.image_text_samples("captions", limit=-1)
    with pytest.raises(AssetError, match="unknown test VLM layout 'blip'"):
        vlm_assets.ensure_test_vlm("blip")


def test_assets_flag_adds_the_vlm_assets(monkeypatch, capsys) -> None:
    from rankcut import cli
    from rankcut.calibration import image_data
    from rankcut.measure import zeroshot
    from rankcut.offline import assets

    for module, name in ((assets, "ensure_smollm2"), (assets, "ensure_wiki"),
                         (zeroshot, "ensure_analogies"), (image_data, "ensure_photos"),
                         (image_data, "ensure_easy_vqa")):
        monkeypatch.setattr(module, name, lambda name=name: Path(f"/c/{name}"))
    monkeypatch.setattr(vlm_assets, "ensure_test_vlm", lambda layout: Path(f"/c/{layout}"))
    plain = "smollm2: /c/ensure_smollm2\nwiki: /c/ensure_wiki\nanalogies: /c/ensure_analogies\n"
    assert cli.main(["assets"]) == 0
    assert capsys.readouterr().out == plain
    assert cli.main(["assets", "--vlm"]) == 0
    assert capsys.readouterr().out == plain + (
        "vlm-llava: /c/llava\nvlm-smolvlm: /c/smolvlm\nphotos: /c/ensure_photos\n"
        "easy-vqa: /c/ensure_easy_vqa\n")


# --- data from the wheels (cached after the first run) ---------------------------------------


def test_captioned_photos_are_real_images_in_manifest_order() -> None:
    records = image_data.image_text_samples("captions")
    manifest = image_data._photo_manifest()["photos"]
    assert [r["image"].name for r in records] == [p["image"] for p in manifest]
    assert [r["text"] for r in records] == [p["text"] for p in manifest]
    for record in records:
        assert record["prompt"] == "Describe the image."
        assert hashlib.sha256(record["image"].read_bytes()).hexdigest() == next(
            p["sha256"] for p in manifest if p["image"] == record["image"].name)
    with Image.open(records[0]["image"]) as astronaut:
        assert astronaut.size == (512, 512)
    assert image_data.open_image(records[1]["image"]).mode == "RGB"  # camera.png is grayscale
    assert image_data.read_image_text(image_data.ensure_photos()) == records
    assert image_data.image_text_samples("captions", limit=3) == records[:3]


def test_easy_vqa_splits_are_complete_and_disjoint() -> None:
    train = image_data.image_text_samples("vqa")
    test = image_data.image_text_samples("vqa-test")
    assert (len(train), len(test)) == (38575, 9673)
    assert train[0] == {"image": image_data.ensure_easy_vqa() / "train/images/0.png",
                        "prompt": "What is the blue shape?", "text": "rectangle"}
    answers = {r["text"] for r in train + test}
    assert answers == {"circle", "rectangle", "triangle", "yes", "no", "red", "green", "blue",
                       "black", "gray", "teal", "brown", "yellow"}
    train_images, test_images = {r["image"] for r in train}, {r["image"] for r in test}
    assert (len(train_images), len(test_images)) == (4000, 1000)
    assert not train_images & test_images and all(p.is_file() for p in test_images)
    with Image.open(test[0]["image"]) as image:
        assert image.size == (64, 64)
    assert image_data.image_text_samples("vqa-test", limit=5) == test[:5]
    assert (image_data.ensure_easy_vqa() / "LICENSE").read_text().startswith("MIT License")


# --- the test VLMs (slow: built from the cached SmolLM2 on first use, ~15 s each) -------------


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rankcut.offline.assets import ensure_smollm2

    folder = ensure_smollm2()
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=["llava", "smolvlm"])
def vlm(request):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = vlm_assets.ensure_test_vlm(request.param)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    return request.param, folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.slow
def test_language_tower_is_smollm2_and_text_logits_match(vlm, smollm2) -> None:
    """The embedding rows are SmolLM2's bit for bit (a copy); the logits come from two model
    classes, so they are compared within the build's own float32 tolerance."""
    name, _, model, processor = vlm
    text_model, tokenizer = smollm2
    tower = getattr(model.model, LANGUAGE_TOWER[name])
    assert type(tower).__name__ == "LlamaModel" and len(tower.layers) == 30
    vocab = len(processor.tokenizer)
    assert vocab == 49152 + len(vlm_assets.LAYOUTS[name].added_tokens)
    emb = tower.embed_tokens.weight
    assert emb.shape == (vocab, 576) and model.lm_head.weight is emb
    assert torch.equal(emb[:49152], text_model.model.embed_tokens.weight)
    ids = tokenizer(["Offline assets come from wheels.", "A cat sat."], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        want, got = text_model(**ids).logits, model(**ids).logits
    assert got.shape[-1] == vocab
    assert vlm_assets.text_logits_mismatch(want, got[..., :49152]) <= vlm_assets.TEXT_LOGITS_RTOL
    assert processor.tokenizer("<image>")["input_ids"] == [model.config.image_token_id]


def photo_batch(processor, image_path: Path, prompt: str):
    """Tokenized chat prompt plus pixels for one image through the folder's processor."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(image_path) as image:
        return processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")


@pytest.mark.slow
def test_image_and_text_through_the_processor_depend_on_the_image(vlm) -> None:
    name, _, model, processor = vlm
    photos = image_data.image_text_samples("captions")
    batches = [photo_batch(processor, photos[i]["image"], photos[i]["prompt"]) for i in (0, 2)]
    image_id = model.config.image_token_id
    for batch in batches:
        tiles = 1 if name == "llava" else batch["pixel_values"].shape[1]
        assert int((batch["input_ids"] == image_id).sum()) == vlm_assets.IMAGE_TOKENS * tiles
        assert batch["pixel_values"].shape[-2:] == (64, 64)
    with torch.no_grad():
        logits = [model(**batch).logits[0, -1] for batch in batches]
        again = model(**batches[0]).logits[0, -1]
    assert all(torch.isfinite(x).all() for x in logits)
    assert torch.equal(logits[0], again)
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.slow
def test_rebuild_is_byte_identical_to_the_cached_folder(vlm, tmp_path: Path) -> None:
    """The rebuild runs with another thread count than this process's (1 if it has more,
    else 2), so the bytes are shown not to depend on how the CPU splits reductions."""
    name, folder, _, _ = vlm
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        rebuilt = vlm_assets.build_test_vlm(name, tmp_path / name)
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.name for p in folder.iterdir() if p.name != ".complete")
    assert files == sorted(p.name for p in rebuilt.iterdir())
    assert {"model.safetensors", "config.json", "processor_config.json",
            "tokenizer.json", "chat_template.jinja"} <= set(files)
    for file in files:
        digest = [hashlib.sha256((root / file).read_bytes()).hexdigest()
                  for root in (folder, rebuilt)]
        assert digest[0] == digest[1], file

"""Image-text data for vision-language models: real photos, easy-VQA, and user JSONL files.

Two built-in sets come out of PyPI wheels (DESIGN.md section 5), each file checked by sha256:

- **photos**: 17 photographs from the ``scikit-image`` wheel's ``skimage/data/`` (astronaut,
  chelsea, coffee, rocket, camera, ...) with short captions written for them in this repository
  (``rankcut/resources/photo_captions.json``, which also pins each file's sha256).
- **easy-VQA** (``easy-vqa==1.0``, MIT): 64x64 images of one coloured shape with question-answer
  pairs, 4,000 train and 1,000 test images. The wheel's ``RECORD`` is pinned by sha256 and every
  extracted file is checked against the hash ``RECORD`` gives for it.

Both are written as image-text JSONL files, the format users give with their own data: one JSON
object a line, ``{"image": "path relative to the file", "prompt": "...", "text": "..."}``
(``prompt`` optional, default :data:`DEFAULT_PROMPT`). Image paths must stay inside the file's
folder: absolute paths, and paths that leave it through ``..`` or a symbolic link, are refused
unless the caller allows them (``allow_external_images``), since the file may come from
someone else. A folder of images is accepted too: its
``captions.jsonl`` when it has one, else every image in name order with the default prompt and an
empty ``text`` (enough for calibration, not for caption perplexity).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..architecture import text_tokenizer
from ..errors import AssetError, CalibrationError, UnsupportedModelError
from ..io.atomic import write_text
from ..offline.assets import (
    COMPLETE_MARKER,
    WheelMember,
    build_folder,
    cache_dir,
    extract_checked,
    fetch_wheel,
)
from .data import IGNORE, Calibration, calibration_batch

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

SKIMAGE_SPEC = "scikit-image==0.26.0"
SKIMAGE_DATA = "skimage/data/"
EASY_VQA_RECORD = WheelMember(
    "easy-vqa==1.0",
    "easy_vqa-1.0.dist-info/RECORD",
    "bb25fb8fb7407b3b8a2b358356992e6d96e5fa69b6a98c17729bdd58e508b39e",
)
EASY_VQA_DATA = "easy_vqa/data/"
EASY_VQA_LICENSE = "easy_vqa-1.0.dist-info/LICENSE"
VQA_SPLITS = ("train", "test")
CAPTIONS_FILE = "captions.jsonl"
DEFAULT_PROMPT = "Describe the image."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: ``kind`` of :func:`image_text_samples`: photo captions, easy-VQA train or test questions.
SAMPLE_KINDS = ("captions", "vqa", "vqa-test")
#: The type and CRC of the IEND chunk that ends every whole PNG file.
PNG_IEND = b"IEND\xaeB`\x82"
#: What Pillow raises on a file it cannot identify or decode, or that is cut short.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


def _photo_manifest() -> dict[str, Any]:
    """Return the packaged ``photo_captions.json`` (prompt, and image/sha256/text per photo)."""
    ref = resources.files("rankcut") / "resources" / "photo_captions.json"
    return json.loads(ref.read_text(encoding="utf-8"))


def _jsonl(records: list[dict[str, str]]) -> str:
    """Serialize records as JSON lines (stable key order, UTF-8 kept as is)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def ensure_photos() -> Path:
    """Return ``<cache>/photos``: the scikit-image photographs and their ``captions.jsonl``.

    Side effects: downloads the scikit-image wheel (pip, no dependencies), extracts each photo
    atomically after its sha256 check, then writes ``captions.jsonl`` atomically; that file is
    written last, so its presence marks a complete folder.
    """
    folder = cache_dir() / "photos"
    if (folder / CAPTIONS_FILE).is_file():
        logger.info("using cached photos %s", folder)
        return folder
    manifest = _photo_manifest()
    wheel = fetch_wheel(SKIMAGE_SPEC)
    for photo in manifest["photos"]:
        extract_checked(wheel, SKIMAGE_DATA + photo["image"], folder / photo["image"],
                        photo["sha256"])
    records = [{"image": p["image"], "prompt": manifest["prompt"], "text": p["text"]}
               for p in manifest["photos"]]
    write_text(folder / CAPTIONS_FILE, _jsonl(records))
    logger.info("%d photos ready at %s", len(records), folder)
    return folder


def _record_hashes(record: str) -> dict[str, str]:
    """Map each file of a wheel ``RECORD`` to its sha256 as hex (entries without one skipped)."""
    hashes = {}
    for line in record.splitlines():
        path, _, rest = line.partition(",")
        algo, _, digest = rest.partition(",")[0].partition("=")
        if algo == "sha256":
            hashes[path] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return hashes


def _extract_vqa(wheel: Path, hashes: dict[str, str], folder: Path) -> None:
    """Copy easy-VQA's data files and licence from ``wheel`` into ``folder``, checking hashes."""
    wanted = {m: m.removeprefix(EASY_VQA_DATA) for m in hashes if m.startswith(EASY_VQA_DATA)
              and m.endswith((".png", "questions.json"))}
    wanted[EASY_VQA_LICENSE] = "LICENSE"
    with zipfile.ZipFile(wheel) as zf:
        for member, rel in sorted(wanted.items()):
            data = zf.read(member)
            if hashlib.sha256(data).hexdigest() != hashes[member]:
                raise AssetError(f"{member} in {wheel} does not match its RECORD hash; "
                                 f"delete {wheel} and fetch it again")
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)


def _vqa_records(folder: Path, split: str) -> list[dict[str, str]]:
    """Return a split's ``[question, answer, image_index]`` triples as JSONL records."""
    questions = json.loads((folder / split / "questions.json").read_text(encoding="utf-8"))
    return [{"image": f"{split}/images/{index}.png", "prompt": q[:1].upper() + q[1:], "text": a}
            for q, a, index in questions]


def ensure_easy_vqa() -> Path:
    """Return ``<cache>/easy-vqa``: ``{train,test}/images/*.png`` and ``{train,test}.jsonl``.

    Side effects: downloads the easy-vqa wheel, checks its pinned ``RECORD``, extracts every image,
    both ``questions.json`` and the MIT licence into a temporary folder (each file checked against
    ``RECORD``), writes the JSONL files and renames the folder into place with a ``.complete``
    marker, so an interrupted build never looks complete.
    """
    target = cache_dir() / "easy-vqa"
    if (target / COMPLETE_MARKER).is_file():
        logger.info("using cached easy-VQA %s", target)
        return target
    wheel = fetch_wheel(EASY_VQA_RECORD.spec)

    def build(tmp: Path) -> None:
        record = extract_checked(wheel, EASY_VQA_RECORD.member, tmp / "RECORD",
                                 EASY_VQA_RECORD.sha256)
        _extract_vqa(wheel, _record_hashes(record.read_text(encoding="utf-8")), tmp)
        for split in VQA_SPLITS:
            (tmp / f"{split}.jsonl").write_text(_jsonl(_vqa_records(tmp, split)), encoding="utf-8")

    build_folder(target, EASY_VQA_RECORD.spec, build)
    logger.info("easy-VQA ready at %s", target)
    return target


@contextlib.contextmanager
def _pillow_errors(path: Path) -> Iterator[None]:
    """Turns what Pillow raises on a bad image file into a :class:`CalibrationError` naming
    ``path``. Pillow's decompression-bomb warning (more than ``Image.MAX_IMAGE_PIXELS``
    pixels) is an error here too, as is its error (more than twice that)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise CalibrationError(f"image {path} is refused as a possible decompression "
                                   f"bomb: {exc}") from exc
        except _PILLOW_ERRORS as exc:
            raise CalibrationError(f"cannot read image {path} (truncated or corrupt?): "
                                   f"{exc}") from exc


def check_image(path: Path) -> None:
    """Raise :class:`CalibrationError` unless ``path`` is an image file Pillow can read: it
    opens, passes Pillow's ``verify()`` (chunk checksums for PNG), is not a decompression
    bomb, and a PNG ends with its IEND chunk (Pillow alone accepts a PNG cut inside it)."""
    from PIL import Image

    if not path.is_file():
        raise CalibrationError(f"image {path} does not exist")
    with _pillow_errors(path):
        with Image.open(path) as image:
            kind = image.format
            image.verify()
        whole = kind != "PNG" or PNG_IEND in _tail(path, 64)
    if not whole:
        raise CalibrationError(f"cannot read image {path} (truncated or corrupt?): the PNG "
                               "does not end with its IEND chunk")


def _tail(path: Path, size: int) -> bytes:
    """The last ``size`` bytes of a file (all of it when shorter)."""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read()


def open_image(path: Path) -> Image:
    """Return the image at ``path`` decoded as an RGB ``PIL.Image``.

    Raises:
        CalibrationError: the file is missing, unreadable, truncated, corrupt or a possible
            decompression bomb (checked by :func:`check_image`, then again while decoding).
    """
    from PIL import Image

    check_image(path)
    with _pillow_errors(path), Image.open(path) as image:
        return image.convert("RGB")


def _image_path(name: str, base: Path, where: str, allow_external: bool) -> Path:
    """The path of a JSONL line's image ``name``, relative to the file's (resolved) folder
    ``base``.

    Raises:
        CalibrationError: unless ``allow_external``, ``name`` is absolute or leads outside
            ``base`` once ``..`` and symbolic links are resolved; the message starts with
            ``where`` (``file:line``).
    """
    path = base / name
    if allow_external:
        return path
    hint = ("; image paths must stay inside the JSONL file's folder (allow others with "
            "--allow-external-images, or allow_external_images=True)")
    if Path(name).is_absolute():
        raise CalibrationError(f"{where}: image path {name!r} is absolute{hint}")
    if not path.resolve().is_relative_to(base):
        raise CalibrationError(f"{where}: image path {name!r} leads outside {base} (to "
                               f"{path.resolve()}){hint}")
    return path


def _parse_line(line: str, where: str, base: Path, allow_external: bool = False
                ) -> dict[str, Any]:
    """Turn one JSONL line into a record; ``where`` (``file:line``) prefixes every error.
    The image path is checked by :func:`_image_path`."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in ("image", "text") if key not in obj]
    if missing:
        raise CalibrationError(f"{where}: missing key(s) {', '.join(missing)}; each line needs "
                               '{"image": ..., "text": ...} and may have "prompt"')
    record = {"image": obj["image"], "prompt": obj.get("prompt", DEFAULT_PROMPT),
              "text": obj["text"]}
    bad = [key for key, value in record.items() if not isinstance(value, str)]
    if bad:
        raise CalibrationError(f"{where}: {', '.join(bad)} must be string(s)")
    record["image"] = _image_path(record["image"], base, where, allow_external)
    return record


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yields (line number, text) of each non-blank line of a UTF-8 file.

    Raises:
        CalibrationError: the file cannot be read, or a line is not UTF-8 (the message names
            the file and line).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"cannot read image-text file {path}: {exc}") from exc
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not UTF-8 text (truncated or "
                                   f"corrupt?): {exc}") from exc
        if line.strip():
            yield number, line


def read_image_text_jsonl(path: str | Path, check_images: bool = True,
                          allow_external_images: bool = False) -> list[dict[str, Any]]:
    """Read an image-text JSONL file into ``{"image": Path, "prompt": str, "text": str}`` records.

    Image paths are relative to the file's folder. Blank lines are skipped; records keep the
    file's order.

    Args:
        path: The JSONL file.
        check_images: Open every distinct image once with Pillow; without it only existence is
            checked.
        allow_external_images: Accept image paths that are absolute or lead outside the file's
            folder (after resolving ``..`` and symbolic links); refused by default, since the
            file may come from someone else.

    Raises:
        CalibrationError: The file is missing, unreadable or holds no records, a line is not
            UTF-8 or not a JSON object with string ``image`` and ``text``, an image path is
            refused, or an image is missing or unreadable (the message names the file and
            line).
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"image-text file {path} does not exist")
    base, records, seen = path.parent.resolve(), [], set()
    for number, line in _jsonl_lines(path):
        record = _parse_line(line, f"{path}:{number}", base, allow_external_images)
        if record["image"] not in seen:
            try:
                if check_images:
                    check_image(record["image"])
                elif not record["image"].is_file():
                    raise CalibrationError(f"image {record['image']} does not exist")
            except CalibrationError as exc:
                raise CalibrationError(f"{path}:{number}: {exc}") from exc
            seen.add(record["image"])
        records.append(record)
    if not records:
        raise CalibrationError(f"image-text file {path} holds no records")
    return records


def read_image_text(path: str | Path, allow_external_images: bool = False
                    ) -> list[dict[str, Any]]:
    """Read image-text records from a JSONL file or a folder (see the module docstring).

    A folder with a ``captions.jsonl`` is read through it; otherwise each image file in it (name
    order, not recursive) becomes ``{"image": path, "prompt": DEFAULT_PROMPT, "text": ""}``.
    ``allow_external_images`` is passed to :func:`read_image_text_jsonl`.

    Raises:
        CalibrationError: Nothing usable at ``path``, or a bad line or image (see
            :func:`read_image_text_jsonl`).
    """
    path = Path(path)
    if path.is_dir():
        if (path / CAPTIONS_FILE).is_file():
            return read_image_text_jsonl(path / CAPTIONS_FILE,
                                         allow_external_images=allow_external_images)
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise CalibrationError(f"folder {path} has no {CAPTIONS_FILE} and no image files "
                                   f"({', '.join(IMAGE_SUFFIXES)})")
        for image in images:
            check_image(image)
        return [{"image": p.resolve(), "prompt": DEFAULT_PROMPT, "text": ""} for p in images]
    return read_image_text_jsonl(path, allow_external_images=allow_external_images)


def image_text_samples(kind: str = "captions", limit: int | None = None) -> list[dict[str, Any]]:
    """Return built-in image-text records, building the data on first use.

    Args:
        kind: ``"captions"`` (the 17 captioned photos, prompt :data:`DEFAULT_PROMPT`), ``"vqa"``
            (easy-VQA train: 38,575 questions on 4,000 images) or ``"vqa-test"`` (9,673 questions
            on 1,000 other images). Order is the files' order: fixed.
        limit: Keep only the first ``limit`` records.

    Raises:
        CalibrationError: Unknown ``kind`` or a negative ``limit``.
        AssetError: The data cannot be fetched or fails its checks.
    """
    if kind not in SAMPLE_KINDS:
        raise CalibrationError(f"unknown image-text set {kind!r}; choose one of "
                               f"{', '.join(SAMPLE_KINDS)}")
    if limit is not None and limit < 0:
        raise CalibrationError(f"limit must be >= 0, got {limit}")
    if kind == "captions":
        path = ensure_photos() / CAPTIONS_FILE
    else:
        path = ensure_easy_vqa() / ("test.jsonl" if kind == "vqa-test" else "train.jsonl")
    return read_image_text_jsonl(path, check_images=False)[:limit]


def image_text_source(source: str, allow_external_images: bool = False
                      ) -> list[dict[str, Any]]:
    """Records of ``--calib-images`` / ``--eval-images``: a built-in set named in
    :data:`SAMPLE_KINDS`, else a JSONL file or a folder (:func:`read_image_text`, which
    takes ``allow_external_images``)."""
    if source in SAMPLE_KINDS:
        return image_text_samples(source)
    if not Path(source).exists():
        raise CalibrationError(f"image-text source not found: {source} (give a JSONL file, a "
                               f"folder of images, or one of {', '.join(SAMPLE_KINDS)})")
    return read_image_text(source, allow_external_images)


def choose_records(records: list[dict[str, Any]], count: int, seed: int
                   ) -> list[dict[str, Any]]:
    """Returns ``count`` records drawn without replacement from a seeded generator, in file
    order (all of them when there are not more than ``count``)."""
    if count < 1:
        raise CalibrationError(f"the number of image samples must be at least 1, got {count}")
    if len(records) <= count:
        return list(records)
    chosen = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:count]
    return [records[i] for i in sorted(chosen.tolist())]


@dataclass(frozen=True)
class EncodedImageText:
    """One image-text record as the model sees it.

    Attributes:
        ids: [L] token ids: the prompt with its image tokens, then the record's text.
        prompt_tokens: how many of them belong to the prompt (the text starts there).
        images: {processor output name: tensor with batch dimension 1}; tensors with one
            entry per token (e.g. ``token_type_ids``) are [1, L].
    """

    ids: torch.Tensor
    prompt_tokens: int
    images: dict[str, torch.Tensor]

    def as_calibration(self) -> Calibration:
        """This record as a one-sample ``Calibration`` whose prompt is not predicted."""
        labels = self.ids.clone()
        labels[: self.prompt_tokens] = IGNORE
        return Calibration(self.ids[None], labels[None], (self.images,))


def prompt_text(processor: Any, prompt: str) -> str:
    """The text before a record's own text: the processor's chat template on a user turn of
    the image and ``prompt`` with the assistant turn opened, or without a template the image
    token, the prompt and a newline.

    Raises:
        UnsupportedModelError: the processor has neither a chat template nor an image token.
    """
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None)
    if token is None:
        raise UnsupportedModelError(f"{type(processor).__name__} has neither a chat template "
                                    "nor an image token; image-text data needs one")
    return f"{token}{prompt}\n"


def encode_image_text(processor: Any, record: dict[str, Any]) -> EncodedImageText:
    """Runs one record through the model's processor (see :func:`prompt_text`).

    Raises:
        CalibrationError: the image cannot be read.
        UnsupportedModelError: see :func:`prompt_text`.
    """
    image = open_image(Path(record["image"]))
    prefix = prompt_text(processor, record.get("prompt") or DEFAULT_PROMPT)
    whole = processor(text=[prefix + record["text"]], images=[[image]], return_tensors="pt")
    head = processor(text=[prefix], images=[[image]], return_tensors="pt")
    ids = whole.pop("input_ids")[0]
    whole.pop("attention_mask", None)
    return EncodedImageText(ids, head["input_ids"].shape[1], dict(whole))


def image_text_calibration(processor: Any, records: list[dict[str, Any]],
                           windows: torch.Tensor) -> Calibration:
    """Lays image-text records over the starts of text windows [N, L].

    Sample i < ``len(records)`` is record i as the model sees it
    (:func:`encode_image_text`), the end-of-sequence token, then the start of window i up
    to L tokens; the other windows stay text only. The calibration keeps its N samples of L
    tokens, without padding. An image sample's prompt with its image tokens is not
    predicted; the text after it is.

    Raises:
        CalibrationError: no records, more records than windows, a record of L tokens or
            more, or an unreadable image.
    """
    count, seqlen = windows.shape
    if not records:
        raise CalibrationError("no image-text records to calibrate on")
    if len(records) > count:
        raise CalibrationError(f"{len(records)} image samples for {count} calibration samples: "
                               "each image sample takes the place of the start of a text "
                               "window; use more samples or fewer images")
    tokenizer = text_tokenizer(processor)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids, labels, images = windows.clone(), windows.clone(), [None] * count
    for number, record in enumerate(records):
        sample = encode_image_text(processor, record)
        head = torch.cat([sample.ids, torch.tensor(eos, dtype=torch.long)])
        if head.numel() >= seqlen:
            raise CalibrationError(
                f"image sample {number} ({record['image']}) has {head.numel()} tokens with its "
                f"prompt, image and text; --seqlen must be more than that")
        ids[number] = torch.cat([head, windows[number, : seqlen - head.numel()]])
        labels[number] = ids[number]
        labels[number, : sample.prompt_tokens] = IGNORE
        images[number] = {key: _pad_tokens(value, sample.ids.numel(), seqlen)
                          for key, value in sample.images.items()}
    return Calibration(ids, labels, tuple(images))


def _pad_tokens(value: torch.Tensor, length: int, seqlen: int) -> torch.Tensor:
    """Pads a per-token tensor ([1, length]) with zeros to [1, seqlen]; others unchanged."""
    if value.dim() == 2 and value.shape == (1, length):
        return torch.nn.functional.pad(value, (0, seqlen - length))
    return value


def mixed_calibration(processor: Any, text: str, num_samples: int, seqlen: int, seed: int,
                      images: str, image_samples: int, allow_external_images: bool = False
                      ) -> Calibration:
    """``num_samples`` windows of ``text`` of ``seqlen`` tokens, the first ``image_samples``
    of which start with a record of the image-text source ``images``
    (:func:`image_text_source`, with ``allow_external_images``; drawn by
    :func:`choose_records`; see :func:`image_text_calibration`)."""
    records = choose_records(image_text_source(images, allow_external_images), image_samples,
                             seed)
    tokenizer = text_tokenizer(processor)
    windows = calibration_batch(tokenizer, text, num_samples, seqlen, seed)
    logger.info("calibration: %d samples of %d tokens, %d of them with an image",
                num_samples, seqlen, len(records))
    return image_text_calibration(processor, records, windows)

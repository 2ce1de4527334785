"""Real sentiment data that can be had offline: the VADER ground-truth corpora (Hutto & Gilbert 2014).

They ship inside the source archive of ``vadersentiment==3.3.2`` on PyPI
(``additional_resources/hutto_ICWSM_2014.tar.gz``). The archive is fetched once with
``pip download`` into ``$ADAPTERKIT_CACHE`` (default ``~/.cache/adapterkit``) and read in place.
"""

from __future__ import annotations

import io
import random
import subprocess
import sys
import tarfile
from pathlib import Path

from adapterkit.errors import AdapterError
from adapterkit.files import cache_dir

VADER = "vadersentiment==3.3.2"
SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
CORPORA = ("movieReviewSnippets", "amazonReviewSnippets", "tweets", "nytEditorialSnippets")


def vader_archive() -> Path:
    """Path of the ``vadersentiment`` source archive, downloaded from PyPI on first use."""
    target = cache_dir() / "vader"
    archive = target / SDIST
    if not archive.is_file():
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", VADER]
        result = subprocess.run([*cmd, "-d", str(target)], capture_output=True, text=True)
        if result.returncode or not archive.is_file():
            raise AdapterError(
                f"could not fetch {VADER} from PyPI ({result.stderr.strip()[-300:]}); "
                f"download {SDIST} by hand into {target}"
            )
    return archive


def read_corpus(name: str = "movieReviewSnippets") -> list[tuple[str, float]]:
    """``(sentence, mean rating in [-4, 4])`` pairs of one ground-truth corpus."""
    if name not in CORPORA:
        raise AdapterError(f"unknown VADER corpus {name!r}; choose from {CORPORA}")
    with tarfile.open(vader_archive()) as outer:
        inner_bytes = outer.extractfile(INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt").read()
    rows = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip():
            rows.append((parts[2].strip(), float(parts[1])))
    return rows


def sentiment_splits(
    name: str = "movieReviewSnippets", seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)
) -> dict[str, list[tuple[str, int]]]:
    """Non-neutral sentences labelled ``rating > 0``, in a fixed seeded train/validation/test split."""
    rows = [(text, int(score > 0)) for text, score in read_corpus(name) if score != 0]
    random.Random(seed).shuffle(rows)
    n_train, n_val = int(fractions[0] * len(rows)), int(fractions[1] * len(rows))
    return {
        "train": rows[:n_train],
        "validation": rows[n_train : n_train + n_val],
        "test": rows[n_train + n_val :],
    }

"""Text corpora by name: the built-in one (Python's own docs, offline) and small downloadable ones.

Downloads are cached under `$GPTLAB_HOME/corpora` (default `~/.cache/gptlab/corpora`) through gptlab's
one downloader (storage.download) and checked against a known sha256, so a corpus is fetched once and
a damaged copy is never used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import GptlabError, UsageError
from ..storage.download import fetch_file, gptlab_home, sha256_file

BUILTIN_CORPUS = "python-docs"
BASE_URL_ENV = "GPTLAB_CORPUS_BASE_URL"


@dataclass(frozen=True)
class Corpus:
    """A downloadable text: where it lives, its file name in the cache, and its sha256."""

    name: str
    url: str
    sha256: str
    description: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


CORPORA: dict[str, Corpus] = {
    "the-verdict": Corpus(
        name="the-verdict",
        url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        description="Edith Wharton's short story (20,479 characters), the book's chapter 2 and 5 text",
    ),
}


def builtin_documents() -> list[str]:
    """The built-in corpus: the topic pages of Python's reference documentation (stdlib pydoc_data)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise GptlabError(
            "this Python has no pydoc_data module, so the built-in corpus is unavailable; pass --data PATH"
        ) from exc
    docs = (reflow(topics[key], keep_code=False) for key in sorted(topics))
    return [doc for doc in docs if doc]


_UNDERLINE = re.compile(r"^([*=~^-])\1{2,}$")


def reflow(text: str, keep_code: bool = True) -> str:
    """Prose paragraphs on one line each; indented blocks (code, grammar, tables) kept or dropped.

    The docs are hard-wrapped at ~70 columns with heading underlines and two spaces after full stops,
    and more than half of their tokens are code, grammar rules and tables. Left as is, a tiny model
    trained for minutes learns mostly newlines and underscores; the built-in corpus therefore keeps
    the prose only, one paragraph per line (about 52,000 tokens of English).
    """
    lines = [line for line in text.strip().split("\n") if not _UNDERLINE.match(line.strip())]
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", "\n".join(lines)):
        block_lines = block.split("\n")
        if block.strip() and all(line and not line[0].isspace() for line in block_lines):
            block = re.sub(r" {2,}", " ", " ".join(line.strip() for line in block_lines))
        elif not keep_code:
            continue
        if block.strip():
            paragraphs.append(block)
    return "\n\n".join(paragraphs)


def corpus_url(corpus: Corpus, base_url: str | None = None) -> str:
    """The corpus's URL, or its file name under `base_url` (argument, else $GPTLAB_CORPUS_BASE_URL)."""
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    return f"{base_url.rstrip('/')}/{corpus.filename}" if base_url else corpus.url


def fetch_corpus(name_or_corpus: str | Corpus, base_url: str | None = None, cache_dir: Path | None = None) -> Path:
    """Path of a named corpus in the cache, downloading (and verifying) it the first time."""
    corpus = name_or_corpus if isinstance(name_or_corpus, Corpus) else get_corpus(name_or_corpus)
    folder = (cache_dir or gptlab_home()) / "corpora"
    path = folder / corpus.filename
    if path.is_file() and sha256_file(path) == corpus.sha256:
        return path
    # Missing or damaged (its hash no longer matches): fetch it again.
    return fetch_file(corpus_url(corpus, base_url), path, sha256=corpus.sha256, progress=False, timeout=30.0,
                      offline_hint=", or download the file yourself and pass it with --data PATH")


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise UsageError(f"unknown corpus {name!r}; named corpora: {', '.join([BUILTIN_CORPUS, *CORPORA])}")
    return CORPORA[name]

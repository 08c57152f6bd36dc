import hashlib
import http.server
import threading
from functools import partial

import pytest
import torch

from gptlab import create_dataloader
from gptlab.data.corpus import Corpus, builtin_documents, fetch_corpus, reflow
from gptlab.data.text import (
    GPTDataset,
    load_documents,
    make_loaders,
    split_tokens,
    tokenize_documents,
    tokens_needed,
)
from gptlab.errors import GptlabError, UsageError
from gptlab.storage.download import fetch_file
from gptlab.tokenizer import EOT_ID, encode


def test_windows_match_the_book_counts_and_shift():
    ids = list(range(100))
    ds = GPTDataset(ids, max_length=8, stride=4)
    # starts 0, 4, ..., 88 (range(0, 100 - 8, 4)): the book's GPTDatasetV1 windows
    assert len(ds) == len(range(0, 92, 4)) == 23
    x, y = ds[3]
    assert x.tolist() == list(range(12, 20)) and y.tolist() == list(range(13, 21))
    last_x, last_y = ds[len(ds) - 1]
    assert last_x[0].item() == 88 and last_y[-1].item() == 96
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(GPTDataset(ids, max_length=99, stride=1)) == 1
    assert len(GPTDataset(ids, max_length=100, stride=1)) == 0  # no room for the shifted target
    assert len(GPTDataset(ids, max_length=10, stride=10)) == 9


def test_dataloader_batches_and_seeded_order():
    ids = torch.arange(1000)
    a = create_dataloader(ids, batch_size=4, max_length=16, stride=16, shuffle=True, seed=7)
    b = create_dataloader(ids, batch_size=4, max_length=16, stride=16, shuffle=True, seed=7)
    c = create_dataloader(ids, batch_size=4, max_length=16, stride=16, shuffle=True, seed=8)
    first_a = [x[:, 0].tolist() for x, _ in a]
    assert first_a == [x[:, 0].tolist() for x, _ in b]
    assert first_a != [x[:, 0].tolist() for x, _ in c]
    n_windows = len(range(0, 1000 - 16, 16))  # 62
    assert len(a) == n_windows // 4  # drop_last
    x, y = next(iter(a))
    assert x.shape == y.shape == (4, 16) and torch.equal(y[:, :-1], x[:, 1:])
    keep = create_dataloader(ids, batch_size=4, max_length=16, stride=16, shuffle=False, drop_last=False)
    assert len(keep) == -(-n_windows // 4)
    assert [x[0, 0].item() for x, _ in keep][:3] == [0, 64, 128]


def test_dataloader_from_text_and_workers():
    text = "Every effort moves you forward. " * 40
    loader = create_dataloader(text, batch_size=2, max_length=8, stride=8, shuffle=False, num_workers=1)
    x, _ = next(iter(loader))
    assert x[0].tolist() == encode(text)[:8]


def test_split_never_overlaps():
    ids = torch.arange(1000)
    train_ids, val_ids = split_tokens(ids, 0.1)
    assert len(train_ids) == 900 and len(val_ids) == 100
    split = make_loaders(ids, batch_size=2, max_length=10, val_fraction=0.1, seed=1)
    train_tokens = {int(t) for x, y in split.train_loader for t in torch.cat([x, y]).flatten()}
    val_tokens = {int(t) for x, y in split.val_loader for t in torch.cat([x, y]).flatten()}
    assert train_tokens and val_tokens and not train_tokens & val_tokens
    with pytest.raises(UsageError, match="between 0 and 1"):
        split_tokens(ids, 1.0)


def test_too_short_corpus_says_how_many_tokens():
    need = tokens_needed(16, 0.1)
    assert need >= 170  # 17 tokens must fit in the 10% part
    train_ids, val_ids = split_tokens(torch.arange(need), 0.1)
    assert len(train_ids) >= 17 and len(val_ids) >= 17
    with pytest.raises(UsageError, match=f"has 100 tokens.*at least {need:,}"):
        make_loaders(torch.arange(100), batch_size=2, max_length=16, val_fraction=0.1)


def test_read_files_folders_and_bad_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text("\ufefffirst", encoding="utf-8")  # BOM dropped
    (tmp_path / "docs" / "c.md").write_text("third", encoding="utf-8")  # any text file, as prepare reads them
    (tmp_path / "docs" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # binary: skipped, said once
    (tmp_path / "docs" / ".hidden.txt").write_text("hidden", encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 1 binary file.*d.png"):
        assert load_documents([tmp_path / "docs"]) == ["first", "second", "third"]
    ids = tokenize_documents(["first", "second"])
    assert ids.tolist() == encode("first") + [EOT_ID] + encode("second")

    with pytest.raises(UsageError, match="not found"):
        load_documents([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(UsageError, match="empty"):
        load_documents([tmp_path / "empty.txt"])
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8.*0xe9 at offset 3"):
        load_documents([tmp_path / "latin.txt"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UsageError, match="no non-empty text files"):  # a folder gives its text files, any name
        load_documents([tmp_path / "nothing"])


def test_reflow_joins_prose_and_keeps_code():
    text = ("Title\n*****\n\nA wrapped  sentence\nthat goes on.\n\n   for i in x:\n       print(i)\n\n"
            "Last\nline.\n")
    assert reflow(text) == "Title\n\nA wrapped sentence that goes on.\n\n   for i in x:\n       print(i)\n\nLast line."
    assert reflow(text, keep_code=False) == "Title\n\nA wrapped sentence that goes on.\n\nLast line."


def test_builtin_corpus_is_pythons_docs():
    docs = builtin_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 200_000
    assert any("assert" in d and "statement" in d for d in docs)
    assert load_documents(None) == docs


# --- downloads, against a local server only --------------------------------------------------------


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_sha256_and_caches(http_root, tmp_path, monkeypatch):
    root, base = http_root
    body = b"A tiny corpus for the test.\n"
    (root / "tiny.txt").write_bytes(body)
    corpus = Corpus("tiny", "https://example.invalid/x/tiny.txt", hashlib.sha256(body).hexdigest())
    cache = tmp_path / "cache"
    path = fetch_corpus(corpus, base_url=base, cache_dir=cache)
    assert path == cache / "corpora" / "tiny.txt" and path.read_bytes() == body
    (root / "tiny.txt").unlink()  # cached: no second download
    assert fetch_corpus(corpus, base_url=base, cache_dir=cache).read_bytes() == body

    monkeypatch.setenv("GPTLAB_CORPUS_BASE_URL", base)  # the env var works as the base URL too
    (root / "tiny.txt").write_bytes(body)
    path.write_bytes(b"damaged")  # a damaged cached copy is fetched again
    assert fetch_corpus(corpus, cache_dir=cache).read_bytes() == body


def test_download_errors_leave_nothing(http_root, tmp_path):
    root, base = http_root
    (root / "f.txt").write_bytes(b"other content")
    dest = tmp_path / "out" / "f.txt"
    with pytest.raises(GptlabError, match="sha256"):
        fetch_file(f"{base}/f.txt", dest, sha256="0" * 64, progress=False)
    with pytest.raises(GptlabError, match="HTTP 404"):
        fetch_file(f"{base}/missing.txt", dest, progress=False)
    closed = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there any more: like being offline
    with pytest.raises(GptlabError, match="offline"):
        fetch_file(f"http://127.0.0.1:{port}/f.txt", dest, timeout=5, progress=False)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_named_corpus_uses_gptlab_home(http_root, tmp_path, monkeypatch):
    _, base = http_root
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPTLAB_CORPUS_BASE_URL", base)  # the server lacks the file: a clear error
    with pytest.raises(GptlabError, match="the-verdict.txt: HTTP 404"):
        load_documents(["the-verdict"])
    assert not (tmp_path / "home" / "corpora" / "the-verdict.txt").exists()

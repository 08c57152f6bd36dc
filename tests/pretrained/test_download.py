"""Downloads against a local HTTP server on 127.0.0.1 (Range support, dropped connections, errors)."""

import http.server
import shutil
import socket
import threading

import pytest
import torch

from gptlab import GptlabError, UsageError, load_pretrained
from gptlab.config import get_preset
from gptlab.pretrained.download import OPENAI_FILES, download_model
from gptlab.pretrained.resolve import load_model_arg
from gptlab.storage import download
from gptlab.storage.download import fetch_file
from tests.gpt2_refs import assert_same_model, random_hf_model
from tests.helpers import FIXTURES, assert_clean_error, run_cli

FIXTURE = FIXTURES / "openai_tiny"


class FileServer:
    """Serves `files` (URL path -> bytes) with HTTP Range; can drop a connection once mid-file."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: dict[str, int] = {}
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if server.ignore_range:
                    rng = None
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_error(416, "Range Not Satisfiable")
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.drop_after.pop(self.path, None)
                if cut is not None:  # send part of the body, then hang up
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(files):
        servers.append(FileServer(files))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def openai_files(size: str) -> dict[str, bytes]:
    """The seven files of OpenAI's layout; the tiny fixture stands in for the model."""
    files = {f"/{size}/{p.name}": p.read_bytes() for p in FIXTURE.iterdir()}
    files[f"/{size}/encoder.json"] = b'{"!": 0}'
    files[f"/{size}/vocab.bpe"] = b"#version: 0.2\n"
    assert sorted(k.split("/")[-1] for k in files) == sorted(OPENAI_FILES)
    return files


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTLAB_OPENAI_MIRROR_URL", raising=False)
    monkeypatch.setattr(download, "ATTEMPTS", 3)
    return tmp_path / "home"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_download_resumes_after_dropped_connection(serve, home, monkeypatch):
    server = serve(openai_files("774M"))
    monkeypatch.setenv("GPTLAB_OPENAI_URL", server.url)
    server.drop_after["/774M/model.ckpt.data-00000-of-00001"] = 5000
    folder = download_model("gpt2-large", progress=False)
    assert folder == home / "openai" / "774M"
    for name in OPENAI_FILES:
        assert (folder / name).read_bytes() == server.files[f"/774M/{name}"]
    assert not list(folder.glob("*.part"))
    assert ("/774M/model.ckpt.data-00000-of-00001", "bytes=5000-") in server.requests  # resumed, not restarted
    server.requests.clear()
    download_model("774M", progress=False)  # everything cached: nothing fetched
    assert server.requests == []


def test_interrupted_download_resumes_on_next_run(serve, home, monkeypatch, tmp_path):
    data = bytes(range(256)) * 200
    server = serve({"/f.bin": data})
    server.drop_after["/f.bin"] = 12345
    dest = tmp_path / "f.bin"
    with pytest.raises(GptlabError, match="run the same command again to resume"):
        fetch_file(f"{server.url}/f.bin", dest, progress=False, attempts=1)
    assert not dest.exists() and (tmp_path / "f.bin.part").stat().st_size == 12345
    fetch_file(f"{server.url}/f.bin", dest, progress=False, attempts=1)
    assert dest.read_bytes() == data and server.requests[-1] == ("/f.bin", "bytes=12345-")
    # a server that ignores Range sends the whole file again: it must replace the partial one
    server.drop_after["/f.bin"] = 777
    with pytest.raises(GptlabError):
        fetch_file(f"{server.url}/f.bin", tmp_path / "g.bin", progress=False, attempts=1)
    server.ignore_range = True
    fetch_file(f"{server.url}/f.bin", tmp_path / "g.bin", progress=False, attempts=1)
    assert (tmp_path / "g.bin").read_bytes() == data


def test_wrong_size_and_wrong_hash_are_refused(serve, home, monkeypatch, tmp_path):
    # gpt2-small's sizes are known facts; the stand-in checkpoint file happens to match OpenAI's 77 bytes
    server = serve(openai_files("124M"))
    monkeypatch.setenv("GPTLAB_OPENAI_URL", server.url)
    with pytest.raises(GptlabError, match="encoder.json should be 1042301"):
        download_model("gpt2-small", progress=False)
    assert not (home / "openai" / "124M" / "encoder.json").exists()
    assert not (home / "openai" / "124M" / "encoder.json.part").exists()
    with pytest.raises(GptlabError, match="sha256"):
        fetch_file(f"{server.url}/124M/hparams.json", tmp_path / "h.json", sha256="0" * 64, progress=False)
    assert not (tmp_path / "h.json").exists() and not (tmp_path / "h.json.part").exists()


def test_http_404_and_mirror_fallback(serve, home, monkeypatch):
    empty = serve({})
    monkeypatch.setenv("GPTLAB_OPENAI_URL", empty.url)
    with pytest.raises(GptlabError, match="HTTP 404"):
        download_model("gpt2-xl", progress=False)
    mirror = serve(openai_files("1558M"))
    monkeypatch.setenv("GPTLAB_OPENAI_MIRROR_URL", mirror.url)
    folder = download_model("gpt2-xl", progress=False)
    assert (folder / "hparams.json").read_bytes() == (FIXTURE / "hparams.json").read_bytes()


def test_offline_is_one_clean_line(tmp_path):
    env = {"GPTLAB_HOME": str(tmp_path), "GPTLAB_OPENAI_URL": f"http://127.0.0.1:{free_port()}"}
    proc = run_cli("download", "gpt2-medium", env=env)
    assert_clean_error(proc, 1, "cannot reach 127.0.0.1", "connection", "point --model at a GPT-2 folder")
    with pytest.raises(UsageError, match="gpt2-huge.*gpt2-small"):
        download_model("gpt2-huge")


def test_name_downloads_when_absent_then_uses_cache(serve, home, monkeypatch, capsys):
    server = serve(openai_files("774M"))
    monkeypatch.setenv("GPTLAB_OPENAI_URL", server.url)
    model = load_pretrained("gpt2-large")
    assert "not in the cache" in capsys.readouterr().err
    assert model.config.vocab_size == 97  # the stand-in's hparams.json
    server.requests.clear()
    again = load_model_arg("774M")  # the CLI's --model: a GPT-2 name means trained weights
    assert server.requests == []
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    random = load_model_arg("random:gpt2-small")  # explicit random init: no download
    assert random.config == get_preset("gpt2-small") and server.requests == []


def test_huggingface_source(serve, home, monkeypatch, tmp_path):
    hf = random_hf_model(9, vocab_size=80, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    hf.save_pretrained(tmp_path / "hf")
    repo = "/openai-community/gpt2-medium/resolve/main"
    server = serve({f"{repo}/{n}": (tmp_path / "hf" / n).read_bytes() for n in ("config.json", "model.safetensors")})
    monkeypatch.setenv("GPTLAB_HF_URL", server.url)
    folder = download_model("355M", "huggingface", progress=False)
    assert folder == home / "huggingface" / "gpt2-medium"
    assert_same_model(load_pretrained("gpt2-medium"), hf, 80)  # no OpenAI copy cached: the HF one is used
    shutil.rmtree(folder)

"""OpenAI's TensorFlow checkpoints, read without TensorFlow, against a genuine TF-written fixture."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab import GptlabError, load_pretrained
from gptlab.pretrained.crc32c import crc32c, mask, unmask
from gptlab.pretrained.openai import verified_marker
from gptlab.pretrained.tf_checkpoint import TFCheckpoint, find_prefix, read_index
from tests.gpt2_refs import assert_same_model, hf_from_openai_values
from tests.helpers import FIXTURES, run_cli

FIXTURE = FIXTURES / "openai_tiny"
READBACK = FIXTURES / "openai_tiny_tf_readback.json"


@pytest.fixture
def openai_dir(tmp_path, monkeypatch) -> Path:
    """A private copy of the fixture, and a private cache home (where the verified-marker goes)."""
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path / "home"))
    folder = tmp_path / "openai_tiny"
    shutil.copytree(FIXTURE, folder)
    return folder


def test_crc32c_known_values_and_lanes():
    assert crc32c(b"123456789", use_native=False) == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(b"", use_native=False) == 0
    assert crc32c(bytes(32), use_native=False) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32, use_native=False) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of ones
    assert unmask(mask(0x12345678)) == 0x12345678
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes()  # several lane passes and a tail
    from gptlab.pretrained.crc32c import _bytes_raw

    expected = _bytes_raw(0xFFFFFFFF, data) ^ 0xFFFFFFFF  # the plain byte-at-a-time definition
    assert crc32c(data, use_native=False) == expected
    assert crc32c(np.frombuffer(data, dtype=np.uint8), use_native=False) == expected


def test_reader_matches_tensorflow_readback():
    """Every tensor equals, bit for bit, what TensorFlow itself read from the same files."""
    ref = json.loads(READBACK.read_text())
    ckpt = TFCheckpoint(find_prefix(FIXTURE))
    assert ckpt.names == sorted(ref)
    for name, want in ref.items():
        arr = ckpt.read(name)
        assert list(arr.shape) == want["shape"] and str(arr.dtype) == want["dtype"], name
        assert hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() == want["sha256"], name
    assert ckpt.shape("model/h1/attn/c_attn/w") == (1, 24, 72)


def test_openai_folder_matches_transformers_on_same_weights(openai_dir):
    hparams = json.loads((openai_dir / "hparams.json").read_text())
    ckpt = TFCheckpoint(find_prefix(openai_dir))
    hf = hf_from_openai_values({n: ckpt.read(n) for n in ckpt.names}, hparams)
    model = load_pretrained(openai_dir)
    assert model.config.vocab_size == 97 and model.config.n_heads == 3 and model.config.n_layers == 2
    assert_same_model(model, hf, hparams["n_vocab"], seq=12, new_tokens=4)


def test_damaged_data_is_detected(openai_dir):
    folder = openai_dir
    load_pretrained(folder)  # verified once: a marker now vouches for these exact data files
    assert verified_marker(folder / "model.ckpt").is_file()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in FIXTURE.iterdir())  # nothing added
    data = folder / "model.ckpt.data-00000-of-00001"
    blob = bytearray(data.read_bytes())
    blob[1000] ^= 0x01  # one flipped bit (the new mtime invalidates the marker)
    data.write_bytes(bytes(blob))
    with pytest.raises(GptlabError, match="CRC-32C"):
        load_pretrained(folder)
    data.write_bytes(bytes(blob[:-100]))  # truncated
    with pytest.raises(GptlabError, match="truncated"):
        load_pretrained(folder)
    index = folder / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    raw[20] ^= 0x40
    index.write_bytes(bytes(raw))
    with pytest.raises(GptlabError, match="damaged"):
        read_index(index)


def test_hparams_mismatch_names_tensor(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    hp = json.loads((folder / "hparams.json").read_text())
    hp["n_vocab"] = 100
    (folder / "hparams.json").write_text(json.dumps(hp))
    with pytest.raises(GptlabError) as err:
        load_pretrained(folder)
    assert "model/wte" in str(err.value) and "(97, 24)" in str(err.value) and "(100, 24)" in str(err.value)


def test_cli_convert_openai_to_gptlab_and_dtype(openai_dir, tmp_path):
    proc = run_cli("convert", str(openai_dir), "--to", "gptlab", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    a, b = load_pretrained(openai_dir), load_pretrained(tmp_path / "g")
    ids = torch.arange(12)[None] % 97
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    half = load_pretrained(openai_dir, dtype=torch.bfloat16)
    assert half.tok_emb.weight.dtype == torch.bfloat16 and half.out_head.weight is half.tok_emb.weight

"""Untrusted weights through the public loaders: lying headers, old torch, pickles that run code."""

import json
import os
import pickle
import struct

import pytest
import torch

from gptlab import GptlabError, GPTModel, load_model, load_pretrained, save_model
from gptlab.storage.safe_load import require_safe_torch, safe_torch_load
from tests.helpers import tiny_config


def _lying_folder(tmp_path):
    folder = tmp_path / "m"
    save_model(GPTModel(tiny_config()), folder)
    # 50257 x 10^7 floats (2 TB) claimed, 64 bytes present: allocating it would kill the machine
    header = json.dumps({"tok_emb.weight": {"dtype": "F32", "shape": [50257, 10**7],
                                            "data_offsets": [0, 4 * 50257 * 10**7]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    return folder


def test_huge_header_is_refused_by_every_loader(tmp_path):
    folder = _lying_folder(tmp_path)
    for load in (load_pretrained, load_model):
        with pytest.raises(GptlabError, match="tok_emb.weight claims"):
            load(folder)
    with pytest.raises(GptlabError, match="tok_emb.weight claims"):
        load_pretrained(folder / "model.safetensors")


def test_wrong_shape_is_refused_before_reading(tmp_path):
    folder = tmp_path / "m"
    save_model(GPTModel(tiny_config()), folder)
    (folder / "config.json").write_text(json.dumps({**tiny_config().to_dict(), "n_layers": 1}))
    with pytest.raises(GptlabError, match="unexpected"):
        load_model(folder)


def test_old_torch_is_refused(monkeypatch, tmp_path):
    with pytest.raises(GptlabError, match="CVE-2025-32434"):
        require_safe_torch("2.5.1+cu121")
    require_safe_torch("2.6.0")
    require_safe_torch("2.13.0+cpu")
    torch.save({"w": torch.ones(1)}, tmp_path / "ok.pt")
    monkeypatch.setattr(torch, "__version__", "2.4.0")
    with pytest.raises(GptlabError, match="upgrade"):
        safe_torch_load(tmp_path / "ok.pt")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED_MARKER",))


def test_book_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "model.pth", "wb") as fh:
        pickle.dump({"tok_emb.weight": _RunsCode()}, fh)
    with pytest.raises(GptlabError, match="refusing to load"):
        load_pretrained(tmp_path / "model.pth")
    assert not (tmp_path / "PWNED_MARKER").exists()

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from gptlab.errors import GptlabError, UsageError
from gptlab.storage.files import RunLock, atomic_open
from gptlab.storage.safe_load import inspect_safetensors, safe_torch_load
from tests.helpers import SRC


class _RunsCode:
    """Unpickling this would call os.system: the classic pickle attack."""

    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED_MARKER",))


def test_crafted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"model": _RunsCode()}, fh)
    with pytest.raises(GptlabError, match="refusing to load"):
        safe_torch_load(evil)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_plain_state_loads(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt")["step"] == 3
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:50])
    with pytest.raises(GptlabError, match="not a readable"):
        safe_torch_load(tmp_path / "trunc.pt")
    with pytest.raises(UsageError, match="not found"):
        safe_torch_load(tmp_path / "missing.pt")


def _write_raw_safetensors(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_header_claiming_huge_tensor_is_refused_without_allocating(tmp_path):
    bad = tmp_path / "huge.safetensors"
    # 10^12 floats claimed, 16 bytes present: must fail on the header alone
    _write_raw_safetensors(bad, {"w": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4 * 10**12]}},
                           b"\0" * 16)
    with pytest.raises(GptlabError, match="truncated or corrupt"):
        inspect_safetensors(bad)


def test_header_checks(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(good))
    info = inspect_safetensors(good, expected={"a": (2, 3), "b": (4,)})
    assert info == {"a": ("F32", (2, 3)), "b": ("BF16", (4,))}
    with pytest.raises(GptlabError, match=r"tensor a has shape \(2, 3\) but the config expects \(3, 2\)"):
        inspect_safetensors(good, expected={"a": (3, 2), "b": (4,)})
    with pytest.raises(GptlabError, match="missing"):
        inspect_safetensors(good, expected={"a": (2, 3), "b": (4,), "c": (1,)})
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(GptlabError, match="truncated"):
        inspect_safetensors(truncated)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(GptlabError, match="corrupt"):
        inspect_safetensors(tmp_path / "junk.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write("new, half written")
            raise RuntimeError("crash in the middle")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_atomic_write_gives_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "out.txt") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_run_lock_excludes_a_second_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; sys.path.insert(0, sys.argv[1]); from gptlab.storage.files import RunLock; "
         "l = RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(30)", SRC, str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(GptlabError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the OS released the dead holder's lock
        pass

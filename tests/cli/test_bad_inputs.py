"""The bad-input matrix: every verb, many broken inputs, each answered by the right exit status and ONE clear
line on stderr (no traceback), with no half-written file left behind. Cases run as real subprocesses, 4 at a
time, and all failures are reported together."""

import json
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptlab.model import GPTModel
from gptlab.pretrained.native import save_model
from tests.helpers import run_cli, tiny_config

ENV = {"OMP_NUM_THREADS": "1"}


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED_MARKER",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.txt").write_text("the model reads every word and learns " * 200, encoding="utf-8")
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (d / "latin1.txt").write_bytes("caf\xe9 na\xefve \xff\xfe".encode("latin-1") * 100)
    (d / "notes").mkdir()
    (d / "notes" / "readme.md").write_text("not a model", encoding="utf-8")
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    save_model(model, d / "model")
    for name in ("badjson", "truncated", "mismatch", "huge", "emptycfg", "hugeline", "wrongtype"):
        save_model(model, d / name)
    (d / "badjson" / "config.json").write_text('{"vocab_size": 50257, "emb_dim": ', encoding="utf-8")
    (d / "emptycfg" / "config.json").write_text("", encoding="utf-8")
    (d / "hugeline" / "config.json").write_text("x" * 2_000_000, encoding="utf-8")
    (d / "wrongtype" / "config.json").write_text(json.dumps({**tiny_config().to_dict(), "n_layers": "two"}))
    weights = (d / "model" / "model.safetensors").read_bytes()
    (d / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (d / "mismatch" / "config.json").write_text(json.dumps({**tiny_config().to_dict(), "emb_dim": 64}))
    header = json.dumps({"tok_emb.weight": {"dtype": "F32", "shape": [50257, 10**7],
                                            "data_offsets": [0, 4 * 50257 * 10**7]}}).encode()
    (d / "huge" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with open(d / "evil.pth", "wb") as fh:
        pickle.dump({"model_state_dict": _RunsCode()}, fh)
    (d / "badcfg.json").write_text("{not json", encoding="utf-8")
    (d / "run").mkdir()
    (d / "run" / "train_config.json").write_text("{}", encoding="utf-8")
    (d / "emptydir").mkdir()
    (d / "cfgonly").mkdir()
    (d / "cfgonly" / "config.json").write_text(json.dumps(tiny_config().to_dict()), encoding="utf-8")
    (d / "program").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + bytes(range(256)) * 8)  # an executable
    (d / "typo.json").write_text(json.dumps({**{k: v for k, v in tiny_config().to_dict().items() if k != "n_heads"},
                                             "n_head": 4}), encoding="utf-8")
    return d


def cases(d):
    """(verb args, expected exit status, words the error line must contain)."""
    m = str(d / "model")
    t = str(d / "text.txt")
    gen = ("generate", "--model", m, "--prompt", "hi")
    plot = ("sampling-plot", "--model", m, "--prompt", "hi", "--out", str(d / "plot.png"))
    return [
        # --- usage errors: argparse types and ranges (exit 2) ---
        (("nosuchverb",), 2, "invalid choice"),
        (("train", "--batch-size", "0"), 2, "--batch-size"),
        (("train", "--batch-size", "abc"), 2, "whole number"),
        (("train", "--lr", "-1"), 2, "--lr"),
        (("train", "--lr", "nan"), 2, "finite"),
        (("train", "--val-fraction", "1.5"), 2, "between 0 and 1"),
        (("train", "--drop-rate", "1"), 2, "--drop-rate"),
        (("train", "--epochs", "-3"), 2, "--epochs"),
        (("train", "--skip-nonfinite", "-1"), 2, "--skip-nonfinite"),
        (("train", "--dtype", "float8"), 2, "invalid choice"),
        (("train", "--resume"), 2, "--out"),
        (("train", "--resume", "--force", "--out", str(d / "x")), 2, "contradict"),
        (("train", "--model", "gpt-nano", "--init", m), 2, "not both"),
        (("eval", "--text", "hi"), 2, "--model"),
        (("eval", "--model", m, "--text", "hi", "--batch-size", "0"), 2, "--batch-size"),
        (("eval", "--model", m, "--text", "hi", "--stride", "x"), 2, "--stride"),
        ((*gen, "--temperature", "-1"), 2, "--temperature"),
        ((*gen, "--top-p", "2"), 2, "--top-p"),
        ((*gen, "--max-new-tokens", "-1"), 2, "--max-new-tokens"),
        ((*gen, "--top-k", "abc"), 2, "--top-k"),
        ((*plot, "--temperatures", "abc"), 2, "--temperatures"),
        ((*plot, "--candidates", "0"), 2, "--candidates"),
        (("download", "gpt5-giant"), 2, "gpt5-giant"),
        (("download", "--source", "xyz", "gpt2"), 2, "invalid choice"),
        (("convert", "--to", "xyz", m, str(d / "c")), 2, "invalid choice"),
        (("prepare", "--data", t, "--out", str(d / "p0"), "--val-fraction", "0"), 2, "--val-fraction"),
        (("prepare", "--data", t, "--out", str(d / "p1"), "--workers", "-1"), 2, "--workers"),
        (("info",), 2, "--model"),
        (("serve", "--model", m, "--port", "70000"), 2, "--port"),
        (("serve", "--model", m, "--max-batch", "0"), 2, "--max-batch"),
        (("serve", "--model", m, "--max-body-bytes", "-5"), 2, "--max-body-bytes"),
        # --- unknown presets and models ---
        (("train", "--model", "gpt-enormous", "--data", t), 2, "gpt-enormous"),
        ((*gen[:2], "no-such-model", "--prompt", "hi"), 2, "no-such-model"),
        (("info", "--model", "gpt-enormous"), 2, "gpt-enormous"),
        (("serve", "--model", "no-such-model", "--port", "0"), 2, "no-such-model"),
        # --- missing, empty, binary, non-UTF-8 input files ---
        (("train", "--data", str(d / "missing.txt"), "--out", str(d / "r1")), 2, "missing.txt"),
        (("train", "--data", str(d / "empty.txt"), "--out", str(d / "r2")), 2, "empty.txt"),
        (("train", "--data", str(d / "binary.bin"), "--out", str(d / "r3")), 2, "binary.bin"),
        (("train", "--data", str(d / "latin1.txt"), "--out", str(d / "r4")), 2, "latin1.txt"),
        (("eval", "--model", m, "--data", str(d / "missing.txt")), 2, "missing.txt"),
        (("eval", "--model", m, "--data", str(d / "empty.txt")), 2, "empty.txt"),
        (("eval", "--model", m, "--data", str(d / "binary.bin")), 2, "binary.bin"),
        (("eval", "--model", m, "--data", str(d / "latin1.txt")), 2, "latin1.txt"),
        (("prepare", "--data", str(d / "missing.txt"), "--out", str(d / "p2")), 2, "missing.txt"),
        (("prepare", "--data", str(d / "empty.txt"), "--out", str(d / "p3")), 2, "empty"),
        (("prepare", "--data", str(d / "binary.bin"), "--out", str(d / "p4")), 2, "binary.bin"),
        # --- broken model folders and weights ---
        (("info", "--model", str(d / "notes")), 2, "notes"),
        (("info", "--model", str(d / "badjson")), 2, "config.json"),
        (("info", "--model", str(d / "emptycfg")), 2, "config.json"),
        (("info", "--model", str(d / "hugeline")), 2, "config.json"),
        (("info", "--model", str(d / "wrongtype")), 2, "n_layers"),
        (("eval", "--model", str(d / "truncated"), "--text", "hi"), 1, "truncated"),
        (("eval", "--model", str(d / "mismatch"), "--text", "hi"), 1, "shape"),
        (("generate", "--model", str(d / "huge"), "--prompt", "hi"), 1, "tok_emb.weight"),
        (("generate", "--model", str(d / "evil.pth"), "--prompt", "hi"), 1, "refusing"),
        (("serve", "--model", str(d / "truncated"), "--port", "0"), 1, "truncated"),
        (("convert", "--to", "hf", str(d / "evil.pth"), str(d / "c1")), 1, "refusing"),
        (("train", "--init", str(d / "truncated"), "--data", t, "--out", str(d / "r5")), 1, "truncated"),
        (("train", "--model", str(d / "badcfg.json"), "--data", t, "--out", str(d / "r6")), 2, "badcfg.json"),
        # --- mistakes a new user makes ---
        ((*gen[:2], str(d / "cfgonly"), "--prompt", "hi"), 2, "no weights file"),
        (("train", "--data", str(d / "program"), "--out", str(d / "r7")), 2, "binary file"),
        (("prepare", "--data", str(d / "program"), "--out", str(d / "p5")), 2, "binary file"),
        ((*gen[:2], "gpt-nanoo", "--prompt", "hi"), 2, "did you mean 'gpt-nano'"),
        (("info", "--model", str(d / "typo.json")), 2, "did you mean 'n_heads'"),
        (("convert", "--to", "hf", m, str(d / "run")), 2, "training run folder"),
        (("convert", "--to", "gptlab", m, str(d / "notes")), 2, "--force"),
        # --- run folders ---
        (("train", "--data", t, "--out", str(d / "run")), 2, "--resume"),
        (("train", "--data", t, "--out", str(d / "emptydir"), "--resume"), 2, "nothing to resume"),
        (("eval", "--model", m, "--text", "hi", "--context-length", "999"), 2, "context"),
        # --- unwritable outputs (a path under a regular file; chmod does not stop root) ---
        (("train", "--data", t, "--out", str(d / "text.txt" / "run")), 2, "--out"),
        (("prepare", "--data", t, "--out", str(d / "text.txt" / "prep")), 1, "text.txt"),
        ((*plot[:-1], str(d / "text.txt" / "plot.png")), 1, "text.txt"),
        (("convert", "--to", "hf", m, str(d / "text.txt" / "hf")), 1, "text.txt"),
        (("sampling-plot", "--model", m, "--prompt", "hi", "--out", "/proc/gptlab-plot.png"), 1, "gptlab-plot"),
    ]


def check(proc, code, needle):
    """'' if the answer is right, else what is wrong with it."""
    err = proc.stderr
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    problems = []
    if proc.returncode != code:
        problems.append(f"exit {proc.returncode} (want {code})")
    if "Traceback" in err:
        problems.append("traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines")
    elif needle.lower() not in lines[0].lower():
        problems.append(f"error line lacks {needle!r}")
    return "; ".join(problems) + (f"\n    stderr: {err.strip()[-400:]}" if problems else "")


def test_bad_input_matrix(files):
    table = cases(files)
    assert len(table) >= 40
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda case: run_cli(*case[0], cwd=files, env=ENV, timeout=300), table))
    failures = []
    for (args, code, needle), proc in zip(table, procs, strict=True):
        problem = check(proc, code, needle)
        if problem:
            failures.append(f"gptlab {' '.join(a[-40:] for a in args)}: {problem}")
    leftovers = sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.name.endswith(".tmp"))
    assert not (files / "PWNED_MARKER").exists(), "a pickle ran code"
    assert not leftovers, f"half-written files left: {leftovers}"
    for made in ("r1", "r2", "r3", "r4", "r5", "r6", "r7", "p0", "p2", "p3", "p4", "p5", "c", "c1", "plot.png"):
        path = files / made
        assert not path.exists() or (path.is_dir() and not any(path.iterdir())), f"{made} was created"
    assert not failures, f"{len(failures)} of {len(table)} bad inputs answered badly:\n" + "\n".join(failures)

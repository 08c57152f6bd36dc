"""The bad-input matrix: every verb, many broken inputs, each answered by the right exit status and ONE clear
line on stderr (no traceback), with no half-written file left behind. Cases run as real subprocesses, 4 at a
time, and all failures are reported together."""

import json
import os
import pickle
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptlab.data.prepare import prepare_dataset
from gptlab.model import GPTModel
from gptlab.pretrained.native import save_model
from gptlab.tokenizer import write_tokenizer
from gptlab.tokenizer.train import train_tokenizer
from tests.helpers import TINY_TRAIN_MODEL, run_cli, synthetic_tokenizer, tiny_config

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
    fine_tuning_files(d, model)
    _tokenizer_files(d)
    return d


def fine_tuning_files(d, model):
    """Instruction and classification data, good and broken; a classifier; an adapter made for another model."""
    from gptlab.finetune.classifier import build_classifier, save_classifier_info
    from gptlab.finetune.lora import save_adapter
    from tests.helpers import write_instructions, write_labelled_csv

    write_instructions(d / "inst.json")
    (d / "malformed.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]')
    (d / "nooutput.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    (d / "nonstring.jsonl").write_text('{"instruction": "a", "input": 7, "output": "b"}\n')
    (d / "empty.json").write_text("")
    write_labelled_csv(d / "cls.csv", 30)
    (d / "nocol.csv").write_text("review,stars\ngreat,5\n")
    (d / "oneclass.csv").write_text("text,label\ngreat,pos\nfine,pos\nnice,pos\n")
    (d / "valextra.csv").write_text("text,label\ngreat,pos\nso so,meh\n")
    classifier = build_classifier(model, 2, ["neg", "pos"])
    save_model(classifier, d / "classifier")
    save_classifier_info(d / "classifier", ["neg", "pos"])
    other = tiny_config(emb_dim=64).to_dict()
    save_adapter(d / "adapter", {}, {"task": "instruct", "r": 2, "alpha": 4, "dropout": 0.0, "targets": ["qkv"],
                                     "base_config": other, "base_fingerprint": "0"})
    for name, settings in (("ftrun", {"task": "instruct"}), ("trainrun", {"model": "gpt-nano"})):
        (d / name).mkdir()
        (d / name / "train_config.json").write_text(json.dumps(settings))
        (d / name / "checkpoint.pt").write_bytes(b"not read: the settings are checked first")


def fine_tuning_cases(d, m):
    def ft(out, data, *extra):
        return ("finetune", "--init", m, "--data", str(d / data), "--out", str(d / out), *extra)

    clf = str(d / "classifier")
    return [
        (ft("f1", "malformed.json"), 2, "line 2"),
        (ft("f2", "nooutput.jsonl"), 2, "record 2 (line 2): missing 'output'"),
        (ft("f3", "nonstring.jsonl"), 2, "'input' must be a string"),
        (ft("f4", "empty.json"), 2, "empty"),
        (ft("f5", "nocol.csv", "--task", "classify"), 2, "no column 'text'"),
        (ft("f6", "oneclass.csv", "--task", "classify"), 2, "single class"),
        (ft("f7", "cls.csv", "--task", "classify", "--val-data", str(d / "valextra.csv")), 2, "lacks"),
        (ft("f8", "inst.json", "--lora-r", "0"), 2, "--lora-r"),
        (ft("f8", "inst.json", "--method", "lora", "--lora-r", "-3"), 2, "--lora-r"),
        (ft("f9", "inst.json", "--adapter", str(d / "adapter")), 2, "another base model"),
        (ft("f10", "cls.csv"), 2, "--task classify"),
        (ft("f11", "inst.json", "--task", "classify"), 2, "instruction data"),
        (("finetune", "--data", str(d / "inst.json"), "--out", str(d / "f12")), 2, "--init"),
        (ft("f13", "inst.json", "--method", "lora", "--lora-targets", "c_attn"), 2, "--lora-targets"),
        (ft("f14", "inst.json", "--max-length", "999"), 2, "--max-length"),
        (ft("f15", "inst.json", "--adapter", str(d / "adapter"), "--lora-alpha", "2"), 2, "own LoRA settings"),
        (ft("f16", "inst.json", "--trainable", "head"), 2, "--trainable"),
        (("classify", "--model", m, "--text", "hi"), 2, "not a classifier"),
        (("classify", "--model", clf, "--data", str(d / "nocol.csv")), 2, "no column 'text'"),
        (("classify", "--model", clf, "--data", str(d / "empty.json")), 2, "empty"),
        (("generate", "--model", clf, "--prompt", "hi"), 2, "classifier"),
        (("eval", "--model", clf, "--text", "hi there"), 2, "classifier"),
        (("generate", "--model", m, "--prompt", "hi", "--input", "x"), 2, "--instruction"),
        (("generate", "--model", m, "--prompt", "hi", "--instruction", "x"), 2, "not allowed with"),
        (("train", "--out", str(d / "ftrun"), "--resume"), 2, "gptlab finetune --out"),
        (("finetune", "--out", str(d / "trainrun"), "--resume"), 2, "gptlab train --out"),
    ]


def _tokenizer_files(d):
    """Tokenizer folders (good, damaged, 70k), models and runs that disagree with theirs, GPT-2 token files."""
    (d / "blank.txt").write_text(" \n\t\n  ", encoding="utf-8")
    (d / "tiny.json").write_text(json.dumps(TINY_TRAIN_MODEL), encoding="utf-8")
    tok = train_tokenizer([d / "text.txt"], 300, d / "tok", progress=False)
    shutil.copytree(d / "tok", d / "badtok")
    (d / "badtok" / "tokenizer.json").write_text((d / "tok" / "tokenizer.json").read_text().replace('"merges"', '"merges" '))
    synthetic_tokenizer(d / "syn70k")
    prepare_dataset([d / "text.txt"], d / "gpt2prep", progress=False)
    model = GPTModel(tiny_config(vocab_size=tok.n_vocab))
    model.tokenizer = tok
    save_model(model, d / "tokmodel")
    save_model(GPTModel(tiny_config(vocab_size=tok.n_vocab + 5)), d / "tokmismatch")
    write_tokenizer(tok, d / "tokmismatch")
    shutil.copytree(d / "tokmodel", d / "tokrun")
    (d / "tokrun" / "checkpoint.pt").write_bytes(b"")
    (d / "tokrun" / "train_config.json").write_text("{}", encoding="utf-8")


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
        *fine_tuning_cases(d, m),
        *tokenizer_cases(d, t),
    ]


def tokenizer_cases(d, t):
    """Own tokenizers: bad training settings and corpora, missing or damaged folders, tokenizers that disagree."""
    train_tok = ("tokenizer", "train", "--data")
    tiny = ("--model", str(d / "tiny.json"))
    return [
        ((*train_tok, t, "--vocab-size", "256", "--out", str(d / "tk1")), 2, "at least 257"),
        ((*train_tok, t, "--vocab-size", "258", "--special-tokens", "<a>", "<b>", "--out", str(d / "tk2")), 2,
         "at least 259"),
        ((*train_tok, str(d / "empty.txt"), "--vocab-size", "300", "--out", str(d / "tk3")), 2, "empty.txt"),
        ((*train_tok, str(d / "blank.txt"), "--vocab-size", "300", "--out", str(d / "tk4")), 2, "corpus is empty"),
        ((*train_tok, str(d / "latin1.txt"), "--vocab-size", "300", "--out", str(d / "tk5")), 2,
         "latin1.txt is not UTF-8 text (byte 3"),
        ((*train_tok, str(d / "missing.txt"), "--vocab-size", "300", "--out", str(d / "tk6")), 2, "missing.txt"),
        ((*train_tok, t, "--vocab-size", "300", "--max-bytes", "lots", "--out", str(d / "tk7")), 2, "--max-bytes"),
        ((*train_tok, t, "--vocab-size", "300", "--out", str(d / "tok")), 2, "--force"),
        (("tokenizer", "info", str(d / "nope")), 2, "does not exist"),
        (("tokenizer", "info", str(d / "badtok")), 2, "changed or damaged"),
        (("tokenizer", "encode", str(d / "notes"), "--text", "hi"), 2, "tokenizer.json is missing"),
        (("prepare", "--data", t, "--out", str(d / "p6"), "--tokenizer", str(d / "badtok")), 2, "changed or damaged"),
        (("train", "--data", t, "--tokenizer", str(d / "nope"), "--out", str(d / "r8")), 2, "does not exist"),
        (("generate", "--model", str(d / "tokmismatch"), "--prompt", "hi"), 2, "vocab_size"),
        (("eval", "--model", str(d / "tokmismatch"), "--text", "hi"), 2, "vocab_size"),
        (("train", "--out", str(d / "tokrun"), "--resume", "--tokenizer", "gpt2"), 2, "cannot change when resuming"),
        (("train", "--data", str(d / "gpt2prep"), "--tokenizer", str(d / "syn70k"), *tiny, "--out", str(d / "r9")), 2,
         "needs uint32"),
        (("train", "--data", str(d / "gpt2prep"), "--tokenizer", str(d / "tok"), *tiny, "--out", str(d / "r10")), 2,
         "prepared with tokenizer gpt2"),
        (("eval", "--model", str(d / "tokmodel"), "--data", str(d / "gpt2prep")), 2, "prepared with tokenizer gpt2"),
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
    for made in ("r1", "r2", "r3", "r4", "r5", "r6", "r7", "p0", "p2", "p3", "p4", "p5", "c", "c1", "plot.png",
                 *(f"f{i}" for i in range(1, 17)), "r8", "r9", "r10", "p6", "tk1", "tk2", "tk3", "tk4", "tk5", "tk6",
                 "tk7"):
        path = files / made
        assert not path.exists() or (path.is_dir() and not any(path.iterdir())), f"{made} was created"
    assert not failures, f"{len(failures)} of {len(table)} bad inputs answered badly:\n" + "\n".join(failures)

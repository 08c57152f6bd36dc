"""`gptlab train` and `gptlab eval` as a user runs them: subprocesses, files on disk, exit codes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.helpers import SRC, TINY_TRAIN_MODEL, assert_clean_error, run_cli, write_training_fixture

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
WORDS = ("the model reads every word and learns which word comes next so that the loss falls while "
         "training goes on step after step over the small text").split()


def cli(*args, **kw):
    return run_cli(*args, env=ONE_THREAD, **kw)


def run_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_training_fixture(tmp_path_factory.mktemp("cli"), WORDS)


def train_args(root, out, *extra):
    return ("train", "--data", str(root / "text.txt"), "--model", str(root / "tiny.json"), "--out", str(out),
            "--batch-size", "4", "--eval-iters", "2", "--sample-prompt", "the model", *extra)


@pytest.fixture(scope="module")
def run_dir(setup):
    out = setup / "run"
    proc = cli(*train_args(setup, out, "--max-steps", "12", "--eval-every", "5", "--quiet"))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_writes_a_complete_run(run_dir):
    out, proc = run_dir
    assert run_files(out) == sorted(["checkpoint.pt", "config.json", "loss.png", "metrics.jsonl",
                                     "model.safetensors", "train_config.json"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 5, 10, 12]  # the start, multiples of --eval-every, the end
    assert set(metrics[0]) == {"step", "epoch", "tokens_seen", "train_loss", "val_loss", "val_bpb", "lr", "elapsed_s"}
    assert metrics[-1]["tokens_seen"] == 12 * 4 * 16
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = json.loads((out / "train_config.json").read_text())
    assert settings["max_steps"] == 12 and settings["batch_size"] == 4 and settings["decay_steps"] == 12
    assert TINY_TRAIN_MODEL.items() <= json.loads((out / "config.json").read_text()).items()
    assert "Train loss" in proc.stdout and "gptlab generate --model" in proc.stdout
    assert "the model" in proc.stdout  # the sample after the run


def test_eval_json_and_text(run_dir, setup):
    out, _ = run_dir
    proc = cli("eval", "--model", str(out), "--text", "the model reads every word", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert list(result) == ["loss", "perplexity", "bits_per_byte", "tokens", "bytes"]
    assert result["tokens"] == 4  # 5 tokens, the first has no context
    assert result["bytes"] == len(" model reads every word")  # the bytes of the 4 scored tokens
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    proc = cli("eval", "--model", str(out), "--data", str(setup / "text.txt"), "--stride", "12")
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "tokens" in proc.stdout
    assert_clean_error(cli("eval", "--model", str(out), "--text", "a b", "--context-length", "99"), 2, "maximum")


def read_metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def start_training(args):
    env = dict(os.environ, PYTHONPATH=SRC, **ONE_THREAD)
    return subprocess.Popen([sys.executable, "-m", "gptlab", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_for(predicate, proc, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


RESUME_OPTS = ("--max-steps", "24", "--eval-every", "2", "--save-every", "5", "--warmup-steps", "5",
               "--grad-accum", "2", "--quiet")


@pytest.fixture(scope="module")
def full_run(setup):
    full = setup / "full"
    assert cli(*train_args(setup, full, *RESUME_OPTS)).returncode == 0
    return full


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_interrupted_run_resumes_bit_exact(setup, full_run, how):
    cut = setup / f"cut-{how}"
    proc = start_training(train_args(setup, cut, *RESUME_OPTS))
    if how == "ctrl-c":  # as soon as a few steps are done
        assert wait_for(lambda: (cut / "metrics.jsonl").exists() and
                        len((cut / "metrics.jsonl").read_text().splitlines()) >= 3, proc)
        proc.send_signal(signal.SIGINT)
    else:  # killed outright once a periodic checkpoint exists
        assert wait_for(lambda: (cut / "checkpoint.pt").exists(), proc)
        proc.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if how == "ctrl-c" else -signal.SIGKILL), err
    if how == "ctrl-c":
        assert "gptlab train --out" in err and "--resume" in err
    assert len(read_metrics(cut)) < len(read_metrics(full_run))

    resumed = cli("train", "--out", str(cut), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(cut) == read_metrics(full_run)
    a, b = load_file(str(full_run / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_with_more_steps_and_force(run_dir, setup):
    out = setup / "more"
    assert cli(*train_args(setup, out, "--max-steps", "3", "--eval-every", "100", "--quiet")).returncode == 0
    proc = cli("train", "--out", str(out), "--resume", "--max-steps", "5", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [m["step"] for m in read_metrics(out)] == [0, 3, 5]  # the start, each end (--eval-every 100)
    assert json.loads((out / "train_config.json").read_text())["decay_steps"] == 3  # the schedule stays
    assert_clean_error(cli("train", "--out", str(out), "--resume", "--batch-size", "2"), 2, "--batch-size",
                       "cannot change")
    proc = cli(*train_args(setup, out, "--max-steps", "2", "--eval-every", "100", "--quiet", "--force"))
    assert proc.returncode == 0, proc.stderr
    assert [m["step"] for m in read_metrics(out)] == [0, 2]


def cli_many(*arg_lists):
    """Run several CLI commands at once (each is mostly Python start-up); results in order."""
    env = dict(os.environ, PYTHONPATH=SRC, **ONE_THREAD)
    procs = [subprocess.Popen([sys.executable, "-m", "gptlab", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for args in arg_lists]
    results = []
    for args, proc in zip(arg_lists, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def test_bad_inputs_fail_cleanly_and_write_nothing(setup, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin.txt").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    (tmp_path / "short.txt").write_text("only a few words here")
    text = setup / "text.txt"
    cases = [  # (data, extra options, exit code, words the one-line error must contain)
        (tmp_path / "missing.txt", (), 2, ["not found"]),
        (tmp_path / "empty.txt", (), 2, ["empty"]),
        (tmp_path / "latin.txt", (), 2, ["not UTF-8"]),
        (tmp_path / "short.txt", (), 2, ["has 5 tokens", "needs at least"]),
        (text, ("--val-fraction", "1.5"), 2, ["--val-fraction"]),
        (text, ("--batch-size", "0"), 2, ["--batch-size"]),
        (text, ("--lr", "-0.001"), 2, ["--lr"]),
        (text, ("--context-length", "64"), 2, ["above the model's maximum"]),
    ]
    results = cli_many(
        *[("train", "--data", str(data), "--model", str(setup / "tiny.json"), "--out", str(out), *extra)
          for data, extra, _, _ in cases],
        ("train", "--out", str(out), "--resume"),
    )
    for (_, _, code, needles), proc in zip(cases, results, strict=False):
        assert_clean_error(proc, code, *needles)
    assert_clean_error(results[-1], 2, "nothing to resume")
    assert not out.exists()


def test_bad_run_folders(run_dir, setup, tmp_path):
    src, _ = run_dir
    proc = cli(*train_args(setup, src, "--max-steps", "1"))
    assert_clean_error(proc, 2, "already holds another run", "--resume", "--force")

    mismatch = cli("train", "--out", str(src), "--resume", "--model", "gpt-nano")
    assert_clean_error(mismatch, 2, "another model")

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in run_files(src):
        (broken / name).write_bytes((src / name).read_bytes())
    data = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    before = {name: (broken / name).read_bytes() for name in run_files(broken)}
    assert_clean_error(cli("train", "--out", str(broken), "--resume"), 1, "corrupt or truncated")
    assert {name: (broken / name).read_bytes() for name in run_files(broken)} == before


def test_init_continues_from_existing_weights(run_dir, setup):
    src, _ = run_dir
    out = setup / "continued"
    proc = cli("train", "--init", str(src), "--data", str(setup / "text.txt"), "--out", str(out), "--batch-size",
               "4", "--eval-iters", "2", "--max-steps", "2", "--eval-every", "100", "--drop-rate", "0.0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    before, after = read_metrics(src)[-1], read_metrics(out)[0]
    assert after["step"] == 0 and after["val_loss"] == before["val_loss"]  # same weights, same validation data
    assert json.loads((out / "config.json").read_text())["drop_rate"] == 0.0
    assert_clean_error(cli("train", "--init", str(src), "--model", "gpt-nano"), 2, "not both")


def test_a_run_resumes_from_any_folder_and_refuses_changed_data(setup, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text((setup / "text.txt").read_text())
    out = tmp_path / "run"
    # relative --data and --model, given in the folder that holds them
    proc = run_cli("train", "--data", "data.txt", "--model", str(setup / "tiny.json"), "--out", "run",
                   "--max-steps", "2", "--batch-size", "4", "--quiet", cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["data"] == [str(data)] and saved["data_files"][0]["bytes"] == data.stat().st_size
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("train", "--out", str(out), "--resume", "--max-steps", "3", "--quiet", cwd=elsewhere,
                   env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    # naming the same file again (another spelling of its path) is accepted
    proc = run_cli("train", "--out", str(out), "--resume", "--max-steps", "4", "--quiet", "--data",
                   "../data.txt", cwd=elsewhere, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert [m["step"] for m in read_metrics(out)][-1] == 4
    data.write_text(data.read_text() + " one more line\n")
    assert_clean_error(cli("train", "--out", str(out), "--resume", "--max-steps", "5"), 2, "changed since the run",
                       str(data))


def test_short_runs_do_what_was_asked(setup, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(" ".join(WORDS * 4))  # about 100 tokens: one batch of 8 windows per epoch
    out = tmp_path / "run"
    proc = cli("train", "--data", str(short), "--model", str(setup / "tiny.json"), "--out", str(out),
               "--context-length", "8", "--batch-size", "8", "--max-steps", "12", "--eval-every", "5")
    assert proc.returncode == 0, proc.stderr
    assert [m["step"] for m in read_metrics(out)] == [0, 5, 10, 12]  # --max-steps alone: exactly 12 steps
    assert "warmup of 20 steps is not shorter than the run's 12 steps" in proc.stderr
    assert "\r" not in proc.stderr  # no progress-bar frames when stderr is not a terminal
    # the sample prompt is the start of the user's own validation text, not the built-in corpus's
    prompt = json.loads((out / "train_config.json").read_text())["sample_prompt"]
    assert prompt and prompt.split()[0] in WORDS and "A function" not in proc.stdout
    samples = [line for line in proc.stdout.splitlines() if line.startswith("sample: ")]
    assert len(samples) == 3  # after epochs ending at steps 5, 10 (not every 1-batch epoch), and the end
    assert f'--prompt "{prompt}"' in proc.stdout.splitlines()[-1]
    proc = cli("train", "--data", str(short), "--model", str(setup / "tiny.json"), "--out", str(out), "--force",
               "--context-length", "8", "--batch-size", "8", "--max-steps", "3", "--sample-prompt", "",
               "--warmup-steps", "1", "--quiet")
    assert proc.returncode == 0 and "sample: " not in proc.stdout and "warmup" not in proc.stderr
    assert proc.stdout.splitlines()[-1].endswith('--prompt ""')

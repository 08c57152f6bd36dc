"""Crash safety of `gptlab train`, for real: SIGKILL at chosen moments (GPTLAB_FAULT), a full disk, NaN losses,
SIGINT/SIGTERM and two processes on one run folder. The randomized version is bench/fault_injection.py."""

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptlab.storage.files import RunLock
from gptlab.training.checkpoint import read_checkpoint
from tests.helpers import SRC, assert_clean_error, run_cli, write_training_fixture

ENV = {"OMP_NUM_THREADS": "1"}
WORDS = "the model reads every word and learns which word comes next so the loss falls step after step".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_training_fixture(tmp_path_factory.mktemp("crash"), WORDS)


def train_args(root, out, *extra):
    return ("train", "--data", str(root / "text.txt"), "--model", str(root / "tiny.json"), "--out", str(out),
            "--batch-size", "4", "--eval-iters", "1", "--eval-every", "2", "--save-every", "2", "--max-steps", "8",
            "--sample-prompt=", "--quiet", *extra)


def losses(out):
    return [(m["step"], m["train_loss"], m["val_loss"])
            for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def leftovers(out):
    """Temporary files anywhere in the run folder (gptlab writes them in its .gptlab-tmp folder)."""
    return sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "reference"
    proc = run_cli(*train_args(setup, out), env=ENV)
    assert proc.returncode == 0, proc.stderr
    return losses(out)


# fault -> the step of the last complete checkpoint (saves happen at steps 2, 4, 6 and at the end)
KILLS = {
    "kill-during-save:1": None,  # killed inside the very first save: nothing to resume
    "kill-during-save:2": 2,
    "kill-at-step:5": 4,
    "kill-during-write:9": 2,  # inside the weights write right after the 2nd checkpoint landed
}


def _kill_and_resume(setup, fault):
    out = setup / fault.replace(":", "-")
    killed = run_cli(*train_args(setup, out), env={**ENV, "GPTLAB_FAULT": fault})
    if killed.returncode != -signal.SIGKILL:
        return killed, None, None
    step = read_checkpoint(out / "checkpoint.pt")["step"] if (out / "checkpoint.pt").exists() else None
    if step is None:  # no checkpoint yet: the run starts over
        resumed = run_cli(*train_args(setup, out, "--force"), env=ENV)
    else:
        resumed = run_cli(*train_args(setup, out, "--resume"), env=ENV)
    return killed, step, (resumed, out)


def test_killed_runs_resume_bit_exact(setup, reference):
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(KILLS, pool.map(lambda f: _kill_and_resume(setup, f), KILLS), strict=True))
    for fault, (killed, step, resumed) in results.items():
        assert killed.returncode == -signal.SIGKILL, (fault, killed.returncode, killed.stderr)
        assert step == KILLS[fault], (fault, step)
        proc, out = resumed
        assert proc.returncode == 0, (fault, proc.stderr)
        assert losses(out) == reference, fault  # bit for bit: same floats, same steps
        assert leftovers(out) == [], fault  # the killed save's temporary file was cleaned up


def test_full_disk_keeps_previous_checkpoint(setup):
    out = setup / "enospc"
    proc = run_cli(*train_args(setup, out), env={**ENV, "GPTLAB_FAULT": "enospc-during-save:2"})
    assert_clean_error(proc, 1, "checkpoint.pt", "no space left", "intact")
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert leftovers(out) == []
    assert run_cli(*train_args(setup, out, "--resume"), env=ENV).returncode == 0


def test_nan_loss_stops_naming_step_or_is_skipped(setup, reference):
    stop, skip = setup / "nan-stop", setup / "nan-skip"
    with ThreadPoolExecutor(2) as pool:
        p_stop, p_skip = pool.map(lambda a: run_cli(*a, env={**ENV, "GPTLAB_FAULT": "nan-at-step:3"}),
                                  [train_args(setup, stop), train_args(setup, skip, "--skip-nonfinite", "1")])
    assert_clean_error(p_stop, 1, "loss is nan at step 3", "--lr", "--grad-clip", "float32", "--skip-nonfinite")
    assert read_checkpoint(stop / "checkpoint.pt")["step"] == 2  # the last good checkpoint is kept
    assert p_skip.returncode == 0, p_skip.stderr
    assert "skipped that batch" in p_skip.stdout
    skipped = losses(skip)
    assert skipped[:2] == reference[:2]  # identical before the bad batch
    assert skipped[-1][0] == 8 and all(v == v for _, a, b in skipped for v in (a, b))  # no NaN reached the weights


def test_the_nan_check_on_the_device_gives_the_same_run(setup, reference):
    """--sync-every 4: the loss is looked at every 4 steps and a non-finite one is kept off the weights by
    the fused optimizer itself (on a GPU, no synchronisation per step): the same run as looking every step."""
    looked, skip, stop, skip1 = (setup / name for name in ("sync4", "sync4-skip", "sync4-stop", "sync1-skip"))
    nan = {**ENV, "GPTLAB_FAULT": "nan-at-step:3"}
    with ThreadPoolExecutor(2) as pool:
        p_looked, p_skip, p_stop, p_skip1 = pool.map(lambda a: run_cli(*a[0], env=a[1]), [
            (train_args(setup, looked, "--sync-every", "4"), ENV),
            (train_args(setup, skip, "--sync-every", "4", "--skip-nonfinite", "1"), nan),
            (train_args(setup, stop, "--sync-every", "4"), nan),
            (train_args(setup, skip1, "--skip-nonfinite", "1"), nan)])
    assert p_looked.returncode == 0 and losses(looked) == reference, p_looked.stderr
    assert p_skip.returncode == 0 and p_skip1.returncode == 0 and "skipped that batch" in p_skip.stdout
    assert losses(skip) == losses(skip1)  # the same fault, looked at every step
    assert_clean_error(p_stop, 1, "loss is nan at step 3")


def _start(setup, out, *extra):
    env = {**__import__("os").environ, **ENV, "PYTHONPATH": SRC, "GPTLAB_FAULT": "slow-step:300"}
    return subprocess.Popen([sys.executable, "-m", "gptlab", *train_args(setup, out, "--max-steps", "300", *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_step(out, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start")


def _signal_and_resume(setup, sig):
    out = setup / f"signal-{sig.name}"
    proc = _start(setup, out)
    _wait_for_step(out)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    step = read_checkpoint(out / "checkpoint.pt")["step"]
    assert 1 <= step < 300
    resumed = run_cli(*train_args(setup, out, "--resume", "--max-steps", str(step + 2)), env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out)[-1][0] == step + 2


def test_sigint_and_sigterm_save_and_exit_cleanly(setup):
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda sig: _signal_and_resume(setup, sig), [signal.SIGINT, signal.SIGTERM]))


def test_second_process_on_same_out_is_refused(setup):
    out = setup / "locked"
    first = _start(setup, out)
    try:
        _wait_for_step(out)
        second = run_cli(*train_args(setup, out, "--force"), env=ENV)
        assert_clean_error(second, 1, "in use", str(first.pid), "another --out")
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL  # the first run was never disturbed by the second


def test_leftovers_of_killed_writers_are_removed_under_the_lock(setup, tmp_path):
    """Whatever a killed writer left -- gptlab's temporary file or one a library made beside it -- is removed
    by the next run in the folder, and never while another process holds the folder."""
    out = tmp_path / "run"
    assert run_cli(*train_args(setup, out), env=ENV).returncode == 0
    temp = out / ".gptlab-tmp"
    temp.mkdir()
    (temp / "model.safetensors.k2j4.tmp").write_bytes(b"\0" * 1000)  # gptlab's own, half written
    (temp / ".tmpAb12Cd").write_bytes(b"\0" * 1000)  # safetensors' own atomic write inside it
    (out / ".tmpXy98Zw").write_bytes(b"\0" * 1000)  # the same, as an older version left it in the folder
    (out / "notes.txt").write_text("mine")  # not gptlab's: stays
    with RunLock(out):  # a live writer: nothing may be removed, and the run is refused
        proc = run_cli("train", "--out", str(out), "--resume", "--max-steps", "9", env=ENV)
        assert proc.returncode == 1 and "in use" in proc.stderr
        assert (temp / ".tmpAb12Cd").exists() and (out / ".tmpXy98Zw").exists()
    proc = run_cli("train", "--out", str(out), "--resume", "--max-steps", "9", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert not temp.exists() and not (out / ".tmpXy98Zw").exists() and (out / "notes.txt").exists()

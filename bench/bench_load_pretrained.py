"""Time load_pretrained on GPT-2 small's real shapes (random weights) from each source format.

    PYTHONPATH=src python3 bench/bench_load_pretrained.py OPENAI_FOLDER
OPENAI_FOLDER: a GPT-2 124M checkpoint folder (OpenAI's download, or one written by
`tests/fixtures/make_tf_checkpoint.py DIR --124M` under TensorFlow). The Hugging Face and gptlab
copies are made from it in a temporary folder. Prints one line per measurement.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def timed(label: str, fn, repeat: int = 3):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    print(f"{label}: {best:.2f} s (best of {repeat})")
    return result


def _anon_mib() -> int:
    """Anonymous resident memory (not the page cache behind memory maps), Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    return -1


def peak_anon_during(fn) -> tuple[int, object]:
    """Peak growth of anonymous memory (MiB) while `fn` runs, sampled every 5 ms."""
    base, peak, done = _anon_mib(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_mib() - base)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = fn()
    done.set()
    watcher.join()
    return peak[0], result


def main(openai_folder: Path) -> None:
    from gptlab import load_pretrained, save_model
    from gptlab.pretrained.crc32c import crc32c
    from gptlab.pretrained.hf import save_hf
    from gptlab.pretrained.openai import load_openai

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    peak, model = peak_anon_during(lambda: load_openai(openai_folder, verify=True))
    print(f"openai folder: peak anonymous memory +{peak} MiB for {model.num_parameters() * 4 / 2**20:.0f} MiB of weights")
    del model
    data = np.random.default_rng(0).integers(0, 256, 154_389_504, dtype=np.uint8)  # wte's bytes
    timed("crc32c numpy, 154 MB (wte)", lambda: crc32c(data, use_native=False), repeat=2)
    model = timed("openai folder, first load (CRC-32C of every tensor)", lambda: load_openai(openai_folder, verify=True))
    load_pretrained(openai_folder)  # leaves the verified-marker
    timed("openai folder, later loads (marker: CRCs already checked)", lambda: load_pretrained(openai_folder))
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, Path(tmp) / "hf")
        save_model(model, Path(tmp) / "gptlab")
        timed("hugging face folder (safetensors)", lambda: load_pretrained(Path(tmp) / "hf"))
        timed("gptlab folder (safetensors)", lambda: load_pretrained(Path(tmp) / "gptlab"))
    print(f"parameters: {model.num_parameters():,}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

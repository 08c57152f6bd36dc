"""Fine-tuning speed and memory: gptlab full vs gptlab LoRA vs transformers + PEFT LoRA, in one run.

    python -m bench.finetune                      # gpt2-small shapes, batch 4 x 256, 10 timed steps each
    python -m bench.finetune --rounds 10 --repeats 2 --json results.json
    python -m bench.finetune --tiny               # a tiny model: checks the code paths only

Memory: every contestant runs alone in a fresh process (`--child NAME`), so its peak RSS
(ru_maxrss) is its own. Speed: one process (`--child speed`) builds all three and times one step of
each in turn, so load from other jobs on a shared machine slows them alike. Random weights of
gpt2-small's shapes (speed and memory do not depend on the values), float32 on CPU, dropout 0 as in
the book's chapter 7 (`--drop-rate`), the same batch for all: instruction-like rows whose first
half is prompt (target -100) and second half response.

- gptlab-full / gptlab-lora: what `gptlab finetune [--method lora]` runs per step: the loop's
  `train_step` (chunked LM-head loss, clipping at 1.0) with its AdamW (`build_optimizer`), after
  `keep_freed_memory()` (process-wide: in the speed process it spares PEFT's steps page faults too);
  LoRA via `add_lora` (r 8, alpha 16, every Linear of the blocks).
- peft-lora: `GPT2LMHeadModel` + `peft.get_peft_model` with the same rank, alpha, dropout and layers
  (c_attn, c_proj, c_fc; fan_in_fan_out), logits -> F.cross_entropy (ignore_index -100), backward,
  clipping at 1.0, `torch.optim.AdamW` over the trainable parameters, zero_grad.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

CONTESTANTS = ("gptlab-full", "gptlab-lora", "peft-lora")
SHAPES = {
    "gpt2-small": dict(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12),
    "tiny": dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2),
}
LORA = dict(rank=8, alpha=16.0)


def batch(shape: dict, size: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, shape["vocab_size"], (size, seq), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[:, : seq // 2] = -100  # the prompt half: not scored, as in instruction tuning
    return x, y


def gptlab_step(name: str, shape: dict, x, y, spec: dict):
    """One optimizer step as `gptlab finetune` takes it (training/step.py)."""
    import torch

    from gptlab import GPTConfig, GPTModel, TrainConfig, add_lora
    from gptlab.hardware import keep_freed_memory
    from gptlab.training.optim import build_optimizer, make_precision
    from gptlab.training.step import train_step

    keep_freed_memory()
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(drop_rate=spec["drop_rate"], **shape)).train()
    if name == "gptlab-lora":
        add_lora(model, LORA["rank"], LORA["alpha"], spec["lora_dropout"])
    cfg = TrainConfig(lr=1e-4, weight_decay=0.0 if name == "gptlab-lora" else 0.1)
    device = torch.device("cpu")
    optimizer = build_optimizer(model, cfg, device)
    precision = make_precision("float32", device)
    return lambda: train_step(model, optimizer, iter([(x, y)]), 1, cfg, device, precision)


def peft_step(shape: dict, x, y, spec: dict):
    import peft
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=shape["vocab_size"], n_positions=shape["context_length"],
                                       n_embd=shape["emb_dim"], n_layer=shape["n_layers"], n_head=shape["n_heads"],
                                       resid_pdrop=spec["drop_rate"], embd_pdrop=spec["drop_rate"],
                                       attn_pdrop=spec["drop_rate"]))
    config = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=spec["lora_dropout"],
                             target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    model = peft.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_step(name: str, spec: dict):
    shape = SHAPES[spec["shape"]]
    x, y = batch(shape, spec["batch"], spec["seq"])
    step = peft_step(shape, x, y, spec) if name == "peft-lora" else gptlab_step(name, shape, x, y, spec)
    return step, x.numel()


def memory_child(name: str, spec: dict) -> dict:
    """One contestant alone in this process: its peak RSS (and, as a side number, its own speed)."""
    import torch

    from .child import timed

    torch.set_num_threads(spec["threads"])
    step, tokens = make_step(name, spec)
    times = timed(step, spec["warmup"], 2)
    return {"contestant": name, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "alone_tokens_per_s": tokens / statistics.median(times)}


def speed_child(spec: dict) -> dict:
    """All contestants in this process, one step each in turn: a load that comes and goes on a shared
    machine then slows all of them alike, so their ratio holds even when the absolute speeds do not."""
    import torch

    from .child import timed

    torch.set_num_threads(spec["threads"])
    steps = {name: make_step(name, spec) for name in CONTESTANTS}
    for step, _ in steps.values():
        timed(step, spec["warmup"], 0)
    times: dict[str, list[float]] = {name: [] for name in CONTESTANTS}
    for _ in range(spec["rounds"]):
        for name, (step, _) in steps.items():
            times[name] += timed(step, 0, 1)
    return {name: {"step_s": t, "tokens_per_s": steps[name][1] / statistics.median(t),
                   "best_tokens_per_s": steps[name][1] / min(t)} for name, t in times.items()}


def run_child(mode: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.finetune", "--child", mode, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, timeout=spec["timeout"])
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(memory: list[dict], speed: dict) -> dict:
    """Per contestant: tokens/s (interleaved run), peak RSS (median of its own processes), and the targets' ratios."""
    table: dict = {}
    for name in CONTESTANTS:
        rss = [r["peak_rss_mb"] for r in memory if r["contestant"] == name]
        table[name] = {"tokens_per_s": speed[name]["tokens_per_s"], "best_tokens_per_s": speed[name]["best_tokens_per_s"],
                       "peak_rss_mb": statistics.median(rss),
                       "alone_tokens_per_s": [round(r["alone_tokens_per_s"], 1) for r in memory
                                              if r["contestant"] == name]}
    table["lora_rss_over_full"] = table["gptlab-lora"]["peak_rss_mb"] / table["gptlab-full"]["peak_rss_mb"]
    table["gptlab_lora_over_peft"] = table["gptlab-lora"]["tokens_per_s"] / table["peft-lora"]["tokens_per_s"]
    # the same ratio round by round (each round's steps ran seconds apart, under about the same load)
    pairs = zip(speed["peft-lora"]["step_s"], speed["gptlab-lora"]["step_s"], strict=True)
    table["gptlab_lora_over_peft_per_round"] = statistics.median(theirs / ours for theirs, ours in pairs)
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=(*CONTESTANTS, "speed"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--drop-rate", type=float, default=0.0, help="model dropout (the book's chapter 7: 0)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (gptlab's and PEFT's default: 0)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps of each contestant, taking turns")
    parser.add_argument("--repeats", type=int, default=1, help="memory processes per contestant")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tiny", action="store_true", help="a tiny model: code paths only, numbers mean nothing")
    parser.add_argument("--json", help="also write every run and the summary to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.spec)
        print(json.dumps(speed_child(spec) if args.child == "speed" else memory_child(args.child, spec)))
        return 0
    spec = {"shape": "tiny" if args.tiny else "gpt2-small", "batch": args.batch,
            "seq": min(args.seq, SHAPES["tiny"]["context_length"]) if args.tiny else args.seq,
            "drop_rate": args.drop_rate, "lora_dropout": args.lora_dropout, "warmup": args.warmup,
            "rounds": args.rounds, "threads": args.threads, "timeout": 3600}
    memory = []
    for _ in range(args.repeats):
        for name in CONTESTANTS:
            memory.append(run_child(name, spec))
            print(f"memory: {name:12s} peak RSS {memory[-1]['peak_rss_mb']:7.0f} MB "
                  f"(alone: {memory[-1]['alone_tokens_per_s']:.1f} tokens/s)", flush=True)
    speed = run_child("speed", spec)
    table = summary(memory, speed)
    print(f"\n{spec['shape']}, batch {spec['batch']} x {spec['seq']}, dropout {spec['drop_rate']:g}, LoRA r "
          f"{LORA['rank']} alpha {LORA['alpha']:g} dropout {spec['lora_dropout']:g}, {args.threads} threads:")
    for name in CONTESTANTS:
        print(f"  {name:12s} {table[name]['tokens_per_s']:8.1f} tokens/s median, {table[name]['best_tokens_per_s']:8.1f} "
              f"best (interleaved)  peak RSS {table[name]['peak_rss_mb']:7.0f} MB")
    print(f"LoRA peak RSS / full: {table['lora_rss_over_full']:.2f} (target <= 0.6); gptlab LoRA / PEFT tokens/s: "
          f"{table['gptlab_lora_over_peft']:.2f} (medians; round by round {table['gptlab_lora_over_peft_per_round']:.2f}; "
          "target >= 1)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"spec": spec, "load_average": os.getloadavg(), "memory": memory, "speed": speed,
                       "summary": table}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

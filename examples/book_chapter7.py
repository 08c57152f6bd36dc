"""Chapter 7 of "Build a Large Language Model (From Scratch)" (fine-tuning to follow instructions), with gptlab.

    python examples/book_chapter7.py                        # a tiny random model: the whole pipeline in ~1 min on CPU
    python examples/book_chapter7.py --model gpt2-small     # GPT-2 small's weights (from the cache, else downloaded)
    python examples/book_chapter7.py --model gpt2-medium --epochs 2 --lr 5e-5   # the book's own setting

The book downloads a 1,100-entry instruction file; this script writes a small one of its own
(`make_instruction_data`: three kinds of tasks over a few hundred words and numbers), so it runs
offline. The steps are the chapter's: split the data 85% / 10% / 5% (train / test / validation),
format each entry with the Alpaca prompt (`format_instruction`, the book's `format_input`), batch
with the custom collate function (`instruction_collate`: padding, end-of-text target, -100 for
padding and, unlike the book's default, for the prompt), check the loss before training, train
(`train`, the book's `train_model_simple` with AdamW lr 5e-5 and weight decay 0.1), plot the
losses, answer the test instructions greedily (`respond`), save them as JSON with a
"model_response" field, and save the model with its prompt template. The book then scores the
answers with a larger model through Ollama; here they are scored by exact match.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gptlab import (
    GPTConfig,
    GPTModel,
    InstructionDataset,
    calc_loss_loader,
    format_instruction,
    instruction_collate,
    respond,
    save_model,
    save_template,
    train,
)
from gptlab.finetune.templates import ALPACA
from gptlab.training.report import plot_losses
from gptlab.training.run import load_init

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("early", "late"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("young", "old"),
             ("high", "low"), ("hard", "soft"), ("rich", "poor"), ("loud", "quiet"), ("wet", "dry")]
NOUNS = ["apple", "river", "window", "garden", "teacher", "pencil", "mountain", "letter", "city", "doctor",
         "flower", "table", "horse", "bottle", "forest", "ticket", "island", "kitchen", "planet", "bridge"]


def make_instruction_data(seed: int = 123) -> list[dict]:
    """Instruction records in the book's format: plurals, opposites and sums, with and without input."""
    rng = random.Random(seed)
    data = []
    for noun in NOUNS:
        data.append({"instruction": "Convert the singular noun to its plural form.", "input": noun,
                     "output": f"The plural of \"{noun}\" is \"{noun}s\"."})
    for a, b in OPPOSITES:
        for word, other in ((a, b), (b, a)):
            data.append({"instruction": f"What is the opposite of \"{word}\"?", "input": "",
                         "output": f"The opposite of \"{word}\" is \"{other}\"."})
    for _ in range(60):
        x, y = rng.randint(1, 20), rng.randint(1, 20)
        data.append({"instruction": "Add the two numbers.", "input": f"{x} + {y}", "output": f"{x} + {y} = {x + y}."})
    rng.shuffle(data)
    return data


def load_model(name: str, drop_rate: float) -> GPTModel:
    if name == "tiny":  # a small random model: shows the pipeline in a minute, answers only what it memorised
        torch.manual_seed(123)
        return GPTModel(GPTConfig(context_length=256, emb_dim=128, n_heads=4, n_layers=4, drop_rate=drop_rate))
    return load_init(name, drop_rate)  # a GPT-2 name, or any model/run folder, with that dropout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (random weights), a GPT-2 name or a model folder")
    parser.add_argument("--epochs", type=int, default=None, help="default: 12 for tiny, 2 (the book's) otherwise")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 for tiny, 5e-5 (the book's) otherwise")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="book_chapter7_output")
    args = parser.parse_args()
    tiny = args.model == "tiny"
    epochs, lr = args.epochs or (12 if tiny else 2), args.lr or (1e-3 if tiny else 5e-5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = make_instruction_data()
    (out / "instruction-data.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    train_portion, test_portion = int(len(data) * 0.85), int(len(data) * 0.1)  # the book's split
    train_data = data[:train_portion]
    test_data = data[train_portion : train_portion + test_portion]
    val_data = data[train_portion + test_portion :]
    print(f"{len(data)} entries: {len(train_data)} train, {len(test_data)} test, {len(val_data)} validation")
    print("first entry formatted:\n" + format_instruction(train_data[0]) + train_data[0]["output"] + "\n")

    model = load_model(args.model, drop_rate=0.0)  # the book fine-tunes without dropout
    collate = functools.partial(instruction_collate, allowed_max_length=model.config.context_length)
    torch.manual_seed(123)
    train_loader = DataLoader(InstructionDataset(train_data), batch_size=args.batch_size, collate_fn=collate,
                              shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(123))
    val_loader = DataLoader(InstructionDataset(val_data), batch_size=args.batch_size, collate_fn=collate)
    with torch.no_grad():
        print(f"before training: train loss {calc_loss_loader(train_loader, model, 'cpu', num_batches=5):.3f}, "
              f"validation loss {calc_loss_loader(val_loader, model, 'cpu', num_batches=5):.3f}")

    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    result = train(model, train_loader, val_loader, optimizer=optimizer, epochs=epochs, eval_every=5, eval_iters=5,
                   lr=lr, lr_schedule="constant", warmup_steps=0, grad_clip=0, eval_at_start=False,
                   book_eval_steps=True, quiet=True, device="cpu",
                   sample=lambda m, step: f"  {val_data[0]['instruction']!r} -> {respond(m, val_data[:1], max_new_tokens=35)[0]!r}")
    print(f"training took {(time.perf_counter() - start) / 60:.2f} minutes")
    plot_losses(result.metrics, out / "loss-plot.png", title="Instruction fine-tuning")

    answers = respond(model, test_data, ALPACA, max_new_tokens=256, batch_size=args.batch_size)
    for entry, answer in list(zip(test_data, answers, strict=True))[:3]:
        print(f"\n{format_instruction(entry)}\n\nCorrect response:\n>> {entry['output']}\n\nModel response:\n>> {answer}")
    scored = [{**entry, "model_response": answer} for entry, answer in zip(test_data, answers, strict=True)]
    (out / "instruction-data-with-response.json").write_text(json.dumps(scored, indent=1), encoding="utf-8")
    exact = sum(e["model_response"] == e["output"] for e in scored)
    print(f"\nexact answers on the {len(scored)} test instructions: {exact} ({exact / len(scored):.0%})")
    save_model(model, out / "model")
    save_template(out / "model", ALPACA)  # `gptlab generate --model DIR --instruction ...` formats prompts with it
    print(f"saved: {out}/model (ask it: gptlab generate --model {out}/model --instruction \"Add the two numbers.\" "
          f"--input \"3 + 4\"), {out}/instruction-data-with-response.json, {out}/loss-plot.png")


if __name__ == "__main__":
    main()

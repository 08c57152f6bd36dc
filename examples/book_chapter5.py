"""Chapter 5 of "Build a Large Language Model (From Scratch)" (pretraining on unlabeled data), with gptlab.

    python examples/book_chapter5.py                  # downloads the-verdict once into ~/.cache/gptlab
    python examples/book_chapter5.py the-verdict.txt  # or use a local copy

Same settings as the book: GPT-2 124M with a 256-token context, dropout 0.1, no qkv bias; AdamW
lr 4e-4, weight decay 0.1; batch 2, windows of 256 with stride 256, a 90/10 split of the text; 10
epochs, evaluation every 5 steps on 5 batches; samples from "Every effort moves you". Takes a while
on a CPU (124M parameters): about 90 optimizer steps of 512 tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from gptlab import (
    GPTModel,
    calc_loss_loader,
    create_dataloader,
    get_preset,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
    text_to_token_ids,
    token_ids_to_text,
    train,
)
from gptlab.data.corpus import fetch_corpus
from gptlab.data.text import read_text_file
from gptlab.generation.generate import generate
from gptlab.tokenizer import encode
from gptlab.training.report import plot_losses

START_CONTEXT = "Every effort moves you"


def book_init(model: GPTModel) -> GPTModel:
    """The book's initialisation: every layer's PyTorch default (embeddings N(0, 1), Linear uniform).

    gptlab's own GPT-2 initialisation (N(0, 0.02), tied head) learns this 5,145-token story more
    slowly in 90 steps, so the chapter's numbers are only comparable with the book's own init.
    """
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", help="path of the-verdict.txt (default: download it once)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="book_chapter5_output", help="folder for the plot and saved model")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 5.1 The book's GPT_CONFIG_124M: GPT-2 small with a shorter context, no qkv bias and (as the
    # book's GPTModel) a separate output head, initialised with PyTorch's defaults.
    config = get_preset("gpt2-small", context_length=256, drop_rate=0.1, qkv_bias=False, tie_embeddings=False)
    torch.manual_seed(123)
    model = book_init(GPTModel(config)).eval()
    ids = generate(model, text_to_token_ids(START_CONTEXT), max_new_tokens=10, context_size=256)
    print("untrained model:", token_ids_to_text(ids))

    # 5.1.3 The data: the short story, split 90/10 by characters as in the book.
    text = read_text_file(args.text if args.text else fetch_corpus("the-verdict"))
    print(f"characters: {len(text):,}  tokens: {len(encode(text)):,}")
    split_idx = int(0.90 * len(text))
    torch.manual_seed(123)
    train_loader = create_dataloader(text[:split_idx], batch_size=2, max_length=256, stride=256,
                                     drop_last=True, shuffle=True, num_workers=0)
    val_loader = create_dataloader(text[split_idx:], batch_size=2, max_length=256, stride=256,
                                   drop_last=False, shuffle=False, num_workers=0)
    print(f"train batches: {len(train_loader)}  validation batches: {len(val_loader)}")

    model.to(device)
    with torch.no_grad():  # the book: about 10.98 for both, ln(50257) = 10.82 plus untrained noise
        print(f"initial training loss:   {calc_loss_loader(train_loader, model, device):.3f}")
        print(f"initial validation loss: {calc_loss_loader(val_loader, model, device):.3f}")

    # 5.2 Training: the book's train_model_simple is gptlab's loop with a constant learning rate,
    # no warmup, no clipping and the book's own optimizer (weight decay on every parameter).
    torch.manual_seed(123)
    model = book_init(GPTModel(config)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    start = time.perf_counter()
    result = train(
        model, train_loader, val_loader, optimizer=optimizer, device=device, epochs=args.epochs, lr=0.0004,
        lr_schedule="constant", warmup_steps=0, grad_clip=0, eval_every=5, eval_iters=5, eval_at_start=False,
        book_eval_steps=True,
        sample_prompt=START_CONTEXT, sample_tokens=50, sample_temperature=0.0, dtype="float32", quiet=True,
    )
    minutes = (time.perf_counter() - start) / 60
    print(f"training took {minutes:.1f} min; final train loss {result.train_losses[-1]:.3f}, "
          f"val loss {result.val_losses[-1]:.3f} (book: 0.569 / 6.373 with its own random draws)")
    plot_losses(result.metrics, out / "loss-plot.png")
    print(f"loss plot: {out / 'loss-plot.png'}")

    # 5.3 Decoding: greedy, then temperature scaling with top-k.
    model.to("cpu").eval()
    idx = text_to_token_ids(START_CONTEXT)
    print("greedy:", token_ids_to_text(generate(model, idx, max_new_tokens=25, context_size=256)))
    torch.manual_seed(123)
    sampled = generate(model, idx, max_new_tokens=15, context_size=256, temperature=1.4, top_k=25)
    print("temperature 1.4, top-k 25:", token_ids_to_text(sampled))

    # 5.4 Saving and loading: a model folder (config.json + model.safetensors) and, to continue
    # training later, the model together with the optimizer state.
    save_model(model, out / "model")
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "model_and_optimizer.pt", model, optimizer)
        reloaded = GPTModel(config)
        new_optimizer = torch.optim.AdamW(reloaded.parameters(), lr=0.0004, weight_decay=0.1)
        load_checkpoint(Path(tmp) / "model_and_optimizer.pt", reloaded, new_optimizer)
    same = torch.equal(generate(load_model(out / "model").eval(), idx, 25, 256),
                       generate(reloaded.eval(), idx, 25, 256))
    print(f"saved model in {out / 'model'}; reloaded model and optimizer give the same text: {same}")


if __name__ == "__main__":
    main()

"""Text classification with a GPT (the book's chapter 6): the LM head replaced by a Linear over the classes.

The classifier reads the hidden state of each text's last real token: under the causal mask it is
the only position that has seen the whole text. Batches are right-padded with PAD_ID (-1, never a
token id), so the classifier finds the last real token itself, and padding after a text never
changes its result (causal attention looks only backwards).

A classifier folder is config.json + model.safetensors (backbone and head, as any gptlab model
folder) plus classifier.json (the labels); `load_classifier` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GPTConfig
from ..errors import UsageError
from ..model import GPTModel, unwrap_model
from ..pretrained.native import (
    CLASSIFIER_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_state_into,
    read_safetensors,
    stored_tokenizer,
)
from ..storage.files import read_format_file, write_json
from ..tokenizer import as_tokenizer, tokenizer_of

PAD_ID = -1  # padding in classification batches (not a token id: the classifier masks it out)
CLASSIFIER_FORMAT = "gptlab-classifier"


class GPTClassifier(GPTModel):
    """A GPTModel whose output layer is nn.Linear(emb_dim, num_classes): class logits from the last real token.

    `labels` names the classes (index = class id) when known. The config keeps the backbone's
    fields with tie_embeddings false: the head is not the token embedding.
    """

    def __init__(self, config: GPTConfig, num_classes: int, labels: Sequence[str] | None = None) -> None:
        if num_classes < 2:
            raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise UsageError(f"{len(labels)} labels for {num_classes} classes")
        self.num_classes = num_classes  # read by make_head during GPTModel.__init__
        super().__init__(config.replace(tie_embeddings=False))
        self.labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
        self.max_length: int | None = None  # the longest text it was trained on, when loaded from a run

    def make_head(self, config: GPTConfig) -> nn.Module:
        return nn.Linear(config.emb_dim, self.num_classes)

    def forward(self, idx: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Class logits (B, num_classes) for token ids (B, T), right-padded with PAD_ID (or per `attention_mask`)."""
        mask = (idx != PAD_ID) if attention_mask is None else attention_mask.bool()
        if mask.shape != idx.shape or bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise UsageError("classifier input must be right-padded: each row's tokens first, then padding")
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise UsageError("a text to classify has no tokens")
        hidden = self.hidden_states(idx.masked_fill(~mask, 0))  # padding ids must still index the embedding
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.out_head(last)

    def loss(self, idx: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:  # type: ignore[override]
        """Mean cross-entropy of the class logits against class ids (B,)."""
        return F.cross_entropy(self(idx).float(), targets, ignore_index=ignore_index)


def build_classifier(base: GPTModel, num_classes: int, labels: Sequence[str] | None = None) -> GPTClassifier:
    """A classifier with `base`'s weights (they are shared, not copied) and a new head, N(0, 0.02) as GPT-2's."""
    base = unwrap_model(base)
    with torch.device("meta"):  # no memory and no random init for the weights taken from the base
        model = GPTClassifier(base.config, num_classes, labels)
    weight = base.tok_emb.weight
    head = nn.Linear(base.config.emb_dim, num_classes, device=weight.device, dtype=weight.dtype)
    nn.init.normal_(head.weight, mean=0.0, std=0.02)
    nn.init.zeros_(head.bias)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("out_head.")}
    state.update({"out_head.weight": head.weight.detach(), "out_head.bias": head.bias.detach()})
    model.load_state_dict(state, assign=True)
    model.tokenizer = base.tokenizer
    return model.train(base.training)


def set_trainable(model: GPTClassifier, which: str = "last-block") -> None:
    """What trains: "head" (the new head only), "last-block" (the book's choice: the last transformer
    block, the final norm and the head) or "all"."""
    model = unwrap_model(model)
    parts = {"head": [model.out_head], "last-block": [model.trf_blocks[-1], model.final_norm, model.out_head],
             "all": [model]}
    if which not in parts:
        raise UsageError(f"unknown trainable part {which!r}; choose one of {', '.join(parts)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for module in parts[which]:
        for param in module.parameters():
            param.requires_grad_(True)


def save_classifier_info(folder: str | os.PathLike, labels: Sequence[str], **info) -> None:
    """classifier.json: the class names (index = class id) and how the texts were read."""
    write_json(Path(folder) / CLASSIFIER_NAME, {"format": CLASSIFIER_FORMAT, "labels": list(labels), **info})


def read_classifier_info(folder: str | os.PathLike) -> dict:
    info = read_format_file(folder, CLASSIFIER_NAME, CLASSIFIER_FORMAT,
                            f"{folder} is not a classifier ({CLASSIFIER_NAME} is missing); give the folder of a run "
                            "of gptlab finetune --task classify")
    labels = info.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise UsageError(f"{Path(folder) / CLASSIFIER_NAME} must list at least 2 labels")
    return info


def load_classifier(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GPTClassifier:
    """The classifier saved in a run folder of `gptlab finetune --task classify` (eval mode)."""
    folder = Path(folder)
    info = read_classifier_info(folder)
    config = GPTConfig.load(folder / CONFIG_NAME)
    with torch.device("meta"):
        model = GPTClassifier(config, len(info["labels"]), [str(x) for x in info["labels"]])
    model.max_length = info.get("max_length")
    state = read_safetensors(folder / WEIGHTS_NAME, model.config, model)
    load_state_into(model, state, str(folder / WEIGHTS_NAME), assign=True)
    model.tokenizer = stored_tokenizer(folder, config)
    return model.to(device).eval()


def encode_texts(texts: Iterable[str], max_length: int | None = None, tokenizer=None) -> list[list[int]]:
    """Token ids of each text (GPT-2's tokenizer by default), the first `max_length` kept (as the book's
    SpamDataset truncates)."""
    tok = as_tokenizer(tokenizer)
    return [tok.encode_ordinary(t)[:max_length] if max_length else tok.encode_ordinary(t) for t in texts]


def classification_collate(batch: Sequence[tuple[list[int], int]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """(token ids right-padded with `pad_id` to the longest text of the batch (B, T), class ids (B,))."""
    width = max(len(ids) for ids, _ in batch)
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        inputs[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return inputs, torch.tensor([label for _, label in batch], dtype=torch.long)


@torch.no_grad()
def classify_texts(model: nn.Module, texts: Sequence[str], batch_size: int = 16,
                   max_length: int | None = None) -> Tensor:
    """Class probabilities (N, num_classes) of each text (the book's classify_review, for many texts)."""
    inner = unwrap_model(model)
    limit = min(max_length or inner.config.context_length, inner.config.context_length)
    device = inner.tok_emb.weight.device
    ids = encode_texts(texts, limit, tokenizer_of(inner))
    if any(not row for row in ids):
        raise UsageError("a text to classify is empty")
    was_training = model.training
    model.eval()
    try:
        out = [torch.softmax(model(classification_collate([(r, 0) for r in ids[i : i + batch_size]])[0].to(device))
                             .float(), dim=-1) for i in range(0, len(ids), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).cpu()


@torch.no_grad()
def confusion_matrix(data_loader: Iterable, model: nn.Module, device, num_classes: int,
                     num_batches: int | None = None) -> Tensor:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for i, (inputs, targets) in enumerate(data_loader):
            if num_batches is not None and i >= num_batches:
                break
            logits = model(inputs.to(device))
            if logits.dim() == 3:  # a GPTModel with a class head (the book's way): its last position
                logits = logits[:, -1, :]
            predicted = logits.argmax(dim=-1).cpu()
            counts.index_put_((targets.cpu(), predicted), torch.ones_like(predicted), accumulate=True)
    finally:
        model.train(was_training)
    return counts


def calc_accuracy_loader(data_loader: Iterable, model: nn.Module, device, num_batches: int | None = None) -> float:
    """Share of correctly classified examples in the first `num_batches` batches (all when None), as in the book.

    NaN for an empty loader. The model's train/eval mode is left as it was.
    """
    num_classes = unwrap_model(model).out_head.out_features
    counts = confusion_matrix(data_loader, model, device, num_classes, num_batches)
    total = int(counts.sum())
    return float(counts.trace()) / total if total else float("nan")

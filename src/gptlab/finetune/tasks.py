"""What a fine-tuning run does besides the shared run steps: per task, the data, the model and the hooks.

`instruction_task` and `classification_task` each return a `Task`: the model ready to train (LoRA
adapters or frozen parts in place), the two loaders, the lines that describe the plan, the files the
run keeps besides the model (prompt template, class names), the loop's hooks (greedy responses
after each epoch; accuracy at every evaluation) and what happens after training (responses.jsonl,
the adapter, the final accuracy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from ..config import GPTConfig
from ..errors import UsageError
from ..generation.generate import generate
from ..model import GPTModel, unwrap_model
from ..storage.files import atomic_open
from ..tokenizer import tokenizer_of
from ..training import distributed as D
from ..training.settings import TrainConfig, TrainResult
from .batching import example_loaders
from .classifier import (
    GPTClassifier,
    build_classifier,
    calc_accuracy_loader,
    classification_collate,
    confusion_matrix,
    save_classifier_info,
    set_trainable,
)
from .classify_data import ClassificationDataset, LabelledTexts, check_classes, class_balance, class_names
from .instructions import InstructionDataset, instruction_collate
from .lora import (
    add_lora,
    base_fingerprint,
    check_adapter_base,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
    trainable_parameters,
)
from .settings import FinetuneConfig
from .templates import ALPACA, PromptTemplate, save_template

RESPONSES_NAME = "responses.jsonl"


@dataclass
class Task:
    """Everything the run steps need from one task."""

    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    fingerprint: str  # of the tokenized examples: a resumed run must read the same ones
    plan: list[str]
    write_files: Callable[[Path], None]
    after: Callable[[nn.Module, TrainResult], None]
    sample: Callable[[nn.Module, int], str | None] | None = None
    extra_metrics: Callable[[nn.Module], dict] | None = None


# --- instructions ----------------------------------------------------------------------------------


def instruction_task(ft: FinetuneConfig, cfg: TrainConfig, base: GPTModel, train_entries: list[dict],
                     val_entries: list[dict], out: Path, template: PromptTemplate = ALPACA, log=print) -> Task:
    """Instruction tuning: loss on the responses, greedy answers to validation instructions after each epoch."""
    model, adapter_info = adapt(base, ft)  # first: a wrong --adapter is named before the data is tokenized
    max_length = example_length(ft.max_length, base.config)
    tok = tokenizer_of(base)
    sets = [InstructionDataset(entries, tok, template=template, max_length=max_length,
                               train_on_prompt=ft.train_on_prompt) for entries in (train_entries, val_entries)]
    for dataset, what in zip(sets, ("training", "validation"), strict=True):
        dataset.warn_if_cut(what)
        if not len(dataset):
            raise UsageError(f"no {what} example fits in {max_length} tokens; raise --max-length")
    collate = partial(instruction_collate, pad_token_id=tok.eot_id, allowed_max_length=max_length,
                      mask_prompt=not ft.train_on_prompt)
    train_loader, val_loader = example_loaders(*sets, collate, ft.batch_size, cfg.seed, ft.num_workers,
                                               D.get_rank(), D.get_world_size())
    val_data = sets[1].data
    scored = "prompt and response" if ft.train_on_prompt else "response and its <|endoftext|> only"
    plan = [f"data: {len(sets[0]) + len(sets[1]):,} examples ({len(sets[0]):,} train, {len(sets[1]):,} validation); "
            f"{len(train_loader)} batches of {ft.batch_size} per epoch, padded to the longest (at most {max_length} "
            f"tokens); loss on the {scored}", describe_model(model, ft)]

    def after(model: nn.Module, result: TrainResult) -> None:
        finish_adapter(model, ft, adapter_info, out)
        limit = len(val_data) if ft.responses is None else min(ft.responses, len(val_data))
        if result.interrupted or not limit or not ft.max_new_tokens:
            return
        answers = respond(model, val_data[:limit], template, ft.max_new_tokens, ft.batch_size)
        if D.is_main_process():
            write_responses(out / RESPONSES_NAME, val_data[:limit], answers)
            log(f"responses to {limit} validation instruction(s): {out / RESPONSES_NAME}")

    return Task(model, train_loader, val_loader, fingerprint(sets[0].encoded, sets[1].encoded), plan,
                write_files=lambda folder: save_template(folder, template), after=after,
                sample=response_sampler(val_data[: ft.sample_responses], template, cfg.sample_tokens))


def respond(model: nn.Module, entries: Sequence[dict], template: PromptTemplate = ALPACA,
            max_new_tokens: int = 256, batch_size: int = 8) -> list[str]:
    """Greedy responses to instruction records, each up to its first <|endoftext|> (the book's chapter 7)."""
    inner = unwrap_model(model)
    tok = tokenizer_of(inner)
    eot, answers = tok.eot_id, []
    for i in range(0, len(entries), batch_size):
        prompts = [tok.encode_ordinary(template.format(e["instruction"], e.get("input") or ""))
                   for e in entries[i : i + batch_size]]
        # one batch (left-padded inside); each row comes back as its prompt and its new ids, up to <|endoftext|>
        rows = generate(inner, prompts, max_new_tokens, temperature=0.0, eos_id=eot)
        for prompt, row in zip(prompts, rows, strict=True):
            new = row[len(prompt):].tolist()
            answers.append(tok.decode(new[: new.index(eot)] if eot in new else new).strip())
    return answers


def response_sampler(entries: Sequence[dict], template: PromptTemplate, max_new_tokens: int):
    """The loop's sample hook: greedy answers to a few validation instructions (no RNG is touched)."""
    if not entries:
        return None

    def sample(model: nn.Module, step: int) -> str:
        answers = respond(model, entries, template, max_new_tokens, len(entries))
        return "\n".join(f"  {e['instruction'][:60]!r} -> {a[:200]!r}" for e, a in zip(entries, answers, strict=True))

    return sample


def write_responses(path: Path, entries: Sequence[dict], answers: Sequence[str]) -> None:
    """responses.jsonl: each validation record with the model's answer under "model_response" (the book's key)."""
    with atomic_open(path) as fh:
        for entry, answer in zip(entries, answers, strict=True):
            fh.write(json.dumps({**entry, "model_response": answer}, ensure_ascii=False) + "\n")


# --- classification --------------------------------------------------------------------------------


def classification_task(ft: FinetuneConfig, cfg: TrainConfig, base: GPTModel, train: LabelledTexts,
                        val: LabelledTexts, source: str, out: Path, log=print) -> Task:
    """Classification: the LM head replaced by a class head, accuracy at every evaluation."""
    names = class_names(train.labels)
    check_classes(names, val.labels, source)
    max_length = example_length(ft.max_length, base.config)
    sets = [ClassificationDataset(d.texts, d.labels, names, max_length, tokenizer_of(base)) for d in (train, val)]
    cut = sets[0].truncated + sets[1].truncated
    if cut:
        warnings.warn(f"{cut} of the {len(sets[0]) + len(sets[1])} texts are longer than {max_length} tokens and "
                      "are truncated to their first tokens; raise --max-length (up to the model's context)",
                      stacklevel=2)
    train_loader, val_loader = example_loaders(*sets, classification_collate, ft.batch_size, cfg.seed,
                                               ft.num_workers, D.get_rank(), D.get_world_size())
    model = build_classifier(base, len(names), names)
    if not ft.uses_lora:
        set_trainable(model, ft.trainable or "last-block")
    model, adapter_info = adapt(model, ft, head=model.out_head, labels=names)
    plan = [f"data: {len(sets[0]) + len(sets[1]):,} texts ({len(sets[0]):,} train, {len(sets[1]):,} validation); "
            f"{len(train_loader)} batches of {ft.batch_size} per epoch, padded to the longest (at most "
            f"{max_length} tokens)", f"classes (training): {class_balance(train.labels, names)}",
            describe_model(model, ft)]

    def accuracy(model: nn.Module) -> dict:
        here = next(unwrap_model(model).parameters()).device
        return {"train_accuracy": calc_accuracy_loader(train_loader, model, here, cfg.eval_iters),
                "val_accuracy": calc_accuracy_loader(val_loader, model, here, cfg.eval_iters)}

    def after(model: nn.Module, result: TrainResult) -> None:
        finish_adapter(model, ft, adapter_info, out)
        if result.interrupted:
            return
        here = next(unwrap_model(model).parameters()).device
        counts = confusion_matrix(val_loader, model, here, len(names))
        if D.is_main_process():
            right, total = int(counts.trace()), int(counts.sum())
            log(f"validation accuracy {right / total:.1%} ({right:,} of {total:,}); confusion matrix (rows: "
                  f"true, columns: predicted, order {', '.join(names)}): {counts.tolist()}")

    def write_files(folder: Path) -> None:
        save_classifier_info(folder, names, text_column=ft.text_column, label_column=ft.label_column,
                             max_length=max_length)

    return Task(model, train_loader, val_loader, fingerprint(sets[0].encoded, sets[1].encoded), plan,
                write_files=write_files, after=after, extra_metrics=accuracy)


# --- shared ----------------------------------------------------------------------------------------


def example_length(requested: int | None, config: GPTConfig) -> int:
    if requested is not None and requested > config.context_length:
        raise UsageError(f"--max-length {requested} is above the model's context of {config.context_length}; lower it")
    return requested or config.context_length


def adapter_settings(ft: FinetuneConfig) -> FinetuneConfig:
    """--adapter: the rank, alpha, dropout and targets the adapter was trained with."""
    if ft.adapter is None:
        return ft
    info = read_adapter_config(ft.adapter)
    if info.get("task", "instruct") != ft.task:
        raise UsageError(f"--adapter {ft.adapter} was trained for --task {info.get('task')}, not {ft.task}")
    return dataclasses.replace(ft, method="lora", lora_r=int(info["r"]), lora_alpha=float(info["alpha"]),
                               lora_dropout=float(info["dropout"]), lora_targets=list(info["targets"]))


def adapt(model: GPTModel, ft: FinetuneConfig, head: nn.Module | None = None,
          labels: list[str] | None = None) -> tuple[GPTModel, dict]:
    """LoRA adapters on the frozen model (the class head, if any, trains whole), loaded from --adapter if given.

    Returns the model and what adapter_config.json records (empty without LoRA).
    """
    if not ft.uses_lora:
        return model, {}
    add_lora(model, ft.lora_r, ft.lora_alpha, ft.lora_dropout, ft.targets)
    if head is not None:
        head.requires_grad_(True)
    info = {"task": ft.task, "init": ft.init, "r": ft.lora_r, "alpha": ft.lora_alpha, "dropout": ft.lora_dropout,
            "targets": ft.targets, **({"labels": labels} if labels else {})}
    if ft.adapter is not None:
        saved = read_adapter_config(ft.adapter)
        if labels and saved.get("labels") != labels:
            raise UsageError(f"--adapter {ft.adapter} was trained on the labels {saved.get('labels')}, this data "
                             f"has {labels}")
        check_adapter_base(saved, model, ft.adapter)
        load_adapter_weights(model, ft.adapter)
    # taken now, before wrapping or sharding: the frozen weights never change during the run
    return model, {**info, "base_config": unwrap_model(model).config.to_dict(),
                   "base_fingerprint": base_fingerprint(model)}


def finish_adapter(model: nn.Module, ft: FinetuneConfig, info: dict, out: Path) -> None:
    """Save the adapter (every rank gathers under torchrun, rank 0 writes)."""
    if not ft.uses_lora:
        return
    names = set(trainable_parameters(model))
    if D.is_multi_rank():
        state = D.model_state_dict(model)
        tensors = {k: v for k, v in state.items() if k in names}
    else:
        tensors = {k: v.detach() for k, v in trainable_parameters(model).items()}
    if D.is_main_process():
        save_adapter(out, tensors, info)


def describe_model(model: nn.Module, ft: FinetuneConfig) -> str:
    """Parameters, what trains, and the optimizer memory that costs (AdamW: two float32 moments per weight)."""
    inner = unwrap_model(model)
    adapters = sum(p.numel() for n, p in inner.named_parameters() if ".lora." in n)
    base = sum(p.numel() for p in inner.parameters()) - adapters
    trainable = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    if ft.uses_lora:
        how = f"LoRA r={ft.lora_r} alpha={ft.lora_alpha:g} dropout {ft.lora_dropout:g} on {', '.join(ft.targets)}"
    elif isinstance(inner, GPTClassifier):
        how = f"trainable: {ft.trainable or 'last-block'}"
    else:
        how = "full fine-tuning"
    return (f"model: {base:,} parameters{f' + {adapters:,} in adapters' if adapters else ''}; {how}: {trainable:,} "
            f"trainable ({trainable / base:.2%} of the model's); AdamW state {8 * trainable / 2**20:,.1f} MiB "
            f"(for every weight: {8 * base / 2**20:,.1f} MiB)")


def fingerprint(*parts: Sequence[tuple[list[int], int]]) -> str:
    """A short sha256 of tokenized examples (ids and the prompt length or label of each)."""
    digest = hashlib.sha256()
    for part in parts:
        for ids, extra in part:
            digest.update(json.dumps([ids, extra]).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]

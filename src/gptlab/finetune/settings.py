"""The settings of a fine-tuning run: what `gptlab finetune` adds to the training loop's TrainConfig.

Like RunConfig (training/settings.py), each field carries the help text of its command-line option,
and nothing here imports torch. The loop's own settings keep their meaning; only their defaults
differ for fine-tuning (`train_defaults`): fewer epochs and a much smaller learning rate than
pretraining from scratch, as in the book's chapters 6 and 7.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..training.settings import STRATEGY_CHOICES, _check, _Settings, setting

TASKS = ("instruct", "classify")
METHODS = ("full", "lora")
TRAINABLE = ("head", "last-block", "all")
# The Linear layers of a transformer block, by attribute name (model.py): LoRA's default targets.
LORA_TARGETS = ("qkv", "out_proj", "fc", "proj")


@dataclass
class FinetuneConfig(_Settings):
    """What `gptlab finetune` sets up around the loop: the task, its data, the model and how it is adapted."""

    task: str = setting("instruct", "instruct: follow instructions (Alpaca-style records, the book's chapter 7); "
                        "classify: label texts (a table of texts and labels, chapter 6)", "choice", group="task",
                        choices=TASKS)
    data: str | None = setting(None, "instructions: a JSON array or JSON Lines of {instruction, input, output} "
                               "or {messages} records; classify: a CSV/TSV with a header, or JSON Lines",
                               "text", group="data")
    val_data: str | None = setting(None, "validation examples in a file of their own (instead of --val-fraction)",
                                   "text", group="data")
    val_fraction: float = setting(0.1, "share of the examples held out for validation (per class when "
                                  "classifying)", "fraction", group="data")
    batch_size: int = setting(8, "examples per batch (padded to the longest one)", "positive", group="data")
    max_length: int | None = setting(None, "tokens per example; longer ones are truncated with a warning "
                                     "(default: the model's context)", "positive", group="data")
    train_on_prompt: bool = setting(False, "also learn to predict the prompt's tokens (default: the loss covers "
                                    "the response and its <|endoftext|> only)", "flag", group="data")
    text_column: str = setting("text", "classify: the column (or JSON key) holding the text", "text",
                               group="data")
    label_column: str = setting("label", "classify: the column (or JSON key) holding the label", "text",
                                group="data")
    num_workers: int = setting(0, "data-loader worker processes", "count", group="data")
    data_files: list[dict] | None = setting(None, "the data files with their sizes and sha256: checked when the "
                                            "run resumes", cli=False)
    init: str | None = setting(None, "the model to fine-tune: anything --model accepts (a GPT-2 name, an "
                               "OpenAI/Hugging Face/gptlab folder, a run folder, a book .pth)", "text", group="model")
    method: str = setting("full", "full: train the weights themselves; lora: train low-rank adapters on "
                          "frozen weights, merged into the saved model", "choice", group="model", choices=METHODS)
    trainable: str | None = setting(None, "classify with --method full: what trains (default last-block: the "
                                    "last transformer block, the final norm and the new head, as in the book)",
                                    "choice", group="model", choices=TRAINABLE)
    drop_rate: float | None = setting(None, "dropout rate (default: the model config's)", "rate", group="model")
    adapter: str | None = setting(None, "start from the LoRA adapter saved in this run folder (its rank, alpha "
                                  "and targets); implies --method lora", "text", group="lora")
    lora_r: int = setting(8, "rank of the adapters", "positive", group="lora")
    lora_alpha: float = setting(16.0, "adapter scale: updates are multiplied by alpha / r", "positive_number",
                                group="lora")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input (0, as in the book and PEFT; each adapted "
                                  "layer then keeps a dropped copy of its input for the backward pass)", "rate",
                                  group="lora")
    lora_targets: list[str] | None = setting(None, f"comma-separated Linear layers of each block to adapt (default "
                                             f"all: {','.join(LORA_TARGETS)})", "names", group="lora")
    max_new_tokens: int = setting(256, "instruct: longest greedy response generated for the validation set "
                                  "(responses.jsonl)", "count", group="evaluation and output")
    responses: int | None = setting(None, "instruct: how many validation examples get a response in "
                                    "responses.jsonl (default all, 0 none)", "count", group="evaluation and output")
    sample_responses: int = setting(3, "instruct: validation instructions answered (greedily) in the log after "
                                    "each epoch (0: none)", "count", group="evaluation and output")
    strategy: str | None = setting(None, "data parallelism under torchrun (default: ddp when several ranks)",
                                   "choice", group="scale", choices=STRATEGY_CHOICES)
    compile: bool = setting(False, "torch.compile the model", "flag", group="scale")
    compile_backend: str = setting("inductor", "torch.compile backend", "text", group="scale")

    def __post_init__(self) -> None:
        if self.lora_targets is not None:
            self.lora_targets = list(self.lora_targets)
        unknown = sorted(set(self.lora_targets or ()) - set(LORA_TARGETS))
        _check([
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (self.trainable in (None, *TRAINABLE), f"trainable must be one of {', '.join(TRAINABLE)}"),
            (0.0 < self.val_fraction < 1.0, "val_fraction must be between 0 and 1 (exclusive)"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.max_length is None or self.max_length >= 1, "max_length must be at least 1"),
            (self.lora_r >= 1, f"--lora-r must be at least 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
            (not unknown, f"unknown --lora-targets {', '.join(unknown)}; choose from {', '.join(LORA_TARGETS)}"),
            (self.lora_targets is None or len(self.lora_targets) > 0, "--lora-targets needs at least one layer"),
            (self.max_new_tokens >= 0, "max_new_tokens must be 0 or more"),
            (self.responses is None or self.responses >= 0, "responses must be 0 or more"),
            (self.sample_responses >= 0, "sample_responses must be 0 or more"),
            (self.num_workers >= 0, "num_workers must be 0 or more"),
            (self.strategy in (None, *STRATEGY_CHOICES), "strategy must be none, ddp or fsdp"),
            (not (self.trainable and self.uses_lora), "--trainable goes with --method full; with LoRA the "
             "adapters and the classification head train"),
            (self.task == "classify" or self.trainable is None, "--trainable is for --task classify"),
            (self.task == "instruct" or not self.train_on_prompt, "--train-on-prompt is for instruction tuning"),
        ], "fine-tuning settings")

    @property
    def uses_lora(self) -> bool:
        return self.method == "lora" or self.adapter is not None

    @property
    def targets(self) -> list[str]:
        return list(self.lora_targets or LORA_TARGETS)


# Settings the loop must keep on --resume: they fix the data order and the model.
FIXED_ON_RESUME = ("task", "data", "val_data", "val_fraction", "batch_size", "max_length", "train_on_prompt",
                   "text_column", "label_column", "init", "method", "trainable", "adapter", "lora_r", "lora_alpha",
                   "lora_targets", "grad_accum", "seed")


def train_defaults(task: str, method: str) -> dict[str, Any]:
    """TrainConfig values that differ for fine-tuning; options given on the command line override them.

    Full fine-tuning: the book's AdamW lr 5e-5 with weight decay 0.1 (chapters 6 and 7); LoRA trains far
    fewer weights from zero and takes a larger step (2e-4, no decay, as litgpt and PEFT recipes do).
    The book trains instructions for 2 epochs and the spam classifier for 5.
    """
    lora = method == "lora"
    return {
        "epochs": 5 if task == "classify" else 2,
        "lr": 2e-4 if lora else 5e-5,
        "weight_decay": 0.0 if lora else 0.1,
        "warmup_steps": 0,
    }

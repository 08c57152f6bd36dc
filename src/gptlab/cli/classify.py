"""`gptlab classify`: label texts with a classifier made by `gptlab finetune --task classify`.

`--text` prints each text's label and the probability of every class; `--data FILE` with a label
column prints the accuracy and the confusion matrix (rows: true label, columns: predicted), and
without one, a label per text. `--json` prints one object instead:
{"predictions": [{"text", "label", "probabilities": {label: p}}]} or
{"accuracy", "examples", "labels", "confusion_matrix", "per_class": {label: {precision, recall, support}}}.
"""

from __future__ import annotations

import argparse
import json

from .common import add_device_arg, pick_device, positive_int


def register(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a classifier fine-tuned by gptlab finetune --task classify")
    p.add_argument("--model", required=True, help="the run folder of gptlab finetune --task classify")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", metavar="TEXT", help="one or more texts to label")
    source.add_argument("--data", metavar="FILE", help="a CSV/TSV or JSON Lines file of texts; with labels: accuracy "
                        "and confusion matrix")
    for what in ("text", "label"):
        p.add_argument(f"--{what}-column", default=None, help=f"column of the {what}s in --data (default: the "
                       "training run's)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..finetune.classifier import classify_texts, load_classifier, read_classifier_info
    from ..finetune.classify_data import load_classification_data

    info = read_classifier_info(args.model)  # a clear error for a folder that is not a classifier
    labels = None
    if args.text is not None:
        texts = args.text
    else:
        data = load_classification_data(args.data, args.text_column or info.get("text_column", "text"),
                                        args.label_column or info.get("label_column", "label"), require_labels=False)
        texts, labels = data.texts, data.labels
        if any(label is None for label in labels):
            if not all(label is None for label in labels):
                raise UsageError(f"{args.data}: some records have a label and some do not; label all of them "
                                 "(for the accuracy) or none (for a label per text)")
            labels = None
    model = load_classifier(args.model, pick_device(args, quiet=True))
    if labels is not None:
        unknown = sorted(set(labels) - set(model.labels))
        if unknown:
            raise UsageError(f"{args.data} has label(s) {', '.join(map(repr, unknown))} the classifier does not know "
                             f"(it knows {', '.join(model.labels)})")
    probs = classify_texts(model, texts, args.batch_size, model.max_length)
    if labels is None:
        _print_predictions(texts, probs, model.labels, args.json)
    else:
        _print_evaluation(labels, probs, model.labels, args.json)
    return 0


def _print_predictions(texts, probs, names, as_json: bool) -> None:
    rows = [{"text": text, "label": names[int(p.argmax())],
             "probabilities": {n: round(float(x), 6) for n, x in zip(names, p, strict=True)}}
            for text, p in zip(texts, probs, strict=True)]
    if as_json:
        print(json.dumps({"predictions": rows}, ensure_ascii=False))
        return
    for row in rows:
        shares = ", ".join(f"{n} {x:.3f}" for n, x in row["probabilities"].items())
        print(f"{row['label']}\t({shares})\t{row['text']}")


def _print_evaluation(labels, probs, names, as_json: bool) -> None:
    import torch

    index = {n: i for i, n in enumerate(names)}
    truth = torch.tensor([index[label] for label in labels])
    counts = torch.zeros(len(names), len(names), dtype=torch.long)
    counts.index_put_((truth, probs.argmax(dim=1)), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    per_class = {}
    for i, name in enumerate(names):
        predicted, support = int(counts[:, i].sum()), int(counts[i].sum())
        per_class[name] = {"precision": counts[i, i].item() / predicted if predicted else None,
                           "recall": counts[i, i].item() / support if support else None, "support": support}
    result = {"accuracy": int(counts.trace()) / len(labels), "examples": len(labels), "labels": list(names),
              "confusion_matrix": counts.tolist(), "per_class": per_class}
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(f"accuracy {result['accuracy']:.2%} ({int(counts.trace()):,} of {len(labels):,})")
    width = max(len(n) for n in names) + 2
    print("confusion matrix (rows: true label, columns: predicted)")
    print(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, counts.tolist(), strict=True):
        print(f"{name:<{width}}" + "".join(f"{c:>{width}}" for c in row))

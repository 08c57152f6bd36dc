"""Data: texts and corpora, sliding-window datasets and loaders, and prepared token files (`gptlab prepare`)."""

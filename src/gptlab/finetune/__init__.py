"""Fine-tuning: instruction tuning (the book's chapter 7), classification (chapter 6) and LoRA (appendix E)."""

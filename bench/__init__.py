"""gptlab benchmarks beside its peers (not part of the installed package)."""

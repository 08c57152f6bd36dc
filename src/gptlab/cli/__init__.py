"""The `gptlab` command line: the entry point (main.py) and one module per verb, on top of the library."""

"""`gptlab serve`: an OpenAI-compatible HTTP server with continuous batching and a web playground.

protocol.py validates requests into plain settings (OpenAI-style errors); scheduler.py shares one
model between requests, batching their decoding steps (continuous batching, in its own thread);
sequence.py is one choice's state (sampling, text, stop strings, logprobs, explain); tokens.py shows
tokens; chat.py turns messages into a prompt; app.py is the FastAPI application; server.py runs it
with uvicorn. The web playground (static/) is served at `/`. FastAPI and uvicorn come with the
`serve` extra (`pip install gptlab[serve]`); nothing here imports them except app.py and server.py.
"""

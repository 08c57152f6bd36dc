"""`gptlab serve`: an OpenAI-compatible HTTP server with continuous batching and a web playground.

protocol.py validates requests into plain settings (OpenAI-style errors); chat.py turns messages into
a prompt; scheduler.py shares one model between requests, batching their decoding steps (continuous
batching, in its own thread); sequence.py is one choice's state (sampling, text, stop strings,
logprobs, explain) and tokens.py how tokens are shown; runs.py carries a request's events from the
scheduler's thread to the event loop; responses.py builds OpenAI's response objects; app.py is the
FastAPI application and server.py runs it with uvicorn. The playground (static/) is served at `/`.
FastAPI and uvicorn come with the `serve` extra (`pip install -e '.[serve]'`); only app.py and
server.py import them. The manual is docs/serve.md.
"""

"""Serving a run: the batching engine (engine.py), OpenAI's
HTTP shapes on FastAPI (api.py, needs the `serve` extra), the chat page (page.html), and the
stage that puts them together (server.py: `python scripts/serve.py run.dir=runs/chat_demo`)."""

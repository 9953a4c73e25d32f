"""Serve a run over OpenAI's API, with a chat page in the browser.

    python scripts/serve.py run.dir=runs/chat_demo                    # http://127.0.0.1:8000/
    python scripts/serve.py run.dir=runs/chat_demo serve.port=8080 serve.max_batch=8
    python scripts/serve.py checkpoint_path=runs/chat_demo/checkpoints/step_000300

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (stream: true for
server-sent events), GET /health, and the chat page at /. Needs the `serve` extra
(pip install -e ".[serve]"). Options: `serve.*` in tinyllama/config.py (ServeConfig). Same as
`tinyllama-serve`.
"""

from tinyllama.cli import serve_main

if __name__ == "__main__":
    serve_main()

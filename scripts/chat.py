"""Chat with a fine-tuned run: one streamed reply, or an interactive chat with history.

    python scripts/chat.py run.dir=runs/chat_demo prompt="Tom had a red ball. Who is the story about?"
    python scripts/chat.py run.dir=runs/chat_demo                       # interactive: /reset, Ctrl-D
    python scripts/chat.py run.dir=runs/chat_demo chat.system="You answer in a few words." chat.temperature=0.7

Replies stop at the end-of-turn token; in the interactive chat the oldest turns are dropped when the
context is full. Options: `chat.*` in tinyllama/config.py (ChatConfig). Same as `tinyllama-chat`.
"""

from tinyllama.cli import chat_main

if __name__ == "__main__":
    chat_main()

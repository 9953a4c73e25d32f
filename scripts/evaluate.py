"""Evaluate a checkpoint: loss, perplexity, bits per byte, loss by position (table and plot).

    python scripts/evaluate.py run.dir=runs/demo
    python scripts/evaluate.py checkpoint_path=runs/demo/checkpoints/step_300
    python scripts/evaluate.py run.dir=runs/demo evaluate.files=[notes.txt]          # your own text
    python scripts/evaluate.py run.dir=runs/demo evaluate.source=data data=tinystories  # another source
    python scripts/evaluate.py run.dir=runs/demo evaluate.seq_len=1024 evaluate.rope_type=linear evaluate.rope_factor=4
    python scripts/evaluate.py run.dir=runs/chat_demo              # a chat run: assistant_loss, answer_accuracy
    python scripts/evaluate.py run.dir=runs/demo evaluate.source=data data=synthetic_chat  # a base run, same questions

Results are printed and written to <run>/eval/. Options: `evaluate.*` in tinyllama/config.py
(EvaluateConfig). Same as `tinyllama-evaluate`.
"""

from tinyllama.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()

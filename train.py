"""Train a small Llama-family model end to end: `python train.py model=tiny data=tinystories`.

With no arguments it runs the built-in demo (tiny model, synthetic stories, CPU-friendly).
All the work is in `tinyllama.cli.train_main`; this file only makes `python train.py` work.
"""

from tinyllama.cli import train_main

if __name__ == "__main__":
    train_main()

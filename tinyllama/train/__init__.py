"""Training: the loop and the pieces it calls.

    loop.py         run_training(job) -> final val loss; the Trainer (one loop for every preset)
    build.py        tokenizer + packed data if missing, the model (fresh or init_from)
    optim.py        AdamW with decay/no-decay groups; cosine / wsd / constant schedules
    precision.py    fp32 / bf16 autocast / fp16 + GradScaler, "auto" per device
    distributed.py  the only reader of the torchrun environment; DDP wrapping
    evaluator.py    validation during training (owns its schedule)
    tracker.py      metrics.jsonl, the console bar, wandb (rank 0)
    throughput.py   tokens/s, MFU, peak memory
    nan_guard.py    stop (or skip) on a NaN/inf loss
    signals.py      SIGTERM/SIGINT: finish the step, save, exit
    rng.py          RNG states for exact resume
    samples.py      samples.txt at the end of training
Checkpoints live one level up, in tinyllama/checkpoint.py, because every stage loads them.
"""

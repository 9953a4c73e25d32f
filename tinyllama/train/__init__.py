"""Training: the loop and the pieces it calls.

    loop.py         run_training(job) -> final val loss; the Trainer (one loop for every preset)
    build.py        tokenizer + packed data if missing, the model (fresh or init_from)
    optim.py        AdamW with decay/no-decay groups; cosine / wsd / constant schedules
    precision.py    fp32 / bf16 autocast / fp16 + GradScaler, "auto" per device
    distributed.py  the only reader of the torchrun environment; DDP wrapping
    checkpointer.py handed the run's stateful objects: saves, resumes and prunes them
    evaluator.py    validation during training
    cadence.py      the schedule both of them own: every N steps, at the end, when forced
    tracker.py      metrics.jsonl, the console bar, wandb (rank 0)
    throughput.py   tokens/s, MFU, peak memory
    nan_guard.py    stop (or skip) on a NaN/inf loss
    signals.py      SIGTERM/SIGINT: finish the step, save, exit
    rng.py          RNG states for exact resume
    samples.py      samples.txt at the end of training
The checkpoint format and its one loader live one level up, in tinyllama/checkpoint.py, because
every stage loads checkpoints; artifacts are written atomically through tinyllama/atomic.py.
"""

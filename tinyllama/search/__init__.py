"""Hyper-parameter searches: a persistent, shared, pruning Optuna study (study.py), run by the
Hydra sweeper in hydra_plugins/tinyllama_search, and the hook through which each trial reports
its validation losses (trial.py). Optuna is imported only when a search runs."""

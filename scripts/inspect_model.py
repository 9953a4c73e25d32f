"""Course tooling: module tree, parameter and FLOP counts, memory estimate, shape trace.

    python scripts/inspect_model.py model=llama2_7b
    python scripts/inspect_model.py model=tiny inspect.trace=true
    python scripts/inspect_model.py model=llama3_8b inspect.seq_len=8192 inspect.tree=false

Options: `inspect.*` in tinyllama/config.py (InspectConfig). Same as `tinyllama-inspect`.
"""

from tinyllama.cli import inspect_main

if __name__ == "__main__":
    inspect_main()

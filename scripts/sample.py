"""Sample from a checkpoint, streaming the text as it is generated.

    python scripts/sample.py run.dir=runs/demo prompt="Once upon a time"
    python scripts/sample.py run.dir=runs/demo sample.prompt_file=prompts.txt sample.temperature=0
    python scripts/sample.py run.dir=runs/demo sample.interactive=true     # prompts from stdin until EOF
    python scripts/sample.py checkpoint_path=runs/demo/checkpoints/best sample.top_k=40 sample.num_samples=1

Options: `sample.*` in tinyllama/config.py (SampleConfig). Same as `tinyllama-sample`.
"""

from tinyllama.cli import sample_main

if __name__ == "__main__":
    sample_main()

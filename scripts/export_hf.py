"""Export a checkpoint to a Hugging Face folder that transformers loads offline.

    python scripts/export_hf.py run.dir=runs/demo                       # -> runs/demo/hf/
    python scripts/export_hf.py run.dir=runs/demo export.out_dir=hf/tiny export.dtype=bfloat16

Then:  AutoModelForCausalLM.from_pretrained("runs/demo/hf"), AutoTokenizer.from_pretrained(...).
Import goes the other way: python train.py init_from=hf:<local folder> (Llama or Qwen2, safetensors).
Options: `export.*` in tinyllama/config.py (ExportConfig). Same as `tinyllama-export`.
"""

from tinyllama.cli import export_main

if __name__ == "__main__":
    export_main()

"""Export a checkpoint to one GGUF file (and an Ollama Modelfile) for llama.cpp, Ollama, LM Studio.

    python scripts/export_gguf.py run.dir=runs/demo                        # -> runs/demo/gguf/demo-F32.gguf
    python scripts/export_gguf.py run.dir=runs/demo export.dtype=q8_0 export.out_dir=gguf/q8

Then:  llama-cli -m runs/demo/gguf/demo-F32.gguf -p "Once upon a time" -n 100
       cd runs/demo/gguf && ollama create demo -f Modelfile && ollama run demo "Once upon a time"
Needs the `gguf` package (pip install -e ".[gguf]"); with llama-cpp-python installed the file is
loaded back in llama.cpp and compared (export.verify). Options: `export.*` in tinyllama/config.py
(ExportConfig). Same as `tinyllama-export-gguf`.
"""

from tinyllama.cli import export_gguf_main

if __name__ == "__main__":
    export_gguf_main()

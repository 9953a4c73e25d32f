"""tinyllama: train small Llama/Qwen2-family language models end to end."""

__version__ = "0.1.0"

"""GGUF export: a checkpoint -> one `.gguf` file that llama.cpp, Ollama and LM Studio load.

Written with the `gguf` package (`pip install -e ".[gguf]"`): its GGUFWriter, its tensor-name
map and its quantizer. The folder (export.out_dir, default <run>/gguf) holds

    <name>-<F32|F16|BF16|Q8_0>.gguf   weights, hyper-parameters and the SentencePiece vocabulary
    Modelfile                         for `ollama create <name> -f Modelfile`

What llama.cpp's Llama and Qwen2 graphs need, checked in its sources (src/llama-model.cpp,
src/models/{llama,qwen2}.cpp, convert_hf_to_gguf.py):

- RoPE layout. Our heads use the half-split layout (channel i rotates with i + D/2). llama.cpp
  runs LLM_ARCH_LLAMA with its "normal" RoPE, which rotates adjacent pairs (2i, 2i + 1), so the
  rows of q_proj and k_proj (weights and biases) are reordered per head: new row 2i = old row i,
  new row 2i + 1 = old row i + D/2. q . k is unchanged by reordering both the same way.
  LLM_ARCH_QWEN2 runs the "neox" RoPE, which is the half-split layout: no reordering.
- RoPE scaling: linear as rope.scaling.type/factor; llama3 as the `rope_freqs` tensor of
  per-frequency divisors (Llama only). HF's "dynamic" NTK scaling has no llama.cpp counterpart.
- Biases: Llama takes optional q/k/v/o and MLP biases; Qwen2 takes q/k/v biases only.
  Neither graph has a sliding window, and Qwen2's attention output must be hidden_size wide.
- Weights: 1-D tensors (norms, biases, rope_freqs) stay float32 as llama.cpp's converter keeps
  them; 2-D tensors take export.dtype (q8_0 only where a row is a whole number of 32-blocks,
  float32 otherwise). A tied head is stored once, as token_embd (llama.cpp reuses it).

The stage (`run_export_gguf`) starts as the Hugging Face export's does, through
`tinyllama.export.export_inputs`, and shares its build-then-rename folder and its verification.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from tinyllama.atomic import building_folder
from tinyllama.chat_template import CHAT_TEMPLATE, END_OF_TURN
from tinyllama.checkpoint import LoadedCheckpoint
from tinyllama.config import QUANTIZED, canonical_dtype, dtype_choices
from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.export import (
    OVERWRITE_HINT,
    chat_end_of_turn,
    check_export,
    export_inputs,
    exported_parts,
    generation_defaults,
    sentencepiece_proto,
)
from tinyllama.generate import generate
from tinyllama.model.config import LlamaConfig
from tinyllama.model.heads import drop_tied_head
from tinyllama.model.rotary import compute_inv_freq

# export.dtype (config.DTYPES and config.QUANTIZED, by their short names) -> (GGMLQuantizationType
# name of 2-D tensors, LlamaFileType name, file-name tag)
GGUF_DTYPES = {
    "fp32": ("F32", "ALL_F32", "F32"),
    "fp16": ("F16", "MOSTLY_F16", "F16"),
    "bf16": ("BF16", "MOSTLY_BF16", "BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
}
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}  # gguf.MODEL_ARCH members
# chat_template.CHAT_TEMPLATE for Ollama: the same pieces around each message, then <|assistant|>
# (Ollama puts the system prompt among .Messages; <s> comes from the GGUF's add_bos).
OLLAMA_CHAT_TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"


def import_gguf():
    """The `gguf` package, or a ConfigError saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ConfigError(f'the GGUF export needs the `gguf` package ({e}): pip install -e ".[gguf]"') from e
    return gguf


def gguf_problems(cfg: LlamaConfig) -> List[str]:
    """What llama.cpp's graph for cfg.model_type cannot express (empty when it can run cfg)."""
    out = []
    rope = (cfg.rope_scaling or {"rope_type": "default"})["rope_type"]
    if cfg.hidden_act != "silu":
        out.append(f"hidden_act={cfg.hidden_act!r}: llama.cpp's Llama and Qwen2 use silu only")
    if rope == "dynamic":
        out.append("rope_scaling dynamic (NTK): llama.cpp has no such scaling; use linear or llama3")
    if any(cfg.uses_sliding_window(i) for i in range(cfg.num_hidden_layers)):
        out.append(
            f"sliding_window={cfg.sliding_window}: llama.cpp's {cfg.model_type} graph has no sliding window"
        )
    if cfg.model_type == "qwen2":
        if rope == "llama3":
            out.append("rope_scaling llama3 with model_type=qwen2: llama.cpp reads rope_freqs for Llama only")
        if cfg.mlp_bias:
            out.append("mlp_bias with model_type=qwen2: llama.cpp's Qwen2 has q/k/v biases only")
        if cfg.resolved_head_dim * cfg.num_attention_heads != cfg.hidden_size:
            out.append(
                "model_type=qwen2 with heads x head_dim != hidden_size: llama.cpp's Qwen2 needs them equal"
            )
    return out


def interleave_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows (H*D, ...) from the half-split layout to adjacent pairs:
    per head, row i -> 2i and row i + D/2 -> 2i + 1 (what llama.cpp's normal RoPE rotates)."""
    d = w.shape[0] // num_heads
    return w.reshape(num_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg: LlamaConfig, state: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Our state_dict (Hugging Face names) -> {GGUF name: float32 array in llama.cpp's layout},
    arrays in PyTorch's (out, in) order (GGUFWriter records the reversed ggml shape)."""
    gguf = import_gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHITECTURES[cfg.model_type]], cfg.num_hidden_layers)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.resolved_num_key_value_heads}
    out: Dict[str, np.ndarray] = {}
    for key, t in drop_tied_head(state, cfg).items():
        t = t.detach().to("cpu", torch.float32)
        proj = key.split(".")[-2]
        if cfg.model_type == "llama" and proj in heads:
            t = interleave_rope_rows(t, heads[proj])
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"{key}: no GGUF tensor of llama.cpp's {cfg.model_type} takes this weight")
        out[name] = t.numpy()
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        # Divisors of each frequency, as llama.cpp applies them: default inv_freq / scaled inv_freq.
        unscaled = dataclasses.replace(cfg, rope_scaling=None)
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = (
            compute_inv_freq(unscaled) / compute_inv_freq(cfg)
        ).numpy()
    return out


def encode_tensor(array: np.ndarray, dtype: str):
    """(data, GGMLQuantizationType) to store `array` (float32) as for export.dtype (a short name)."""
    gguf = import_gguf()
    kind = (
        gguf.GGMLQuantizationType[GGUF_DTYPES[dtype][0]] if array.ndim == 2 else gguf.GGMLQuantizationType.F32
    )
    if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        kind = gguf.GGMLQuantizationType.F32  # rows must be whole blocks of 32
    return gguf.quants.quantize(array, kind), kind


def add_tokenizer(
    writer,
    sp_model: Path,
    vocab_size: int,
    chat_template: Optional[str] = None,
    end_of_turn: Optional[int] = None,
) -> Optional[str]:
    """The SentencePiece model as llama.cpp's "llama" vocabulary: every piece with its score and
    type (SentencePiece's type numbers are GGUF's), padded with unused pieces up to vocab_size,
    the special ids, add-bos, and the dummy-prefix setting; a chat model's template as
    tokenizer.chat_template and its end-of-turn id as llama.cpp's eot token (generation ends at
    it). Returns the eos piece (None: none)."""
    proto = sentencepiece_proto(sp_model)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if len(proto.pieces) > vocab_size:
        raise CheckpointError(
            f"{sp_model} has {len(proto.pieces)} pieces, more than the model's "
            f"vocab_size={vocab_size}: it is not this model's tokenizer"
        )
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        warnings.warn(
            f"{sp_model} normalizes text ({norm.name or 'custom'} rules, remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}); llama.cpp applies no SentencePiece normalization, so "
            "its token ids will differ from ours on text the normalization changes",
            stacklevel=2,
        )
    if spec.model_type == spec.UNIGRAM:
        warnings.warn(
            f"{sp_model} is a unigram model; llama.cpp segments by merging the best-scoring pairs "
            "(BPE), so its ids can differ from SentencePiece's on some text",
            stacklevel=2,
        )
    pad = range(len(proto.pieces), vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(
        [p.piece.encode("utf-8") for p in proto.pieces] + [f"[PAD{i}]".encode() for i in pad]
    )
    writer.add_token_scores([p.score for p in proto.pieces] + [-1000.0] * len(pad))
    writer.add_token_types([int(p.type) for p in proto.pieces] + [5] * len(pad))  # 5: UNUSED
    for add, token_id in (
        (writer.add_bos_token_id, spec.bos_id),
        (writer.add_eos_token_id, spec.eos_id),
        (writer.add_unk_token_id, spec.unk_id),
        (writer.add_pad_token_id, spec.pad_id),
    ):
        if token_id >= 0:
            add(token_id)
    writer.add_add_bos_token(spec.bos_id >= 0)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(norm.add_dummy_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)
    return spec.eos_piece if spec.eos_id >= 0 else None


def add_hyperparameters(writer, cfg: LlamaConfig) -> None:
    """The model's shape and RoPE in llama.cpp's `<arch>.*` keys."""
    gguf = import_gguf()
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.resolved_num_key_value_heads)
    writer.add_key_length(cfg.resolved_head_dim)
    writer.add_value_length(cfg.resolved_head_dim)
    writer.add_rope_dimension_count(cfg.resolved_head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    rope = cfg.rope_scaling or {}
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def export_gguf(
    model: Union[nn.Module, LoadedCheckpoint],
    out_dir: Union[str, Path],
    tokenizer_path: Optional[Union[str, Path]] = None,
    dtype: str = "fp32",
    name: str = "model",
    generation: Optional[Dict[str, Any]] = None,
    chat_template: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write `out_dir`/<name>-<type>.gguf and its Ollama Modelfile; return the .gguf path.

    model: a LlamaForCausalLM or a LoadedCheckpoint. tokenizer_path: the SentencePiece .model
    (default: the checkpoint's copy; needed, since llama.cpp reads the vocabulary from the file).
    generation: sampling defaults for the Modelfile (generation_config.json's names).
    chat_template: a Jinja chat template stored as tokenizer.chat_template; default: the project's
    (tinyllama/chat_template.py) when the tokenizer has the chat pieces.
    The folder is built beside `out_dir` and renamed into place; an existing non-empty `out_dir`
    is refused unless overwrite=True. A model llama.cpp cannot run is refused with the reasons.
    """
    cfg, state, tokenizer_path = exported_parts(model, tokenizer_path)
    if canonical_dtype(dtype) not in GGUF_DTYPES:
        raise ConfigError(f"export dtype={dtype!r}: choose one of {dtype_choices(QUANTIZED)}")
    dtype = canonical_dtype(dtype)
    if tokenizer_path is None:
        raise ConfigError(
            "a GGUF file carries its vocabulary: give tokenizer_path (the SentencePiece .model)"
        )
    problems = gguf_problems(cfg)
    if problems:
        raise ConfigError("llama.cpp cannot run this model as exported:\n  - " + "\n  - ".join(problems))
    end = chat_end_of_turn(tokenizer_path)
    if end is not None and chat_template is None:
        chat_template = CHAT_TEMPLATE
    gguf = import_gguf()
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # it logs the temporary path
    file_name = f"{name}-{GGUF_DTYPES[dtype][2]}.gguf"
    out_dir = Path(out_dir)
    with building_folder(out_dir, overwrite, OVERWRITE_HINT) as tmp:
        arch = gguf.MODEL_ARCH[ARCHITECTURES[cfg.model_type]]
        writer = gguf.GGUFWriter(tmp / file_name, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType[GGUF_DTYPES[dtype][1]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, cfg)
        eos_piece = add_tokenizer(writer, Path(tokenizer_path), cfg.vocab_size, chat_template, end)
        for tensor_name, array in gguf_tensors(cfg, state).items():
            data, kind = encode_tensor(array, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        stop = [p for p in (eos_piece, END_OF_TURN if end is not None else None) if p]
        text = modelfile(file_name, cfg, generation or {}, chat_template, stop=stop)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    return out_dir / file_name


def modelfile(
    gguf_file: str,
    cfg: LlamaConfig,
    generation: Dict[str, Any],
    chat_template: Optional[str],
    stop: Union[str, Sequence[str], None],
) -> str:
    """An Ollama Modelfile for the .gguf beside it: the prompt template, the stop tokens (the eos
    piece; a chat model's end-of-turn too), the context length and the run's sampling settings
    (generation_config.json's names)."""
    lines = [
        '# ollama create <name> -f Modelfile  (then: ollama run <name> "Once upon a time")',
        f"FROM ./{gguf_file}",
    ]
    if chat_template == CHAT_TEMPLATE:  # ours in Ollama's Go template language (it runs no Jinja)
        lines.append(f'TEMPLATE """{OLLAMA_CHAT_TEMPLATE}"""')
    elif chat_template:  # Ollama derives its Go template from the GGUF's tokenizer.chat_template
        lines.append("# TEMPLATE: taken from the chat template stored in the .gguf")
    else:  # a base model continues the text as given (<s> is added per the GGUF's add_bos)
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    for piece in [stop] if isinstance(stop, str) else stop or []:
        lines.append(f'PARAMETER stop "{piece}"')
    lines.append(f"PARAMETER num_ctx {cfg.max_position_embeddings}")
    if "max_new_tokens" in generation:
        lines.append(f"PARAMETER num_predict {generation['max_new_tokens']}")
    if not generation.get("do_sample", True):
        lines.append("PARAMETER temperature 0")
    else:
        ollama_names = {
            "temperature": "temperature",
            "top_p": "top_p",
            "top_k": "top_k",
            "repetition_penalty": "repeat_penalty",
        }
        for ours, theirs in ollama_names.items():
            if ours in generation:
                lines.append(f"PARAMETER {theirs} {generation[ours]}")
        if "top_k" not in generation:  # Ollama's default is 40; the run samples from every token
            lines.append("PARAMETER top_k 0")
        if "top_p" not in generation:
            lines.append("PARAMETER top_p 1.0")
    return "\n".join(lines) + "\n"


def run_export_gguf(job) -> Path:
    """The GGUF stage: the checkpoint (job.checkpoint_path or run.dir) -> export.out_dir (default
    <run>/gguf) as <run name>-<type>.gguf + Modelfile; then, with export.verify and llama-cpp-python
    installed, load it in llama.cpp and compare. Returns the .gguf path."""
    ex = job.export
    ckpt, model, tokenizer, out_dir = export_inputs(job, "gguf")
    if ckpt.adapter is not None and not ex.merge_lora:
        raise ConfigError(
            f"{ckpt.path} is a LoRA run and a GGUF file holds merged weights: drop "
            "export.merge_lora=false (the default merges the adapter in), or use "
            "scripts/export_hf.py export.merge_lora=false for the base and the PEFT adapter apart"
        )
    path = export_gguf(
        ckpt,
        out_dir,
        dtype=ex.dtype,
        name=ckpt.path.parent.parent.name,
        generation=generation_defaults(job.sample),
        overwrite=ex.overwrite,
    )
    print(f"exported {ckpt.path} -> {path}")
    if ex.verify:  # llama.cpp sums in another order than torch: 1e-4, not transformers' 1e-5
        check_export(
            path,
            "llama.cpp",
            "llama_cpp",
            "llama-cpp-python",
            ex.dtype,
            1e-4,
            lambda: verify_with_llama_cpp(path, model, tokenizer),
        )
    return path


# English, Chinese, byte fallback (characters outside a small vocabulary), emoji, whitespace runs.
VERIFY_TEXTS = (
    "Once upon a time, there was a little robot.",
    "从前有座山，山里有座庙。",
    "byte fallback: \u2603 \u01c5 \u00e6\u00f8\u00e5 and emoji \U0001f600\U0001f680!",
    "  two  spaces,\ta tab\n\nblank lines   and a trailing space ",
)


def verify_with_llama_cpp(
    path: Path,
    model: nn.Module,
    tokenizer,
    texts=VERIFY_TEXTS,
    max_new_tokens: int = 20,
    n_threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Load `path` with llama-cpp-python (float32 KV cache) and compare it with our model: the
    token ids of every text, the logits of the first text (largest difference relative to the
    largest logit), the greedy continuation of its ids (argmax at each step, through llama.cpp's
    own KV cache), how many leading tokens of it agree, and the decoded text."""
    from llama_cpp import GGML_TYPE_F32, Llama

    prompt = tokenizer.encode(texts[0], bos=True)
    llm = Llama(
        model_path=str(path),
        n_ctx=len(prompt) + max_new_tokens,
        n_batch=64,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        n_threads=n_threads,
        verbose=False,
    )
    same_ids = all(llm.tokenize(t.encode("utf-8"), add_bos=False) == tokenizer.encode(t) for t in texts)
    llm.reset()
    llm.eval(prompt)
    theirs = torch.from_numpy(llm.scores[: len(prompt)].copy())  # (T, V)
    greedy: List[int] = []
    for _ in range(max_new_tokens):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(greedy[-1:])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ours = model(ids).logits[0].float()
    ours_greedy = generate(model, ids, max_new_tokens, temperature=0.0)[0, len(prompt) :].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(ours_greedy, greedy)) if a != b), max_new_tokens)
    rel = ((ours - theirs).abs().max() / ours.abs().max()).item()
    # SentencePiece's decode shows the chat pieces (<|end|>), drops BOS/EOS and the dummy-prefix
    # space of the first piece. llama-cpp-python joins the pieces as they are, showing the pieces
    # llama.cpp types as control only with special=True (and then BOS/EOS too, so those go first).
    shown = [t for t in prompt + greedy if t not in (tokenizer.bos_id, tokenizer.eos_id)]
    text = llm.detokenize(shown, special=True).decode("utf-8", "replace")
    if sentencepiece_proto(tokenizer.model_path).normalizer_spec.add_dummy_prefix:
        text = text.removeprefix(" ")
    llm.close()
    return {
        "max_rel_logit_error": float(f"{rel:.2e}"),
        "same_greedy_text": greedy == ours_greedy,
        "greedy_tokens_agreeing": f"{agree}/{max_new_tokens}",
        "same_token_ids": same_ids,
        "same_decoded_text": text == tokenizer.decode(prompt + ours_greedy),
    }

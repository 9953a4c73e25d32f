"""Hugging Face export and import: our checkpoints <-> `transformers` folders.

Our state_dict keys are already Hugging Face's, so weights convert by copying tensors; the work
is in the configs and the tokenizer. An exported folder holds:

    config.json              LlamaForCausalLM (or Qwen2ForCausalLM for model_type=qwen2), RoPE included
    model.safetensors        the weights (a tied lm_head stored once, as transformers does)
    generation_config.json   bos/eos ids (a chat model's eos: [</s>, <|end|>]) and the run's sampling settings
    tokenizer.json           the SentencePiece model rebuilt for the `tokenizers` library
    tokenizer_config.json    so `AutoTokenizer.from_pretrained(folder)` loads it offline; a chat
                             model's also holds `chat_template` (tinyllama/chat_template.py)
    tokenizer.model          the original SentencePiece model

`import_hf(folder)` (tinyllama/hf_import.py, re-exported here) reads a local Llama or Qwen2
safetensors folder (transformers 4.x or 5.x config.json) into our LlamaConfig and a float32
state_dict; `init_from=hf:<folder>` uses it.

The stage `run_export` and the GGUF stage (tinyllama/export_gguf.py) start alike, through
`export_inputs`: the checkpoint from `tinyllama.checkpoint.load_for_inference`, its model on the
CPU for verification, and the output folder. `transformers` and `tokenizers` stay optional: they
are imported where an export or a verification needs them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from tinyllama.atomic import building_folder
from tinyllama.chat_template import add_chat_template, end_of_turn_id, missing_pieces
from tinyllama.checkpoint import LoadedCheckpoint, load_for_inference, save_weights
from tinyllama.config import DTYPES, canonical_dtype, dtype_choices
from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.generate import generate
from tinyllama.hf_import import ARCHITECTURES, import_hf  # noqa: F401 (import_hf: re-exported)
from tinyllama.lora import write_peft_files
from tinyllama.model.config import LlamaConfig
from tinyllama.tokenizer import Tokenizer

ADAPTER_DIR = "adapter"  # export.merge_lora=false: the PEFT adapter's folder inside the export
# How both exports tell the user to replace an existing folder (tinyllama.atomic refuses it).
OVERWRITE_HINT = "choose another export.out_dir, or set export.overwrite=true to replace it"


def hf_config(cfg: LlamaConfig, dtype: str = "fp32") -> Dict[str, Any]:
    """config.json contents for `cfg` with weights in `dtype` (either name). RoPE is written as
    rope_theta + rope_scaling, which transformers 4.x reads as is and 5.x converts into its
    rope_parameters."""
    out: Dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.resolved_num_key_value_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": cfg.hidden_act,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "attention_dropout": cfg.attention_dropout,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": DTYPES[canonical_dtype(dtype)],  # Hugging Face's long name
        "use_cache": True,
    }
    if cfg.model_type == "qwen2":  # q/k/v bias is implied by the architecture
        out.update(
            use_sliding_window=cfg.sliding_window is not None,
            sliding_window=cfg.sliding_window,
            max_window_layers=cfg.max_window_layers,
        )
    else:
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    return out


def exported_parts(
    model: Union[nn.Module, LoadedCheckpoint], tokenizer_path: Optional[Union[str, Path]] = None
):
    """(LlamaConfig, state_dict, tokenizer path) of a LlamaForCausalLM or a LoadedCheckpoint;
    a checkpoint's own tokenizer copy unless `tokenizer_path` is given."""
    if hasattr(model, "model_state"):  # a LoadedCheckpoint
        return model.model_config, model.model_state, tokenizer_path or model.tokenizer_path
    return model.config, model.state_dict(), tokenizer_path


def export_hf(
    model: Union[nn.Module, LoadedCheckpoint],
    out_dir: Union[str, Path],
    tokenizer_path: Optional[Union[str, Path]] = None,
    dtype: str = "fp32",
    generation: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    adapter: Optional[Tuple[Dict[str, Any], Dict[str, torch.Tensor]]] = None,
) -> Path:
    """Write a Hugging Face folder for `model` (a LlamaForCausalLM or a LoadedCheckpoint).

    tokenizer_path: the SentencePiece .model (default: the checkpoint's copy); None with a bare
    model writes no tokenizer. A tokenizer with the chat pieces also gets the chat template
    (`chat_template` in tokenizer_config.json), and generation stops at `<|end|>` as well as </s>. generation: sampling defaults for generation_config.json
    (do_sample, temperature, top_k, top_p, repetition_penalty, max_new_tokens).
    adapter: (adapter_config.json dict, tensors) of a PEFT LoRA adapter of this model, written
    in out_dir/adapter/ with out_dir as its base_model_name_or_path.
    The folder is built beside `out_dir` and renamed into place; an existing non-empty `out_dir`
    is refused unless overwrite=True (then replaced only once the new folder is complete).
    """
    cfg, state, tokenizer_path = exported_parts(model, tokenizer_path)
    if canonical_dtype(dtype) not in DTYPES:
        raise ConfigError(f"export dtype={dtype!r}: choose one of {dtype_choices()}")
    out_dir = Path(out_dir)
    with building_folder(out_dir, overwrite, OVERWRITE_HINT) as tmp:
        save_weights(tmp / "model.safetensors", state, cfg, getattr(torch, DTYPES[canonical_dtype(dtype)]))
        _write_json(tmp / "config.json", hf_config(cfg, dtype))
        end = chat_end_of_turn(tokenizer_path) if tokenizer_path is not None else None
        # A chat model's replies end at <|end|>: generate stops at either id (transformers takes a list).
        eos = cfg.eos_token_id if end is None else [cfg.eos_token_id, end]
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, **(generation or {})}
        if cfg.pad_token_id is not None:
            gen["pad_token_id"] = cfg.pad_token_id
        _write_json(tmp / "generation_config.json", gen)
        if tokenizer_path is not None:
            write_hf_tokenizer(Path(tokenizer_path), tmp, cfg.max_position_embeddings)
            if end is not None:
                add_chat_template(tmp)
        if adapter is not None:
            config, tensors = adapter
            (tmp / ADAPTER_DIR).mkdir()
            write_peft_files(tmp / ADAPTER_DIR, {**config, "base_model_name_or_path": str(out_dir)}, tensors)
    return out_dir


def chat_end_of_turn(sp_model: Union[str, Path]) -> Optional[int]:
    """Id of the end-of-turn piece of a SentencePiece model that has the chat pieces, else None
    (a base model's tokenizer: nothing of the chat template is exported)."""
    tokenizer = Tokenizer.load(sp_model)
    return None if missing_pieces(tokenizer) else end_of_turn_id(tokenizer)


def _write_json(path: Path, obj: Dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def sentencepiece_proto(sp_model: Path):
    """The SentencePiece model file parsed as its protobuf (pieces, scores, types, trainer and
    normalizer settings), which both exports read the vocabulary from."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # the generated module needs the protobuf runtime
        raise ConfigError(
            f"reading {sp_model} needs the `protobuf` package ({e}): pip install protobuf"
        ) from e
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    return proto


def write_hf_tokenizer(sp_model: Path, out_dir: Path, model_max_length: int, add_bos: bool = True) -> None:
    """Write tokenizer.json, tokenizer_config.json and tokenizer.model for a SentencePiece model.

    tokenizer.json rebuilds the SentencePiece pipeline in the `tokenizers` library: the same
    vocabulary and ids, BPE merges ordered by piece score (SentencePiece merges the best-scoring
    pair first) or the Unigram scores, byte fallback, and the normalizer spec (charsmap, extra
    whitespace removal, the dummy "▁" prefix, spaces as "▁"). Loading it needs no conversion
    (transformers 5 would otherwise rebuild a Llama tokenizer with its own normalization).
    Known difference: a user-defined symbol at the very start of a text gets no lone "▁" before it.
    add_bos: prepend <s> when encoding with special tokens, as the Llama tokenizer does.
    """
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
        from tokenizers.models import BPE, Unigram
    except ImportError as e:
        raise ConfigError(
            f"exporting the tokenizer needs the `tokenizers` package ({e}): pip install tokenizers"
        ) from e
    proto = sentencepiece_proto(sp_model)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == spec.BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = BPE(
            vocab,
            _bpe_merges(proto, vocab),
            unk_token=spec.unk_piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    elif spec.model_type == spec.UNIGRAM:
        model = Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise ConfigError(f"{sp_model}: only BPE and unigram SentencePiece models export")
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []  # drop the dummy prefix
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + strip
    )
    # Control pieces (<s>, </s>, <pad>) are special; user-defined symbols are never split.
    tok.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=p.type == _CONTROL)
            for p in proto.pieces
            if p.type in (_CONTROL, _USER_DEFINED)
        ]
    )
    bos, eos, unk = spec.bos_piece, spec.eos_piece, spec.unk_piece
    if add_bos and spec.bos_id >= 0:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)]
        )
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    if spec.pad_id >= 0:
        config["pad_token"] = spec.pad_piece
    _write_json(out_dir / "tokenizer_config.json", config)
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")


def _bpe_merges(proto: Any, vocab: Dict[str, int]) -> list:
    """Every split of a normal piece into two vocabulary pieces, best piece score first."""
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.type != _NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in vocab and right in vocab:
                merges.append((-p.score, i, vocab[left], vocab[right], left, right))
    return [(m[4], m[5]) for m in sorted(merges)]


def export_inputs(job, default_folder: str) -> Tuple[LoadedCheckpoint, nn.Module, Any, Path]:
    """What both export stages start from: (the checkpoint named by job.checkpoint_path or
    run.dir, its model on the CPU, where the reloaded export is compared with it, its
    tinyllama.tokenizer.Tokenizer, the output folder: export.out_dir, default
    <run>/<default_folder>)."""
    ckpt, model, tokenizer, _ = load_for_inference(job)
    out_dir = Path(job.export.out_dir or ckpt.path.parent.parent / default_folder)
    return ckpt, model.cpu(), tokenizer, out_dir


def run_export(job) -> Path:
    """The export stage: the checkpoint (job.checkpoint_path or run.dir) -> export.out_dir
    (default <run>/hf), with the run's sampling settings as generation defaults; then, with
    export.verify and transformers installed, reload the folder and compare. Returns the folder."""
    ckpt, model, tokenizer, out = export_inputs(job, "hf")
    ex = job.export
    generation = generation_defaults(job.sample)
    if ckpt.adapter is not None and not ex.merge_lora:  # the base, and the adapter beside it
        base = dataclasses.replace(ckpt, model_state=ckpt.adapter.base_state)
        parts = (ckpt.adapter.config, ckpt.adapter.tensors)
        export_hf(base, out, dtype=ex.dtype, generation=generation, overwrite=ex.overwrite, adapter=parts)
        print(f"exported the base of {ckpt.path} -> {out}, its LoRA adapter -> {out / ADAPTER_DIR}")
        if ex.verify:
            check_export(
                out, "peft", "peft", "peft", ex.dtype, 1e-5, lambda: verify_with_peft(out, model, tokenizer)
            )
        return out
    export_hf(ckpt, out, dtype=ex.dtype, generation=generation, overwrite=ex.overwrite)
    merged = " (its LoRA adapter merged into the weights)" if ckpt.adapter is not None else ""
    print(f"exported {ckpt.path} -> {out}{merged}")
    if ex.verify:
        check_export(
            out,
            "transformers",
            "transformers",
            "transformers",
            ex.dtype,
            1e-5,
            lambda: verify_with_transformers(out, model, tokenizer),
        )
    return out


def check_export(
    path: Path,
    reader: str,
    module: str,
    pip_name: str,
    dtype: str,
    rtol: float,
    verify: Callable[[], Dict[str, Any]],
) -> None:
    """Verify an export in the library that will read it (`reader`, imported as `module`), where
    that library is installed: `verify()` reloads it and returns a report (max_rel_logit_error,
    same_token_ids, same_greedy_text). A float32 export that does not reproduce the model within
    `rtol` fails."""
    if importlib.util.find_spec(module) is None:
        print(f"verify skipped: {pip_name} is not installed (pip install {pip_name})")
        return
    report = verify()
    print(f"verified with {reader}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    exact = report["max_rel_logit_error"] < rtol and report["same_greedy_text"] and report["same_token_ids"]
    if canonical_dtype(dtype) == "fp32" and not exact:
        raise CheckpointError(f"{path} does not reproduce the model in {reader} ({report})")


def generation_defaults(s) -> Dict[str, Any]:
    """The run's sampling settings (a SampleConfig) in generation_config.json's names."""
    generation: Dict[str, Any] = {"do_sample": s.temperature > 0, "max_new_tokens": s.max_new_tokens}
    if s.temperature > 0:
        sampling = {
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "repetition_penalty": s.repetition_penalty,
        }
        generation.update({k: v for k, v in sampling.items() if v is not None})
    return generation


def verify_with_peft(
    folder: Path, model: nn.Module, tokenizer, text: str = "Once upon a time, there was a little robot."
) -> Dict[str, Any]:
    """verify_with_transformers for a base export with its adapter in folder/adapter: PEFT puts
    the adapter on the transformers model, and the pair is compared with our (merged) model."""
    return verify_with_transformers(folder, model, tokenizer, text, adapter=folder / ADAPTER_DIR)


def verify_with_transformers(
    folder: Path,
    model: nn.Module,
    tokenizer,
    text: str = "Once upon a time, there was a little robot.",
    adapter: Optional[Path] = None,
) -> Dict[str, Any]:
    """Load `folder` with transformers (float32; with `adapter`, a PEFT adapter folder put on it)
    and compare it with our model on `text`: the largest logit difference relative to the largest
    logit, the greedy continuation (20 tokens) and the tokenizer's ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        theirs = PeftModel.from_pretrained(theirs, adapter).eval()
    hf_ids = AutoTokenizer.from_pretrained(folder)(text).input_ids
    ids = torch.tensor([tokenizer.encode(text, bos=True)])
    with torch.no_grad():
        ours_logits, their_logits = model(ids).logits, theirs(ids).logits
    greedy = theirs.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.eos_id,
    )
    rel = ((ours_logits - their_logits).abs().max() / their_logits.abs().max()).item()
    return {
        "max_rel_logit_error": float(f"{rel:.2e}"),
        "same_greedy_text": torch.equal(generate(model, ids, 20, temperature=0.0), greedy),
        "same_token_ids": hf_ids == ids[0].tolist(),
    }

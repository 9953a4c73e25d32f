"""Typed configuration: one dataclass per config group, registered in Hydra's ConfigStore.

The library takes these dataclasses (not DictConfigs), so every stage is usable and testable
without Hydra; `tinyllama.cli` is the only module that composes them from YAML. A misspelt key
or a wrong type is rejected by OmegaConf against this schema before anything runs, and
`validate()` then checks the values and their combinations, reporting every problem at once.

The keys that name a choice (data.source, train.nan_policy, train.precision, export.dtype) have
their allowed values in one table each below, which validate() and the code acting on the value
both read. This module imports only the model config and the errors, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tinyllama.chat_template import CHAT_PIECES
from tinyllama.errors import ConfigError
from tinyllama.model.config import LlamaConfig
from tinyllama.model.rotary import ROPE_TYPES

# The allowed values of the keys that name a choice: validate() and the code that acts on each
# value read these tables, so a new choice is added in one place.
SOURCES = ("synthetic", "synthetic_zh", "tinystories", "text_files", "hf", "synthetic_chat", "chat_files")
# Sources of conversations (supervised fine-tuning) rather than plain documents.
CHAT_SOURCES = ("synthetic_chat", "chat_files")
# data.train_on: which tokens of a conversation carry loss.
TRAIN_ON = ("assistant", "all")
# data.packing: several conversations per window (no attention across them), or one per window.
PACKING = ("packed", "padded")
# data.overflow: what becomes of a conversation longer than train.seq_len (counted and reported).
OVERFLOW = ("truncate", "drop")
"""data.source (tinyllama.data.sources reads each)."""
NAN_POLICIES = ("stop", "skip")
"""train.nan_policy (tinyllama.train.nan_guard)."""
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Floating-point formats of train.precision and export.dtype: the short name (canonical) -> the
Hugging Face / torch name, which is accepted as an alias (export.dtype=bfloat16 means bf16)."""
PRECISIONS = ("auto", *DTYPES)
"""train.precision (tinyllama.train.precision)."""
PARALLEL = ("ddp", "fsdp")
"""How the training state is spread over the devices: replicated (DistributedDataParallel) or
sharded (FSDP2's fully_shard): train.parallel (tinyllama.train.parallel), and inspect.parallel,
which sizes either per device."""
SAMPLE_WEIGHTS = ("float32", "int8")
"""sample.weights: the matrices of the CPU decoding step (tinyllama.fast_decode) in float32, or
int8 weight-only with one scale per output channel."""
QUANTIZED = ("q8_0",)
"""export.dtype values that only the GGUF export writes (tinyllama.export_gguf)."""
OBJECTIVES = ("lm", "dpo", "grpo")
"""train.objective: next-token loss (pretraining, or SFT on chat data), preference pairs (DPO), or
reinforcement learning on sampled replies with rewards (GRPO); tinyllama.train.objectives."""
DPO_LOSSES = ("sigmoid", "ipo")
"""dpo.loss_type (tinyllama.train.dpo)."""
SCALE_REWARDS = ("group", "batch", "none")
"""grpo.scale_rewards: divide advantages by the group's reward std, the batch's, or not at all."""
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")
# finetune.lora.target_modules: the decoder's linear layers by their Hugging Face names, or
# "all-linear" for all of them (the lm_head is never a target: PEFT's all-linear leaves the
# output layer out too, and a tied head is the embedding matrix).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
# Modules a LoRA run may train whole beside its adapters (PEFT's modules_to_save). With a tied
# head both name the one matrix shared by the input embedding and the output layer.
LORA_MODULES_TO_SAVE = ("embed_tokens", "lm_head")
"""grpo.loss_type: how per-token losses become one number (tinyllama.train.grpo)."""


def canonical_dtype(name: str) -> str:
    """The short name of a floating-point format named either way ("bfloat16" -> "bf16"); any
    other name is returned as it is, for the caller to refuse."""
    return {long: short for short, long in DTYPES.items()}.get(name, name)


def dtype_choices(extra: Sequence[str] = ()) -> str:
    """The export dtypes in words for error messages, Hugging Face's names first."""
    return f"{', '.join([*DTYPES.values(), *extra])} (or {', '.join(DTYPES)})"


@dataclass
class TokenizerConfig:
    name: str = "bpe_4k"
    """Preset name; the trained model lands in data/tokenizers/<data.name>-<name>/."""
    vocab_size: int = 4096
    """Size of the SentencePiece vocabulary, special and byte-fallback pieces included."""
    model_type: str = "bpe"
    """"bpe" or "unigram"."""
    byte_fallback: bool = True
    """Encode unknown characters as UTF-8 bytes, so no text maps to <unk>."""
    split_digits: bool = True
    """Split numbers into single digits (as Llama does)."""
    character_coverage: float = 1.0
    """Share of characters covered by the vocabulary: 1.0 for English, 0.9995 for Chinese."""
    pad_id: int = -1
    """Id of a <pad> piece, or -1 for none (Llama has none)."""
    user_defined_symbols: List[str] = field(default_factory=lambda: list(CHAT_PIECES))
    """Pieces that text never splits into. The default reserves the chat template's pieces
    (tinyllama/chat_template.py), so any model pretrained with it can be fine-tuned for chat: a
    trained tokenizer does not gain pieces later. [] for none; extra markers go after them."""
    input_sentence_size: int = 200_000
    """Cap on the sentences SentencePiece samples, so large corpora train in bounded time/memory."""
    max_train_bytes: int = 50_000_000
    """Cap on the bytes of text read from the source to train the tokenizer."""
    num_threads: int = 0
    """SentencePiece training threads; 0 means all cores."""
    model_file: Optional[str] = None
    """Use this existing SentencePiece .model instead of training one."""


@dataclass
class DataConfig:
    name: str = "synthetic"
    """Name of the dataset; keys the packed output data/packed/<name>/<tokenizer fingerprint>/."""
    source: str = "synthetic"
    """"synthetic" (built-in stories), "synthetic_zh" (the same in Chinese), "tinystories",
    "text_files" or "hf"; conversations for fine-tuning: "synthetic_chat" (built-in, from the
    synthetic stories) or "chat_files" (train_files/val_files, or hf_path)."""
    train_files: List[str] = field(default_factory=list)
    """Local files or globs for the train split (tinystories and text_files)."""
    val_files: List[str] = field(default_factory=list)
    """Local files or globs for the validation split; empty: hold out val_fraction of documents."""
    doc_separator: str = "<|endoftext|>"
    """For .txt files: a line holding exactly this separates documents; "blank_lines" splits on
    empty lines; "file" makes each file one document."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json/parquet files and HF datasets."""
    hf_path: Optional[str] = None
    """Hugging Face dataset name (source=hf; tinystories defaults to roneneldan/TinyStories)."""
    hf_name: Optional[str] = None
    """Hugging Face dataset config name."""
    hf_train_split: str = "train"
    """Split used for training."""
    hf_val_split: Optional[str] = "validation"
    """Split used for validation; None: hold out val_fraction of the train documents."""
    streaming: bool = False
    """Stream the HF dataset instead of downloading it whole."""
    val_fraction: float = 0.01
    """Share of documents held out for validation when no validation split/files are given."""
    num_docs: int = 20_000
    """synthetic, synthetic_zh, synthetic_chat: number of stories (conversations) to generate for
    train (validation gets num_docs // 50)."""
    max_docs: Optional[int] = None
    """Cap on train documents read from any source (None: all)."""
    seed: int = 1234
    """Seed for the synthetic corpus and the held-out split."""
    num_workers: int = 2
    """Worker processes that encode documents while packing; 0 encodes in the main process."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file."""
    root: str = "data"
    """Folder holding tokenizers/ and packed/."""
    train_on: str = "assistant"
    """Conversations: "assistant" (loss on the assistant's tokens and end-of-turn pieces only) or
    "all" (every token)."""
    packing: str = "packed"
    """Conversations: "packed" (several per window, none attending to another) or "padded"."""
    overflow: str = "truncate"
    """Conversations longer than train.seq_len: "truncate" or "drop" (both counted and reported)."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train for."""
    batch_size: int = 16
    """Micro-batch size per device (sequences)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = batch_size x grad_accum x world)."""
    seq_len: int = 128
    """Tokens per training sequence (must not exceed model.max_position_embeddings)."""
    precision: str = "auto"
    """"auto" (bf16 on capable GPUs, fp16 on older GPUs; on CPU bf16 where it multiplies bf16
    natively, fp32 otherwise), "fp32", "bf16" or "fp16" (or their long names, see DTYPES)."""
    compile: bool = False
    """Apply torch.compile to the model."""
    grad_checkpointing: bool = False
    """Recompute layer activations in backward to save memory."""
    parallel: str = "ddp"
    """With several processes: "ddp" (every device holds the whole model, its gradients and AdamW
    state) or "fsdp" (FSDP2: each holds 1/N of them; checkpoints are sharded with DCP)."""
    tp: int = 1
    """Tensor-parallel degree: attention and MLP projections, embedding and head split over this
    many processes (whole heads each); the processes form a (data = world / tp) x (tensor = tp)
    mesh, the data dimension sharded with FSDP."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    log_every: int = 10
    """Steps between training log lines."""
    nan_policy: str = "stop"
    """On a NaN/inf loss: "stop" the run, or "skip" the step."""
    objective: str = "lm"
    """What a step minimises: "lm" (next-token loss: pretraining, or SFT on conversations), "dpo"
    (preference pairs, the dpo group) or "grpo" (sampled replies scored by rewards, the grpo
    group); dpo and grpo start from init_from, a chat run."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and wsd)."""
    weight_decay: float = 0.1
    """AdamW decay on matrices (not on norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    schedule: str = "cosine"
    """"cosine" (warmup + cosine), "wsd" (warmup-stable-decay) or "constant"."""
    decay_fraction: float = 0.2
    """wsd: share of the steps spent in the final decay."""


@dataclass
class DPOConfig:
    """Direct preference optimisation (train.objective=dpo; experiment=dpo_demo)."""

    beta: float = 0.1
    """Strength of the tie to the reference: the implicit reward is beta x the log-ratio."""
    loss_type: str = "sigmoid"
    """"sigmoid" (the DPO paper's loss) or "ipo" (squared loss on length-averaged log-ratios)."""
    label_smoothing: float = 0.0
    """sigmoid: the assumed share of flipped labels (conservative DPO), in [0, 0.5)."""
    nll_weight: float = 0.0
    """Weight of an extra NLL term on the chosen replies (RPO); 0 disables it."""
    precompute_ref: bool = False
    """Compute the reference log-probs once before training and drop the reference model
    (saves its memory; the same values, as the reference never changes)."""
    train_files: List[str] = field(default_factory=list)
    """Preference pairs (.jsonl/.json/.parquet; prompt/chosen/rejected as strings or messages);
    empty with hf_path unset: the built-in pairs made from data's synthetic chat corpus."""
    val_files: List[str] = field(default_factory=list)
    """Held-out pairs; empty: data.val_fraction of the train pairs (built-in: held-out stories)."""
    hf_path: Optional[str] = None
    """A Hugging Face dataset of pairs (Hub name, local folder or save_to_disk folder)."""


@dataclass
class RewardConfig:
    """One reward: a callable f(prompts, completions, **columns) -> list of floats, and its weight."""

    _target_: str = "tinyllama.rewards.exact_answer"
    """"module:function" or "module.function"."""
    weight: float = 1.0
    """Factor of this reward in the sum that advantages are computed from."""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments bound to the function."""


@dataclass
class GRPOConfig:
    """Group relative policy optimisation (train.objective=grpo; experiment=grpo_demo)."""

    num_generations: int = 8
    """G: completions sampled per prompt (a group); at least 2."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (> 0)."""
    top_p: Optional[float] = None
    """Nucleus threshold of the rollouts (None: the whole distribution)."""
    max_new_tokens: int = 32
    """Most tokens of a completion; one without <|end|> by then is cut (and may be penalised)."""
    epsilon: float = 0.2
    """Lower clip of the probability ratio: 1 - epsilon."""
    epsilon_high: Optional[float] = None
    """Upper clip: 1 + epsilon_high (DAPO's clip-higher); None: epsilon."""
    beta: float = 0.0
    """Weight of the KL to the reference (k3 estimator); 0 loads no reference model."""
    scale_rewards: str = "group"
    """Advantages (r - group mean) divided by the group's std ("group"), the batch's ("batch") or
    not at all ("none", Dr. GRPO)."""
    loss_type: str = "dapo"
    """"grpo" (mean over each completion's tokens, then over completions), "dr_grpo" (sum over
    tokens / (completions x max_new_tokens)) or "dapo" (sum over tokens / tokens in the batch)."""
    num_iterations: int = 1
    """Optimizer steps on each rollout batch (> 1 makes the clipped ratio matter)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: keep only the groups whose rewards differ (a group of equal rewards
    has zero advantages, so it costs an update's compute and gives no policy gradient) and sample
    further prompts until train.batch_size such groups are found or max_sampling_rounds rounds of
    train.batch_size prompts have been drawn (the batch is then smaller)."""
    max_sampling_rounds: int = 3
    """With dynamic_sampling: the most rounds of train.batch_size prompts sampled per batch."""
    rewards: List[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    """The rewards, summed with their weights."""
    prompt_weights: Dict[str, float] = field(default_factory=dict)
    """How often each kind of prompt is drawn, by the value of its grpo.weight_column: a prompt of
    weight w comes up w times an epoch on average (2: twice, 0.5: every other epoch, 0: never);
    values not named keep 1. With the built-in corpus, {boy/girl: 4} makes the boy-or-girl
    questions, whose reward the chat model only learns from many of them, about a third of the
    prompts. Empty: every prompt once an epoch."""
    weight_column: str = "question"
    """The column of the prompts whose values grpo.prompt_weights names (the built-in corpus's
    question kind: who, animal, boy/girl, ending, friend, where, thing, food)."""
    only_answered: bool = True
    """Sample only prompts whose conversation ends with a checkable answer, where the data has any
    (the built-in corpus's questions); files without answers are used whole."""


@dataclass
class LoRAConfig:
    """LoRA adapters on the fine-tuned model (tinyllama/lora.py): only they train, the base stays
    frozen, and checkpoints hold the adapter alone (a PEFT adapter folder) plus its base's name."""

    rank: Optional[int] = None
    """Rank r of each adapter; None: full fine-tuning (every weight trains)."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training."""
    target_modules: List[str] = field(default_factory=lambda: [ALL_LINEAR])
    """Layers that get an adapter: names among LORA_TARGETS, or ["all-linear"] for all of them."""
    modules_to_save: List[str] = field(default_factory=list)
    """Modules trained whole beside the adapters and saved in the adapter folder (PEFT's
    modules_to_save): names among LORA_MODULES_TO_SAVE. ["embed_tokens"] lets the chat pieces,
    new to a pretrained base, get embeddings of their own."""


@dataclass
class FinetuneConfig:
    """How a run started from init_from trains its weights (any train.objective)."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class CheckpointConfig:
    every: int = 100
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = 2
    """Number of recent checkpoints kept (the best by validation loss is kept too)."""
    resume: str = "auto"
    """"auto" (continue from runs/<name>/checkpoints/latest if present), "never", or a path."""


@dataclass
class EvalConfig:
    every: int = 100
    """Steps between evaluations during training."""
    batches: int = 20
    """Batches per evaluation during training (None-like 0: the whole validation split)."""


@dataclass
class LoggerConfig:
    name: str = "none"
    """"none" or "wandb" (console and metrics.jsonl are always on)."""
    mode: str = "offline"
    """wandb mode: "online", "offline" (no account needed) or "disabled"."""
    project: str = "tinyllama"
    """wandb project."""
    group: Optional[str] = None
    """wandb group (sweeps set one per sweep)."""
    run_name: Optional[str] = None
    """wandb run name; None: the run folder's name. train.yaml sets run.name plus the job's
    command-line overrides, so the jobs of a sweep are told apart."""
    tags: List[str] = field(default_factory=list)
    """wandb tags."""


@dataclass
class RunConfig:
    name: str = "demo"
    """Run name; the run folder is runs/<name>/ unless dir is set."""
    dir: Optional[str] = None
    """Run folder (overrides runs/<name>/)."""
    seed: int = 1337
    """Seed for model init, data order and sampling."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda"."""


@dataclass
class SampleConfig:
    prompt: str = "Once upon a time"
    """Prompt text for sampling."""
    prompt_file: Optional[str] = None
    """File with one prompt per line (overrides prompt)."""
    num_samples: int = 3
    """Samples to draw (written to samples.txt at the end of training). A chat run writes this
    many greedy replies to held-out conversations instead (the sampling settings do not apply)."""
    max_new_tokens: int = 200
    """Tokens to generate per sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 is greedy."""
    top_k: Optional[int] = None
    """Keep only the k most likely tokens."""
    top_p: Optional[float] = 0.95
    """Nucleus sampling threshold: the most likely tokens whose probabilities reach it are kept,
    and any token tied with the least likely of them (on a near-uniform model that can be many)."""
    repetition_penalty: float = 1.0
    """>1 discourages repeating tokens already present."""
    seed: Optional[int] = None
    """Sampling seed (None: run.seed)."""
    interactive: bool = False
    """scripts/sample.py: read prompts from standard input, one per line, until end of input."""
    stream: bool = True
    """scripts/sample.py: print tokens as they are generated."""
    trim_prompt: bool = False
    """Cut a prompt that leaves no room for max_new_tokens in the context from the left
    (keeping its end) instead of refusing it."""
    weights: str = "float32"
    """Decoding on the CPU: float32, or int8 (weight-only int8 matrices, one scale per output
    channel: about a quarter of the bytes to read per token; greedy tokens can differ from
    float32's where two logits are close). Used by sample, chat, evaluate and serve; training's
    samples and GRPO's rollouts decode in float32."""


@dataclass
class EvaluateConfig:
    """Options of scripts/evaluate.py (results go to <run>/eval/)."""

    source: str = "run"
    """"run": the packed split of the data the checkpoint was trained on; "data": the `data`
    group of this command line, read as text (e.g. data=tinystories)."""
    files: List[str] = field(default_factory=list)
    """Evaluate on these local text files (globs; read as data=text_files reads them, documents
    split by data.doc_separator) instead of `source`."""
    split: str = "val"
    """Split to evaluate: "val" or "train"."""
    seq_len: Optional[int] = None
    """Tokens per window; None: the run's train.seq_len. May exceed the training length."""
    batch_size: int = 8
    """Windows per forward pass."""
    max_batches: Optional[int] = None
    """Cap on the batches evaluated; None: the whole split."""
    rope_type: Optional[str] = None
    """Evaluate with this RoPE scaling instead of the trained one (long-context checks):
    "linear", "dynamic" or "llama3" (low/high frequency factors 1 and 4 as in Llama 3.1, the
    trained max_position_embeddings as the original context); None: as trained."""
    rope_factor: float = 4.0
    """Context stretch of rope_type, e.g. 4 to read 1024 tokens with a model trained on 256."""
    plot: bool = True
    """Write the loss-by-position plot (PNG) next to the JSON."""
    max_answers: Optional[int] = 200
    """Chat data: held-out questions answered greedily for answer_accuracy (the built-in corpus
    only); None: all of them."""
    pass_at: List[int] = field(default_factory=lambda: [1, 4])
    """Chat data: the k of pass@k, from max(pass_at) replies sampled per question (the built-in
    corpus only); [] skips sampling."""
    temperature: Optional[float] = None
    """Temperature of pass@k's samples; None: the run's (grpo.temperature for a GRPO run, else
    sample.temperature)."""


@dataclass
class ExportConfig:
    """Options of scripts/export_hf.py and scripts/export_gguf.py."""

    out_dir: Optional[str] = None
    """Folder to write; None: <run>/hf (<run>/gguf for GGUF). An existing non-empty folder is
    refused unless overwrite."""
    dtype: str = "fp32"
    """Weight dtype: fp32, bf16 or fp16 (or float32, bfloat16, float16); GGUF also q8_0 (the gguf
    package's quantizer)."""
    overwrite: bool = False
    """Replace an existing out_dir (only once the new folder is complete)."""
    verify: bool = True
    """Reload the export with transformers (GGUF: llama-cpp-python), when installed, and compare
    token ids, logits and greedy text."""
    merge_lora: bool = True
    """A LoRA run: write the weights with the adapter merged in (a plain model); false
    (export_hf only): the base model in out_dir and the PEFT adapter folder in out_dir/adapter."""


@dataclass
class InspectConfig:
    """Options of the course tooling (scripts/inspect_model.py)."""

    seq_len: Optional[int] = None
    """Sequence length T of the attention term in FLOPs per token; None: model.max_position_embeddings."""
    tree: bool = True
    """Print the module tree as PyTorch prints it."""
    trace: bool = False
    """Run one forward pass on random input_ids and print the tensor shape at each step."""
    trace_seq_len: Optional[int] = None
    """Length of the traced input; None: drawn in [4, 30] from run.seed."""
    trace_batch_size: int = 1
    """Batch size B of the traced input."""
    trace_device: str = "auto"
    """"auto" (cpu up to 200M parameters, else meta), "cpu", or "meta" (shapes only, no weights)."""
    parallel: str = "ddp"
    """Memory per device under this strategy: ddp (each device holds everything) or fsdp
    (weights, gradients and optimizer state sharded over the data-parallel devices)."""
    devices: int = 1
    """Devices of the job (data-parallel degree x inspect.tp)."""
    tp: int = 1
    """Tensor-parallel degree: attention and MLP projections, embedding and head split this many
    ways (heads across devices); norms replicated."""
    batch_size: int = 1
    """Sequences per device for the activation memory (at inspect.seq_len tokens each)."""


@dataclass
class JobConfig:
    """The root config of every stage (configs/train.yaml is its primary YAML)."""

    model: LlamaConfig = field(default_factory=LlamaConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    init_from: Optional[str] = None
    """Start from these weights only (a checkpoint folder, a run folder, or hf:<local HF folder>)."""
    checkpoint_path: Optional[str] = None
    """evaluate/sample/export: the checkpoint to load (a run folder, checkpoints/latest or best, or a
    checkpoints/step_<N> folder); None: run.dir."""
    prompt: Optional[str] = None
    """scripts/sample.py shorthand for sample.prompt (python scripts/sample.py prompt="Once");
    scripts/chat.py: the one user message to reply to (without it the chat is interactive)."""
    chat: "ChatConfig" = field(default_factory=lambda: ChatConfig())
    """scripts/chat.py options (ChatConfig, defined at the end of this module)."""
    serve: "ServeConfig" = field(default_factory=lambda: ServeConfig())
    """scripts/serve.py options (ServeConfig, defined after ChatConfig)."""


def is_chat(data: DataConfig) -> bool:
    """Whether `data` holds conversations (supervised fine-tuning) rather than documents."""
    return data.source in CHAT_SOURCES


def run_dir_of(job: JobConfig) -> Path:
    """The run folder: run.dir, or runs/<run.name> when run.dir is unset."""
    return Path(job.run.dir or Path("runs") / job.run.name)


def split_unknown(
    data: Dict[str, Any], schema: type = JobConfig, prefix: str = ""
) -> Tuple[Dict[str, Any], List[str]]:
    """Separate the keys of a plain nested dict that `schema` declares from those it does not.

    Returns (the known part, dotted paths of the unknown keys). The CLI refuses unknown keys;
    the checkpoint loader drops them with a warning, so a run saved before a config key was
    removed or renamed still loads.
    """
    hints = typing.get_type_hints(schema)
    known: Dict[str, Any] = {}
    unknown: List[str] = []
    for key, value in data.items():
        if key not in hints:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            known[key], deeper = split_unknown(value, hints[key], f"{prefix}{key}.")
            unknown += deeper
        else:
            known[key] = value
    return known, unknown


def precision_problem(name: str) -> str:
    """What is wrong with train.precision=`name` (validate() and resolve_precision say the same)."""
    return (
        f"train.precision={name!r}: choose {', '.join(PRECISIONS)} "
        f"(or the long names {', '.join(DTYPES.values())})"
    )


def validate(job: JobConfig) -> None:
    """Check values and their combinations; raise one ConfigError listing every problem."""
    problems: List[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    t, o = job.train, job.optim
    need(t.max_steps > 0, f"train.max_steps={t.max_steps}: must be > 0")
    need(t.batch_size > 0, f"train.batch_size={t.batch_size}: must be > 0")
    need(t.grad_accum > 0, f"train.grad_accum={t.grad_accum}: must be > 0")
    need(t.seq_len > 0, f"train.seq_len={t.seq_len}: must be > 0")
    need(
        t.seq_len <= job.model.max_position_embeddings,
        f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
        f"{job.model.max_position_embeddings}: lower train.seq_len or raise the model's context",
    )
    need(canonical_dtype(t.precision) in PRECISIONS, precision_problem(t.precision))
    problems += parallel_problems(job)
    need(
        t.nan_policy in NAN_POLICIES, f"train.nan_policy={t.nan_policy!r}: choose {' or '.join(NAN_POLICIES)}"
    )
    need(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    need(
        o.schedule in ("cosine", "wsd", "constant"),
        f"optim.schedule={o.schedule!r}: choose cosine, wsd or constant",
    )
    need(0 <= o.warmup_steps, f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
    need(t.log_every > 0, f"train.log_every={t.log_every}: must be > 0")
    need(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")
    need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    need(0.0 < o.decay_fraction <= 1.0, f"optim.decay_fraction={o.decay_fraction}: must be in (0, 1]")
    need(o.weight_decay >= 0 and o.eps > 0, "optim.weight_decay must be >= 0 and optim.eps > 0")
    need(
        0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0,
        f"optim.beta1={o.beta1}, optim.beta2={o.beta2}: each must be in [0, 1)",
    )
    need(job.eval.batches >= 0, f"eval.batches={job.eval.batches}: must be >= 0 (0: the whole split)")
    need(
        job.tokenizer.vocab_size <= job.model.vocab_size,
        f"tokenizer.vocab_size={job.tokenizer.vocab_size} exceeds model.vocab_size="
        f"{job.model.vocab_size}: the embedding table must cover every token id",
    )
    need(
        job.tokenizer.model_type in ("bpe", "unigram"),
        f"tokenizer.model_type={job.tokenizer.model_type!r}: choose bpe or unigram",
    )
    need(job.data.source in SOURCES, f"data.source={job.data.source!r}: choose {', '.join(SOURCES)}")
    for key, choices in (("train_on", TRAIN_ON), ("packing", PACKING), ("overflow", OVERFLOW)):
        value = getattr(job.data, key)
        need(value in choices, f"data.{key}={value!r}: choose {', '.join(choices)}")
    d, tk = job.data, job.tokenizer
    need(0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction}: must be in [0, 1)")
    need(d.num_docs > 0, f"data.num_docs={d.num_docs}: must be > 0")
    need(d.num_workers >= 0, f"data.num_workers={d.num_workers}: must be >= 0 (0: encode in the main thread)")
    need(d.shard_tokens > 0, f"data.shard_tokens={d.shard_tokens}: must be > 0")
    need(
        0.0 < tk.character_coverage <= 1.0,
        f"tokenizer.character_coverage={tk.character_coverage}: must be in (0, 1]",
    )
    need(job.logger.name in ("none", "wandb"), f"logger.name={job.logger.name!r}: choose none or wandb")
    need(
        job.logger.mode in ("online", "offline", "disabled"),
        f"logger.mode={job.logger.mode!r}: choose online, offline or disabled",
    )
    need(
        job.run.device in ("auto", "cpu", "cuda") or job.run.device.startswith("cuda:"),
        f"run.device={job.run.device!r}: choose auto, cpu or cuda",
    )
    need(job.checkpoint.every > 0, f"checkpoint.every={job.checkpoint.every}: must be > 0")
    need(job.checkpoint.keep_last > 0, f"checkpoint.keep_last={job.checkpoint.keep_last}: must be > 0")
    need(job.eval.every > 0, f"eval.every={job.eval.every}: must be > 0")
    ins = job.inspect
    need(
        ins.trace_device in ("auto", "cpu", "meta"),
        f"inspect.trace_device={ins.trace_device!r}: choose auto, cpu or meta",
    )
    need(
        all(v is None or v > 0 for v in (ins.seq_len, ins.trace_seq_len, ins.trace_batch_size)),
        "inspect.seq_len, inspect.trace_seq_len and inspect.trace_batch_size must be > 0",
    )
    need(ins.parallel in PARALLEL, f"inspect.parallel={ins.parallel!r}: choose {' or '.join(PARALLEL)}")
    need(
        ins.devices >= 1 and ins.tp >= 1 and ins.batch_size >= 1,
        "inspect.devices, inspect.tp and inspect.batch_size must be >= 1",
    )
    need(
        ins.devices % max(ins.tp, 1) == 0,
        f"inspect.devices={ins.devices} is not a multiple of inspect.tp={ins.tp}: the devices form a "
        f"(data x tensor) grid",
    )
    problems += tp_problems(job.model, ins.tp, "inspect.tp")
    ev, ex = job.evaluate, job.export
    need(ev.source in ("run", "data"), f"evaluate.source={ev.source!r}: choose run or data")
    need(ev.split in ("train", "val"), f"evaluate.split={ev.split!r}: choose val or train")
    scalings = [t for t in ROPE_TYPES if t != "default"]
    need(
        ev.rope_type is None or ev.rope_type in scalings,
        f"evaluate.rope_type={ev.rope_type!r}: choose {', '.join(scalings)} (or null)",
    )
    need(
        ev.batch_size > 0 and (ev.seq_len is None or ev.seq_len > 0),
        "evaluate.batch_size and evaluate.seq_len must be > 0",
    )
    need(
        all(k >= 1 for k in ev.pass_at) and (ev.temperature is None or ev.temperature > 0),
        f"evaluate.pass_at={list(ev.pass_at)} must hold k >= 1 and evaluate.temperature must be > 0",
    )
    need(
        ev.max_answers is None or ev.max_answers > 0,
        f"evaluate.max_answers={ev.max_answers}: must be > 0 (or null: every held-out question)",
    )
    need(
        canonical_dtype(ex.dtype) in (*DTYPES, *QUANTIZED),
        f"export.dtype={ex.dtype!r}: choose one of {dtype_choices(QUANTIZED)}; "
        f"{', '.join(QUANTIZED)} for GGUF only",
    )
    sa = job.sample
    need(sa.max_new_tokens >= 0, f"sample.max_new_tokens={sa.max_new_tokens}: must be >= 0")
    need(sa.num_samples >= 0, f"sample.num_samples={sa.num_samples}: must be >= 0")
    need(sa.temperature >= 0, f"sample.temperature={sa.temperature}: must be >= 0 (0 is greedy)")
    need(
        sa.weights in SAMPLE_WEIGHTS,
        f"sample.weights={sa.weights!r}: choose {' or '.join(SAMPLE_WEIGHTS)}",
    )
    need(sa.top_k is None or sa.top_k >= 1, f"sample.top_k={sa.top_k}: must be >= 1 (or null)")
    need(sa.top_p is None or 0 < sa.top_p <= 1, f"sample.top_p={sa.top_p}: must be in (0, 1] (or null)")
    need(
        sa.repetition_penalty > 0,
        f"sample.repetition_penalty={sa.repetition_penalty}: must be > 0 (1 disables it)",
    )
    problems += chat_problems(job.chat)
    problems += serve_problems(job.serve)
    problems += post_training_problems(job)
    problems += lora_problems(job)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


@dataclass
class ChatConfig:
    """Options of scripts/chat.py (the message itself is `prompt=`; without it, interactive)."""

    system: Optional[str] = None
    """System prompt put before the conversation; None: none."""
    max_new_tokens: int = 64
    """Most tokens of one reply; the history is trimmed to leave this much room in the context."""
    temperature: float = 0.0
    """Softmax temperature; 0 is greedy (the replies a fine-tuned model was taught)."""
    top_k: Optional[int] = None
    """Keep only the k most likely tokens."""
    top_p: Optional[float] = None
    """Nucleus sampling threshold."""
    seed: Optional[int] = None
    """Sampling seed of the first reply, + 1 per reply (None: run.seed)."""


def parallel_problems(job: JobConfig) -> List[str]:
    """What is wrong with train.parallel and train.tp whatever the number of processes
    (validate() reports them; tinyllama.train.parallel checks the number of processes)."""
    t = job.train
    if t.parallel not in PARALLEL:
        return [f"train.parallel={t.parallel!r}: choose {' or '.join(PARALLEL)}"]
    if t.tp < 1:
        return [f"train.tp={t.tp}: must be >= 1 (1: no tensor parallelism)"]
    problems = tp_problems(job.model, t.tp, "train.tp")
    if t.parallel == "fsdp" or t.tp > 1:
        chosen = "train.parallel=fsdp" if t.tp == 1 else f"train.tp={t.tp}"
        if t.objective != "lm":
            problems.append(
                f"{chosen} trains train.objective=lm (pretraining, SFT); "
                f"{t.objective} runs with train.parallel=ddp"
            )
        if job.finetune.lora.rank is not None:
            problems.append(f"{chosen} does not train LoRA adapters: use train.parallel=ddp")
        if canonical_dtype(t.precision) == "fp16":
            problems.append(
                f"{chosen} trains in bf16 or fp32 (fp16 needs a gradient scaler over the "
                "shards): set train.precision=bf16 or fp32"
            )
    return problems


def tp_problems(model: LlamaConfig, tp: int, key: str) -> List[str]:
    """Why a tensor-parallel degree cannot split this model: it must divide the attention heads,
    the key/value heads, the MLP width and the vocabulary (each device takes whole heads)."""
    if tp <= 1:
        return []
    sizes = {
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.resolved_num_key_value_heads,
        "intermediate_size": model.intermediate_size,
        "vocab_size": model.vocab_size,
    }
    return [
        f"{key}={tp} does not divide model.{name}={value}: choose a degree that divides it"
        for name, value in sizes.items()
        if value % tp
    ]


def chat_problems(c: ChatConfig) -> List[str]:
    """What is wrong with the chat options (validate() reports them with the rest)."""
    problems = []
    if c.max_new_tokens <= 0:
        problems.append(f"chat.max_new_tokens={c.max_new_tokens}: must be > 0")
    if c.temperature < 0:
        problems.append(f"chat.temperature={c.temperature}: must be >= 0 (0 is greedy)")
    if c.top_k is not None and c.top_k < 1:
        problems.append(f"chat.top_k={c.top_k}: must be >= 1 (or null)")
    if c.top_p is not None and not 0 < c.top_p <= 1:
        problems.append(f"chat.top_p={c.top_p}: must be in (0, 1] (or null)")
    return problems


@dataclass
class ServeConfig:
    """Options of scripts/serve.py: the OpenAI-compatible server and its chat page."""

    host: str = "127.0.0.1"
    """Address to listen on; 127.0.0.1 serves this machine only, 0.0.0.0 every network it is on."""
    port: int = 8000
    """TCP port; 0 picks a free one (the address is printed when the server is up)."""
    max_batch: int = 16
    """Most sequences decoded together (each choice of each request is one); more requests wait."""
    max_new_tokens: int = 256
    """Tokens a reply may have when the request names no max_tokens (cut to what the context leaves)."""
    model_id: Optional[str] = None
    """The model's id in /v1/models and the `model` field requests must name; None: the run folder's name."""
    stream_interval: float = 0.02
    """Seconds a streamed reply gathers tokens between two writes to its socket (its first
    tokens go at once, and so does its end at a stop token or the length limit; a stop string is
    found when the gathered tokens are read, so such a row decodes up to an interval longer;
    each token stays one server-sent event). Each write costs the event loop a system call and
    a pass through the ASGI stack, about as much as the decoding step spends on a row, and the
    event loop shares the interpreter with the engine, so a loaded server that writes every
    token leaves less to decoding (BENCHMARKS.md, serving). 50 writes a second still look like
    a stream of tokens. 0: write each token as soon as it is decoded."""
    threads: Optional[int] = None
    """torch threads on a CPU (the prefill, and the compiled decoding step's threads); None: one
    fewer than the cores this process may use (at least 1). The HTTP side needs a core of its
    own: with every core in torch's thread pool, each product waits whenever the event loop
    holds one of them (BENCHMARKS.md, serving). Where the decoding step runs in NumPy (no
    compiler), its float32 products run in NumPy's BLAS off the main thread, which
    OPENBLAS_NUM_THREADS governs."""


def serve_problems(s: ServeConfig) -> List[str]:
    """What is wrong with the serve options (validate() reports them with the rest)."""
    problems = []
    if not 0 <= s.port <= 65535:
        problems.append(f"serve.port={s.port}: must be in [0, 65535] (0 picks a free port)")
    if s.max_batch < 1:
        problems.append(f"serve.max_batch={s.max_batch}: must be >= 1")
    if s.max_new_tokens < 1:
        problems.append(f"serve.max_new_tokens={s.max_new_tokens}: must be >= 1")
    if s.threads is not None and s.threads < 1:
        problems.append(f"serve.threads={s.threads}: must be >= 1 (or null: one fewer than the cores)")
    if not 0 <= s.stream_interval <= 1:
        problems.append(f"serve.stream_interval={s.stream_interval}: must be in [0, 1] seconds")
    if s.model_id is not None and not s.model_id.strip():
        problems.append("serve.model_id is empty: give a name, or null for the run folder's name")
    return problems


def post_training_problems(job: JobConfig) -> List[str]:
    """What is wrong with train.objective and the dpo/grpo groups (validate() reports them)."""
    t, d, g = job.train, job.dpo, job.grpo
    if t.objective not in OBJECTIVES:
        return [f"train.objective={t.objective!r}: choose {', '.join(OBJECTIVES)}"]
    if t.objective == "lm":
        return []
    problems = []
    if not job.init_from:
        problems.append(
            f"train.objective={t.objective} starts from a chat model: set init_from=<a chat run> "
            "(python train.py experiment=chat_demo makes runs/chat_demo)"
        )
    if not is_chat(job.data):
        problems.append(
            f"train.objective={t.objective} takes its prompts from conversations: use data=synthetic_chat "
            f"or data=chat_files, not data.source={job.data.source}"
        )
    if t.objective == "dpo":
        if d.loss_type not in DPO_LOSSES:
            problems.append(f"dpo.loss_type={d.loss_type!r}: choose {', '.join(DPO_LOSSES)}")
        if d.beta <= 0:
            problems.append(f"dpo.beta={d.beta}: must be > 0")
        if not 0 <= d.label_smoothing < 0.5:
            problems.append(f"dpo.label_smoothing={d.label_smoothing}: must be in [0, 0.5)")
        if d.nll_weight < 0:
            problems.append(f"dpo.nll_weight={d.nll_weight}: must be >= 0")
        return problems
    if g.num_generations < 2:
        problems.append(
            f"grpo.num_generations={g.num_generations}: a group needs at least 2 completions, "
            "since advantages compare a completion with the others of its prompt"
        )
    m = job.model
    if any(m.uses_sliding_window(i) for i in range(m.num_hidden_layers)):
        problems.append(
            f"model.sliding_window={m.sliding_window} with model.max_window_layers={m.max_window_layers}: "
            "GRPO's update puts a prompt's completions in one row behind one attention mask, which "
            "has no per-layer window; set model.sliding_window=null for GRPO"
        )
    if g.temperature <= 0:
        problems.append(f"grpo.temperature={g.temperature}: must be > 0 (rollouts are sampled)")
    if g.top_p is not None and not 0 < g.top_p <= 1:
        problems.append(f"grpo.top_p={g.top_p}: must be in (0, 1] (or null)")
    if g.max_new_tokens <= 0:
        problems.append(f"grpo.max_new_tokens={g.max_new_tokens}: must be > 0")
    if not 0 <= g.epsilon < 1 or (g.epsilon_high is not None and g.epsilon_high < 0):
        problems.append(f"grpo.epsilon={g.epsilon} must be in [0, 1) and grpo.epsilon_high >= 0")
    if g.beta < 0:
        problems.append(f"grpo.beta={g.beta}: must be >= 0 (0: no reference model)")
    if not all(0 <= w < math.inf for w in g.prompt_weights.values()):  # NaN fails too
        problems.append(f"grpo.prompt_weights={dict(g.prompt_weights)}: each weight must be a number >= 0")
    if g.scale_rewards not in SCALE_REWARDS:
        problems.append(f"grpo.scale_rewards={g.scale_rewards!r}: choose {', '.join(SCALE_REWARDS)}")
    if g.loss_type not in GRPO_LOSSES:
        problems.append(f"grpo.loss_type={g.loss_type!r}: choose {', '.join(GRPO_LOSSES)}")
    if g.num_iterations < 1:
        problems.append(f"grpo.num_iterations={g.num_iterations}: must be >= 1")
    if g.max_sampling_rounds < 1:
        problems.append(f"grpo.max_sampling_rounds={g.max_sampling_rounds}: must be >= 1")
    if not g.rewards:
        problems.append("grpo.rewards is empty: give at least one reward")
    if g.max_new_tokens >= t.seq_len:
        problems.append(
            f"grpo.max_new_tokens={g.max_new_tokens} leaves no room for the prompt in train.seq_len={t.seq_len}"
        )
    return problems


def lora_widths(model: LlamaConfig) -> Dict[str, int]:
    """{target: min(in, out)} of each of LORA_TARGETS in `model`: the largest LoRA rank that
    stays low rank there."""
    hidden, inner = model.hidden_size, model.intermediate_size
    q = model.num_attention_heads * model.resolved_head_dim
    kv = model.resolved_num_key_value_heads * model.resolved_head_dim
    shapes = dict(q_proj=q, k_proj=kv, v_proj=kv, o_proj=q, gate_proj=inner, up_proj=inner, down_proj=inner)
    return {name: min(hidden, width) for name, width in shapes.items()}


def lora_problems(job: JobConfig) -> List[str]:
    """What is wrong with finetune.lora (validate() reports them); nothing when rank is None."""
    lora = job.finetune.lora
    if lora.rank is None:
        return []
    problems = []
    if not job.init_from:
        problems.append(
            "finetune.lora.rank is set but the run starts from scratch: LoRA adapts a trained model, "
            "so set init_from=<a run, a checkpoint or hf:<folder>> (or finetune.lora.rank=null)"
        )
    unknown = [t for t in lora.target_modules if t != ALL_LINEAR and t not in LORA_TARGETS]
    if unknown or not lora.target_modules:
        problems.append(
            f"finetune.lora.target_modules={list(lora.target_modules)}: "
            f"{'no module' if not unknown else f'{unknown} match no module'}; choose among "
            f"{', '.join(LORA_TARGETS)}, or [{ALL_LINEAR}] for all of them"
        )
    unsavable = [m for m in lora.modules_to_save if m not in LORA_MODULES_TO_SAVE]
    if unsavable:
        problems.append(
            f"finetune.lora.modules_to_save={list(lora.modules_to_save)}: {unsavable} cannot be "
            f"trained whole; choose among {', '.join(LORA_MODULES_TO_SAVE)} (or [])"
        )
    if lora.rank <= 0:
        problems.append(f"finetune.lora.rank={lora.rank}: must be > 0 (or null: full fine-tuning)")
    else:
        widths = lora_widths(job.model)
        chosen = (
            LORA_TARGETS
            if ALL_LINEAR in lora.target_modules
            else [t for t in lora.target_modules if t in widths]
        )
        over = {t: widths[t] for t in chosen if lora.rank > widths[t]}
        if over:
            problems.append(
                f"finetune.lora.rank={lora.rank} is above the width min(in, out) of "
                + ", ".join(f"{t} ({w})" for t, w in over.items())
                + f": choose rank <= {min(over.values())}"
            )
    if not lora.alpha > 0:
        problems.append(
            f"finetune.lora.alpha={lora.alpha}: must be > 0 (the update is scaled by alpha / rank)"
        )
    if not 0 <= lora.dropout < 1:
        problems.append(f"finetune.lora.dropout={lora.dropout}: must be in [0, 1)")
    return problems

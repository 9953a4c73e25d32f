"""LoRA adapters (Hu et al. 2021) on our Llama, saved and loaded in PEFT's folder format.

A frozen linear layer W (out, in) gets a trainable low-rank update:

    y = x W^T + (alpha / r) * x A^T B^T        A: (r, in), B: (out, r), r << min(in, out)

Only A and B train: r * (in + out) numbers per layer instead of in * out. B starts at zero, so
the adapted model equals the base at step 0, and `adapters_disabled(model)` gives the base back
at any time (the DPO/GRPO reference model without a second copy in memory). `merge_lora` folds
B A * alpha / r into W, after which the model is a plain Llama again (exports see plain weights).

Module names are Hugging Face's (`model.layers.0.self_attn.q_proj`), and so are PEFT's:

    ours   model.layers.0.self_attn.q_proj.lora_A.weight                   (lora_state_dict)
    PEFT   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (adapter_model.safetensors)

Beside the adapters a run may train whole modules (PEFT's `modules_to_save`): the embedding, so
that tokens the base never saw in use (the chat pieces) get vectors of their own. The module's
weight trains in place and a frozen copy of the base's weight rides along as the buffer
`lora_original_weight` (not saved), which `adapters_disabled` swaps in. With a tied head, the
embedding and the head are one matrix: it is saved under both names, as PEFT does with
`ensure_weight_tying`, and `PeftModel.from_pretrained` ties them again.

PEFT keeps each adapter under a name ("default": `lora_A.default.weight` in memory) and drops
that name from the saved keys; its `base_model.model.` prefix is the PeftModel wrapper and its
LoraModel. An adapter folder holds adapter_config.json and adapter_model.safetensors, which
`PeftModel.from_pretrained(<our HF export of the base>, folder)` loads unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinyllama.atomic import building_folder
from tinyllama.config import ALL_LINEAR, LORA_MODULES_TO_SAVE, LORA_TARGETS
from tinyllama.errors import CheckpointError, ConfigError

# The decoder's linear layers LoRA may wrap, by their Hugging Face names (config.LORA_TARGETS).
TARGETS = LORA_TARGETS
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the wrapped model)
# modules_to_save: Hugging Face's short name -> the module's full name in LlamaForCausalLM
SAVED_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}
assert tuple(SAVED_MODULES) == LORA_MODULES_TO_SAVE
ORIGINAL = "lora_original_weight"  # the buffer holding a saved module's base weight
TargetModules = Union[str, Sequence[str]]


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base_layer` plus the low-rank path lora_B(lora_A(dropout(x))) * scaling.

    x (..., in) -> (..., out). lora_A: in -> r, lora_B: r -> out, both without bias (the base's
    bias, if any, stays frozen). The submodule names are PEFT's, so our state-dict keys are
    PEFT's less the prefix and the adapter name.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha = rank, alpha
        # alpha / r keeps the update's scale about constant when r changes, so a learning rate
        # tuned at one rank carries over to another (the paper's choice, and PEFT's default).
        self.scaling = alpha / rank
        kw = dict(bias=False, device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Linear(base_layer.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base_layer.out_features, **kw)
        # Dropout on the LoRA path's input only: the base path must stay the base model's.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout = dropout
        self.disabled = False  # see adapters_disabled()
        self.merged = False  # see merge()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's default init: A as nn.Linear's own (kaiming uniform, a=sqrt(5)), B zero, so
        B A = 0 and the first forward equals the base's while A's random directions let B's
        gradient be non-zero from the first step."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self.merged:
            raise RuntimeError("this LoRALinear was merged into its base layer: use the merged model")
        result = self.base_layer(x)
        if self.disabled:
            return result
        # Same order of operations as PEFT's, so the two agree to float32 rounding.
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(out, in): B @ A * scaling, the update to the base weight (see delta_weight())."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold B @ A * scaling into base_layer.weight and return base_layer: a plain nn.Linear
        that computes what this module did (without dropout). This module is spent afterwards:
        its base now includes the update, so it refuses a second merge and a forward."""
        if self.merged:
            raise RuntimeError("this LoRALinear was already merged")
        weight = self.base_layer.weight
        weight.copy_(merged_weight(weight, self.lora_A.weight, self.lora_B.weight, self.scaling))
        self.merged = True
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """(out, in): B (out, r) @ A (r, in) * scaling, in float32 at least (a bf16 product would
    round away small updates before they reach the weight)."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    return (lora_B.detach().to(dtype) @ lora_A.detach().to(dtype)) * scaling


def merged_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """W + B A * scaling, summed in float32 and rounded to W's dtype once: the merged weight."""
    delta = delta_weight(lora_A, lora_B, scaling).to(weight.device)
    return (weight.detach().to(delta.dtype) + delta).to(weight.dtype)


def lora_modules(model: nn.Module) -> Dict[str, LoRALinear]:
    """{module name: LoRALinear} of `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` computes the base model's outputs (every LoRA path off), e.g. the
    reference log-probabilities of DPO and GRPO; the previous switches are restored after it."""
    modules = list(lora_modules(model).values())
    before = [m.disabled for m in modules]
    saved = list(saved_modules(model).values())
    trained = [m.weight.data for m in saved]
    for m in modules:
        m.disabled = True
    for m in saved:  # the base's weight in place of the trained one (the same Parameter object)
        m.weight.data = getattr(m, ORIGINAL)
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.disabled = was
        for m, weight in zip(saved, trained):
            m.weight.data = weight


def saved_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{module name: module} of the modules `model` trains whole beside its adapters
    (apply_lora's modules_to_save), in module order."""
    return {name: m for name, m in model.named_modules() if ORIGINAL in m._buffers}


def _tied_head(model: nn.Module) -> bool:
    head, embed = (
        getattr(model, "lm_head", None),
        getattr(getattr(model, "model", None), "embed_tokens", None),
    )
    return head is not None and embed is not None and head.weight is embed.weight


def resolve_modules_to_save(model: nn.Module, modules_to_save: Sequence[str]) -> List[str]:
    """Full names of the modules `modules_to_save` names (short, "embed_tokens", or full,
    "model.embed_tokens"), in module order. With a tied head either name is the one shared
    matrix, held by "model.embed_tokens". Raises ConfigError naming the entries that are not
    among LORA_MODULES_TO_SAVE."""
    entries = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    full = {v: v for v in SAVED_MODULES.values()}
    unknown = [e for e in entries if e not in SAVED_MODULES and e not in full]
    if unknown:
        raise ConfigError(
            f"modules_to_save {unknown} cannot be trained whole: choose among "
            f"{', '.join(SAVED_MODULES)} (the embedding and the output layer)"
        )
    chosen = {SAVED_MODULES.get(e, e) for e in entries}
    if chosen and _tied_head(model):
        return [SAVED_MODULES["embed_tokens"]]
    return [n for n in SAVED_MODULES.values() if n in chosen]


def _saved_keys(model: nn.Module, names: List[str]) -> Dict[str, str]:
    """{our state-dict key: the module it is saved from} of the modules trained whole; a tied
    head adds "lm_head.weight", the embedding under the head's name (as PEFT saves it)."""
    keys = {f"{n}.weight": n for n in names}
    if names and _tied_head(model):
        keys[f"{SAVED_MODULES['lm_head']}.weight"] = SAVED_MODULES["embed_tokens"]
    return keys


def _candidates(model: nn.Module) -> Dict[str, nn.Module]:
    """{name: module} of the layers LoRA may wrap (nn.Linear) or has wrapped (LoRALinear):
    those named one of TARGETS. A LoRALinear's own base_layer is named "...q_proj.base_layer"."""
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) in (nn.Linear, LoRALinear) and name.rsplit(".", 1)[-1] in TARGETS
    }


def resolve_targets(model: nn.Module, target_modules: TargetModules, regex: bool = False) -> List[str]:
    """Names of the modules of `model` that `target_modules` selects, in module order.

    target_modules: "all-linear" (every one of TARGETS), or names each matching a module whose
    name equals it or ends with "." + it (PEFT's rule): "q_proj" or "model.layers.0.mlp.up_proj".
    One name may be given as a plain string, unless regex: then a string other than "all-linear"
    is a regular expression the whole module name must match, as PEFT reads a string in
    adapter_config.json. Raises ConfigError naming the entries that match nothing and the valid
    names."""
    candidates = list(_candidates(model))
    valid = f"choose among {', '.join(TARGETS)}, or {ALL_LINEAR!r} for all of them (the lm_head is never a target)"
    if not candidates:
        raise ConfigError(f"the model has no linear layer named {', '.join(TARGETS)} to put LoRA on")
    if target_modules == ALL_LINEAR or (not isinstance(target_modules, str) and ALL_LINEAR in target_modules):
        return candidates  # "all-linear", or a list holding it (finetune.lora.target_modules)
    if isinstance(target_modules, str) and regex:
        chosen = [n for n in candidates if re.fullmatch(target_modules, n)]
        if not chosen:
            raise ConfigError(f"target_modules={target_modules!r} (a pattern) matches no module: {valid}")
        return chosen
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not entries:
        raise ConfigError(f"target_modules is empty: {valid}")

    def matches(name: str, entry: str) -> bool:
        return name == entry or name.endswith("." + entry)

    unmatched = [e for e in entries if not any(matches(n, e) for n in candidates)]
    if unmatched:
        raise ConfigError(f"target_modules {unmatched} match no module of the model: {valid}")
    return [n for n in candidates if any(matches(n, e) for e in entries)]


def _check_settings(layers: Dict[str, nn.Module], rank: int, alpha: float, dropout: float) -> None:
    """Raise one ConfigError listing every invalid LoRA setting for these (nn.Linear) layers."""
    problems = []
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        problems.append(f"rank={rank!r} must be a positive integer")
    else:
        # Above min(in, out), B @ A is no longer low rank: more parameters than the layer itself.
        widths = {n: min(m.in_features, m.out_features) for n, m in layers.items()}
        over = [n for n, w in widths.items() if rank > w]
        if over:
            problems.append(
                f"rank={rank} is above min(in, out) = {widths[over[0]]} of {over[0]} ({len(over)} "
                f"targeted layer(s) in all): choose rank <= {min(widths.values())}"
            )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        problems.append(f"alpha={alpha!r} must be > 0 (the update is scaled by alpha / rank)")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        problems.append(f"dropout={dropout!r} must be in [0, 1)")
    if problems:
        raise ConfigError("invalid LoRA settings: " + "; ".join(problems))


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: TargetModules = ALL_LINEAR,
    modules_to_save: Sequence[str] = (),
) -> List[str]:
    """Wrap the targeted nn.Linear layers of `model` in LoRALinear, in place, and freeze every
    other parameter, so that only lora_A and lora_B get gradients (and optimizer state: build the
    optimizer after this call), and the weights of `modules_to_save` (see
    resolve_modules_to_save), which train whole. Returns the wrapped module names.

    Every setting is checked first (ConfigError): on a refusal the model is untouched.
    """
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters: apply LoRA once, to a plain base model")
    names = resolve_targets(model, target_modules)
    saved = resolve_modules_to_save(model, modules_to_save)
    layers = _candidates(model)
    _check_settings({n: layers[n] for n in names}, rank, alpha, dropout)
    for p in model.parameters():  # the base, embeddings and norms included: only adapters train
        p.requires_grad_(False)
    for name in saved:
        module = model.get_submodule(name)
        # Not persistent: checkpoints save the trained weight; the base's comes from the base.
        module.register_buffer(ORIGINAL, module.weight.detach().clone(), persistent=False)
        module.weight.requires_grad_(True)
    for name in names:
        # A new module starts in training mode: take the layer's, or an eval() model would drop out.
        lora = LoRALinear(layers[name], rank, alpha, dropout).train(layers[name].training)
        _replace(model, name, lora)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors alone, with our module names: {"<module>.lora_A.weight": (r, in),
    "<module>.lora_B.weight": (out, r)}, and the weights of the modules trained whole
    ("model.embed_tokens.weight", and "lm_head.weight" for a tied head), detached (they share
    memory with the model)."""
    out: Dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    for key, name in _saved_keys(model, list(saved_modules(model))).items():
        out[key] = model.get_submodule(name).weight.detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (W += B A * scaling) and put the plain nn.Linear
    back in its place, in place; returns `model`, whose state_dict is a plain Llama's again.
    The merged layers stay frozen as the base was (requires_grad False); modules trained whole
    keep their trained weights."""
    for name, m in lora_modules(model).items():
        _replace(model, name, m.merge())
    for m in saved_modules(model).values():  # their trained weights are the merged model's
        del m._buffers[ORIGINAL]
    return model


def _settings(model: nn.Module) -> Tuple[Dict[str, LoRALinear], int, float, float]:
    """(modules, rank, alpha, dropout) of the model's adapters; one setting for all of them."""
    modules = lora_modules(model)
    if not modules:
        raise ConfigError("the model has no LoRA adapters to save: apply_lora first")
    found = {(m.rank, m.alpha, m.dropout) for m in modules.values()}
    if len(found) > 1:
        raise ConfigError(
            f"the adapters differ in (rank, alpha, dropout): {sorted(found)}; one setting is saved"
        )
    rank, alpha, dropout = found.pop()
    return modules, rank, alpha, dropout


def _saved_targets(model: nn.Module, names: List[str]) -> List[str]:
    """target_modules for adapter_config.json: the short names (["q_proj", "v_proj"]) when they
    select exactly the wrapped modules, else the full module names."""
    short = [t for t in TARGETS if any(n.rsplit(".", 1)[-1] == t for n in names)]
    every = [n for n in _candidates(model) if n.rsplit(".", 1)[-1] in short]
    return short if every == names else list(names)


def save_peft_adapter(
    model: nn.Module,
    folder: Union[str, Path],
    base_model_name_or_path: Optional[str] = None,
    rank: Optional[int] = None,
    alpha: Optional[float] = None,
    dropout: Optional[float] = None,
    target_modules: Optional[TargetModules] = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of `model` as a PEFT folder: adapter_config.json and
    adapter_model.safetensors (PEFT's key names, the adapters' dtype).

    rank, alpha, dropout and target_modules are read from the model's adapters; given, each must
    agree with them (the config must describe the tensors). base_model_name_or_path is recorded
    for PEFT (a path or a Hub name). The folder is built beside `folder` and renamed into place
    (tinyllama.atomic); an existing non-empty folder is refused unless overwrite.
    """
    modules, r, a, p = _settings(model)
    names = list(modules)
    given = {"rank": (rank, r), "alpha": (alpha, a), "dropout": (dropout, p)}
    wrong = [
        f"{k}={v!r} (the adapters have {have!r})" for k, (v, have) in given.items() if v not in (None, have)
    ]
    if target_modules is not None and resolve_targets(model, target_modules) != names:
        wrong.append(
            f"target_modules={target_modules!r} (the adapters are on {_saved_targets(model, names)})"
        )
    if wrong:
        raise ConfigError("save_peft_adapter: " + "; ".join(wrong))
    config = model_peft_config(model, base_model_name_or_path)
    folder = Path(folder)
    with building_folder(folder, overwrite, "choose another adapter folder, or allow overwriting it") as tmp:
        write_peft_files(tmp, config, lora_state_dict(model))
    return folder


def model_peft_config(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> Dict:
    """adapter_config.json describing the adapters of `model` (one rank, alpha and dropout)."""
    modules, r, a, p = _settings(model)
    saved = [short for short, full in SAVED_MODULES.items() if full in saved_modules(model)]
    return peft_config(
        r, a, p, _saved_targets(model, list(modules)), base_model_name_or_path, saved, _tied_head(model)
    )


def peft_config(
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: List[str],
    base_model_name_or_path: Optional[str],
    modules_to_save: Sequence[str] = (),
    tied_head: bool = False,
) -> Dict:
    """adapter_config.json of a LoRA adapter, as PEFT's LoraConfig reads it. modules_to_save:
    short names of the modules saved whole; tied_head: the model ties its head to its embedding
    (then PEFT is told to keep the saved embedding tied: ensure_weight_tying)."""
    return {
        # The keys PEFT's LoraConfig reads (peft 0.13 on); every other key takes PEFT's default.
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "bias": "none",  # only A and B are saved: base biases are the base's
        "fan_in_fan_out": False,  # weights are (out, in), as nn.Linear stores them (GPT-2's Conv1D is not)
        "use_rslora": False,  # scaling = alpha / r, not alpha / sqrt(r)
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": list(modules_to_save) or None,
        "ensure_weight_tying": bool(tied_head and modules_to_save),
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_peft_files(folder: Path, config: Dict, tensors: Dict[str, torch.Tensor]) -> None:
    """adapter_config.json and adapter_model.safetensors into the existing `folder` (one being
    built: a checkpoint's or an export's). tensors: our names ("<module>.lora_A.weight") or
    PEFT's (with base_model.model.); written under PEFT's."""
    peft = {  # cloned: a tied head's two names share one tensor, which safetensors refuses
        (k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v.detach().cpu().clone()
        for k, v in tensors.items()
    }
    save_file(peft, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# adapter_config.json options of PEFT's LoraConfig that change LoRA's arithmetic or what the
# folder holds (a bias, DoRA's magnitudes, per-layer ranks). Plain LoRA leaves each one empty or
# false (bias: "none"); a folder that sets one is refused, not loaded wrongly. modules_to_save
# may name the modules of SAVED_MODULES.
_EXTRAS = (
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
)


def read_peft_config(folder: Union[str, Path]) -> Dict:
    """adapter_config.json of `folder`, checked to be a plain LoRA adapter (CheckpointError)."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file() or not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    problems = [f"{k}={config[k]!r}" for k in _EXTRAS if config.get(k)]
    saved = config.get("modules_to_save") or []
    if any(m not in SAVED_MODULES and m not in SAVED_MODULES.values() for m in saved):
        problems.append(f"modules_to_save={saved!r} (only {', '.join(SAVED_MODULES)} load)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}")
    if config.get("peft_type") != "LORA":
        problems.insert(0, f"peft_type={config.get('peft_type')!r} (not 'LORA')")
    problems += [f"no {k!r}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if problems:
        raise CheckpointError(
            f"{path}: only plain LoRA adapters load here (bias 'none', no {', '.join(_EXTRAS)}, "
            f"modules_to_save among {', '.join(SAVED_MODULES)}); "
            f"found {', '.join(problems)}"
        )
    return config


def read_peft_adapter(
    folder: Union[str, Path], model: nn.Module
) -> Tuple[Dict, List[str], Dict[str, torch.Tensor]]:
    """(config, wrapped module names, tensors under PEFT's keys) of the PEFT adapter in `folder`,
    checked against `model` (a plain base model; on the meta device is enough): a config, a key
    or a shape that does not fit raises one CheckpointError naming it (and both shapes)."""
    folder = Path(folder)
    config = read_peft_config(folder)
    if lora_modules(model):
        raise CheckpointError(
            f"cannot load {folder}: the model already has LoRA adapters (load into a plain base)"
        )
    rank, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout") or 0.0
    try:  # a string in PEFT's config is a regular expression over full module names
        names = resolve_targets(model, config["target_modules"], regex=True)
        layers = _candidates(model)
        _check_settings({n: layers[n] for n in names}, rank, alpha, dropout)
        saved = resolve_modules_to_save(model, config.get("modules_to_save") or [])
    except ConfigError as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} does not fit this model: {e}") from e
    whole = {
        key: tuple(model.get_submodule(name).weight.shape) for key, name in _saved_keys(model, saved).items()
    }
    tensors = _read_adapter_tensors(folder / ADAPTER_WEIGHTS, layers, names, rank, whole, _tied_head(model))
    return config, names, tensors


def load_peft_adapter(model: nn.Module, folder: Union[str, Path]) -> List[str]:
    """Put the PEFT adapter in `folder` on `model` (a plain base model): apply_lora with the
    config's r, lora_alpha, lora_dropout and target_modules, then load the tensors. Returns the
    wrapped module names. The adapters stay trainable (call .eval() for inference: dropout).

    Everything is checked before the model changes (read_peft_adapter): on a CheckpointError
    the model is untouched.
    """
    config, names, tensors = read_peft_adapter(folder, model)
    dropout = config.get("lora_dropout") or 0.0
    apply_lora(model, config["r"], config["lora_alpha"], dropout, names, config.get("modules_to_save") or [])
    set_adapter_weights(model, tensors)
    return names


def set_adapter_weights(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy A and B of every adapter of `model`, and the weights of the modules it trains whole,
    from `tensors` (PEFT's keys, as read_peft_adapter gives them; cast to the model's dtype and
    device). The keys must be exactly the model's."""
    modules = lora_modules(model)
    whole = _saved_keys(model, list(saved_modules(model)))
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in modules for ab in "AB"}
    expected |= {PEFT_PREFIX + key for key in whole}
    if expected != set(tensors):
        raise CheckpointError(
            f"the adapter tensors do not match the model's adapters: missing "
            f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}"
        )
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
        for key, name in whole.items():
            model.get_submodule(name).weight.copy_(tensors[PEFT_PREFIX + key])


def merged_state(
    state: Dict[str, torch.Tensor], config: Dict, names: List[str], tensors: Dict[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """A copy of the base `state` (a plain model's state_dict) with the adapter merged into each
    wrapped layer's weight (merged_weight); what merge_lora gives, without building the modules.
    config, names, tensors: as read_peft_adapter returns them."""
    scaling = config["lora_alpha"] / config["r"]
    merged = dict(state)
    for name in names:
        A, B = tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        merged[f"{name}.weight"] = merged_weight(state[f"{name}.weight"], A, B, scaling)
    for key, tensor in tensors.items():  # the modules trained whole replace the base's weights
        if ".lora_" not in key:
            ours = key[len(PEFT_PREFIX) :]
            merged[ours] = tensor.to(state[ours].dtype) if ours in state else tensor
    return merged


def _read_adapter_tensors(
    path: Path,
    layers: Dict[str, nn.Module],
    names: List[str],
    rank: int,
    whole: Optional[Dict[str, Tuple[int, ...]]] = None,
    tied_head: bool = False,
) -> Dict[str, torch.Tensor]:
    """adapter_model.safetensors, checked to hold exactly A (r, in) and B (out, r) of each layer
    in `names` under PEFT's keys, and the weights `whole` lists ({our key: shape}) of the modules
    trained whole (CheckpointError naming the key and both shapes). With tied_head (the model
    ties its head to its embedding) the two saved copies of that matrix must be equal."""
    expected: Dict[str, Tuple[int, ...]] = {}
    for name in names:
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, layers[name].in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (layers[name].out_features, rank)
    for key, shape in (whole or {}).items():
        expected[PEFT_PREFIX + key] = shape
    try:
        tensors = load_file(str(path))
    except Exception as e:  # truncated or corrupt file
        raise CheckpointError(f"{path} is corrupt: {type(e).__name__}: {e}") from e
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model and its {ADAPTER_CONFIG}: missing {missing[:3]} "
            f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all)"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensors[key].shape)} but this model needs {shape} "
                f"(r={rank}): the adapter was made for another base model"
            )
    head, embed = (f"{PEFT_PREFIX}{SAVED_MODULES[k]}.weight" for k in ("lm_head", "embed_tokens"))
    if tied_head and head in expected and not torch.equal(tensors[head], tensors[embed]):
        raise CheckpointError(
            f"{path}: {head} differs from {embed}, but this model ties its head to its embedding"
        )
    return tensors

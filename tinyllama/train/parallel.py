"""How a built model is spread over the processes of a run: DDP, FSDP2, tensor parallelism.

    parallel = Parallelism.plan(job, world_size)      # refusals, before anything is read or written
    env = setup_distributed(device, tp=parallel.tp)
    train_model = parallel.apply(model, env, precision, compile=...)  # before building the optimizer

The model knows nothing of this (DESIGN: compile, DDP and FSDP are applied from outside), as
in torchtitan's split between the model and its parallelisms:

- ddp (train.parallel=ddp, the default): every process holds the whole model, its gradients
  and AdamW state; DistributedDataParallel averages the gradients in backward.
- fsdp (train.parallel=fsdp): FSDP2's `fully_shard` on every DecoderLayer and then the root.
  Each process keeps 1/N of every parameter, gradient and AdamW moment; a layer's weights are
  gathered just before its forward (and again in backward) and freed after it
  (reshard_after_forward), and gradients are reduce-scattered. In bf16 the gathered weights are
  bf16 while the kept shards and the gradient reduction stay float32 (MixedPrecisionPolicy).
- tp (train.tp=k): q/k/v and gate/up split by output features (ColwiseParallel: each process
  computes whole heads, num_heads / k of them), o and down by input features (RowwiseParallel:
  the partial products are summed over the k processes), the embedding by vocabulary rows and
  the head by vocabulary columns, both returning whole activations. Norms stay whole.
  With world / k > 1 the processes form a (dp, tp) mesh and the dp dimension is FSDP.

Parameters under fsdp/tp are DTensors: checkpoints are written with torch.distributed.checkpoint
(each process its shards), and gradient clipping sums the squared norms over the meshes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Dict, List, Optional

import torch
from torch import nn

from tinyllama.config import JobConfig
from tinyllama.errors import ConfigError
from tinyllama.train.distributed import DistEnv, wrap_ddp


@dataclass(frozen=True)
class Parallelism:
    """train.parallel and train.tp resolved for a world size (see `plan`)."""

    strategy: str  # "ddp" or "fsdp" (the data-parallel dimension)
    world_size: int
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (fsdp or tp): checkpoints are DCP shards."""
        return self.strategy == "fsdp" or self.tp > 1

    @property
    def name(self) -> str:
        """ "ddp", "fsdp", "tp" or "fsdp+tp": how checkpoints and the run's first line name it."""
        if self.tp > 1:
            return "fsdp+tp" if self.dp > 1 else "tp"
        return self.strategy

    def describe(self) -> str:
        """'fsdp over 2 processes, mesh (dp=2)' and the like, for the run's first line."""
        if self.world_size == 1:
            return "single process"
        mesh = f"dp={self.dp}" + (f" x tp={self.tp}" if self.tp > 1 else "")
        return f"{self.name} over {self.world_size} processes, mesh ({mesh})"

    @staticmethod
    def plan(job: JobConfig, world_size: int) -> "Parallelism":
        """The parallelism job.train.parallel / train.tp ask for on `world_size` processes; one
        ConfigError listing what the number of processes rules out (raised before anything is
        read or written). What the config alone rules out is validate()'s (parallel_problems)."""
        train, tp = job.train, job.train.tp
        problems: List[str] = []
        launch = "launch with torchrun --nproc_per_node=N (N >= 2)"
        if world_size == 1 and train.parallel == "fsdp":
            problems.append(
                f"train.parallel=fsdp shards over several processes, but this is one: {launch}, "
                "or train with train.parallel=ddp (the default) on one process"
            )
        if world_size == 1 and tp > 1:
            problems.append(f"train.tp={tp} splits layers over {tp} processes, but this is one: {launch}")
        elif world_size % tp:
            problems.append(
                f"train.tp={tp} does not divide the {world_size} processes: the mesh is "
                f"(data = processes / tp) x (tensor = tp); launch a multiple of {tp} processes"
            )
        elif tp > 1 and world_size > tp and train.parallel != "fsdp":
            problems.append(
                f"train.tp={tp} on {world_size} processes leaves a data-parallel degree of "
                f"{world_size // tp}, which is sharded with FSDP: add train.parallel=fsdp"
            )
        if problems:
            raise ConfigError("invalid parallelism:\n  - " + "\n  - ".join(problems))
        return Parallelism(train.parallel if world_size > 1 else "ddp", world_size, tp)

    # ---- applying it ------------------------------------------------------------------------
    def apply(
        self, model: nn.Module, env: DistEnv, param_dtype: torch.dtype, compile: bool = False
    ) -> nn.Module:
        """What training steps run through. ddp: the model (compiled) in DistributedDataParallel;
        sharded: `model` itself, its parameters replaced by DTensors in place (so `model` is
        what is evaluated and saved). param_dtype: the precision's compute dtype (fsdp gathers
        weights in it). Build the optimizer on model.parameters() after this call."""
        if not self.sharded:
            return wrap_ddp(torch.compile(model) if compile else model, env)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(env.device.type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
        if self.tp > 1:
            apply_tensor_parallel(model, mesh["tp"])
        if compile:  # per layer, before sharding, as torchtitan does: the hooks stay outside
            for layer in model.model.layers:
                layer.compile()
        if self.strategy == "fsdp":
            apply_fsdp(model, mesh["dp"], param_dtype)
        return model

    def gradient_sync(self, train_model: nn.Module, last: bool) -> ContextManager:
        """Context of one micro-step: gradients are reduced across data-parallel processes only
        on the last micro-step of an accumulation."""
        if self.world_size == 1 or self.dp == 1:
            return contextlib.nullcontext()
        if self.strategy == "fsdp":
            train_model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else train_model.no_sync()

    def optimizer_context(self) -> ContextManager:
        """Context of the optimizer step. Under tp alone the norms stay plain tensors (the same
        on every process) beside DTensors; AdamW's fused kernel takes them as replicated."""
        if self.tp > 1 and self.strategy != "fsdp":
            from torch.distributed.tensor.experimental import implicit_replication

            return implicit_replication()
        return contextlib.nullcontext()


def tensor_parallel_plan() -> Dict[str, object]:
    """Each DecoderLayer's plan: the projections into heads and into the MLP split by output
    features, the projections back split by input features (one sum over the tensor processes
    per block, Megatron-LM's layout)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }


def apply_tensor_parallel(model: nn.Module, mesh) -> None:
    """Split `model` (LlamaForCausalLM) over the 1-D tensor mesh in place (see the module
    docstring). Attention reshapes with -1 heads, so each process runs its own heads unchanged."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for layer in model.model.layers:
        parallelize_module(layer, mesh, tensor_parallel_plan())
    parallelize_module(
        model,
        mesh,
        {
            # Rows of the vocabulary: each process looks up the ids it holds, the rest are zeros,
            # and the sum over processes is the embedding.
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            # Columns of the vocabulary, gathered into whole logits for the loss.
            "lm_head": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    if tied:  # both split the (V, C) matrix by rows: one tensor again, as in the unsplit model
        model.lm_head.weight = model.model.embed_tokens.weight


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype) -> None:
    """FSDP2 in place: fully_shard on each DecoderLayer (its weights gathered for its forward and
    backward only), then on the root (embedding, final norm and head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # The root's parameters are needed again at once by backward: keep them gathered.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def clip_grad_norm_(parameters: List[nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over gradients that may be DTensors on different meshes (under
    fsdp+tp the norms live on the dp mesh and the projections on the dp x tp mesh; under tp
    alone the norms are plain tensors, the same on every process). Returns the global norm
    (a plain 0-dim float32 tensor), as torch.nn.utils.clip_grad_norm_ does."""
    from torch.distributed.tensor import DTensor

    groups: Dict[object, List[nn.Parameter]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the norm of the whole gradients, on every process
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if max_norm != float("inf"):
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def full_state_dict(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The whole weights of a sharded model on rank 0's CPU (None on the other ranks); every
    rank calls it (it gathers). Hugging Face key names, as model.state_dict() gives them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None

"""The training loop: one loop for every preset, from a laptop CPU to multi-node DDP or FSDP2
with tensor parallelism (tinyllama/train/parallel.py applies those to the built model).

    run_training(job) -> final validation loss

Components own their schedules: the loop calls `evaluator.maybe_eval(step)`,
`checkpointer.maybe_save(step)` and `tracker.log_step(...)` after every optimizer step and
never does cadence arithmetic itself. The Trainer declares the run's state once, handing it to
the Checkpointer, which saves and resumes everything a step depends on (weights, optimizer,
scaler, schedule, counters, loader position and RNG states per rank), so losses after a resume
equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from tinyllama.config import JobConfig, is_chat, run_dir_of
from tinyllama.data import packing_report, read_chat_meta
from tinyllama.data.conversations import iter_conversations
from tinyllama.model import LlamaForCausalLM
from tinyllama.run_record import record_launch, write_summary
from tinyllama.train.build import build_training_model, prepare_data, tokenizer_origin
from tinyllama.train.checkpointer import Attribute, Checkpointer, resume_checkpoint
from tinyllama.train.distributed import DistEnv, setup_distributed, teardown_distributed, torchrun_world_size
from tinyllama.train.dpo_objective import DPOObjective
from tinyllama.train.evaluator import Evaluator
from tinyllama.train.grpo import GRPOObjective
from tinyllama.train.nan_guard import NanGuard
from tinyllama.train.objectives import LMObjective, Objective
from tinyllama.train.optim import build_optimizer, build_schedule
from tinyllama.train.parallel import Parallelism, clip_grad_norm_, full_state_dict
from tinyllama.train.precision import resolve_precision
from tinyllama.train.rng import RNGStates, seed_everything
from tinyllama.train.samples import write_chat_samples, write_samples
from tinyllama.train.signals import StopRequest
from tinyllama.train.throughput import Throughput, peak_flops, peak_memory_bytes
from tinyllama.train.tracker import Tracker


def run_training(
    job: JobConfig, overrides: Sequence[str] = (), on_eval: Optional[Callable[[int, float], bool]] = None
) -> float:
    """Train, evaluate and sample as `job` says; returns the final validation loss.
    `overrides`: the command line that launched it, kept in the run folder's launches.jsonl.
    on_eval(step, val_loss), called on rank 0 after each evaluation during training, may return
    True to end the run there (a search pruning a hopeless trial); summary.json says "pruned"."""
    parallel = Parallelism.plan(job, torchrun_world_size())  # refusals before anything is written
    env = setup_distributed(job.run.device, tp=parallel.tp)
    try:
        final = Trainer(job, env, overrides, on_eval, parallel).fit()
        # Ranks leave together: gloo aborts a process ("terminate called without an active
        # exception") that destroys its group while another still talks to it (rank 0 samples
        # and writes the summary after the others are done).
        env.barrier()
        return final
    finally:
        teardown_distributed()


class Trainer:
    """Holds the state of one run. `model` is the LlamaForCausalLM (saved, evaluated and
    sampled; under fsdp/tp sharded in place); `train_model` is what steps run through (compiled
    and/or DDP-wrapped, or `model` itself when sharded)."""

    def __init__(
        self,
        job: JobConfig,
        env: DistEnv,
        overrides: Sequence[str] = (),
        on_eval: Optional[Callable[[int, float], bool]] = None,
        parallel: Optional[Parallelism] = None,
    ) -> None:
        self.job, self.env, t = job, env, job.train
        self.on_eval = on_eval
        self.parallel = parallel or Parallelism.plan(job, env.world_size)
        self.run_dir = run_dir_of(job)
        seed_everything(job.run.seed)
        self.tokenizer, self.packed_dir = prepare_data(job, env)
        self.precision = resolve_precision(t.precision, env.device)
        # base: what a LoRA run's checkpoints name as the weights their adapter adapts (else None)
        self.model, self.base = build_training_model(job, self.tokenizer, env.device)
        # The optimizer holds the parameters as the parallelism leaves them (fsdp/tp: DTensors).
        self.train_model = self.parallel.apply(self.model, env, self.precision.dtype, compile=t.compile)
        self.optimizer = build_optimizer(self.model, job.optim, env.device)
        self.scheduler = build_schedule(self.optimizer, job.optim, t.max_steps)
        self.scaler = self.precision.grad_scaler()
        self.guard = NanGuard(t.nan_policy)
        # What a step minimises (pretraining/SFT, DPO or GRPO): its data, built and checked here.
        self.chat = is_chat(job.data)
        self.objective = build_objective(
            job, env, self.model, self.tokenizer, self.packed_dir, self.precision.autocast
        )
        self.step, self.tokens, self.resumed_from = 0, 0, None
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * env.dp_size
        # Refusals happen here, before anything is written.
        resume = resume_checkpoint(self.run_dir, job, self.tokenizer, env.world_size)
        if env.is_main:
            record_launch(
                self.run_dir,
                job,
                overrides,
                resumed_from_step=resume.step if resume else 0,
                device=str(env.device),
                world_size=env.world_size,
                parallel=self.parallel.describe(),
                precision=self.precision.name,
                precision_reason=self.precision.reason,
            )
        self.tracker = Tracker(
            self.run_dir,
            env.is_main,
            job.logger,
            t.log_every,
            t.max_steps,
            resume.step if resume else 0,
            OmegaConf.to_container(OmegaConf.structured(job)),
        )
        self.evaluator = Evaluator(
            self.model,
            self.packed_dir,
            job.eval,
            t.batch_size,
            t.seq_len,
            env,
            self.precision.autocast,
            t.max_steps,
            self.tracker.log_eval,
            conversations=self.chat,
        )
        # The run's state, declared once: the checkpointer saves, restores and prunes it.
        self.checkpointer = Checkpointer(
            self.run_dir,
            job,
            env,
            self.model,
            self.tokenizer,
            self.evaluator,
            self.optimizer,
            base=self.base,
            parallel=self.parallel,
            states={
                "step": Attribute(self, "step"),
                "tokens": Attribute(self, "tokens"),
                "scheduler": self.scheduler,
                "scaler": self.scaler,
                "best_val_loss": Attribute(self.evaluator, "best_loss"),
            },
            rank_states={"loader": self.objective, "rng": RNGStates()},
        )
        if resume:
            self.checkpointer.load(resume)  # last: restores the RNG states everything above consumed
            self.resumed_from = resume.path
        self.throughput = Throughput(
            self.tokens_per_step,
            self.model.flops_per_token(t.seq_len)["training"],
            peak_flops(env.device, self.precision.dtype),
            env.world_size,
        )

    # ---- one optimizer step ---------------------------------------------------------------
    def forward_backward(self) -> Tuple[float, float]:
        """grad_accum micro-steps; DDP and FSDP reduce gradients only on the last one.
        Returns (mean loss over the micro-batches of every rank, global gradient norm)."""
        accum, device = self.job.train.grad_accum, self.env.device
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = self.objective.next_batch()  # on the device; rollouts and references included
            with self.parallel.gradient_sync(self.train_model, last=micro == accum - 1):
                with self.precision.autocast():
                    # / accum: the summed grads are a mean.
                    loss = self.objective.loss(self.train_model, batch) / accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)  # true gradients before clipping (no-op unless fp16)
        clip = self.job.train.grad_clip if self.job.train.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm_(list(self.model.parameters()), clip)  # over shards too
        # The loss of the global batch: the mean of the ranks' means (each rank saw as many
        # tokens), so N ranks log what one process with N x the accumulation logs. It is the
        # step's only collective besides the gradients'; a NaN on any rank makes it NaN on all.
        loss_sum = self.env.mean(loss_sum)
        loss, norm = torch.stack([loss_sum, grad_norm.float()]).tolist()  # one device sync per step
        return loss, norm

    def optimizer_step(self, loss: float, grad_norm: float) -> None:
        """Apply the update unless the loss/gradients are not finite (see NanGuard). Under fp16 an
        infinite gradient norm is the GradScaler's business (it skips and lowers the scale)."""
        # Both figures are global (the loss averaged over ranks, the norm of DDP's averaged
        # gradients), so every rank takes the same decision without another collective.
        finite = math.isfinite(loss) and (self.scaler.is_enabled() or math.isfinite(grad_norm))
        if not self.guard.should_skip(self.step + 1, finite, f"loss ({loss}) or gradient norm"):
            with self.parallel.optimizer_context():
                self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> float:
        """Train to train.max_steps (or a stop signal), then evaluate, sample and summarise."""
        t0, start_step = time.perf_counter(), self.step
        self._announce()
        try:
            with StopRequest(self.tracker.print) as stop:
                if self.step == 0:
                    self.evaluator.maybe_eval(0)  # the starting point, to see the run learn
                while self.step < self.job.train.max_steps:
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss, grad_norm = self.forward_backward()
                    self.optimizer_step(loss, grad_norm)
                    self.step += 1
                    self.tokens += self.tokens_per_step
                    self._log_step(loss, lr, grad_norm)
                    val_loss = self.evaluator.maybe_eval(self.step)
                    if self.env.any(stop.requested):  # all ranks stop after the same step
                        return self._stop(stop.signal_name, lr, grad_norm)
                    if val_loss is not None and self._pruned(val_loss):
                        self._summarise(
                            val_loss, time.perf_counter() - t0, self.step - start_step, pruned=True
                        )
                        return val_loss
                    self.checkpointer.maybe_save(self.step)
            final = self.evaluator.maybe_eval(self.step, force=True)
            self.checkpointer.maybe_save(self.step, force=True)
            self.tracker.end_progress()
            whole = self.whole_model()  # rank 0's, gathered from the shards if need be
            if self.env.is_main and self.chat:
                held_out = iter_conversations(self.job.data, "val")
                samples = self.run_dir / "samples.txt"
                context = self.job.train.seq_len
                write_chat_samples(
                    whole,
                    self.tokenizer,
                    self.job.sample,
                    held_out,
                    context,
                    samples,
                    self.tracker.print,
                )
            elif self.env.is_main:
                write_samples(
                    whole,
                    self.tokenizer,
                    self.job.sample,
                    self.job.run.seed,
                    self.run_dir / "samples.txt",
                    self.env.device,
                    self.tracker.print,
                )
            self._summarise(final, time.perf_counter() - t0, self.step - start_step)
            return final
        finally:
            self.tracker.close()

    def _log_step(self, loss: float, lr: float, grad_norm: float) -> None:
        self.throughput.step()
        if self.tracker.log_step(self.step, loss):
            self._write_step(lr, grad_norm)

    def _write_step(self, lr: float, grad_norm: float) -> None:
        perf = {**self.throughput.window(), "peak_mem_mb": peak_memory_bytes(self.env.device) / 2**20}
        figures = self.objective.window()
        self.tracker.write_step(self.step, lr, self.tokens, perf, grad_norm=grad_norm, **figures)

    def _pruned(self, val_loss: float) -> bool:
        """Whether on_eval (asked on rank 0; every rank evaluates at the same steps) ends the run."""
        if self.on_eval is None or self.step >= self.job.train.max_steps:
            return False  # at the last step the run is complete, not pruned
        if not self.env.any(self.env.is_main and bool(self.on_eval(self.step, val_loss))):
            return False
        self.tracker.end_progress()
        self.tracker.print(f"pruned at step {self.step} (validation loss {val_loss:.4f})")
        return True

    def _stop(self, signal_name: Optional[str], lr: float, grad_norm: float) -> float:
        """Preemption or Ctrl-C: log the steps since the last training line, save now and
        return the last validation loss (nan if none)."""
        if self.tracker.pending:
            self._write_step(lr, grad_norm)
        self.checkpointer.maybe_save(self.step, force=True)
        self.tracker.print(
            f"stopped at step {self.step} by {signal_name}; run the same command again to resume"
        )
        return self.evaluator.last_loss if self.evaluator.last_loss is not None else float("nan")

    def whole_model(self) -> Optional[nn.Module]:
        """On rank 0, the model with whole weights, for what runs there alone (samples): `model`
        itself, or under fsdp/tp a plain copy gathered from every rank's shards (every rank
        calls this; the other ranks get None)."""
        if not self.parallel.sharded:
            return self.model if self.env.is_main else None
        state = full_state_dict(self.model)
        if not self.env.is_main:
            return None
        whole = LlamaForCausalLM(self.model.config)
        whole.load_state_dict(state)
        return whole.to(self.env.device)

    def trainable_parameters(self) -> int:
        """Parameters that get gradients (all of them, or a LoRA run's adapters alone)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _announce(self) -> None:
        t, n = self.job.train, self.model.num_parameters()
        trained, lora = self.trainable_parameters(), self.job.finetune.lora
        adapters = (
            f" | LoRA rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.target_modules)}"
            + (f", {', '.join(lora.modules_to_save)} trained whole" if lora.modules_to_save else "")
            + ": "
            f"{trained / 1e6:.3f}M trainable ({100 * trained / n:.2f}%), the rest frozen"
            if self.base is not None
            else ""
        )
        self.tracker.print(
            f"parallel: {self.parallel.describe()} | "
            f"precision: {self.precision.name} ({self.precision.reason})\n"
            f"model: {n / 1e6:.2f}M parameters{adapters} | device {self.env.device} x {self.env.world_size}\n"
            f"global batch: {t.batch_size} sequences x "
            f"{t.grad_accum} accumulation x {self.env.dp_size} ranks = "
            f"{t.batch_size * t.grad_accum * self.env.dp_size} sequences of {t.seq_len} tokens "
            f"({self.tokens_per_step} tokens per step) | run folder {self.run_dir}"
        )
        if self.chat:  # what packing made of the conversations, cut and dropped ones included
            self.tracker.print(tokenizer_origin(self.job, self.tokenizer))
            self.tracker.print(packing_report(read_chat_meta(self.packed_dir)))
        if self.base is not None:
            self.tracker.print(f"LoRA base: {self.base['path']} (weights {self.base['fingerprint']})")
        if self.resumed_from is not None:
            self.tracker.print(f"resumed from {self.resumed_from} at step {self.step}")

    def _summarise(self, final: float, wall_s: float, steps: int, pruned: bool = False) -> None:
        summary = {
            "final_val_loss": final,
            "best_val_loss": self.evaluator.best_loss,
            "tokens_seen": self.tokens,
            "wall_time_s": wall_s,
            "tok_per_s": steps * self.tokens_per_step / max(wall_s, 1e-9),
            "trainable_params": self.trainable_parameters(),
            "peak_mem_mb": peak_memory_bytes(self.env.device) / 2**20,
            "skipped_steps": self.guard.skipped,
            "pruned": pruned,
            "precision": self.precision.name,
            "precision_reason": self.precision.reason,
        }
        summary.update(self.objective.total())
        self.tracker.print("summary:")
        self.tracker.summary(summary)
        if self.env.is_main:
            write_summary(self.run_dir, summary)


def build_objective(
    job: JobConfig,
    env: DistEnv,
    model: nn.Module,
    tokenizer,
    packed_dir: Path,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Objective:
    """The objective train.objective names (config.OBJECTIVES), built before any step: DPO and
    GRPO read and check their pairs or prompts (and GRPO its rewards) here."""
    name = job.train.objective
    if name == "dpo":
        return DPOObjective(job, env, model, tokenizer)
    if name == "grpo":
        return GRPOObjective(job, env, model, tokenizer, autocast)
    return LMObjective(job, env, packed_dir, tokenizer)

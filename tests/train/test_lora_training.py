"""LoRA on the fine-tuning paths: the loop trains the adapters alone, checkpoints hold the adapter
(a PEFT folder) and name its base, every stage loads the run merged, exports merge it or write it
apart, and DPO/GRPO score against the base with the adapters off."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tinyllama.checkpoint import (
    WEIGHTS,
    build_model,
    load_checkpoint,
    load_for_inference,
    load_weights,
    save_checkpoint,
    weights_fingerprint,
)
from tinyllama.config import JobConfig, LoRAConfig, validate
from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.export import run_export
from tinyllama.lora import LoRALinear, lora_modules
from tinyllama.model import LlamaForCausalLM
from tinyllama.train import loop
from tinyllama.train.dpo_objective import DPOObjective
from tinyllama.train.loop import Trainer, run_training
from tinyllama.train.objectives import AdaptersOff


def metrics(job):
    lines = (loop.run_dir_of(job) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(job):
    return {m["step"]: m["loss"] for m in metrics(job) if "loss" in m}


def snapshot(folder: Path) -> dict:
    """{relative path: (size, mtime)} of every file under `folder`: what 'nothing written' compares."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def lora_job(chat_job):
    chat_job.finetune.lora = LoRAConfig(rank=4, alpha=8.0, target_modules=["all-linear"])
    chat_job.optim.lr = 1e-2
    return chat_job


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


# ---- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lora, init_from, message",
    [
        (LoRAConfig(rank=8), None, "starts from scratch"),
        (LoRAConfig(rank=0), "runs/demo", "rank=0: must be > 0"),
        (LoRAConfig(rank=65), "runs/demo", r"rank=65 is above the width .*q_proj \(64\)"),
        (LoRAConfig(rank=8, target_modules=["kv_proj"]), "runs/demo", r"\['kv_proj'\] match no module"),
        (LoRAConfig(rank=8, target_modules=[]), "runs/demo", "no module"),
        (LoRAConfig(rank=8, alpha=0.0), "runs/demo", "alpha=0.0: must be > 0"),
        (LoRAConfig(rank=8, dropout=1.0), "runs/demo", r"dropout=1.0: must be in \[0, 1\)"),
    ],
)
def test_bad_lora_settings_are_refused_by_validate(lora, init_from, message):
    job = JobConfig(init_from=init_from)
    job.model = dataclasses.replace(job.model, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    job.finetune.lora = lora
    with pytest.raises(ConfigError, match=message):
        validate(job)


def test_the_k_v_width_bounds_the_rank_only_where_they_are_targeted():
    job = JobConfig(init_from="runs/demo")
    job.model = dataclasses.replace(
        job.model, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=128
    )
    job.finetune.lora = LoRAConfig(rank=32, target_modules=["q_proj", "up_proj"])
    validate(job)  # k/v are 16 wide here, but not targeted
    job.finetune.lora.target_modules = ["v_proj"]
    with pytest.raises(ConfigError, match=r"v_proj \(16\)"):
        validate(job)


# ---- the loop -----------------------------------------------------------------------------


def test_a_lora_run_trains_the_adapters_alone_and_saves_them_as_a_peft_folder(lora_job, capsys):
    base_state = load_weights(lora_job.init_from)[1]
    run_training(lora_job)
    out = capsys.readouterr().out
    assert "LoRA rank 4, alpha 8 on all-linear" in out and "trainable" in out
    folder = load_checkpoint(loop.run_dir_of(lora_job)).path
    assert not (folder / WEIGHTS).exists()  # the adapter alone, not the model
    assert {"adapter_config.json", "adapter_model.safetensors", "base.json"} <= {
        p.name for p in folder.iterdir()
    }
    base = json.loads((folder / "base.json").read_text())
    assert base["init_from"] == lora_job.init_from
    assert base["fingerprint"] == weights_fingerprint(base_state)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"

    ckpt = load_checkpoint(folder, train_state=False)
    merged = ckpt.model_state
    targeted = {f"{n}.weight" for n in ckpt.adapter.names}
    assert len(targeted) == 2 * 7  # every linear layer of both decoder layers
    for key, tensor in base_state.items():  # embeddings and norms as they were; the rest adapted
        assert torch.equal(merged[key], tensor) == (key not in targeted), key
    summary = json.loads((loop.run_dir_of(lora_job) / "summary.json").read_text())
    n = sum(t.numel() for k, t in base_state.items() if k != "lm_head.weight")  # tied head: once
    # r (in + out) per layer: q 32->32, k and v 32->16, o 32->32, gate and up 32->64, down 64->32
    per_layer = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64))
    assert summary["trainable_params"] == 2 * per_layer < n / 4


def test_the_merged_checkpoint_computes_what_the_adapted_model_did(lora_job, chat_tokenizer):
    lora_job.train.max_steps = 3
    seen = {}
    real = Trainer.fit

    def keep(self):
        seen["model"] = self.model
        return real(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "fit", keep)
        run_training(lora_job)
    adapted = seen["model"]
    assert lora_modules(adapted) and all(
        not p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n
    )
    ids = torch.tensor([chat_tokenizer.encode("<|user|>Who is Tom?<|end|><|assistant|>", bos=True)])
    merged = build_model(load_checkpoint(loop.run_dir_of(lora_job), train_state=False))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, ids), logits_of(adapted, ids), rtol=1e-5, atol=1e-5)


def test_a_resumed_lora_run_gives_the_same_losses(lora_job, tmp_path, monkeypatch):
    straight = copy.deepcopy(lora_job)
    straight.run.dir = str(tmp_path / "straight")
    run_training(straight)
    real = Trainer.optimizer_step

    def stop_at_3(self, loss, grad_norm):
        real(self, loss, grad_norm)
        if self.step + 1 == 3:
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", stop_at_3)
        run_training(lora_job)
    assert load_checkpoint(loop.run_dir_of(lora_job)).step == 3
    run_training(lora_job)
    assert train_losses(lora_job) == train_losses(straight)  # exact, all 6 steps


def test_a_resume_or_a_stage_given_another_base_refuses_naming_both(lora_job, chat_tokenizer, tmp_path):
    lora_job.train.max_steps = 3
    run_training(lora_job)
    run = loop.run_dir_of(lora_job)
    lora_job.train.max_steps = 6
    base = Path(lora_job.init_from)
    # The base run goes on: its `latest` now names other weights than the adapter was trained on.
    torch.manual_seed(7)
    other = LlamaForCausalLM(lora_job.model)
    meta = {"tokens": 0, "tokenizer_fingerprint": chat_tokenizer.fingerprint}
    save_checkpoint(
        base / "checkpoints", 9, other, lora_job.model, lora_job, chat_tokenizer.model_path, meta, None
    )
    before = snapshot(run)
    with pytest.raises(CheckpointError) as e:
        run_training(lora_job)
    message = str(e.value)
    assert "wrong base" in message and "step_5" in message and "step_9" in message
    assert message.count("sha256:") == 2
    assert snapshot(run) == before  # nothing written
    # A stage reads the base base.json names (step_5, still there) unless init_from names another.
    stage = copy.deepcopy(lora_job)
    stage.init_from = None
    load_for_inference(stage)
    stage.init_from = str(base / "checkpoints" / "step_9")
    with pytest.raises(CheckpointError, match="wrong base"):
        load_for_inference(stage)
    # The recorded base gone, and no other given: the message says which one to give.
    base.rename(tmp_path / "moved")
    stage.init_from = None
    with pytest.raises(CheckpointError, match=r"whose base is gone: .*step_5.*init_from="):
        load_for_inference(stage)
    stage.init_from = str(tmp_path / "moved" / "checkpoints" / "step_5")
    load_for_inference(stage)


def test_resuming_with_other_lora_settings_is_refused(lora_job):
    lora_job.train.max_steps = 3
    run_training(lora_job)
    run = loop.run_dir_of(lora_job)
    before = snapshot(run)
    for change in ({"rank": 8}, {"rank": None}, {"alpha": 4.0}, {"target_modules": ["q_proj"]}):
        job = copy.deepcopy(lora_job)
        job.train.max_steps = 6
        job.finetune.lora = dataclasses.replace(job.finetune.lora, **change)
        key = next(iter(change))
        with pytest.raises(CheckpointError, match=f"finetune.lora.{key}: checkpoint"):
            run_training(job)
    assert snapshot(run) == before


def test_grad_checkpointing_takes_the_lora_model(lora_job, tmp_path):
    lora_job.train.max_steps = 2
    gc = copy.deepcopy(lora_job)
    gc.train.grad_checkpointing, gc.run.dir = True, str(tmp_path / "gc")
    run_training(lora_job)
    run_training(gc)
    a, b = train_losses(lora_job), train_losses(gc)
    torch.testing.assert_close(list(a.values()), list(b.values()), rtol=1e-6, atol=1e-6)


def test_compile_takes_the_lora_model(lora_job, tmp_path, monkeypatch):
    lora_job.train.max_steps, lora_job.train.compile = 2, True
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: real(m, backend="aot_eager", **k))
    plain = copy.deepcopy(lora_job)
    plain.train.compile, plain.run.dir = False, str(tmp_path / "plain")
    run_training(lora_job)
    run_training(plain)
    a, b = train_losses(lora_job), train_losses(plain)
    torch.testing.assert_close(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-5)


def test_ddp_two_processes_train_the_adapters_as_one_process_with_twice_the_accumulation(lora_job, tmp_path):
    import subprocess
    import sys

    from tinyllama.cli import job_config_args

    lora_job.data.num_docs, lora_job.data.packing = 100, "padded"  # 2 held-out windows: 1 per rank
    lora_job.train.max_steps, lora_job.train.batch_size = 3, 1
    lora_job.eval.every, lora_job.eval.batches, lora_job.checkpoint.every = 3, 0, 3
    ddp, single = copy.deepcopy(lora_job), copy.deepcopy(lora_job)
    ddp.run.dir, single.run.dir, single.train.grad_accum = str(tmp_path / "ddp"), str(tmp_path / "one"), 2
    repo = Path(__file__).resolve().parents[2]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*torchrun, str(repo / "train.py"), *job_config_args(ddp, tmp_path)],
        cwd=repo,
        text=True,
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    run_training(single)
    for key in ("loss", "val_loss"):
        a = {m["step"]: m[key] for m in metrics(ddp) if key in m}
        b = {m["step"]: m[key] for m in metrics(single) if key in m}
        assert a.keys() == b.keys() and a, key
        torch.testing.assert_close(list(a.values()), list(b.values()), rtol=1e-5, atol=0, msg=key)
    ours = load_checkpoint(loop.run_dir_of(ddp), train_state=False).adapter.tensors
    theirs = load_checkpoint(loop.run_dir_of(single), train_state=False).adapter.tensors
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6, msg=k)


# ---- stages and exports -------------------------------------------------------------------


def test_a_lora_run_with_the_embedding_trained_whole_saves_it_and_resumes_exactly(
    lora_job, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    lora_job.finetune.lora.modules_to_save = ["embed_tokens"]
    base_state = load_weights(lora_job.init_from)[1]
    straight = copy.deepcopy(lora_job)
    straight.run.dir = str(tmp_path / "straight")
    run_training(straight)
    real = Trainer.optimizer_step

    def stop_at_3(self, loss, grad_norm):
        real(self, loss, grad_norm)
        if self.step + 1 == 3:
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", stop_at_3)
        run_training(lora_job)
    run_training(lora_job)
    assert train_losses(lora_job) == train_losses(straight)  # exact, the embedding's AdamW state too
    ckpt = load_checkpoint(loop.run_dir_of(lora_job), train_state=False)
    config = json.loads((ckpt.path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens"] and config["ensure_weight_tying"] is True
    saved = load_file(ckpt.path / "adapter_model.safetensors")
    embed, head = "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"
    assert torch.equal(saved[embed], saved[head])  # the tied matrix under both names, as PEFT saves it
    merged = ckpt.model_state
    assert torch.equal(merged["model.embed_tokens.weight"], saved[embed])
    assert not torch.equal(merged["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], base_state["model.norm.weight"])  # the rest frozen
    summary = json.loads((loop.run_dir_of(lora_job) / "summary.json").read_text())
    per_layer = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64))
    assert summary["trainable_params"] == 2 * per_layer + base_state["model.embed_tokens.weight"].numel()


@pytest.fixture(params=[[], ["embed_tokens"]], ids=["adapters", "adapters_and_embedding"])
def lora_run(lora_job, request):
    lora_job.finetune.lora.modules_to_save = request.param
    lora_job.train.max_steps = 3
    run_training(lora_job)
    stage = copy.deepcopy(lora_job)
    stage.init_from = None  # as `scripts/<stage>.py run.dir=...` sees it
    return stage


def test_sample_and_evaluate_run_a_lora_run_directly(lora_run, capsys):
    import io

    from tinyllama.evaluate import run_evaluation
    from tinyllama.sample import run_sampling

    out = io.StringIO()
    replies = run_sampling(lora_run, prompts=["<|user|>Who is Tom?<|end|><|assistant|>"], out=out)
    assert len(replies) == 1
    lora_run.evaluate.split, lora_run.evaluate.max_answers = "train", 4  # the val split is one drill
    lora_run.evaluate.pass_at = [1]
    result = run_evaluation(lora_run)
    assert result["step"] == 3 and "answer_accuracy" in result


def test_the_merged_hf_export_gives_the_adapted_models_logits(lora_run, chat_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    lora_run.export.out_dir = str(tmp_path / "hf")
    out = run_export(lora_run)  # verify=true: transformers reproduces the merged model, or it raises
    ckpt, merged, _, _ = load_for_inference(lora_run)
    adapted = LlamaForCausalLM(ckpt.model_config)
    adapted.load_state_dict(ckpt.adapter.base_state)
    from tinyllama.lora import apply_lora, set_adapter_weights

    saved = ckpt.adapter.config["modules_to_save"] or []
    apply_lora(
        adapted, ckpt.adapter.config["r"], ckpt.adapter.config["lora_alpha"], 0.0, ckpt.adapter.names, saved
    )
    set_adapter_weights(adapted, ckpt.adapter.tensors)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([chat_tokenizer.encode("<|user|>Where does Mia live?<|end|><|assistant|>", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, logits_of(adapted, ids), rtol=1e-5, atol=1e-5)
    assert not (out / "adapter").exists()


def test_merge_lora_false_writes_the_base_and_an_adapter_peft_loads(lora_run, chat_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    lora_run.export.out_dir, lora_run.export.merge_lora = str(tmp_path / "hf"), False
    out = run_export(lora_run)  # verify=true: PEFT on the base reproduces our merged model
    ckpt, merged, _, _ = load_for_inference(lora_run)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out)
    base = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([chat_tokenizer.encode("<|user|>What does Ben eat?<|end|><|assistant|>", bos=True)])
    with torch.no_grad():
        plain = LlamaForCausalLM(ckpt.model_config)
        plain.load_state_dict(ckpt.adapter.base_state)
        torch.testing.assert_close(base(ids).logits, logits_of(plain, ids), rtol=1e-5, atol=1e-5)
        theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        torch.testing.assert_close(theirs(ids).logits, logits_of(merged, ids), rtol=1e-5, atol=1e-5)


def test_peft_loads_the_checkpoint_folder_itself_on_the_bases_hf_export(lora_run, chat_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tinyllama.export import export_hf

    ckpt = load_checkpoint(loop.run_dir_of(lora_run), train_state=False)
    base_dir = export_hf(load_checkpoint(ckpt.adapter.base_source, train_state=False), tmp_path / "base_hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, ckpt.path).eval()
    ids = torch.tensor([chat_tokenizer.encode("<|user|>Who is Tom?<|end|><|assistant|>", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(ids).logits, logits_of(build_model(ckpt), ids), rtol=1e-5, atol=1e-5
        )


def test_gguf_export_merges_and_refuses_merge_lora_false(lora_run, tmp_path):
    pytest.importorskip("gguf")
    from tinyllama.export_gguf import run_export_gguf

    lora_run.export.out_dir, lora_run.export.merge_lora = str(tmp_path / "gguf"), False
    with pytest.raises(ConfigError, match="GGUF file holds merged weights"):
        run_export_gguf(lora_run)
    assert not (tmp_path / "gguf").exists()
    lora_run.export.merge_lora = True
    path = run_export_gguf(lora_run)  # with llama-cpp-python installed, verified against our model
    assert path.is_file()


# ---- DPO and GRPO -------------------------------------------------------------------------


def test_dpo_with_lora_scores_against_the_base_without_a_copy(
    chat_job, chat_tokenizer, base_run_of, tmp_path
):
    from tests.train.test_dpo_objective import DPO_LEN

    job = copy.deepcopy(chat_job)
    job.model = dataclasses.replace(job.model, max_position_embeddings=DPO_LEN)
    job.init_from = str(base_run_of(tmp_path / "dpo_base", job.model, chat_tokenizer))
    job.train.seq_len, job.train.objective, job.dpo.beta = DPO_LEN, "dpo", 0.5
    job.finetune.lora = LoRAConfig(rank=4, alpha=8.0)
    built = {}
    real = DPOObjective.__init__

    def keep(self, *args, **kwargs):
        real(self, *args, **kwargs)
        built["objective"] = self

    with pytest.MonkeyPatch.context() as m:
        m.setattr(DPOObjective, "__init__", keep)
        run_training(job)
    reference = built["objective"].reference
    assert isinstance(reference, AdaptersOff) and not list(reference.parameters())
    logged = [m for m in metrics(job) if "loss" in m]
    first = logged[0]  # B = 0: the policy is its base at step 1
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0
    assert any(m["rewards/margins"] != 0 for m in logged[1:])
    # The reference of later steps is still the base: its log-probs equal the base model's.
    batch = built["objective"].next_batch()
    base = LlamaForCausalLM(job.model)
    base.load_state_dict(load_weights(job.init_from)[1])
    from tinyllama.dpo import sequence_logps

    with torch.no_grad():
        torch.testing.assert_close(
            batch.ref_logps, sequence_logps(base.eval(), batch)[0], rtol=1e-5, atol=1e-5
        )
    assert reference.policy is not None and lora_modules(reference.policy)


def test_adapters_off_runs_the_base_in_eval_mode_and_gives_the_policy_back_as_it_was(chat_job):
    from tinyllama.lora import apply_lora

    torch.manual_seed(0)
    base = LlamaForCausalLM(chat_job.model)
    policy = copy.deepcopy(base)
    apply_lora(policy, 4, 8.0, 0.5, [n for n, m in policy.named_modules() if n.endswith("q_proj")])
    for m in lora_modules(policy).values():
        torch.nn.init.normal_(m.lora_B.weight)  # the adapters now change the output
    ids = torch.randint(0, chat_job.model.vocab_size, (2, 7))
    reference = AdaptersOff(policy)
    for mode in (True, False):
        policy.train(mode)
        out = reference(ids).logits
        assert policy.training == mode and not out.requires_grad
        torch.testing.assert_close(out, logits_of(base, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of(policy, ids), logits_of(base, ids), atol=1e-3)


def test_grpo_with_lora_and_a_kl_term_runs_on_the_base_as_reference(
    chat_job, chat_tokenizer, tmp_path, base_run_of
):
    from tinyllama.config import RewardConfig

    job = copy.deepcopy(chat_job)
    job.model.max_position_embeddings = job.train.seq_len = 512
    job.init_from = str(base_run_of(tmp_path / "base512", job.model, chat_tokenizer))
    job.train.objective, job.train.max_steps, job.train.batch_size = "grpo", 2, 2
    job.checkpoint.every, job.eval.every = 2, 2
    job.grpo.num_generations, job.grpo.max_new_tokens, job.grpo.beta = 4, 6, 0.1
    job.grpo.rewards = [RewardConfig("tinyllama.rewards.format_reward", 1.0)]
    job.finetune.lora = LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    run_training(job)
    logged = [m for m in metrics(job) if "loss" in m]
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its base
    ckpt = load_checkpoint(loop.run_dir_of(job), train_state=False)
    assert sorted({n.rsplit(".", 1)[-1] for n in ckpt.adapter.names}) == ["q_proj", "v_proj"]

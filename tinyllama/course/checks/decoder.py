"""Lesson 6 check: the decoder layer against tinyllama/model/modeling.py, parameter counts against
tinyllama/inspection.py, and the meta-device model."""

from __future__ import annotations

from types import ModuleType

import torch

from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.inspection import count_parameters
from tinyllama.model import DecoderLayer, LlamaConfig, LlamaForCausalLM, RotaryEmbedding

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head", "total")
LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
CONFIGS = {
    "tiny GQA, tied head": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "Qwen2-style: q/k/v bias, untied": dict(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        model_type="qwen2",
        tie_word_embeddings=False,
    ),
    "Llama with attention and MLP bias": dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        attention_bias=True,
        mlp_bias=True,
    ),
    "Llama-2-7B": LLAMA2_7B,
}


def _layer_variants(ref: DecoderLayer, x: torch.Tensor, pos) -> dict:
    """Outputs of the classic wiring mistakes, built from the reference's own sub-modules."""
    attn = lambda h: ref.self_attn(h, pos)  # noqa: E731
    n1, n2, mlp = ref.input_layernorm, ref.post_attention_layernorm, ref.mlp
    h = x + attn(n1(x))
    post = n1(x + attn(x))
    return {
        "post-norm: you normalise after adding the residual; Llama is pre-norm, the branch input is "
        "normalised and the residual stream is left untouched: h = x + attn(norm1(x))": n2(post + mlp(post)),
        "the attention residual is missing: h = x + attn(input_layernorm(x))": attn(n1(x))
        + mlp(n2(attn(n1(x)))),
        "the MLP residual is missing: out = h + mlp(post_attention_layernorm(h))": mlp(n2(h)),
        "input_layernorm is used twice: the MLP branch uses post_attention_layernorm": h + mlp(n1(h)),
        "the residual stream is normalised: add the branch output to x itself, not to norm(x)": n1(x)
        + attn(n1(x))
        + mlp(n2(n1(x) + attn(n1(x)))),
    }


def _case_layer(learner: ModuleType, heads: int, kv_heads: int, seed: int) -> None:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=heads * 8,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    ref = DecoderLayer(config, 0)
    with torch.no_grad():  # distinct norm gains, so swapping the two norms shows
        ref.input_layernorm.weight.normal_(1.0, 0.3)
        ref.post_attention_layernorm.weight.normal_(1.0, 0.3)
    mine = learner_attr(learner, "DecoderLayer")(config, 0)
    try:
        mine.load_state_dict(ref.state_dict())
    except RuntimeError as e:
        raise Mismatch(
            "cannot load the reference weights into your DecoderLayer: name the parts self_attn, "
            f"mlp, input_layernorm, post_attention_layernorm ({str(e).splitlines()[0]})"
        ) from e
    x = torch.randn(2, 5, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    pos = RotaryEmbedding(config)(x, torch.arange(5)[None])
    with torch.no_grad():
        compare(
            mine(x, pos),
            ref(x, pos),
            what=f"DecoderLayer output (H={heads}, KV={kv_heads})",
            dims=("B", "T", "C"),
            mistakes=_layer_variants(ref, x, pos),
        )


def _case_count(learner: ModuleType, name: str) -> None:
    config = LlamaConfig(**CONFIGS[name])
    got = learner_attr(learner, "count_parameters")(config)
    if not isinstance(got, dict):
        raise Mismatch(
            f"count_parameters returned {type(got).__name__}, expected a dict with keys "
            f"{', '.join(COMPONENTS)}"
        )
    expected = count_parameters(config)
    for key in COMPONENTS:
        if got.get(key) != expected[key]:
            raise Mismatch(
                f"{name}: {key} = {got.get(key)}, expected {expected[key]:,}" + _count_hint(key, config)
            )


def _count_hint(key: str, c: LlamaConfig) -> str:
    d, kv = c.resolved_head_dim, c.resolved_num_key_value_heads
    return {
        "attention": f" (q_proj and o_proj have C*H*D = {c.hidden_size * c.num_attention_heads * d:,} "
        f"weights each, k_proj and v_proj C*KV*D = {c.hidden_size * kv * d:,}; plus biases)",
        "mlp": f" (three C x I matrices, {3 * c.hidden_size * c.intermediate_size:,} per layer)",
        "norms": f" (2 per layer plus the final norm, {c.hidden_size} each)",
        "head": " (0 when tie_word_embeddings: the head reuses the embedding tensor)",
        "total": " (the sum of the five components)",
    }.get(key, "")


def _case_meta(learner: ModuleType) -> None:
    # A small config first: a meta_model that allocates real memory must not get 27 GB of 7B.
    for config in (LlamaConfig(**CONFIGS["tiny GQA, tied head"]), LlamaConfig(**LLAMA2_7B)):
        model = learner_attr(learner, "meta_model")(config)
        if not isinstance(model, LlamaForCausalLM):
            raise Mismatch(f"meta_model returned {type(model).__name__}, expected a LlamaForCausalLM")
        devices = {p.device.type for p in model.parameters()}
        if devices != {"meta"}:
            raise Mismatch(
                f"parameters live on {sorted(devices)}: build the model inside "
                "`with torch.device('meta'):` so 7B parameters take no memory"
            )
    total = sum(p.numel() for p in model.parameters())
    if total != 6_738_415_616:
        raise Mismatch(f"your Llama-2-7B has {total:,} parameters, expected 6,738,415,616")


def check(grader: Grader, learner: ModuleType) -> None:
    for seed, (heads, kv) in enumerate([(2, 2), (4, 2), (4, 1)]):
        grader.case(
            f"DecoderLayer H={heads} KV={kv}", lambda h=heads, k=kv, s=seed: _case_layer(learner, h, k, s)
        )
    for name in CONFIGS:
        grader.case(f"count_parameters: {name}", lambda n=name: _case_count(learner, n))
    grader.case("meta_model: Llama-2-7B on the meta device", lambda: _case_meta(learner))

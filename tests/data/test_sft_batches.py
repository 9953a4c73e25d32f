"""Packing conversations for fine-tuning: whole conversations per window, counted overflow, and
no attention across conversations (a conversation's logits packed equal its logits alone)."""

from __future__ import annotations

import pytest
import torch

from tinyllama.chat_template import IGNORE_INDEX
from tinyllama.data.sft_batches import PackingStats, collate, pack_windows
from tinyllama.errors import ConfigError
from tinyllama.model import LlamaConfig, LlamaForCausalLM
from tinyllama.model.masks import segment_attention_mask

PAD = 0


def _conversation(n: int, start: int):
    ids = [start + i for i in range(n)]
    return ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]


def test_windows_hold_whole_conversations_with_restarting_positions():
    stats = PackingStats()
    convs = [_conversation(5, 10), _conversation(4, 20), _conversation(6, 30), _conversation(3, 40)]
    windows = list(pack_windows(convs, seq_len=10, pad_id=PAD, stats=stats))
    assert [w.segment_ids for w in windows] == [[1] * 5 + [2] * 4 + [0], [1] * 6 + [2] * 3 + [0]]
    assert windows[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert windows[0].input_ids == list(range(10, 15)) + list(range(20, 24)) + [PAD]
    # Each conversation's own labels, but never its first token (predicted from another conversation).
    assert windows[0].labels[:5] == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14]
    assert windows[0].labels[9] == IGNORE_INDEX
    assert (stats.conversations, stats.windows, stats.real_tokens, stats.truncated) == (4, 2, 18, 0)
    assert stats.real_share == pytest.approx(18 / 20)
    assert collate(windows).real_share == pytest.approx(18 / 20)


def test_first_token_of_a_packed_conversation_is_never_a_target_even_training_on_all():
    ids = [5, 6, 7]
    (window,) = pack_windows([(ids, ids), (ids, ids)], seq_len=6, pad_id=PAD)
    assert window.labels == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 6, 7]


def test_conversations_longer_than_the_window_are_cut_or_dropped_and_counted():
    convs = [_conversation(3, 1), _conversation(12, 50), _conversation(2, 90)]
    stats = PackingStats()
    windows = list(pack_windows(convs, seq_len=8, pad_id=PAD, stats=stats))
    assert stats.truncated == 1 and stats.dropped == 0
    assert [len(w.input_ids) for w in windows] == [8, 8, 8]
    assert windows[1].input_ids == list(range(50, 58))
    stats = PackingStats()
    windows = list(pack_windows(convs, seq_len=8, pad_id=PAD, overflow="drop", stats=stats))
    assert stats.dropped == 1 and stats.conversations == 3 and len(windows) == 1
    with pytest.raises(ConfigError, match="overflow"):
        list(pack_windows(convs, seq_len=8, pad_id=PAD, overflow="wrap"))


def test_segment_mask_is_block_diagonal_causal_and_padding_sees_itself():
    mask = segment_attention_mask(torch.tensor([[1, 1, 2, 2, 0]]))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_of_a_packed_conversation_equal_its_logits_alone(impl):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    model = LlamaForCausalLM(config).eval()
    lengths = [7, 5, 9, 6]
    convs = [(ids, ids) for ids in (torch.randint(3, 64, (n,)).tolist() for n in lengths)]
    batch = collate(list(pack_windows(convs, seq_len=16, pad_id=PAD)))
    assert batch.input_ids.shape == (2, 16)
    with torch.no_grad():
        packed = model(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits  # (B, T, V)
        for row in range(batch.input_ids.shape[0]):
            for segment in batch.segment_ids[row].unique().tolist():
                if segment == 0:
                    continue
                where = batch.segment_ids[row] == segment
                alone = model(batch.input_ids[row, where][None]).logits[0]
                torch.testing.assert_close(packed[row, where], alone, rtol=1e-5, atol=1e-5)
        loss = model(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            labels=batch.labels,
        ).loss
    assert torch.isfinite(loss)


def test_padding_rows_keep_gradients_finite():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    batch = collate(list(pack_windows([([3, 4, 5], [3, 4, 5])], seq_len=8, pad_id=PAD)))
    model(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        labels=batch.labels,
    ).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padded_windows_hold_one_conversation_each():
    convs = [_conversation(3, 10), _conversation(2, 20), _conversation(4, 30)]
    stats = PackingStats()
    windows = list(pack_windows(convs, seq_len=6, pad_id=PAD, stats=stats, packing="padded"))
    assert [w.segment_ids for w in windows] == [[1] * 3 + [0] * 3, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2]
    assert stats.real_share == pytest.approx(9 / 18)
    with pytest.raises(ConfigError, match="packing"):
        list(pack_windows(convs, seq_len=6, pad_id=PAD, packing="stacked"))


def test_a_cut_conversation_left_without_loss_tokens_is_dropped_not_trained_on():
    prompt_only = ([1, 2, 3, 4, 5, 6], [IGNORE_INDEX] * 4 + [5, 6])  # its reply lies past the cut
    stats = PackingStats()
    windows = list(pack_windows([prompt_only, _conversation(4, 20)], seq_len=4, pad_id=PAD, stats=stats))
    assert len(windows) == 1 and (stats.dropped, stats.truncated) == (1, 0)

"""The Chinese synthetic story corpus: Chinese, varied, well-formed; served by the data=
registry and round-tripped by a Chinese tokenizer. Its golden digest is in test_synthetic.py."""

import functools
import re
import unicodedata

import pytest

from tinyllama.cli import compose_job
from tinyllama.config import DataConfig, TokenizerConfig
from tinyllama.data import iter_documents, synthetic
from tinyllama.data.synthetic_zh import ANIMALS, PLOTS, THINGS, generate_story
from tinyllama.errors import ConfigError
from tinyllama.tokenizer import ensure_tokenizer

# The Chinese corpus through the one story iterator, as data=synthetic_zh reads it.
iter_stories = functools.partial(synthetic.iter_stories, story=generate_story)


def _is_han(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith("CJK UNIFIED IDEOGRAPH")


def test_stories_are_chinese_and_well_formed():
    for s in iter_stories(500, seed=7):
        body = s.replace("\n", "")
        assert not re.search(r"[A-Za-z0-9{}\[\]'\"!?,.:;]", body), (
            s
        )  # no slot left unfilled, no ASCII punctuation
        assert sum(map(_is_han, body)) / len(body) > 0.8, s
        assert set(body) - {ch for ch in body if _is_han(ch)} <= set("，。！？：“”、——"), s
        quotes = "".join(ch for ch in body if ch in "“”")
        assert quotes == "“”" * (len(quotes) // 2), s  # every quote opens, then closes
        assert s[-1] in "。！？”"
        assert 2 <= s.count("\n") <= 3  # paragraphs
        assert 100 < len(s) < 600  # characters


def test_thousands_of_distinct_stories_with_varied_words():
    stories = list(iter_stories(3000, seed=7))
    assert len(set(stories)) == 3000
    assert len({s.split("\n")[0] for s in stories}) > 2000  # openings vary
    assert len(set("".join(stories))) > 600  # distinct characters


def test_measure_words_agree_with_their_nouns():
    """一只小猫, 一条小金鱼, 一匹小马: every 一 + measure word (+ modifiers) + noun uses the noun's own."""
    text = "\n".join(iter_stories(2000, seed=11))
    measures = "".join(sorted({m for m, _ in THINGS} | {m for _, m in ANIMALS} | {"个"}))
    checked = 0
    for noun, want in [(a, m) for a, m in ANIMALS] + [(t, m) for m, t in THINGS]:
        for got in re.findall(f"一([{measures}])[^一，。！？“”：]{{0,14}}?{re.escape(noun)}", text):
            assert got == want, (noun, got, want)
            checked += 1
    assert checked > 1000


def test_every_plot_is_used_and_the_hero_recurs(monkeypatch):
    import tinyllama.data.synthetic_zh as synthetic_zh

    used = set()

    def recording(i, plot):
        return lambda rng, slots: used.add(i) or plot(rng, slots)

    monkeypatch.setattr(synthetic_zh, "PLOTS", [recording(i, p) for i, p in enumerate(PLOTS)])
    stories = [generate_story(3, i) for i in range(400)]
    named = 0
    for story in stories:
        hero = re.search(r"(?:名叫|叫|都叫[他她它])([^，。]+?)。", story.split("。")[0] + "。")
        if hero:
            named += 1
            assert story.count(hero.group(1)) >= 3, story
    assert named > 150
    assert len(PLOTS) >= 15 and used == set(range(len(PLOTS)))  # every plot is reachable


def test_the_registry_serves_it_and_a_chinese_tokenizer_round_trips_it(tmp_path):
    data = DataConfig(
        name="synthetic_zh", source="synthetic_zh", num_docs=300, seed=5, num_workers=0, root=str(tmp_path)
    )
    train = list(iter_documents(data, "train"))
    val = list(iter_documents(data, "val"))
    assert train == list(iter_stories(300, seed=5)) and val == list(iter_stories(6, seed=5, start=300))
    tok = ensure_tokenizer(
        TokenizerConfig(name="zh", vocab_size=1200, character_coverage=0.9995, num_threads=1), data
    )
    for story in val + train[:50]:
        ids = tok.encode(story)
        assert tok.decode(ids) == story and tok.unk_id not in ids
    # Merges beyond single characters: fewer tokens than characters.
    assert sum(len(tok.encode(s)) for s in val) < 0.9 * sum(len(s) for s in val)


def test_the_presets_compose_and_validate():
    job = compose_job(["data=synthetic_zh", "tokenizer=bpe_2k_zh", "model.vocab_size=2048"])
    assert (job.data.name, job.data.source) == ("synthetic_zh", "synthetic_zh")
    assert (job.tokenizer.character_coverage, job.tokenizer.byte_fallback) == (0.9995, True)
    with pytest.raises(ConfigError, match="choose synthetic, synthetic_zh, tinystories, text_files, hf"):
        compose_job(["data.source=synthetic_fr"])

"""The built-in espeak corpus and the raw-item schema: determinism, held-out splits, audio, summary,
validation errors, shards, CLI."""

import io
import json
import random
from itertools import combinations

import pyarrow as pa
import pytest
import soundfile as sf

from deepomni.cli import main
from deepomni.data import lexicon
from deepomni.data.content import (KNOWLEDGE_FAMILIES, TEMPLATES, WorldConfig, build_pools, build_world,
                                   knowledge_item, phrasings, transcript)
from deepomni.data.schema import (RAW_SCHEMA, SPLITS, TASKS, ShardWriter, read_raw, rows_to_table, shard_paths,
                                  validate_table, write_shards)
from deepomni.data.synth import SynthConfig, plan, synthesize, task_quotas

SIZES = {"train": 6, "validation": 3, "test": 3}  # 12 items: every task appears (quota guarantee in train)


def _synth(tmp_path_factory, seed: int, workers: int):
    out = tmp_path_factory.mktemp(f"synth-s{seed}-w{workers}")
    summary = synthesize(SynthConfig(seed=seed, sizes=dict(SIZES), workers=workers), out, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def run0(tmp_path_factory):
    return _synth(tmp_path_factory, 0, 2)


@pytest.fixture(scope="module")
def table0(run0):
    return read_raw(run0[0] / "raw")


def test_same_seed_is_byte_identical_and_other_seed_differs(run0, table0, tmp_path_factory):
    again, _ = _synth(tmp_path_factory, 0, 1)  # also a different worker count
    a, b = shard_paths(run0[0] / "raw"), shard_paths(again / "raw")
    assert [p.relative_to(run0[0]) for p in a] == [p.relative_to(again) for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert read_raw(again / "raw").equals(table0)
    other = read_raw(_synth(tmp_path_factory, 1, 2)[0] / "raw")
    assert other.column("question_text").to_pylist() != table0.column("question_text").to_pylist()
    assert other.column("question_audio").to_pylist() != table0.column("question_audio").to_pylist()


def test_every_task_and_the_modality_rules(table0):
    rows = table0.to_pylist()
    assert {r["task"] for r in rows} == set(TASKS)
    assert {s: [r["split"] for r in rows].count(s) for s in SPLITS} == SIZES
    for r in rows:
        assert (r["question_audio"] is not None) == (r["input_modality"] == "speech")
        assert (r["answer_audio"] is not None) == (r["task"] in ("tts", "spoken_qa"))
        if r["task"] == "asr":
            assert r["answer_text"] == transcript(r["question_text"]) and r["answer_text"].islower()
        if r["task"] == "tts":
            assert r["answer_text"] == r["question_text"]
        meta = json.loads(r["meta"])
        assert meta["source"] == "synth" and meta["template"].startswith(meta["family"] + ".")


def test_splits_share_no_sentence_entity_and_no_knowledge_phrasing(table0):
    """Sentences and skills: no template or entity in two splits. Knowledge: the same world in every split,
    but a fact is never asked in the same template in two splits (held-out phrasings)."""
    metas = {s: [json.loads(m) for m, sp in zip(table0["meta"].to_pylist(), table0["split"].to_pylist()) if sp == s]
             for s in SPLITS}
    knowledge = set(KNOWLEDGE_FAMILIES)
    templates = {s: {m["template"] for m in ms if m["family"] not in knowledge} for s, ms in metas.items()}
    entities = {s: {e for m in ms if m["family"] not in knowledge for e in m["entities"]} for s, ms in metas.items()}
    for a, b in combinations(SPLITS, 2):
        assert not templates[a] & templates[b] and not entities[a] & entities[b]
    # and the pools themselves, which a 12-item corpus only samples
    pools = build_pools(0)
    for a, b in combinations(SPLITS, 2):
        pa_, pb = pools[a], pools[b]
        for name in ("people", "towns", "objects", "animals", "jobs", "opposites", "counts"):
            assert not set(getattr(pa_, name)) & set(getattr(pb, name)), name
        for fam in pa_.templates:
            assert pa_.templates[fam] and not set(pa_.templates[fam]) & set(pb.templates[fam]), fam
    words = [w for p in lexicon.OPPOSITES for w in p] + list(lexicon.OBJECTS + lexicon.ANIMALS + lexicon.JOBS)
    assert len(words) == len(set(words))  # an entity key names one thing


def test_knowledge_is_held_out_by_phrasing():
    """Every fact of the world has its own test and validation template, disjoint from its training
    templates; every template is still seen in training (with other facts); world people are train-pool
    people, so held-out sentences never mention them."""
    pools = build_pools(0)
    world = build_world(pools["train"], WorldConfig(), 0)
    assert set(world.knowledge) <= set(pools["train"].people)
    trained_templates = {f: set() for f in KNOWLEDGE_FAMILIES}
    for family, facts in world.facts.items():
        assert facts and len(facts) == len(set(facts))
        for fact in facts:
            ph = phrasings(family, fact, 0)
            assert len(ph["test"]) == len(ph["validation"]) == 1
            assert not set(ph["test"]) & set(ph["train"]) and not set(ph["validation"]) & set(ph["train"])
            trained_templates[family] |= set(ph["train"])
            item = knowledge_item(world, family, fact, "test", random.Random(0), 0)
            assert item.template == f"{family}.{ph['test'][0]}" and item.answer_text == world.answers[family][fact]
    for family, seen in trained_templates.items():
        assert seen == set(range(len(TEMPLATES[family]))), family
    assert world.answers["arith"]["plus:3:4"] == "seven" and world.answers["next"]["Monday"] == "Tuesday"
    # the test split asks each fact once before any repeats (facts cycle)
    jobs = plan(SynthConfig(sizes={"train": 0, "validation": 0, "test": 40}, task_mix={"text_qa": 1.0},
                            family_mix={"fact_town": 1.0}))["test"]
    asked = [json.loads(j.row["meta"])["entities"][0] for j in jobs]
    assert len(set(asked[:16])) == 16 == len(world.facts["fact_town"])


def test_audio_is_16k_mono_of_plausible_length(table0):
    for r in table0.to_pylist():
        for side in ("question", "answer"):
            blob = r[f"{side}_audio"]
            if blob is None:
                continue
            x, sr = sf.read(io.BytesIO(blob))
            assert sr == 16000 and x.ndim == 1
            seconds = len(x) / sr
            assert seconds == pytest.approx(r[f"{side}_seconds"], abs=1e-3)
            words = len((r["question_text"] if side == "question" else r["answer_text"]).split())
            assert 0.15 < seconds / words < 1.5 and x.std() > 0.01


def test_summary_matches_the_table(run0, table0):
    out, summary = run0
    assert json.loads((out / "summary.json").read_text())["items"] == summary["items"]
    for s in SPLITS:
        part = table0.filter(pa.compute.equal(table0["split"], s))
        tasks = part["task"].to_pylist()
        assert summary["items"][s] == {t: tasks.count(t) for t in sorted(set(tasks))}
        seconds = sum(v or 0 for v in part["question_seconds"].to_pylist() + part["answer_seconds"].to_pylist())
        assert summary["audio_hours"][s] == pytest.approx(seconds / 3600, abs=1e-4)
    assert summary["items_per_second"] > 0


def test_task_quotas_and_number_words():
    assert sorted(task_quotas(10, {"asr": 0.3, "spoken_qa": 0.3, "tts": 0.1, "text_qa": 0.3})) == \
        sorted(["asr"] * 3 + ["spoken_qa"] * 3 + ["tts"] + ["text_qa"] * 3)
    assert set(task_quotas(4, {"asr": 0.9, "spoken_qa": 0.05, "tts": 0.01, "text_qa": 0.04})) == set(TASKS)
    words = [lexicon.number_to_words(n) for n in (0, 13, 40, 142)]
    assert words == ["zero", "thirteen", "forty", "one hundred forty two"]
    with pytest.raises(ValueError, match="unknown split"):
        SynthConfig(sizes={"dev": 3})


def _good_rows():
    return [
        {"id": "a", "split": "train", "task": "text_qa", "input_modality": "text", "question_text": "q",
         "answer_text": "x", "meta": {}},
        {"id": "b", "split": "test", "task": "asr", "input_modality": "speech", "question_text": "hi",
         "question_audio": b"flac", "question_seconds": 1.0, "answer_text": "hi", "meta": {"k": 1}},
    ]


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop_columns(["meta"]), r"missing column\(s\) \['meta'\]"),
    (lambda t: t.set_column(2, "task", pa.array(["text_qa", "speech_qa"])),
     "row 1 \\(id 'b'\\): unknown task 'speech_qa'"),
    (lambda t: t.set_column(1, "split", pa.array(["train", "dev"])), "unknown split 'dev'"),
    (lambda t: t.set_column(5, "question_audio", pa.array([None, None], pa.binary())),
     "speech input without question_audio"),
    (lambda t: t.set_column(3, "input_modality", pa.array(["speech", "speech"])), "row 0 .*speech input without"),
    (lambda t: t.set_column(0, "id", pa.array(["a", "a"])), "duplicate id 'a'"),
    (lambda t: t.set_column(6, "question_seconds", pa.array([None, 1.0], pa.float64())), "has type double"),
    (lambda t: t.set_column(10, "meta", pa.array(["{}", "not json"])), "meta is not a JSON object"),
    (lambda t: t.set_column(2, "task", pa.array(["tts", "asr"])), "tts item without answer_audio"),
])
def test_validate_table_names_the_problem(change, message):
    table = rows_to_table(_good_rows())
    validate_table(table)
    with pytest.raises(ValueError, match=message):
        validate_table(change(table))


def test_write_shards_and_read_raw(tmp_path):
    rows = [dict(_good_rows()[0], id=f"r{i}") for i in range(7)]
    paths = write_shards(iter(rows), tmp_path / "raw" / "train", rows_per_shard=3)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = read_raw(tmp_path)
    assert table.schema == RAW_SCHEMA and table["id"].to_pylist() == [f"r{i}" for i in range(7)]
    with pytest.raises(ValueError, match="already holds 3 shard"):
        ShardWriter(tmp_path / "raw" / "train")
    assert len(write_shards(rows[:2], tmp_path / "raw" / "train", overwrite=True)) == 1
    with pytest.raises(ValueError, match="duplicate id 'r0'"):
        write_shards([rows[0], rows[0]], tmp_path / "other")


def test_cli_synth(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--help"])
    assert e.value.code == 0 and "--voices" in capsys.readouterr().out
    args = ["data", "synth", "--out", str(tmp_path), "--train", "2", "--validation", "1", "--test", "1", "--quiet"]
    assert main(args + ["--voices", "en-us", "en+f3"]) == 0
    assert read_raw(tmp_path).num_rows == 4 and (tmp_path / "summary.json").exists()
    assert main(args) == 2 and "already holds" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--voices", "en-gb+f4"]) == 2
    assert "ignores the variant" in capsys.readouterr().err
    assert main(["info", "--preset", "tiny"]) == 0

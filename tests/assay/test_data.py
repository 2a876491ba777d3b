"""assay.data: the three kinds of data file, in every format `datasets` reads, and bad rows named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assay.data import (
    DataError,
    PreferenceRow,
    RankedRow,
    load_demonstrations,
    load_preferences,
    load_prompts,
    read_table,
    split,
)

pytestmark = pytest.mark.unit

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_find_a_gsm8k_answer_column_and_keep_the_other_columns(tmp_path):
    f = jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": CHAT, "answer": 4, "source": "a"}, {"prompt": "Q: 1+1 A:", "answer": None, "source": "b"}],
    )
    loaded = load_prompts(f)
    assert [r.reference for r in loaded.rows] == ["4", None]
    assert loaded.rows[0].prompt == CHAT and loaded.rows[1].prompt == "Q: 1+1 A:"
    assert loaded.rows[0].extra == {"source": "a"} and loaded.skipped == []


def test_prompts_reference_key_named_and_missing(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "gold": "7", "answer": "long solution"}])
    assert load_prompts(f, reference_key="gold").rows[0].reference == "7"
    assert load_prompts(f, reference_key="gold").rows[0].extra == {"answer": "long solution"}
    with pytest.raises(DataError, match="no reference column 'ref'"):
        load_prompts(f, reference_key="ref")


def test_a_bad_row_names_file_row_and_column_and_skipping_counts_it(tmp_path):
    f = jsonl(
        tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": [{"role": "robot", "content": "hi"}]}, {"prompt": "ok2"}]
    )
    with pytest.raises(DataError) as e:
        load_prompts(f)
    assert str(e.value).startswith(f"{f} row 1, column 'prompt': message 0 is not a {{role, content}} message")
    loaded = load_prompts(f, skip_bad_rows=True)
    assert [r.row for r in loaded.rows] == [0, 2]
    assert [(s.row, s.column) for s in loaded.skipped] == [(1, "prompt")]


def test_missing_columns_and_unreadable_files_are_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"needs the columns prompt; it has \['text'\]"):
        load_prompts(jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))
    with pytest.raises(DataError, match="no such file"):
        load_prompts(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match=r"unknown format '\.txt'"):
        read_table(jsonl(tmp_path / "p.txt", [{"prompt": "x"}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": \n')
    with pytest.raises(DataError, match="cannot be read as a dataset"):
        load_prompts(bad)


def test_every_format_reads_the_same_rows(tmp_path):
    import datasets

    rows = [{"prompt": "a", "chosen": "good", "rejected": "bad", "subset": "s1"}] * 2
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    (tmp_path / "p.json").write_text(json.dumps(rows))
    ds.save_to_disk(str(tmp_path / "folder"))
    jsonl(tmp_path / "p.jsonl", rows)
    for name in ("p.jsonl", "p.json", "p.parquet", "p.csv", "folder"):
        got = load_preferences(tmp_path / name).rows
        assert got == [PreferenceRow("a", "good", "bad", "s1", 0), PreferenceRow("a", "good", "bad", "s1", 1)], name


def test_preferences_implicit_prompt_split_off_as_trl_does(tmp_path):
    chosen = [*CHAT, {"role": "assistant", "content": "4"}]
    rejected = [*CHAT, {"role": "assistant", "content": "5"}]
    f = jsonl(
        tmp_path / "p.jsonl",
        [{"chosen": chosen, "rejected": rejected}, {"chosen": "Q: 2+2 A: 4", "rejected": "Q: 2+2 A: 5"}],
    )
    conv, text = load_preferences(f).rows
    assert isinstance(conv, PreferenceRow) and conv.prompt == CHAT
    assert conv.chosen == chosen[-1:] and conv.rejected == rejected[-1:]
    assert (text.prompt, text.chosen, text.rejected) == ("Q: 2+2 A:", " 4", " 5")


def test_kwise_rows_from_scores_or_a_ranking(tmp_path):
    f = jsonl(
        tmp_path / "k.jsonl",
        [
            {"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5]},
            {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        ],
    )
    first, second = load_preferences(f).rows
    assert isinstance(first, RankedRow) and first.scores == [0.1, 0.9, 0.5]
    assert isinstance(second, RankedRow) and second.scores == [2.0, 1.0, 3.0]  # c best, then a, then b


@pytest.mark.parametrize(
    ("row", "column", "message"),
    [
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking", "indices 0..1"),
        ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}, "scores", "prefers nothing"),
        ({"prompt": "p", "responses": ["a"], "scores": [1]}, "responses", "at least two"),
        ({"prompt": "p", "responses": ["a", "b"]}, "scores", "needs `scores` or `ranking`"),
    ],
)
def test_bad_kwise_rows(tmp_path, row, column, message):
    with pytest.raises(DataError, match=message) as e:
        load_preferences(jsonl(tmp_path / "k.jsonl", [row]))
    assert (e.value.row, e.value.column) == (0, column)


def test_pairs_with_a_null_side_are_named(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": None}])
    with pytest.raises(
        DataError, match=r"row 0, column 'rejected': expected a string or a list of chat messages, got null"
    ):
        load_preferences(f)


def test_demonstrations_in_both_forms(tmp_path):
    convo = [*CHAT, {"role": "assistant", "content": "4"}]
    f = jsonl(tmp_path / "m.jsonl", [{"messages": convo}])
    (row,) = load_demonstrations(f).rows
    assert row.prompt == CHAT and row.completion == convo[-1:]
    g = jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 1+1 A:", "completion": " 2"}])
    assert load_demonstrations(g).rows[0].completion == " 2"
    h = jsonl(tmp_path / "b.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match="ending with an assistant message"):
        load_demonstrations(h)


def test_split_is_seeded_disjoint_and_complete():
    rows = list(range(100))
    train, held = split(rows, 0.2, seed=3)
    assert len(held) == 20 and sorted(train + held) == rows
    assert split(rows, 0.2, seed=3) == (train, held) and split(rows, 0.2, seed=4) != (train, held)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split(rows, 1.0, seed=0)
    with pytest.raises(ValueError, match="cannot be split"):
        split([1], 0.5, seed=0)

import json

import pytest

from sparse_jax.atomic_files import atomic_write_json
from sparse_jax.pipeline import jsonl_store


def test_append_and_read_back(tmp_path):
    path = tmp_path / "pred.jsonl"
    for i in range(3):
        jsonl_store.append_record(path, {"index": i, "pred": f"p{i}"})
    records, good = jsonl_store.read_records(path)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert good == path.stat().st_size


@pytest.mark.parametrize("tail", [b'{"index": 3, "pr', b'{"index": 3}'])
def test_torn_last_line_is_dropped_and_repaired(tmp_path, tail):
    path = tmp_path / "pred.jsonl"
    jsonl_store.write_records(path, [{"index": 0}, {"index": 1}])
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(tail)
    records, good = jsonl_store.read_records(path)
    assert [r["index"] for r in records] == [0, 1] and good == size
    assert [r["index"] for r in jsonl_store.repair(path)] == [0, 1]
    assert path.stat().st_size == size
    jsonl_store.append_record(path, {"index": 2})
    assert [r["index"] for r in jsonl_store.read_records(path)[0]] == [0, 1, 2]


def test_corruption_in_the_middle_is_an_error_and_nothing_is_lost(tmp_path):
    path = tmp_path / "pred.jsonl"
    path.write_text('{"index": 0}\nGARBAGE\n{"index": 2}\n')
    before = path.read_bytes()
    with pytest.raises(jsonl_store.CorruptResultsError, match="line 2"):
        jsonl_store.repair(path)
    assert path.read_bytes() == before


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]

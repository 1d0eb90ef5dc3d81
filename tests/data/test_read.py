"""lorafit.data.read: every file type, folders and hf: datasets, errors naming file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorafit.data import (
    detect_format,
    read_records,
    to_messages,
)
from lorafit.errors import LorafitError

from chat_data import EXPECTED_CHAT, write_jsonl


def test_read_jsonl_json_csv_parquet_folder(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(3)]
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", rows)
    (folder / "a.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    (folder / "c.csv").write_text(
        "instruction,input,output\n" + "".join(f'"say {i}",,"{i}"\n' for i in range(3)), encoding="utf-8"
    )
    pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet")
    (folder / "README.md").write_text("not data")

    wheres = {"b.jsonl": "line 1", "a.json": "record 1", "c.csv": "row 1", "d.parquet": "row 1"}
    for name, where in wheres.items():
        records = read_records(folder / name)
        assert [r.data for r in records] == rows, name
        assert records[0].where == f"{folder / name} {where}"
        assert records[2].where == f"{folder / name} {where[:-1]}3"

    records = read_records(folder)
    assert len(records) == 12
    assert [r.where for r in records[::3]] == [
        f"{folder / name} {where}" for name, where in sorted(wheres.items())
    ]
    (tmp_path / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    assert [r.data for r in read_records(tmp_path / "list.json")] == rows


def test_read_csv_with_json_messages_column(tmp_path):
    path = tmp_path / "chat.csv"
    cell = json.dumps(EXPECTED_CHAT).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    (record,) = read_records(path)
    assert to_messages(record, detect_format([record])) == EXPECTED_CHAT


def test_read_hf_dataset_from_a_local_folder(tmp_path, hf_cache):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "one"}, {"text": "two"}])
    write_jsonl(folder / "test.jsonl", [{"text": "three"}])
    records = read_records(f"hf:{folder}")
    assert [r.data["text"] for r in records] == ["one", "two"]
    assert records[1].where == f"hf:{folder} record 2"
    assert [r.data["text"] for r in read_records(f"hf:{folder}:test")] == ["three"]
    with pytest.raises(LorafitError, match="could not load split 'dev'"):
        read_records(f"hf:{folder}:dev")


def test_read_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "train.jsonl"
    bad_json.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(
        LorafitError, match=r"train\.jsonl line 3: not valid JSON .*expected one JSON object per line"
    ):
        read_records(bad_json)

    not_object = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, ["a", "list"]])
    with pytest.raises(LorafitError, match=r"list\.jsonl line 2: found a JSON list; expected a JSON object"):
        read_records(not_object)

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(
        LorafitError, match=r"latin1\.jsonl line 2: byte 0xe9 at column 14 is not valid UTF-8"
    ):
        read_records(latin1)

    with pytest.raises(
        LorafitError, match=r"trian\.jsonl: no such file or folder \(did you mean 'train\.jsonl'"
    ):
        read_records(tmp_path / "trian.jsonl")

    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(
        LorafitError, match=r"unsupported file type '\.txt'.*\.jsonl, \.json, \.csv, \.parquet"
    ):
        read_records(tmp_path / "data.txt")

    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LorafitError, match=r"empty\.jsonl: the file holds no records"):
        read_records(tmp_path / "empty.jsonl")

    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(
        LorafitError, match=r"lines\.json line 2 column 1: not valid JSON \(Extra data\).*\.jsonl"
    ):
        read_records(tmp_path / "lines.json")

    (tmp_path / "two.json").write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(LorafitError, match=r"two\.json: the top-level object has 2 list fields \(a, b\)"):
        read_records(tmp_path / "two.json")

    (tmp_path / "wide.csv").write_text("text\nhello,extra\n")
    with pytest.raises(LorafitError, match=r"wide\.csv row 1 \(line 2\): more fields than the header"):
        read_records(tmp_path / "wide.csv")

    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(LorafitError, match=r"bad\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "bad.parquet")

    (tmp_path / "nothing").mkdir()
    with pytest.raises(LorafitError, match=r"nothing: the folder has no data files"):
        read_records(tmp_path / "nothing")

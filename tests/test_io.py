
import pytest

from stages.lib import StageError
from stages.lib.io import atomic_dir, atomic_file, iter_jsonl, read_json, write_jsonl



def test_jsonl_roundtrip_keeps_order_and_unicode(tmp_path):
    records = [{"b": 1, "a": "café"}, {"text": "line\nbreak"}]
    path = tmp_path / "out" / "x.jsonl"
    assert write_jsonl(path, records) == 2
    assert list(iter_jsonl(path)) == [(1, records[0]), (2, records[1])]
    assert path.read_text(encoding="utf-8").splitlines()[0] == '{"b": 1, "a": "café"}'


def test_malformed_line_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(StageError, match=r"data\.jsonl:3: malformed JSON"):
        list(iter_jsonl(path))


def test_non_object_and_missing_field_are_reported(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(StageError, match=r"data\.jsonl:2: expected a JSON object, got list"):
        list(iter_jsonl(path))
    path.write_text('{"a": 1, "b": 2}\n{"a": 1}\n')
    with pytest.raises(StageError, match=r"data\.jsonl:2: record missing required field 'b'"):
        list(iter_jsonl(path, required=["a", "b"]))


def test_read_json_reports_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(StageError, match=r"x\.json:4: malformed JSON"):
        read_json(path)
    with pytest.raises(StageError, match=r"missing\.json: input not found"):
        read_json(tmp_path / "missing.json")


def test_atomic_outputs_get_ordinary_modes(tmp_path):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
    with atomic_dir(tmp_path / "d"):
        pass
    (tmp_path / "plain").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    assert stat.S_IMODE((tmp_path / "x.jsonl").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode)


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"

    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("boom")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with atomic_dir(target) as tmp:
        (tmp / "other").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_invalid_utf8_is_reported_with_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(StageError, match=r"data\.jsonl:2: not valid UTF-8"):
        list(iter_jsonl(path))

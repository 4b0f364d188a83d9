"""Input readers: every format from local files and S3, malformed records, empty and missing inputs."""

from __future__ import annotations

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.data import PrepError, SourceConfig, prepare_dataset
from components.data.sources import detect_format, expand_source, read_file


def read(uri: str, max_bad_fraction: float = 0.0, **src):
    docs, rep = read_file(uri, SourceConfig(uri=uri, **src), max_bad_fraction=max_bad_fraction)
    return [t for t, _ in docs], rep


def test_jsonl_reads_the_text_field(tmp_path, write_jsonl, prose):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(prose)])
    texts, rep = read(str(path))
    assert texts == prose
    assert (rep.format, rep.records, rep.documents, rep.malformed, rep.gzip) == ("jsonl", 6, 6, 0, False)
    assert rep.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jsonl_reads_a_configured_text_field(tmp_path, write_jsonl, prose):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": t} for t in prose])
    texts, _ = read(str(path), text_field="body")
    assert texts == prose


def test_jsonl_gz_is_decompressed(tmp_path, write_jsonl, prose):
    path = write_jsonl(tmp_path / "a.jsonl.gz", [{"text": t} for t in prose], gz=True)
    texts, rep = read(str(path))
    assert texts == prose and rep.gzip
    assert rep.bytes == path.stat().st_size  # the stored (compressed) bytes are hashed


def test_parquet_reads_the_text_column(tmp_path, prose):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": prose, "n": list(range(len(prose)))}), path)
    texts, rep = read(str(path))
    assert texts == prose and rep.format == "parquet"


def test_parquet_without_the_column_names_it(tmp_path, prose):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": prose}), path)
    with pytest.raises(PrepError, match=r"a\.parquet: no column 'text'.*\['body'\]"):
        read(str(path))


def test_parquet_nulls_are_malformed_records(tmp_path, prose):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": prose + [None]}), path)
    texts, rep = read(str(path), max_bad_fraction=0.5)
    assert texts == prose
    assert rep.malformed == 1 and rep.malformed_examples == [f"{path}:7: null 'text'"]


def test_text_file_is_one_document(tmp_path, prose):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(prose))
    texts, rep = read(str(path))
    assert texts == ["\n\n".join(prose)] and rep.records == 1


def test_text_paragraphs_are_documents(tmp_path, prose):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(prose[:3]) + "\n\n\n" + prose[3] + "\n" + prose[4] + "\n")
    docs, _ = read_file(
        str(path), SourceConfig(uri=str(path), text_unit="paragraph"), max_bad_fraction=0.0
    )
    assert [t for t, _ in docs] == prose[:3] + [prose[3] + "\n" + prose[4]]
    assert [w for _, w in docs] == [f"{path}:1", f"{path}:3", f"{path}:5", f"{path}:8"]


def test_txt_gz_is_decompressed(tmp_path, prose):
    path = tmp_path / "a.txt.gz"
    path.write_bytes(gzip.compress("\n\n".join(prose).encode(), mtime=0))
    texts, rep = read(str(path), text_unit="paragraph")
    assert texts == prose and rep.gzip and rep.format == "text"


def test_format_is_detected_from_the_name():
    assert [detect_format(u) for u in ("s3://b/x.JSONL.gz", "a.parquet", "b.txt.gz", "c.bin")] == [
        "jsonl", "parquet", "text", None
    ]


def test_unknown_format_asks_for_the_setting(tmp_path):
    path = tmp_path / "data.bin"
    path.write_text("x")
    with pytest.raises(PrepError, match=r"data\.bin: cannot tell the format.*sources\[\]\.format"):
        read(str(path))


def test_a_directory_source_reads_its_files_in_order(tmp_path, write_jsonl, prose):
    write_jsonl(tmp_path / "b.jsonl", [{"text": prose[1]}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": prose[0]}])
    (tmp_path / "_SUCCESS").write_text("")
    assert expand_source(SourceConfig(uri=str(tmp_path))) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_malformed_records_below_the_threshold_are_counted_and_reported(tmp_path, write_jsonl, prose):
    rows = [{"text": f"{prose[i % 6]} ({i})"} for i in range(200)]
    rows[2] = "{not json"
    rows[10] = {"body": "no text field"}
    rows[50] = {"text": 12}
    rows[60] = "[1, 2]"
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    texts, rep = read(str(path), max_bad_fraction=0.05)
    assert len(texts) == 196 and rep.records == 200 and rep.malformed == 4
    assert rep.malformed_examples[0].startswith(f"{path}:3: bad JSON")
    assert rep.malformed_examples[1:] == [
        f"{path}:11: missing text field 'text'",
        f"{path}:51: text field 'text' is int, not a string",
        f"{path}:61: not a JSON object but list",
    ]


def test_malformed_records_above_the_threshold_stop_with_file_line_examples(tmp_path, write_jsonl, prose):
    rows = [{"text": prose[i % 6]} for i in range(100)]
    rows[4] = "{broken"
    rows[7] = {"text": None}
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(PrepError) as err:
        read(str(path), max_bad_fraction=0.01)
    assert "2 of 100 records are malformed" in str(err.value)
    assert f"{path}:5: bad JSON" in str(err.value) and f"{path}:8: text field 'text' is NoneType" in str(err.value)
    assert err.value.examples[0].startswith(f"{path}:5:")


def test_invalid_utf8_line_is_malformed(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(PrepError, match=r"a\.jsonl:2: invalid UTF-8"):
        read(str(path))


@pytest.mark.parametrize("name, content", [("a.jsonl", b""), ("a.txt", b"  \n\n"), ("a.jsonl.gz", None)])
def test_empty_file_is_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"", mtime=0) if content is None else content)
    with pytest.raises(PrepError, match=rf"{name.replace('.', '[.]')}: empty input"):
        read(str(path))


def test_missing_uri_is_an_error_naming_it(tmp_path, sources_only):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(PrepError, match=rf"{missing}: input does not exist"):
        prepare_dataset(sources_only({"uri": str(missing)}), tmp_path / "out", progress=False)


def test_no_documents_at_all_is_an_error(tmp_path, sources_only):
    with pytest.raises(PrepError, match="empty input: no documents"):
        prepare_dataset(sources_only(), tmp_path / "out", progress=False)


def test_s3_jsonl_gz_source_prepares_like_the_local_file(tmp_path, s3_env, write_jsonl, sources_only, prose):
    from infra.storage import write_bytes

    rows = [{"text": f"{prose[i % 6]} Item number {i}."} for i in range(60)]
    local = write_jsonl(tmp_path / "a.jsonl.gz", rows, gz=True)
    uri = f"{s3_env}/in/a.jsonl.gz"
    write_bytes(uri, local.read_bytes())
    cfg_kw = {"tokenizer": {"vocab_size": 300}, "packing": {"seq_len": 16, "shard_tokens": 1000}}
    s3_stats = prepare_dataset(sources_only({"uri": uri}, **cfg_kw), tmp_path / "s3", progress=False)
    local_stats = prepare_dataset(sources_only({"uri": str(local)}, **cfg_kw), tmp_path / "loc", progress=False)
    assert s3_stats["inputs"][0]["uri"] == uri
    assert s3_stats["inputs"][0]["sha256"] == local_stats["inputs"][0]["sha256"]
    assert s3_stats["tokens"] == local_stats["tokens"] and s3_stats["tokens"]["train"]["rows"] > 0
    shard = ("train", "00000.bin")
    assert (tmp_path / "s3").joinpath(*shard).read_bytes() == (tmp_path / "loc").joinpath(*shard).read_bytes()
    written = json.loads((tmp_path / "s3" / "stats.json").read_text())["documents"]
    assert (written["read"], written["malformed_skipped"]) == (60, 0)


def test_missing_s3_uri_is_an_error_naming_it(s3_env, tmp_path, sources_only):
    uri = f"{s3_env}/nothing/here.jsonl"
    with pytest.raises(PrepError, match=rf"{uri}: input does not exist"):
        prepare_dataset(sources_only({"uri": uri}), tmp_path / "out", progress=False)

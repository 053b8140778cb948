import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotate.schema import (
    SHARD_SCHEMA,
    Manifest,
    SchemaError,
    ShardEntry,
    check_schema,
    file_sha256,
)


def test_schema_check_names_every_fault():
    check_schema(SHARD_SCHEMA.append(pa.field("coco_boxes", pa.string())))
    broken = SHARD_SCHEMA.remove(SHARD_SCHEMA.get_field_index("tags")).set(
        SHARD_SCHEMA.get_field_index("width"), pa.field("width", pa.int64())
    )
    with pytest.raises(
        SchemaError, match=r"width.*int64.*; missing column 'tags'|missing column 'tags'"
    ):
        check_schema(broken)


def test_manifest_round_trip_and_verification(tmp_path):
    table = pa.Table.from_pylist(
        [
            {
                "image_id": "x-1",
                "sha256": "ab",
                "source": "x",
                "uri": "file:///x.png",
                "image": None,
                "width": 64,
                "height": 64,
                "caption": "a cat",
                "tags": ["cat"],
                "instances": [
                    {"box": [0.1, 0.1, 0.5, 0.5], "label": "cat", "score": 0.9, "caption": "a cat"}
                ],
                "annotator": "{}",
            }
        ],
        schema=SHARD_SCHEMA,
    )
    pq.write_table(table, tmp_path / "shard-00000.parquet")
    manifest = Manifest(
        shards=[
            ShardEntry("shard-00000.parquet", 1, file_sha256(tmp_path / "shard-00000.parquet"))
        ],
        inputs=1,
    )
    manifest.write(tmp_path)
    again = Manifest.read(tmp_path)
    assert again == manifest and again.rows == 1 and again.quarantined == 0
    again.verify(tmp_path)
    check_schema(pq.read_schema(again.shard_paths(tmp_path)[0]))
    (tmp_path / "shard-00000.parquet").write_bytes(b"changed")
    with pytest.raises(SchemaError, match="checksum"):
        again.verify(tmp_path)
    with pytest.raises(SchemaError, match="not a shard dataset"):
        Manifest.read(tmp_path / "nowhere")

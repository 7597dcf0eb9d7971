"""The process that drives the shard stages holds per-shard bookkeeping only, never per-face rows (issue 10)."""
from __future__ import annotations

import gc
import pickle
import tracemalloc

import numpy as np
import pandas as pd

from facedetail.data.execution import SynchronousExecutor
from facedetail.data.shards import shard_face_ids
from facedetail.data.stages import ShardInput, ShardStage, run_stage
from facedetail.datasets import ShardedFaceDataset


class _Faces(ShardStage):
    """Makes ``per_shard`` tiny faces per shard, with index columns and one report (manifest-like) row per face."""

    name = "many_faces"
    index_columns = ("source_image", "score")

    def __init__(self, per_shard: int) -> None:
        self.per_shard = per_shard

    def settings(self):
        return {"per_shard": self.per_shard}

    def process(self, state, shard, inputs):
        records, report = [], []
        for i in range(self.per_shard):
            face_id = f"photo_{shard.number:04d}_{i:05d}__f0"
            records.append({"face_id": face_id, "face_sha256": f"{shard.number * 100000 + i:064x}", "status": "ok",
                            "image": np.zeros((2, 2, 3), np.uint8), "score": np.float32(0.5), "source_image": f"{face_id}.jpg"})
            report.append({"image": f"{face_id}.jpg", "status": "ok", "reason": "face 1 of 1", "face_id": face_id,
                           "bbox": [1.0, 2.0, 3.0, 4.0] if i % 7 else None, "image_width": 640 if i % 5 else pd.NA})
        return records, report


class _Recording(SynchronousExecutor):
    """The in-process executor, recording how many bytes each task result would take to send back."""

    def __init__(self) -> None:
        self.result_bytes: list[int] = []

    def map_shards(self, stage, shards, work_dir):
        for output in super().map_shards(stage, shards, work_dir):
            self.result_bytes.append(len(pickle.dumps(output)))
            yield output


def _run(per_shard: int, shards: int, work) -> tuple[int, _Recording, object, object]:
    executor = _Recording()
    gc.collect()
    tracemalloc.start()
    data, report = run_stage(_Faces(per_shard), [ShardInput(number=k, items=(k,)) for k in range(shards)], work, lambda n: executor)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, executor, data, report


def test_task_results_and_driver_memory_do_not_grow_with_the_faces(tmp_path):
    few_peak, few, few_data, _ = _run(5, 12, tmp_path / "few")
    many_peak, many, many_data, many_report = _run(300, 12, tmp_path / "many")
    assert len(few_data) == 60 and len(many_data) == 3600 and len(many_report) == 3600
    # what a task sends back is per-shard bookkeeping (paths, hash, count): same size at 5 and at 300 faces a shard
    assert max(many.result_bytes) - min(few.result_bytes) < 64, (few.result_bytes[:3], many.result_bytes[:3])
    # 3540 more faces (with index and report rows) cost the driver less than 150 bytes of Python objects each:
    # collecting their rows as dicts (what it did before) takes several kB per face
    assert many_peak - few_peak < 3540 * 150, (few_peak, many_peak)


def test_index_and_report_stream_into_the_same_tables(tmp_path):
    _, _, data, report = _run(9, 4, tmp_path / "work")
    index = data.index  # read from the runner's parquet file on first use
    assert list(index.columns[:6]) == ["face_id", "shard", "position", "face_sha256", "status", "reason"]
    assert index["shard"].tolist() == [k for k in range(4) for _ in range(9)]
    assert index["position"].tolist() == list(range(9)) * 4
    assert shard_face_ids(data.index_path, 2) == [f"photo_0002_{i:05d}__f0" for i in range(9)] and data.count("ok") == 36
    frame = report.frame()
    assert len(frame) == 36 and frame["face_id"].tolist() == index["face_id"].tolist()
    assert frame["bbox"].isna().sum() == 8 and list(frame["bbox"].iloc[1]) == [1.0, 2.0, 3.0, 4.0]
    assert frame["image_width"].isna().sum() == 8 and frame["image_width"].dropna().eq(640).all()
    # published as a version: the index file is linked, never loaded by the save; load gives the same rows
    _, _, fresh, _ = _run(9, 4, tmp_path / "work")  # all shards reused, index not read yet
    dataset = ShardedFaceDataset(filepath=str(tmp_path / "out"))
    dataset.save(fresh)
    loaded = dataset.load()
    assert len(loaded) == 36 and loaded.meta["shards_reused"] == 4
    pd.testing.assert_frame_equal(loaded.index, index)


def test_task_records_of_the_first_format_are_reused_and_moved_to_parts(tmp_path):
    import json

    from facedetail.data.shards import index_rows, read_shard

    _, _, data, _ = _run(3, 2, tmp_path / "work")
    expected = data.index
    folder = tmp_path / "work" / "many_faces"
    for record_path in folder.glob("*.json"):  # rewrite each record as the row-collecting runner stored it
        shard_path = record_path.with_suffix(".tar")
        number = int(expected.loc[expected["face_id"] == read_shard(shard_path)[0]["face_id"], "shard"].iloc[0])
        record = json.loads(record_path.read_text())
        rows = index_rows(number, read_shard(shard_path), _Faces.index_columns)
        record_path.write_text(json.dumps({"sha256": record["sha256"], "rows": rows, "report": [{"image": "x.jpg", "status": "ok"}]}))
    for part in folder.glob("*.parquet"):
        part.unlink()
    called = []
    again, report = run_stage(_Faces(3), [ShardInput(number=k, items=(k,)) for k in range(2)], tmp_path / "work",
                              lambda n: called.append(n) or SynchronousExecutor())
    assert called == [] and again.meta["shards_reused"] == 2  # resumed, nothing recomputed
    pd.testing.assert_frame_equal(again.index, expected, check_dtype=False)  # JSON rows gave float64 scores
    assert report.frame()["image"].tolist() == ["x.jpg", "x.jpg"]
    assert all("rows" not in json.loads(p.read_text()) for p in folder.glob("*.json"))

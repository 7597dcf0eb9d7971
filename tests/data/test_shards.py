"""Tar shards, the versioned sharded dataset and the stage runner (resume, failures, hashes, Dask)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from facedetail.data.execution import ExecutionError, SynchronousExecutor, make_executor
from facedetail.data.shards import FaceShards, ShardError, file_sha256, iter_shard, read_shard, write_shard, zip_shard_records
from facedetail.data.stages import ShardInput, ShardStage, run_shard_task, run_stage, shard_inputs
from facedetail.datasets import ShardedFaceDataset


def _records(n: int, offset: int = 0) -> list[dict]:
    return [
        {"face_id": f"img{offset + i}__f0", "face_sha256": f"{offset + i:064x}", "status": "ok",
         "image": np.full((4, 4, 3), offset + i, np.uint8), "score": np.float32(0.25 * i), "source_image": f"dir/img{i}.jpg"}
        for i in range(n)
    ]


def test_shard_round_trip_keeps_arrays_dtypes_and_order(tmp_path):
    sha = write_shard(tmp_path / "s.tar", _records(3))
    faces = read_shard(tmp_path / "s.tar")
    assert [f["face_id"] for f in faces] == ["img0__f0", "img1__f0", "img2__f0"]
    assert faces[2]["image"].dtype == np.uint8 and int(faces[2]["image"][0, 0, 0]) == 2
    assert faces[1]["score"].dtype == np.float32 and float(faces[1]["score"]) == 0.25
    assert faces[0]["source_image"] == "dir/img0.jpg"
    assert sha == file_sha256(tmp_path / "s.tar")
    # same content -> same bytes (mtime 0): task hashes are stable across reruns
    assert write_shard(tmp_path / "t.tar", _records(3)) == sha


def test_shard_is_readable_by_webdataset_and_tar(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    write_shard(tmp_path / "s.tar", _records(2))
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert "000001.image.npy" in tar.getnames()
    samples = list(webdataset.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode())
    assert [s["face_id.txt"] for s in samples] == ["img0__f0", "img1__f0"]
    assert np.array_equal(samples[1]["image.npy"], np.full((4, 4, 3), 1, np.uint8))


def test_failed_write_leaves_no_shard_and_truncated_shard_is_an_error(tmp_path):
    bad = _records(2) + [{"face_id": "x", "image": np.array([object()])}]
    with pytest.raises(TypeError):
        write_shard(tmp_path / "s.tar", bad)
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary left behind
    sha = write_shard(tmp_path / "s.tar", _records(3))
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[:9800])  # inside the data of 000001.image.npy
    with pytest.raises(ShardError, match="s.tar.*(truncated|unexpected end)"):
        list(iter_shard(tmp_path / "s.tar"))
    # cut between two members, a tar reads as a shorter archive: the recorded hash catches it
    (tmp_path / "s.tar").write_bytes(data[:6144])
    shards = FaceShards([tmp_path / "s.tar"], pd.DataFrame(), [sha])
    assert len(shards.read(0)) == 1
    with pytest.raises(ShardError, match="sha256"):
        shards.read(0, verify=True)


def test_zip_shard_records_checks_face_order():
    a, b = _records(2), _records(2)
    assert len(list(zip_shard_records(a, b))) == 2
    with pytest.raises(ShardError, match="out of step"):
        list(zip_shard_records(a, list(reversed(b))))
    with pytest.raises(ShardError, match="different face counts"):
        list(zip_shard_records(a, b[:1]))


class _Double(ShardStage):
    """A test stage: doubles every image; fails on faces named in ``fail``."""

    name = "double"
    index_columns = ("score",)

    def __init__(self, fail: tuple[str, ...] = (), sleep: float = 0.0, die_once: str | None = None) -> None:
        self.fail, self.sleep, self.die_once = fail, sleep, die_once

    def setup(self):
        return {"pid": os.getpid()}

    def process(self, state, shard, inputs):
        time.sleep(self.sleep)
        if self.die_once and shard.number == 1 and not os.path.exists(self.die_once):
            Path(self.die_once).write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies mid-task
        out = []
        for (face,) in zip_shard_records(*inputs):
            if face["face_id"] in self.fail:
                raise RuntimeError(f"cannot double {face['face_id']}")
            out.append({**{k: v for k, v in face.items() if k != "__key__"}, "image": face["image"] * 2})
        return out, []


def _source(tmp_path: Path, shards: int = 3, per_shard: int = 2) -> FaceShards:
    paths, shas, rows = [], [], []
    for k in range(shards):
        records = _records(per_shard, offset=k * per_shard)
        path = tmp_path / "src" / f"shard-{k:05d}.tar"
        shas.append(write_shard(path, records))
        paths.append(path)
        rows += [{"face_id": r["face_id"], "shard": k, "position": i, "face_sha256": r["face_sha256"], "status": "ok", "reason": ""}
                 for i, r in enumerate(records)]
    return FaceShards(paths, pd.DataFrame(rows), shas)


def test_stage_runner_reuses_finished_shards_and_records_failures(tmp_path):
    source = _source(tmp_path)
    work = tmp_path / "work"
    result, _ = run_stage(_Double(fail=("img3__f0",)), shard_inputs([source]), work, lambda n: SynchronousExecutor())
    assert list(result.index["status"]) == ["ok", "ok", "error", "error", "ok", "ok"]  # shard 1 failed, kept its faces
    assert "cannot double img3__f0" in result.index["reason"].iloc[2]
    assert int(read_shard(result.shards[2])[1]["image"][0, 0, 0]) == 10
    # the finished shards are reused; the failed one is not finished and runs again (now without the failure)
    computed = []
    again, _ = run_stage(_Double(), shard_inputs([source]), work, lambda n: computed.append(n) or SynchronousExecutor())
    assert computed == [1] and again.meta["shards_reused"] == 2 and list(again.index["status"]) == ["ok"] * 6
    assert again.shard_sha256[0] == result.shard_sha256[0] and again.shard_sha256[2] == result.shard_sha256[2]
    # a corrupt stored shard is detected by its hash and recomputed
    again.shards[0].write_bytes(b"garbage")
    computed = []
    third, _ = run_stage(_Double(), shard_inputs([source]), work, lambda n: computed.append(n) or SynchronousExecutor())
    assert computed == [1] and third.shard_sha256 == again.shard_sha256


def test_sharded_dataset_versions_are_published_atomically(tmp_path, monkeypatch):
    source = _source(tmp_path)
    from kedro.io.core import Version

    dataset = ShardedFaceDataset(filepath=str(tmp_path / "faces"), version=Version(None, None))  # load = latest

    first = ShardedFaceDataset(filepath=str(tmp_path / "faces"), version=Version(None, "2026-01-01T00.00.00.000Z"))
    first.save(source)
    loaded = dataset.load()
    assert len(loaded) == 6 and loaded.num_shards == 3 and loaded.shard_sha256 == source.shard_sha256
    assert [f["face_id"] for f in loaded.iter_faces()] == list(source.index["face_id"])
    # a save that dies half way leaves no visible version: the previous one stays the latest
    real_link = os.link

    def broken_link(src, dst):
        if str(dst).endswith("shard-00001.tar"):
            raise OSError(28, "No space left on device")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", broken_link)
    monkeypatch.setattr("shutil.copy2", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    second = ShardedFaceDataset(filepath=str(tmp_path / "faces"), version=Version(None, "2026-01-02T00.00.00.000Z"))
    with pytest.raises(Exception, match="No space left"):
        second.save(source)
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == ["2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"]
    assert not any((tmp_path / "faces" / "2026-01-02T00.00.00.000Z").iterdir())  # only the (removed) staging folder was there
    assert ShardedFaceDataset(filepath=str(tmp_path / "faces"), version=Version(None, None)).load().shard_sha256 == source.shard_sha256


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_shards import _Double, _source
    from facedetail.data.execution import SynchronousExecutor
    from facedetail.data.stages import run_stage, shard_inputs
    from pathlib import Path
    root = Path({root!r})
    source = _source(root)
    run_stage(_Double(sleep=1.5), shard_inputs([source]), root / "work", lambda n: SynchronousExecutor())
    """
)


def test_killed_stage_resumes_at_shard_granularity(tmp_path):
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TQDM_DISABLE": "1"})
    work = tmp_path / "work" / "double"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(work.glob("*.json"))) < 1:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(work.glob("*.json")))
    assert 1 <= done < 3, f"expected the kill to land between shards, {done} finished"
    computed = []
    result, _ = run_stage(_Double(sleep=0), shard_inputs([_source(tmp_path)]), tmp_path / "work",
                          lambda n: computed.append(n) or SynchronousExecutor())
    # sleep is not a setting: the finished shards keep their keys and are reused
    assert computed == [3 - done] and result.meta["shards_reused"] == done
    assert list(result.index["status"]) == ["ok"] * 6


@pytest.mark.slow
def test_local_dask_cluster_gives_the_same_shards_and_survives_a_dying_worker(tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    source = _source(tmp_path, shards=4)
    expected, _ = run_stage(_Double(), shard_inputs([source]), tmp_path / "a", lambda n: SynchronousExecutor())
    executor = make_executor({"scheduler": "local", "n_workers": 2, "threads_per_worker": 1})
    marker = tmp_path / "died"
    try:
        result, _ = run_stage(_Double(die_once=str(marker)), shard_inputs([source]), tmp_path / "b", lambda n: executor)
        # one call (a worker list fetched separately can already name the restarted worker: KeyError, flaky)
        pids = set(executor.client.run(os.getpid).values())
    finally:
        executor.close()
    assert result.shard_sha256 == expected.shard_sha256  # the task of the worker that died was run again
    assert marker.is_file() and int(marker.read_text()) != os.getpid()
    assert pids and os.getpid() not in pids


def test_unreachable_scheduler_is_one_clear_error():
    with pytest.raises(ExecutionError, match="execution.scheduler"):
        make_executor({"scheduler": "tcp://127.0.0.1:9", "connect_timeout": 1})

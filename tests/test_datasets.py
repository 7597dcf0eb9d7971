from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from kedro.io.core import DatasetError, Version

from facedetail.datasets import NpzBundleDataset, TorchCheckpointDataset


def test_npz_bundle_versions_roundtrip_and_rejects_objects(tmp_path):
    path = str(tmp_path / "faces.npz")
    first = NpzBundleDataset(filepath=path, version=Version(None, "2026-01-01T00.00.00.000Z"))
    first.save({"face_ids": np.array(["a__f0", "b__f0"]), "images": np.zeros((2, 4, 4, 3), np.uint8)})
    second = NpzBundleDataset(filepath=path, version=Version(None, "2026-01-02T00.00.00.000Z"))
    second.save({"face_ids": np.array(["c__f0"]), "images": np.ones((1, 4, 4, 3), np.uint8)})
    latest = NpzBundleDataset(filepath=path, version=Version(None, None)).load()
    assert latest["face_ids"].tolist() == ["c__f0"]  # the newest version is loaded
    old = NpzBundleDataset(filepath=path, version=Version("2026-01-01T00.00.00.000Z", None)).load()
    assert old["images"].shape == (2, 4, 4, 3)
    with pytest.raises(DatasetError, match="object array"):
        first.save({"bad": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(DatasetError, match="dict of arrays"):
        first.save([1, 2])


def test_torch_checkpoint_dataset_loads_weights_only(tmp_path):
    path = str(tmp_path / "model.pt")
    TorchCheckpointDataset(filepath=path, version=Version(None, "2026-01-01T00.00.00.000Z")).save({"w": torch.arange(3)})
    assert torch.equal(TorchCheckpointDataset(filepath=path, version=Version(None, None)).load()["w"], torch.arange(3))

    TorchCheckpointDataset(filepath=path, version=Version(None, "2026-01-02T00.00.00.000Z")).save({"obj": Version(None, None)})
    with pytest.raises(Exception, match="[Ww]eights only"):
        TorchCheckpointDataset(filepath=path, version=Version(None, None)).load()


# ---------------------------------------------------------------------------------------------- atomic saves, broken versions

V1, V2, V3 = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z", "2026-01-03T00.00.00.000Z"


def _save_two_versions(cls, path, first, second):
    cls(filepath=path, version=Version(None, V1)).save(first)
    cls(filepath=path, version=Version(None, V2)).save(second)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_npz_broken_latest_version_falls_back_with_a_warning(tmp_path, caplog, how):
    path = tmp_path / "faces.npz"
    _save_two_versions(NpzBundleDataset, str(path), {"face_ids": np.array(["old"])}, {"face_ids": np.array(["new"])})
    latest = path / V2 / "faces.npz"
    data = latest.read_bytes()
    latest.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a zip at all"}[how])
    with caplog.at_level("WARNING", logger="facedetail.datasets"):
        loaded = NpzBundleDataset(filepath=str(path), version=Version(None, None)).load()
    assert loaded["face_ids"].tolist() == ["old"]
    assert str(latest) in caplog.text and "broken" in caplog.text
    assert f"Delete the broken version folder(s) '{path / V2}'" in caplog.text
    # a pinned broken version is an error naming the file, never a silent substitute
    with pytest.raises(DatasetError, match=f"'{latest}' is broken.*delete it"):
        NpzBundleDataset(filepath=str(path), version=Version(V2, None)).load()


def test_torch_truncated_latest_version_falls_back(tmp_path, caplog):
    path = tmp_path / "model.pt"
    _save_two_versions(TorchCheckpointDataset, str(path), {"w": torch.arange(3)}, {"w": torch.arange(5)})
    TorchCheckpointDataset(filepath=str(path), version=Version(None, V3)).save({"w": torch.arange(7)})
    for version in (V3, V2):  # the two newest are truncated: the oldest good one is used, both folders named
        file = path / version / "model.pt"
        file.write_bytes(file.read_bytes()[:-100])
    loaded = TorchCheckpointDataset(filepath=str(path), version=Version(None, None)).load()
    assert torch.equal(loaded["w"], torch.arange(3))
    assert str(path / V3) in caplog.text and str(path / V2) in caplog.text


def test_all_versions_broken_says_what_to_delete(tmp_path):
    path = tmp_path / "faces.npz"
    NpzBundleDataset(filepath=str(path), version=Version(None, V1)).save({"a": np.zeros(3)})
    (path / V1 / "faces.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DatasetError, match="no older good version either. Delete the broken version folder"):
        NpzBundleDataset(filepath=str(path), version=Version(None, None)).load()


def test_refused_pickle_in_latest_version_is_not_skipped(tmp_path):
    """An intact file that fails to decode (object array / pickle refused) raises; no fallback hides it."""
    path = tmp_path / "faces.npz"
    NpzBundleDataset(filepath=str(path), version=Version(None, V1)).save({"a": np.zeros(3)})
    (path / V2).mkdir()
    np.savez(path / V2 / "faces.npz", a=np.array([{"x": 1}], dtype=object))  # a pickle inside a good zip
    with pytest.raises(Exception, match="allow_pickle"):
        NpzBundleDataset(filepath=str(path), version=Version(None, None)).load()


class _FailingHalfway:
    """A file object that writes half of the data, then fails like a full disk."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_failed_write_leaves_no_new_version(tmp_path, monkeypatch):
    import os

    import facedetail.utils as utils

    path = tmp_path / "faces.npz"
    NpzBundleDataset(filepath=str(path), version=Version(None, V1)).save({"face_ids": np.array(["old"])})
    real_fdopen = os.fdopen
    monkeypatch.setattr(utils.os, "fdopen", lambda fd, mode: _FailingHalfway(real_fdopen(fd, mode)))
    with pytest.raises(DatasetError, match=rf"cannot write '.*{V2}/faces.npz': No space left on device"):
        NpzBundleDataset(filepath=str(path), version=Version(None, V2)).save({"face_ids": np.array(["new"])})
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == [V1]  # no new version folder, no temporary file left
    assert NpzBundleDataset(filepath=str(path), version=Version(None, None)).load()["face_ids"].tolist() == ["old"]


def test_failed_write_on_another_filesystem_leaves_no_new_version(monkeypatch):
    import fsspec

    root = "memory:///atomic_test/faces.npz"
    NpzBundleDataset(filepath=root, version=Version(None, V1)).save({"face_ids": np.array(["old"])})
    dataset = NpzBundleDataset(filepath=root, version=Version(None, V2))
    real_open = dataset._fs.open
    monkeypatch.setattr(dataset._fs, "open", lambda p, mode="rb", **k: _FailingHalfway(real_open(p, mode, **k)))
    with pytest.raises(DatasetError, match="No space left on device"):
        dataset.save({"face_ids": np.array(["new"])})
    monkeypatch.undo()
    fs = fsspec.filesystem("memory")
    assert [PurePosixPath(p).name for p in fs.ls("/atomic_test/faces.npz", detail=False)] == [V1]  # no tmp, no V2
    NpzBundleDataset(filepath=root, version=Version(None, V2)).save({"face_ids": np.array(["new"])})
    assert NpzBundleDataset(filepath=root, version=Version(None, None)).load()["face_ids"].tolist() == ["new"]
    fs.rm("/atomic_test", recursive=True)


def test_raw_bytes_save_is_atomic(tmp_path, monkeypatch):
    import os

    import facedetail.utils as utils
    from facedetail.datasets import RawBytesDataset

    path = tmp_path / "raw" / "a.jpg"
    RawBytesDataset(filepath=str(path)).save(b"old")
    real_fdopen = os.fdopen
    monkeypatch.setattr(utils.os, "fdopen", lambda fd, mode: _FailingHalfway(real_fdopen(fd, mode)))
    with pytest.raises(Exception, match="No space left on device"):
        RawBytesDataset(filepath=str(path)).save(b"new bytes")
    monkeypatch.undo()
    assert RawBytesDataset(filepath=str(path)).load() == b"old"
    assert [p.name for p in path.parent.iterdir()] == ["a.jpg"]

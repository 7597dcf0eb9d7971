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

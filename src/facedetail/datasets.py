"""Kedro datasets of the project.

Kedro refuses ``versioned: true`` on ``PartitionedDataset``; per-face arrays (aligned crops,
masks, coefficients, UV maps) are therefore stored as ONE compressed ``.npz`` bundle per run,
which Kedro versions like any other file (``data/0x_*/name.npz/<timestamp>/name.npz``).
A bundle is a ``dict[str, np.ndarray]``; by convention every per-face array is indexed along
axis 0 in the order of the bundle's ``face_ids`` array.
"""
from __future__ import annotations

import io
import logging
import uuid
import zipfile
from pathlib import PurePosixPath
from typing import Any, Callable, TypeVar

import fsspec
import numpy as np
from kedro.io.core import (
    AbstractDataset,
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _is_intact_zip(data: bytes) -> bool:
    """Whether ``data`` is a complete zip archive with good CRCs (``.npz`` and ``torch.save`` files are zips)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.testzip() is None
    except Exception:  # noqa: BLE001 - BadZipFile, EOFError, zlib errors, ...
        return False


class _VersionedFileDataset(AbstractVersionedDataset[dict, dict]):
    """A versioned single file on any fsspec filesystem, read and written as bytes (atomically)."""

    #: Name of the format in messages.
    _format = "zip"

    def __init__(
        self,
        *,
        filepath: str,
        version: Version | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **(fs_args or {}))
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def _read_bytes(self) -> bytes:
        return self._read_path(get_filepath_str(self._get_load_path(), self._protocol))

    def _read_path(self, path: str) -> bytes:
        try:
            with self._fs.open(path, "rb") as handle:
                return handle.read()
        except OSError as error:
            raise DatasetError(f"cannot read '{path}': {error}") from error

    def _load_decoded(self, decode: Callable[[bytes], T]) -> T:
        """``decode`` the file; a broken latest version (truncated, not a zip) falls back to the newest good one.

        A file that is an intact archive but fails to decode (e.g. a pickle refused by ``weights_only`` /
        ``allow_pickle=False``) is never skipped: its error is raised. A pinned version (``load_versions``)
        or an unversioned file that is broken raises a ``DatasetError`` naming the file to delete.
        """
        path = get_filepath_str(self._get_load_path(), self._protocol)
        data = self._read_path(path)
        try:
            return decode(data)
        except Exception as error:  # noqa: BLE001 - intact archives re-raise below
            if _is_intact_zip(data):
                raise
            broken = f"'{path}' is broken ({len(data)} bytes, truncated or not a {self._format} file: {type(error).__name__}: {error})"
            cause = error
        if not self._version or self._version.load is not None:
            raise DatasetError(f"{broken}; delete it (or load another version)") from cause
        broken_folders = [str(PurePosixPath(path).parent)]
        broken_version = PurePosixPath(path).parent.name
        for candidate in self._get_versions():
            if PurePosixPath(candidate).parent.name == broken_version:
                continue
            candidate_path = get_filepath_str(PurePosixPath(candidate), self._protocol)
            candidate_data = b""
            try:
                candidate_data = self._read_path(candidate_path)
                value = decode(candidate_data)
            except Exception:  # noqa: BLE001 - an older broken version: keep looking
                if _is_intact_zip(candidate_data):
                    raise
                broken_folders.append(str(PurePosixPath(candidate_path).parent))
                continue
            self._cached_load_version = PurePosixPath(candidate).parent.name
            logger.warning("%s; loaded the previous good version '%s' instead. Delete the broken version folder(s) %s "
                           "(left by a crash or a full disk during a save) to silence this warning.",
                           broken, candidate_path, ", ".join(f"'{folder}'" for folder in broken_folders))
            return value
        raise DatasetError(f"{broken}; no older good version either. Delete the broken version folder(s) "
                           f"{', '.join(repr(folder) for folder in broken_folders)} and rerun the pipeline that writes it") from cause

    def _write_bytes(self, data: bytes) -> None:
        """Write atomically: a temporary file in the dataset's folder, renamed into place once complete.

        A failed or killed save leaves no new version (the version folder is created only at the rename).
        """
        path = get_filepath_str(self._get_save_path(), self._protocol)
        target = PurePosixPath(path)
        # versioned: <filepath>/<version>/<name>, staged in <filepath>/ (not matched by Kedro's <filepath>/*/<name>)
        staging = get_filepath_str(self._filepath, self._protocol) if self._version else str(target.parent)
        try:
            if self._protocol == "file":
                from facedetail.utils import atomic_write_bytes  # here: utils imports torch, the catalog need not

                atomic_write_bytes(path, data, staging_dir=staging)
            else:
                self._write_staged(path, data, staging)
        except OSError as error:
            raise DatasetError(f"cannot write '{path}': {error.strerror or error} (nothing was saved; the previous "
                               f"version is intact)") from error
        finally:
            self._invalidate_cache()

    def _write_staged(self, path: str, data: bytes, staging: str) -> None:
        """Other fsspec filesystems: write ``<staging>/.<name>.tmp-<uuid>`` then ``fs.mv`` it to ``path``."""
        tmp = f"{staging}/.{PurePosixPath(path).name}.tmp-{uuid.uuid4().hex}"
        self._fs.makedirs(staging, exist_ok=True)
        try:
            with self._fs.open(tmp, "wb") as handle:
                handle.write(data)
            self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
            self._fs.mv(tmp, path)
        except BaseException:
            try:
                if self._fs.exists(tmp):
                    self._fs.rm(tmp)
            except Exception:  # noqa: BLE001 - best effort; the original error matters
                logger.debug("could not remove %s", tmp)
            raise

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol, "version": self._version}

    def _exists(self) -> bool:
        try:
            path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.exists(path)

    def _release(self) -> None:
        super()._release()
        self._invalidate_cache()

    def _invalidate_cache(self) -> None:
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))


class NpzBundleDataset(_VersionedFileDataset):
    """A versioned ``.npz`` file holding a dict of numpy arrays (string arrays allowed, no pickles).

    Example catalog entry::

        aligned_faces:
          type: facedetail.datasets.NpzBundleDataset
          filepath: data/02_intermediate/aligned_faces.npz
          versioned: true
    """

    def __init__(
        self,
        *,
        filepath: str,
        version: Version | None = None,
        compress: bool = True,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._compress = compress
        super().__init__(filepath=filepath, version=version, fs_args=fs_args, metadata=metadata)

    _format = "npz"

    def load(self) -> dict[str, np.ndarray]:
        return self._load_decoded(_decode_npz)

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise DatasetError(f"NpzBundleDataset expects a dict of arrays, got {type(data).__name__}")
        arrays = {}
        for key, value in data.items():
            array = np.asarray(value)
            if array.dtype == object:
                raise DatasetError(f"bundle entry '{key}' is an object array; store numbers or strings only")
            arrays[key] = array
        buffer = io.BytesIO()
        (np.savez_compressed if self._compress else np.savez)(buffer, **arrays)
        self._write_bytes(buffer.getvalue())


class RawBytesDataset(AbstractDataset[bytes, bytes]):
    """A file's raw bytes, undecoded (used inside ``PartitionedDataset`` so unreadable files become
    manifest rows instead of load-time crashes).

    Example catalog entry::

        raw_faces:
          type: partitions.PartitionedDataset
          path: data/01_raw/faces
          dataset: facedetail.datasets.RawBytesDataset
    """

    def __init__(
        self,
        *,
        filepath: str,
        fs_args: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(filepath)
        self._protocol = protocol
        self._filepath = PurePosixPath(path)
        self._fs = fsspec.filesystem(protocol, **(credentials or {}), **(fs_args or {}))
        self.metadata = metadata

    @property
    def filepath(self) -> str:
        """The file this dataset reads (with its protocol for non-local filesystems)."""
        return get_filepath_str(self._filepath, self._protocol)

    def load(self) -> bytes:
        path = get_filepath_str(self._filepath, self._protocol)
        try:
            with self._fs.open(path, "rb") as handle:
                return handle.read()
        except OSError as error:
            raise DatasetError(f"cannot read '{path}': {error}") from error

    def save(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DatasetError(f"RawBytesDataset expects bytes, got {type(data).__name__}")
        path = get_filepath_str(self._filepath, self._protocol)
        if self._protocol == "file":  # atomic: a temporary file in the same folder, renamed
            from facedetail.utils import atomic_write_bytes

            atomic_write_bytes(path, bytes(data))
            return
        self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        with self._fs.open(path, "wb") as handle:
            handle.write(bytes(data))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol}

    def _exists(self) -> bool:
        return self._fs.exists(get_filepath_str(self._filepath, self._protocol))


class TorchCheckpointDataset(_VersionedFileDataset):
    """A versioned ``torch.save`` file of a dict of tensors/plain values, loaded with ``weights_only=True``.

    Example catalog entry::

        detail_model:
          type: facedetail.datasets.TorchCheckpointDataset
          filepath: data/06_models/detail_generator.pt
          versioned: true
    """

    _format = "torch.save"

    def load(self) -> dict:
        return self._load_decoded(_decode_torch)

    def save(self, data: dict) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(data, buffer)
        self._write_bytes(buffer.getvalue())


class ShardedFaceDataset(AbstractVersionedDataset):
    """A versioned folder of per-face tar shards + ``index.parquet`` + ``meta.json`` (local filesystem).

    ``load()`` returns a :class:`facedetail.data.shards.FaceShards` handle (paths and index; no arrays
    are read until a stage streams a shard). ``save(face_shards)`` publishes a stage's shards, which
    the stage runner wrote to its work folder, as a new version: each shard is hard-linked (copied
    across filesystems) into a hidden temporary folder beside the version, the index and meta are
    written, and the folder is renamed into place. A killed or disk-full save therefore never
    leaves a visible, broken latest version, and a rerun never overwrites an old one.

    Example catalog entry::

        aligned_faces:
          type: facedetail.datasets.ShardedFaceDataset
          filepath: data/03_primary/aligned_faces
          versioned: true
    """

    def __init__(self, *, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        if protocol != "file":
            raise DatasetError(f"ShardedFaceDataset supports local folders only, got '{filepath}'")
        self._fs = fsspec.filesystem("file")
        self.metadata = metadata
        super().__init__(filepath=PurePosixPath(path), version=version, exists_function=self._fs.exists, glob_function=self._fs.glob)

    def load(self):
        import json
        from pathlib import Path

        from facedetail.data.shards import FaceShards

        folder = Path(str(self._get_load_path()))
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise DatasetError(f"'{folder}' is not a complete shard folder (no meta.json); delete it and rerun the stage")
        meta = json.loads(meta_path.read_text())
        if not (folder / "index.parquet").is_file():
            raise DatasetError(f"'{folder}' is not a complete shard folder (no index.parquet); delete it and rerun the stage")
        shards = [folder / name for name in meta["shards"]]
        # the index is read when a consumer first asks for it (the stage runner never does)
        return FaceShards(shards, None, list(meta["shard_sha256"]), dict(meta.get("meta", {})),
                          index_path=folder / "index.parquet", faces=meta.get("faces"))

    def save(self, data) -> None:
        import json
        import os
        import shutil
        import uuid
        from pathlib import Path

        from facedetail.data.shards import FaceShards, shard_name

        if not isinstance(data, FaceShards):
            raise DatasetError(f"ShardedFaceDataset expects FaceShards, got {type(data).__name__}")
        final = Path(str(self._get_save_path()))
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        def link_or_copy(source, destination) -> None:
            try:
                os.link(source, destination)
            except OSError:  # another file system
                shutil.copy2(source, destination)

        try:
            names = []
            for number, source in enumerate(data.shards):
                name = shard_name(number)
                link_or_copy(source, staging / name)
                names.append(name)
            if data.unloaded_index_path is not None:  # the runner's index file, never loaded here
                link_or_copy(data.unloaded_index_path, staging / "index.parquet")
            else:
                data.index.to_parquet(staging / "index.parquet", index=False)
            meta = {"shards": names, "shard_sha256": list(data.shard_sha256), "faces": int(len(data)), "meta": data.meta}
            (staging / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            os.rename(staging, final)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError):
                raise DatasetError(f"cannot write '{final}': {error.strerror or error} (while writing "
                                   f"'{error.filename or staging}'; nothing was saved; the previous version is intact)") from error
            raise
        self._fs.invalidate_cache(str(self._filepath))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "version": self._version}

    def _exists(self) -> bool:
        try:
            path = str(self._get_load_path())
        except DatasetError:
            return False
        return self._fs.exists(path)
def _decode_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as bundle:
        return {key: bundle[key] for key in bundle.files}


def _decode_torch(data: bytes) -> dict:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

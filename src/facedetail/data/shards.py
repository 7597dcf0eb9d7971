"""Sharded per-face datasets: WebDataset-layout tar shards plus a parquet index.

Why tar shards in the WebDataset layout
---------------------------------------
A face folder of FFHQ/CelebA size (30k-200k faces, 0.3-1 MB of arrays each) must never be held in
memory, must be readable front to back without seeking (local disk, NFS or an object store), and
must split cleanly over Dask tasks, training ranks and DataLoader workers. POSIX tar shards of a
few hundred faces do all three: a reader streams one shard at a time, a shard is the unit of work
and of resume, and each shard is a single file that is written to a temporary name and renamed
(atomic). The member layout is WebDataset's (``<key>.<field>.<ext>``, members of one sample
adjacent), so ``webdataset.WebDataset(path)`` and plain ``tar tf`` read our shards too
(tested). Arrays are ``.npy`` members (``np.save``, never pickled: loaded with
``allow_pickle=False``); strings are ``.txt`` members. Parquet/Arrow would need fixed-size list
columns per array and rewrites to append; zarr stores one file per chunk (hundreds of thousands of
small files at this scale); litdata/mosaic-streaming bring their own cloud caches and formats
that other tools cannot open.

Every stage of the per-face chain writes its shard ``k`` from shard ``k`` of its inputs, keeping
the faces in the same order, so shard ``k`` of every stage describes the same faces: stages join
by position (checked by face id) without any global lookup. A face that fails a stage keeps its
place with ``status``/``reason`` and no arrays; later stages pass the failure on.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

#: Per-face text fields (everything else is an array).
TEXT_FIELDS = ("face_id", "status", "reason")
#: Columns every shard index has (a stage may add its own scalar columns after these).
INDEX_COLUMNS = ["face_id", "shard", "position", "face_sha256", "status", "reason"]
SHARD_PATTERN = "shard-{:05d}.tar"


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not match its recorded hash."""


def shard_name(number: int) -> str:
    """File name of shard ``number`` (``shard-00042.tar``)."""
    return SHARD_PATTERN.format(number)


def _npy_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError(f"object arrays cannot be stored in a shard (got {type(value).__name__})")
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_face(key: str, record: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The tar members of one face: ``<key>.<field>.txt`` for text fields, ``.npy`` for arrays."""
    if "." in key or "/" in key:
        raise ValueError(f"shard sample key {key!r} must not contain '.' or '/'")
    members = []
    for name, value in record.items():
        if value is None:
            continue
        if name in TEXT_FIELDS or isinstance(value, str):
            members.append((f"{key}.{name}.txt", str(value).encode("utf-8")))
        else:
            members.append((f"{key}.{name}.npy", _npy_bytes(value)))
    return members


def write_shard(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> str:
    """Write ``records`` (one dict per face; each needs ``face_id``) as one tar shard, atomically.

    The shard is written to a temporary file in the same folder, flushed to disk and renamed over
    ``path``: a killed or disk-full run never leaves a truncated shard under the final name.

    Returns:
        The sha256 of the shard file (recorded in the index; readers verify it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as raw:
            hashing = _HashingWriter(raw, digest)
            with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for position, record in enumerate(records):
                    if "face_id" not in record:
                        raise ValueError("every shard record needs a 'face_id'")
                    for name, data in encode_face(f"{position:06d}", record):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        info.mtime = 0  # identical content -> identical bytes -> identical hash
                        tar.addfile(info, io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # "No space left on device: '<shard>'" names the shard being written
        raise
    return digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes what passes through it."""

    def __init__(self, raw: Any, digest: Any) -> None:
        self._raw, self._digest = raw, digest

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._digest.update(data)
        return self._raw.write(data)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Stream the faces of one shard in order (one dict per face: arrays, text fields, ``__key__``).

    Raises:
        ShardError: the file is missing or not a readable tar (truncated, overwritten).
    """
    path = Path(path)
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, rest = member.name.partition(".")
                name, _, ext = rest.rpartition(".")
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} is truncated ({len(data)} of {member.size} bytes)")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                if ext == "npy":
                    current[name] = np.load(io.BytesIO(data), allow_pickle=False)
                else:
                    current[name] = data.decode("utf-8")
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        raise ShardError(f"cannot read shard '{path}': {type(error).__name__}: {error}") from error
    if current is not None:
        yield current


def read_shard(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All faces of one shard (a shard is the unit a stage holds in memory)."""
    return list(iter_shard(path))


@dataclass
class FaceShards:
    """A sharded per-face dataset: shard files plus their index (no arrays in memory).

    Attributes:
        shards: one tar file per shard, in shard order (``shard-00000.tar`` ...).
        index: one row per face (``INDEX_COLUMNS`` plus stage-specific scalar columns).
        shard_sha256: the sha256 of each shard file (same order as ``shards``).
        meta: stage-wide facts (settings hash, UV size, face model kind ...), JSON-serialisable.
    """

    shards: list[Path]
    index: pd.DataFrame
    shard_sha256: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def ok(self) -> pd.DataFrame:
        """Index rows of the faces this stage produced successfully."""
        return self.index[self.index["status"] == "ok"]

    def read(self, number: int, verify: bool = False) -> list[dict[str, Any]]:
        """The faces of shard ``number`` (optionally checking the file against its recorded hash)."""
        path = self.shards[number]
        if verify and self.shard_sha256 and file_sha256(path) != self.shard_sha256[number]:
            raise ShardError(f"shard '{path}' does not match its recorded sha256 (corrupt or replaced)")
        return read_shard(path)

    def iter_faces(self) -> Iterator[dict[str, Any]]:
        """Every face, one shard in memory at a time."""
        for number in range(self.num_shards):
            yield from self.read(number)


def zip_shard_records(*shards: Sequence[Mapping[str, Any]]) -> Iterator[tuple[Mapping[str, Any], ...]]:
    """Walk the k-th shards of several stages together (same faces, same order; checked by face id)."""
    lengths = {len(s) for s in shards}
    if len(lengths) > 1:
        raise ShardError(f"shards of one number hold different face counts {sorted(lengths)}: stale stage outputs?")
    for records in zip(*shards):
        ids = {r["face_id"] for r in records}
        if len(ids) != 1:
            raise ShardError(f"shards are out of step: face ids {sorted(ids)} at one position")
        yield records


def index_rows(number: int, records: Iterable[Mapping[str, Any]], extra_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Index rows of one shard's records (``INDEX_COLUMNS`` plus scalar ``extra_columns``)."""
    rows = []
    for position, record in enumerate(records):
        row = {
            "face_id": str(record["face_id"]),
            "shard": number,
            "position": position,
            "face_sha256": str(record.get("face_sha256", "")),
            "status": str(record.get("status", "ok")),
            "reason": str(record.get("reason", "")),
        }
        for column in extra_columns:
            value = record.get(column)
            row[column] = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
        rows.append(row)
    return rows


def index_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A shard index as a DataFrame with the standard columns first."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return pd.DataFrame(columns=INDEX_COLUMNS)
    extra = [c for c in frame.columns if c not in INDEX_COLUMNS]
    return frame[INDEX_COLUMNS + extra]

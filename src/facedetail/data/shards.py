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


class FaceShards:
    """A sharded per-face dataset: shard files plus their index (no arrays in memory).

    Attributes:
        shards: one tar file per shard, in shard order (``shard-00000.tar`` ...).
        index: one row per face (``INDEX_COLUMNS`` plus stage-specific scalar columns). Given as a
            DataFrame, or read on first use from ``index_path`` (a parquet file, one row group per
            shard): a stage runner hands its index over as a file, so the process that drives the
            stages never holds per-face rows unless a consumer asks for them.
        shard_sha256: the sha256 of each shard file (same order as ``shards``).
        meta: stage-wide facts (settings hash, UV size, face model kind ...), JSON-serialisable.
        index_path: the parquet file of the index (when ``index`` is not given).
        faces: the number of faces (known without reading the index; else ``len(index)``).
    """

    def __init__(self, shards: Sequence[Path], index: pd.DataFrame | None = None, shard_sha256: Sequence[str] | None = None,
                 meta: Mapping[str, Any] | None = None, *, index_path: str | os.PathLike | None = None, faces: int | None = None) -> None:
        if index is None and index_path is None:
            raise ValueError("FaceShards needs an index DataFrame or an index_path")
        self.shards = list(shards)
        self._index = index
        self.index_path = Path(index_path) if index_path is not None else None
        self.shard_sha256 = list(shard_sha256 or [])
        self.meta = dict(meta or {})
        self._faces = int(faces) if faces is not None else None

    @property
    def index(self) -> pd.DataFrame:
        """The per-face index (read from ``index_path`` on first use)."""
        if self._index is None:
            self._index = pd.read_parquet(self.index_path)
        return self._index

    @index.setter
    def index(self, value: pd.DataFrame) -> None:
        self._index, self._faces = value, None

    @property
    def unloaded_index_path(self) -> Path | None:
        """``index_path`` while the index has not been read into memory (a writer can link the file), else None."""
        return self.index_path if self._index is None else None

    def __len__(self) -> int:
        if self._index is None and self._faces is not None:
            return self._faces
        return len(self.index)

    def __repr__(self) -> str:
        return f"FaceShards({self.num_shards} shard(s), {len(self)} face(s), meta={self.meta})"

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def ok(self) -> pd.DataFrame:
        """Index rows of the faces this stage produced successfully."""
        return self.index[self.index["status"] == "ok"]

    def count(self, status: str = "ok") -> int:
        """Faces with ``status``, counted one index row group (shard) at a time when the index is a file."""
        if self.unloaded_index_path is None:
            return int((self.index["status"] == status).sum())
        return sum(int((batch.column("status").to_numpy(zero_copy_only=False) == status).sum())
                   for batch in _iter_parquet_batches(self.index_path, ["status"]))

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


def _iter_parquet_batches(path: str | os.PathLike, columns: Sequence[str]) -> Iterator[Any]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as handle:
        for group in range(handle.num_row_groups):
            yield handle.read_row_group(group, columns=list(columns))


def shard_face_ids(index_path: str | os.PathLike, number: int) -> list[str]:
    """Face ids of shard ``number`` from an index parquet file, reading only the row groups that can hold it."""
    import pyarrow.parquet as pq

    ids: list[tuple[int, str]] = []
    with pq.ParquetFile(index_path) as handle:
        shard_column = handle.schema_arrow.get_field_index("shard")
        for group in range(handle.num_row_groups):
            stats = handle.metadata.row_group(group).column(shard_column).statistics
            if stats is not None and stats.has_min_max and not (stats.min <= number <= stats.max):
                continue
            table = handle.read_row_group(group, columns=["face_id", "shard", "position"])
            for face_id, shard, position in zip(*(table.column(c).to_pylist() for c in ("face_id", "shard", "position"))):
                if shard == number:
                    ids.append((int(position), str(face_id)))
    return [face_id for _, face_id in sorted(ids)]


def table_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as parquet bytes; an object column that Arrow cannot type is stored as strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = frame.reset_index(drop=True)
    for column in frame.columns:
        if frame[column].dtype == object:
            try:
                pa.array(frame[column], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                frame[column] = [None if v is None or v is pd.NA else str(v) for v in frame[column]]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    return buffer.getvalue()


def concat_parquet(parts: Sequence[str | os.PathLike], destination: str | os.PathLike, columns: Sequence[str] = ()) -> int:
    """Append parquet ``parts`` (one per shard) to ``destination`` as row groups, one part in memory at a time.

    The column types are unified over every part first (a column that is all null in one shard
    takes its type from the others); ``columns`` come first, in that order, even with no rows.
    Written to a temporary file beside ``destination`` and renamed (atomic).

    Returns:
        The number of rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    destination = Path(destination)
    schemas = [pq.read_schema(p).remove_metadata() for p in parts]
    fields = {name: pa.null() for name in columns}
    for schema in schemas:
        for schema_field in schema:
            fields.setdefault(schema_field.name, pa.null())
    schema = pa.unify_schemas([pa.schema(list(fields.items())), *schemas], promote_options="permissive")
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(fd)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for part in parts:
                table = pq.read_table(part).replace_schema_metadata(None)
                if table.num_rows == 0:
                    continue
                for name in schema.names:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
                writer.write_table(table.select(schema.names).cast(schema))
                rows += table.num_rows
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rows


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

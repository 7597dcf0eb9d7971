"""THE face-id rule, shared by ``data_prep``, ``facedetail fit``/``reconstruct`` and the inference pipeline.

A face id is ``<stem>__f<k>``: ``stem`` names the photo (unique within one run, file-name safe) and ``k`` counts
the faces of that photo left to right (MTCNN order). Stems come from :func:`image_stems`:

* relative names keep their folders, ``/`` becoming ``__`` (``dir/a.jpg`` -> ``dir__a``);
* absolute paths (or ones with ``..``) use the file name only (``/data/x/a.jpg`` -> ``a``);
* stems that clash get their extension (``a.jpg`` + ``a.png`` -> ``a_jpg``, ``a_png``);
* stems that still clash are numbered in input order (``x/y.jpg`` + ``x__y.jpg`` -> ``x__y_jpg``, ``x__y_jpg_1``),
  so two photos never share a face id (and an estimate can never be attached to another photo's face).
"""
from __future__ import annotations

from collections import Counter
from pathlib import PurePosixPath
from typing import Sequence


def image_stems(names: Sequence[str]) -> list[str]:
    """One unique, file-name-safe stem per image name (same order); see the module rules."""
    posix = [PurePosixPath(str(name).replace("\\", "/")) for name in names]
    posix = [PurePosixPath(p.name) if p.is_absolute() or ".." in p.parts else p for p in posix]
    stems = [str(p.with_suffix("")).replace("/", "__") or "image" for p in posix]
    counts = Counter(stems)
    out = [f"{stem}_{p.suffix.lstrip('.').lower()}" if counts[stem] > 1 and p.suffix else stem for stem, p in zip(stems, posix)]
    taken = set(out)
    seen: Counter[str] = Counter()
    unique = []
    for stem in out:  # still duplicated (same name twice, or x/y.jpg and x__y.jpg): number them
        seen[stem] += 1
        candidate = stem
        while seen[stem] > 1 and (candidate == stem or candidate in taken):
            candidate = f"{stem}_{seen[stem] - 1}"
            if candidate in taken:
                seen[stem] += 1
        taken.add(candidate)
        unique.append(candidate)
    return unique


def make_face_id(stem: str, face_index: int) -> str:
    """``<stem>__f<k>``: the id of the ``k``-th face (left to right) of the image with that stem."""
    return f"{stem}__f{int(face_index)}"

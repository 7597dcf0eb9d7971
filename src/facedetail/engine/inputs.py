"""Inputs of the inference engine: decoding photos given as paths, bytes, arrays or lazy loaders, and listing image
folders (plain module, no Kedro).

Names: a path input is named by its file name, anything else ``image_<i>``; a folder's files by their path
relative to it (``sub/a.jpg``). Face ids are built from names by :mod:`facedetail.io.face_ids`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar, Union

import numpy as np

from facedetail.io.export import to_uint8_image
from facedetail.io.images import DEFAULT_MAX_PIXELS, ImageReadError, is_image_file, read_image

#: An input photo: a path, encoded bytes, a uint8 RGB array, or a no-argument callable returning bytes (a lazy
#: loader such as a Kedro partition's ``load``).
ImageInput = Union[str, os.PathLike, bytes, bytearray, np.ndarray, Callable[[], bytes]]
#: Extensions taken as images without looking inside (a fast path only: every file of a folder is an input, and
#: files with other names are recognised by their content).
DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm",
                            ".pnm", ".ico")
T = TypeVar("T")


class InputError(ValueError):
    """A folder/file that does not hold usable images (message for the user)."""


def default_name(image: ImageInput, index: int) -> str:
    """File name of a path input, else ``image_<index>``."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name
    return f"image_{index}"


def _suffixes(extensions: Sequence[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def looks_like_image(name: str, extensions: Sequence[str], path: str | os.PathLike | None = None) -> bool:
    """True when ``name`` ends with an image extension, or the file at ``path`` is an image by its content."""
    return name.lower().endswith(_suffixes(extensions)) or (path is not None and is_image_file(path))


def list_images(folder: str | os.PathLike, extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS) -> tuple[list[Path], list[str]]:
    """EVERY file of a folder (recursive, sorted) and its name (path relative to it); a single file is accepted.

    Files are recognised by content, not by name: every file is an input, and one that is not an image gets its
    report row (``not_an_image``) when read. ``extensions`` only spares a look inside for the usual names.

    A sub-folder that cannot be listed (permissions, I/O error) is returned as an entry too: reading it fails with
    its reason, so it gets its report row instead of vanishing.

    Raises:
        InputError: the folder does not exist, cannot be listed, or none of its files is an image (by extension or content).
    """
    root = Path(folder)
    if root.is_file():
        return [root], [root.name]
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    # symlinks count even when broken or looping: reading them gives their report row, never a silent drop;
    # so does a sub-folder that cannot be listed (its read gives "folder cannot be read"), never a silent skip
    unreadable: list[Path] = []

    def _unlistable(error: OSError) -> None:
        if error.filename is not None and Path(error.filename) != root:
            unreadable.append(Path(error.filename))
        else:
            raise InputError(f"cannot read image folder {root}: {error.strerror or error}") from error

    files = []
    for here, _, names in os.walk(root, onerror=_unlistable):
        files.extend(Path(here) / n for n in names)
    files = sorted(files + unreadable)
    if not any(looks_like_image(p.name, extensions, p) for p in files):
        raise InputError(f"no images in {root} ({len(files)} file(s), none of them an image Pillow can read)")
    return files, [p.relative_to(root).as_posix() for p in files]


def select_image_names(items: Mapping[str, T], extensions: Sequence[str]) -> dict[str, T]:
    """The entries whose name ends with one of ``extensions`` (any case), sorted by name (may be empty)."""
    wanted = _suffixes(extensions)
    return {name: items[name] for name in sorted(items) if name.lower().endswith(wanted)}


def load_input_image(image: ImageInput, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An input (path, encoded bytes, an (H, W[, 3|4]) array or a bytes loader) as ``uint8`` RGB (H, W, 3).

    Raises:
        ImageReadError: unreadable file/bytes, or an array that is not an image (the message names ``name``).
    """
    return load_input_frames(image, name, max_pixels)[0]


def load_input_frames(image: ImageInput, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """:func:`load_input_image` and the input's frame/page count (its FIRST frame is the image; arrays: 1)."""
    if callable(image) and not isinstance(image, (np.ndarray, bytes, bytearray, str, os.PathLike)):
        try:
            image = image()
        except Exception as error:  # noqa: BLE001 - permissions, broken links, ...
            raise ImageReadError(f"{name}: cannot read ({type(error).__name__}: {error})", status="unreadable") from error
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) == 0:
            raise ImageReadError(f"{name}: expected an (H, W, 3) RGB array, got shape {image.shape}", status="not_an_image")
        return to_uint8_image(array[..., :3], name), 1
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            loaded = read_image(bytes(image), max_pixels=max_pixels)
        except ImageReadError as error:
            raise ImageReadError(error.reason.replace("<bytes>", name), error.status) from error
        return loaded.rgb, loaded.frames
    if isinstance(image, (str, os.PathLike)):
        loaded = read_image(Path(image), max_pixels=max_pixels)
        return loaded.rgb, loaded.frames
    raise ImageReadError(f"{name}: unsupported input type {type(image).__name__} (expected a path, bytes or an array)",
                         status="not_an_image")

"""A minimal glTF 2.0 binary (``.glb``) writer for one textured triangle mesh (numpy only, no torch, no Kedro).

glTF fixes what OBJ leaves open: **metres**, **+Y up**, +Z forward (the face looks down +Z), UV origin
**top-left** (``v_gltf = 1 - v_obj``; the images are stored top row first, as our UV maps already are), and
tangent-space normal maps in the **OpenGL convention** (+X right, +Y up, +Z out of the surface) relative to the
per-vertex ``TANGENT`` (xyz + handedness w) written here, so engines need not recompute tangents.

The file holds one mesh/node, a ``pbrMetallicRoughness`` material with ``baseColorTexture`` and optionally
``normalTexture``, the PNGs embedded in the binary chunk. trimesh, Blender, three.js and Khronos' validator
read it. (trimesh's own exporter cannot write ``TANGENT``: it prefixes custom attributes with ``_``.)
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facedetail.utils import atomic_write_bytes

GLB_MAGIC = 0x46546C67  # "glTF"
CHUNK_JSON = 0x4E4F534A
CHUNK_BIN = 0x004E4942
ARRAY_BUFFER = 34962
ELEMENT_ARRAY_BUFFER = 34963
FLOAT = 5126
UNSIGNED_INT = 5125


def png_bytes(image_rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8/uint16 RGB -> PNG bytes."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image_rgb)[..., ::-1]))
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return encoded.tobytes()


class _Builder:
    """Collects buffer views / accessors into one 4-byte aligned binary chunk."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.views: list[dict[str, Any]] = []
        self.accessors: list[dict[str, Any]] = []

    def view(self, data: bytes, target: int | None = None) -> int:
        while len(self.blob) % 4:
            self.blob.append(0)
        entry: dict[str, Any] = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)}
        if target is not None:
            entry["target"] = target
        self.blob.extend(data)
        self.views.append(entry)
        return len(self.views) - 1

    def accessor(self, array: np.ndarray, kind: str, target: int, with_bounds: bool = False) -> int:
        if kind == "SCALAR":
            data, component = np.ascontiguousarray(array, "<u4").reshape(-1), UNSIGNED_INT
        else:
            data, component = np.ascontiguousarray(array, "<f4"), FLOAT
        entry: dict[str, Any] = {"bufferView": self.view(data.tobytes(), target), "componentType": component,
                                 "count": int(len(data)), "type": kind}
        if with_bounds:
            entry["min"] = [float(v) for v in data.min(axis=0)]
            entry["max"] = [float(v) for v in data.max(axis=0)]
        self.accessors.append(entry)
        return len(self.accessors) - 1


def write_glb(
    path: str | Path,
    vertices: np.ndarray,
    faces: np.ndarray,
    uv: np.ndarray,
    normals: np.ndarray,
    *,
    tangents: np.ndarray | None = None,
    base_color: np.ndarray | None = None,
    normal_texture: np.ndarray | None = None,
    name: str = "face",
    extras: dict[str, Any] | None = None,
) -> Path:
    """Write one mesh as GLB (atomically).

    Args:
        path: the ``.glb`` file.
        vertices: (V, 3) positions in **metres**, +Y up (convert before: glTF has no unit field).
        faces: (F, 3) vertex indices, counter-clockwise seen from outside.
        uv: (V, 2) **OBJ** UVs (origin bottom-left); written as ``(u, 1 - v)``.
        normals: (V, 3) unit normals.
        tangents: optional (V, 4) ``(T, w)``, ``w (N x T)`` following +v_obj (see
            :func:`facedetail.geometry.tangents.vertex_tangents`); required with ``normal_texture``.
        base_color: optional (H, W, 3) uint8 texture (row 0 = v_obj 1 = top).
        normal_texture: optional (H, W, 3) uint8 tangent-space normal map, OpenGL convention (+Y = green up).
        name: mesh/node/material name.
        extras: JSON-serialisable metadata stored as the asset's ``extras``.
    """
    path = Path(path)
    if path.suffix.lower() != ".glb":
        raise ValueError(f"GLB output must end with .glb, got {path.name}")
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"vertices must be (V, 3) and faces (F, 3), got {vertices.shape} and {faces.shape}")
    if not np.isfinite(vertices).all():
        raise ValueError("vertices hold NaN/inf values")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"faces index 0..{int(faces.max())} but there are {len(vertices)} vertices")
    if normal_texture is not None and tangents is None:
        raise ValueError("a normal texture needs per-vertex tangents (the map is tangent space)")
    uv_gltf = np.stack([np.asarray(uv, np.float64)[:, 0], 1.0 - np.asarray(uv, np.float64)[:, 1]], axis=1)

    build = _Builder()
    attributes = {
        "POSITION": build.accessor(vertices, "VEC3", ARRAY_BUFFER, with_bounds=True),
        "NORMAL": build.accessor(normals, "VEC3", ARRAY_BUFFER),
        "TEXCOORD_0": build.accessor(uv_gltf, "VEC2", ARRAY_BUFFER),
    }
    if tangents is not None:
        attributes["TANGENT"] = build.accessor(tangents, "VEC4", ARRAY_BUFFER)
    indices = build.accessor(faces.reshape(-1), "SCALAR", ELEMENT_ARRAY_BUFFER)

    images: list[dict[str, Any]] = []
    textures: list[dict[str, Any]] = []
    material: dict[str, Any] = {
        "name": name,
        "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 0.7},
        "doubleSided": False,
    }
    for key, image in (("base_color", base_color), ("normal", normal_texture)):
        if image is None:
            continue
        images.append({"bufferView": build.view(png_bytes(image)), "mimeType": "image/png", "name": f"{name}_{key}"})
        textures.append({"sampler": 0, "source": len(images) - 1})
        if key == "base_color":
            material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": len(textures) - 1, "texCoord": 0}
        else:
            material["normalTexture"] = {"index": len(textures) - 1, "texCoord": 0, "scale": 1.0}

    document: dict[str, Any] = {
        "asset": {"version": "2.0", "generator": "facedetail",
                  "extras": {"units": "m", "up": "+Y", "normal_map": "tangent space, OpenGL (+Y green up)",
                             **(extras or {})}},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": name}],
        "meshes": [{"name": name, "primitives": [{"attributes": attributes, "indices": indices, "material": 0, "mode": 4}]}],
        "materials": [material],
        "accessors": build.accessors,
        "bufferViews": build.views,
        "buffers": [{"byteLength": 0}],
    }
    if images:
        document.update(images=images, textures=textures,
                        samplers=[{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}])
    while len(build.blob) % 4:
        build.blob.append(0)
    document["buffers"][0]["byteLength"] = len(build.blob)
    text = json.dumps(document, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(build.blob)
    data = (struct.pack("<III", GLB_MAGIC, 2, total) + struct.pack("<II", len(text), CHUNK_JSON) + text
            + struct.pack("<II", len(build.blob), CHUNK_BIN) + bytes(build.blob))
    return atomic_write_bytes(path, data)


def read_glb_json(path: str | Path) -> dict[str, Any]:
    """The JSON chunk of a GLB file (for checks: accessors, materials, extras)."""
    data = Path(path).read_bytes()
    magic, version, _ = struct.unpack_from("<III", data, 0)
    if magic != GLB_MAGIC or version != 2:
        raise ValueError(f"{path} is not a glTF 2.0 binary")
    length, kind = struct.unpack_from("<II", data, 12)
    if kind != CHUNK_JSON:
        raise ValueError(f"{path}: first chunk is not JSON")
    return json.loads(data[20 : 20 + length])

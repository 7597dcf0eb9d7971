"""Boundary loops of a triangle mesh and closing its inner holes (eyes, mouth) with UVs.

ICT-FaceKit's face-only mesh is open at the eyes and the mouth: renders and exports would show
the background through them. :func:`plan_hole_fill` finds the boundary loops (edges used by one
triangle), keeps the longest one open (the outer face border) and fills every other loop with
concentric rings around a centre vertex:

* every new vertex is an affine combination ``(1 - s) * X[rim] + s * mean(X[loop])`` of original
  vertices (plus a constant offset along the loop's outward normal for the mean shape only), so
  the same combination applied to the identity / expression / albedo bases makes the fill follow
  shape and expression (:meth:`HoleFill.extend`);
* new vertices come after the original ones: every original vertex index (``lmk68``, region
  masks) stays valid;
* eyes (the loop nearest the landmark eye rings 36-41 / 42-47) get a slightly convex, eyeball-like
  cap (``eye_bulge`` x the loop's RMS radius in front of the loop plane); the mouth (nearest the
  inner-lip landmarks 60-67) gets a bowl recessed behind the lips (``mouth_recess`` x its RMS
  radius), so an open mouth shows a shaded cavity (and the photo's dark interior once textured),
  not a membrane at the lip line; other holes are filled flat;
* UVs: rim corners reuse the loop's own UV indices, ring / centre UVs interpolate towards the mean
  of the loop's UVs. On ICT the eye and mouth loops are empty slits in the UV chart (no existing
  triangle inside), so the fill lies inside them and overlaps nothing.

A mesh with a single boundary loop (a disc such as Deng's BFM front model) or none is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Landmark (iBUG-68) groups that name a hole: the nearest loop to each group's centroid.
HOLE_LANDMARKS = {"eye": (tuple(range(36, 42)), tuple(range(42, 48))), "mouth": (tuple(range(60, 68)),)}


def boundary_edges(triangles: np.ndarray) -> np.ndarray:
    """Directed boundary edges ``(E, 2)`` (as they run in their one triangle) of an (F, 3) mesh."""
    tris = np.asarray(triangles, np.int64)
    directed = np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]], axis=0)
    undirected = np.sort(directed, axis=1)
    _, inverse, counts = np.unique(undirected, axis=0, return_inverse=True, return_counts=True)
    return directed[counts[inverse.reshape(-1)] == 1]


def boundary_loops(triangles: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops of a triangle mesh, each an array of vertex ids in edge direction.

    ``loop[i] -> loop[i + 1]`` is a boundary edge as it runs in its triangle (so for a mesh whose
    triangles are counter-clockwise from the front, a hole runs clockwise). A vertex where two
    loops touch is visited by both. An open chain (non-manifold input) is returned as it was walked.
    """
    edges = boundary_edges(triangles)
    outgoing: dict[int, list[int]] = {}
    for a, b in edges.tolist():
        outgoing.setdefault(a, []).append(b)
    loops: list[np.ndarray] = []
    for start in sorted(outgoing):
        while outgoing.get(start):
            loop, current = [start], outgoing[start].pop()
            while current != start and outgoing.get(current):
                loop.append(current)
                current = outgoing[current].pop()
            loops.append(np.asarray(loop, np.int64))
    return loops


def loop_perimeter(vertices: np.ndarray, loop: np.ndarray) -> float:
    """Length of a closed loop of vertices."""
    points = np.asarray(vertices, np.float64)[loop]
    return float(np.linalg.norm(points - np.roll(points, -1, axis=0), axis=1).sum())


def _newell_normal(points: np.ndarray) -> np.ndarray:
    """Unit normal of a closed polygon (right-hand rule along the point order)."""
    nxt = np.roll(points, -1, axis=0)
    normal = np.stack(
        [
            ((points[:, 1] - nxt[:, 1]) * (points[:, 2] + nxt[:, 2])).sum(),
            ((points[:, 2] - nxt[:, 2]) * (points[:, 0] + nxt[:, 0])).sum(),
            ((points[:, 0] - nxt[:, 0]) * (points[:, 1] + nxt[:, 1])).sum(),
        ]
    )
    return normal / max(float(np.linalg.norm(normal)), 1e-12)


@dataclass(frozen=True)
class HoleFill:
    """How to close a mesh's holes; :meth:`extend` applies it to any per-vertex array.

    Attributes:
        n_vertices: vertex count of the open mesh (new vertices are ``n_vertices ..``).
        loops: the filled loops (original vertex ids, edge order); ``kinds``: "eye" / "mouth" / "other".
        rim: (N,) original vertex each new vertex starts from; ``loop_of``: (N,) its loop;
            ``weight``: (N,) ``s`` in ``(1 - s) X[rim] + s mean(X[loop])``.
        offsets: (N, 3) constant shift of each new vertex in the mean shape (bulge / recess).
        triangles: (F_new, 3) fill triangles (same winding as the mesh: the rim edges reversed).
        uv: (T_new, 2) new UV coordinates (indices ``n_uv ..``); ``tri_uv_idx``: (F_new, 3).
    """

    n_vertices: int
    loops: tuple[np.ndarray, ...]
    kinds: tuple[str, ...]
    rim: np.ndarray
    loop_of: np.ndarray
    weight: np.ndarray
    offsets: np.ndarray
    triangles: np.ndarray
    uv: np.ndarray
    tri_uv_idx: np.ndarray

    @property
    def n_new(self) -> int:
        """Number of vertices the fill adds."""
        return int(len(self.rim))

    def new_values(self, values: np.ndarray, with_offsets: bool = False) -> np.ndarray:
        """Values of the new vertices from per-vertex ``values`` (..., V, C) -> (..., N, C).

        ``with_offsets`` adds the bulge / recess (positions of the mean shape only: bases are
        deltas and must not get it).
        """
        values = np.asarray(values)
        means = np.stack([values[..., loop, :].mean(axis=-2) for loop in self.loops], axis=-2) if self.loops else None
        if not self.n_new:
            return values[..., :0, :]
        s = self.weight[:, None].astype(np.float64)
        out = (1.0 - s) * values[..., self.rim, :] + s * means[..., self.loop_of, :]
        if with_offsets:
            out = out + self.offsets
        return out.astype(values.dtype, copy=False)

    def extend(self, values: np.ndarray, with_offsets: bool = False) -> np.ndarray:
        """``values`` (..., V, C) with the new vertices appended: (..., V + N, C)."""
        values = np.asarray(values)
        if values.shape[-2] != self.n_vertices:
            raise ValueError(f"per-vertex array has {values.shape[-2]} vertices, the fill expects {self.n_vertices}")
        return np.concatenate([values, self.new_values(values, with_offsets)], axis=-2)


def plan_hole_fill(
    vertices: np.ndarray,
    triangles: np.ndarray,
    uv: np.ndarray,
    tri_uv_idx: np.ndarray,
    lmk68: np.ndarray | None = None,
    *,
    rings: int = 2,
    eye_bulge: float = 0.2,
    mouth_recess: float = 0.6,
) -> HoleFill:
    """Plan the fill of every boundary loop except the longest (the outer border).

    Args:
        vertices: (V, 3) neutral / mean shape of the open mesh.
        triangles: (F, 3); uv: (T, 2); tri_uv_idx: (F, 3).
        lmk68: iBUG-68 landmark vertex ids, to tell the eyes and the mouth apart (None: all flat).
        rings: concentric rings between a loop and its centre vertex (0: a plain fan).
        eye_bulge: eye cap height in front of the loop plane, in RMS loop radii.
        mouth_recess: mouth bowl depth behind the loop plane, in RMS loop radii.
    """
    vertices = np.asarray(vertices, np.float64)
    triangles = np.asarray(triangles, np.int64)
    tri_uv_idx = np.asarray(tri_uv_idx, np.int64)
    uv = np.asarray(uv, np.float64)
    loops = [loop for loop in boundary_loops(triangles) if len(loop) >= 3]
    if len(loops) > 1:
        outer = int(np.argmax([loop_perimeter(vertices, loop) for loop in loops]))
        holes = [loop for k, loop in enumerate(loops) if k != outer]
    else:
        holes = []
    kinds = _classify_holes(vertices, holes, lmk68)
    corner_uv = _edge_start_uv(triangles, tri_uv_idx)
    n_v, n_uv = len(vertices), len(uv)
    rims, loop_ofs, weights, offsets, new_tris, new_uv, new_tuv = [], [], [], [], [], [], []
    next_v, next_uv = n_v, n_uv
    for h, (loop, kind) in enumerate(zip(holes, kinds)):
        n = len(loop)
        points = vertices[loop]
        centre = points.mean(0)
        normal = _newell_normal(points[::-1])  # the fill's outward side (rim edges reversed)
        radius = float(np.sqrt(((points - centre) ** 2).sum(1).mean()))
        amplitude = {"eye": eye_bulge, "mouth": -mouth_recess}.get(kind, 0.0) * radius
        loop_uv_idx = np.array([corner_uv[(int(loop[i]), int(loop[(i + 1) % n]))] for i in range(n)])
        loop_uv = uv[loop_uv_idx]
        uv_centre = loop_uv.mean(0)
        ring_v = [loop]
        ring_uv = [loop_uv_idx]
        for r in range(1, rings + 1):
            s = r / (rings + 1)
            ids = np.arange(next_v, next_v + n)
            rims.append(loop)
            loop_ofs.append(np.full(n, h))
            weights.append(np.full(n, s))
            offsets.append(np.tile(amplitude * (1 - (1 - s) ** 2) * normal, (n, 1)))
            uv_ids = np.arange(next_uv, next_uv + n)
            new_uv.append((1 - s) * loop_uv + s * uv_centre)
            next_v, next_uv = next_v + n, next_uv + n
            ring_v.append(ids)
            ring_uv.append(uv_ids)
        centre_id, centre_uv = next_v, next_uv
        rims.append(loop[:1])
        loop_ofs.append(np.array([h]))
        weights.append(np.array([1.0]))
        offsets.append((amplitude * normal)[None])
        new_uv.append(uv_centre[None])
        next_v, next_uv = next_v + 1, next_uv + 1
        nxt = np.roll(np.arange(n), -1)
        for r in range(rings):
            a, b, a2, b2 = ring_v[r], ring_v[r][nxt], ring_v[r + 1], ring_v[r + 1][nxt]
            ua, ub, ua2, ub2 = ring_uv[r], ring_uv[r][nxt], ring_uv[r + 1], ring_uv[r + 1][nxt]
            new_tris += [np.stack([b, a, a2], 1), np.stack([b, a2, b2], 1)]
            new_tuv += [np.stack([ub, ua, ua2], 1), np.stack([ub, ua2, ub2], 1)]
        a, b = ring_v[rings], ring_v[rings][nxt]
        new_tris.append(np.stack([b, a, np.full(n, centre_id)], 1))
        new_tuv.append(np.stack([ring_uv[rings][nxt], ring_uv[rings], np.full(n, centre_uv)], 1))
    cat = lambda parts, shape, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)  # noqa: E731
    return HoleFill(
        n_vertices=n_v,
        loops=tuple(holes),
        kinds=tuple(kinds),
        rim=cat(rims, (0,), np.int64),
        loop_of=cat(loop_ofs, (0,), np.int64),
        weight=cat(weights, (0,), np.float64),
        offsets=cat(offsets, (0, 3), np.float64),
        triangles=cat(new_tris, (0, 3), np.int64),
        uv=cat(new_uv, (0, 2), np.float64),
        tri_uv_idx=cat(new_tuv, (0, 3), np.int64),
    )


def _edge_start_uv(triangles: np.ndarray, tri_uv_idx: np.ndarray) -> dict[tuple[int, int], int]:
    """Directed edge ``(a, b)`` -> UV index of its corner ``a`` in the triangle that holds it."""
    out: dict[tuple[int, int], int] = {}
    for k in range(3):
        a, b, t = triangles[:, k], triangles[:, (k + 1) % 3], tri_uv_idx[:, k]
        out.update(zip(zip(a.tolist(), b.tolist()), t.tolist()))
    return out


def _classify_holes(vertices: np.ndarray, holes: list[np.ndarray], lmk68: np.ndarray | None) -> list[str]:
    """Hole kinds: eye / mouth for the hole nearest each landmark group's centroid, other elsewhere."""
    kinds = ["other"] * len(holes)
    if lmk68 is None or not holes or len(lmk68) != 68:
        return kinds
    centres = np.stack([vertices[h].mean(0) for h in holes])
    sizes = np.array([np.sqrt(((vertices[h] - vertices[h].mean(0)) ** 2).sum(1).mean()) for h in holes])
    for kind, groups in HOLE_LANDMARKS.items():
        for group in groups:
            target = vertices[np.asarray(lmk68)[list(group)]].mean(0)
            dist = np.linalg.norm(centres - target, axis=1)
            k = int(np.argmin(dist))
            if dist[k] < 3.0 * max(sizes[k], 1e-12) and kinds[k] == "other":
                kinds[k] = kind
    return kinds


def fill_uv_fold_count(uv: np.ndarray, tri_uv_idx: np.ndarray, reference_sign: float) -> int:
    """Number of UV triangles whose signed area has the opposite sign of ``reference_sign``."""
    corners = np.asarray(uv, np.float64)[np.asarray(tri_uv_idx)]
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    return int((np.sign(area) * np.sign(reference_sign) < 0).sum())

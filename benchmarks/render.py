"""Benchmark the rasterizer backends: forward + backward of a photometric loss.

ICT-FaceKit face mesh (18,460 faces) at 224x224, batch 1 and 8, fast and pytorch3d backends in the
same process; then a BFM-size mesh (the ICT mesh subdivided once: 73,840 faces) at batch 8 with the
fast backend. Reports medians of ``--repeats`` runs (after one warm-up). The LAST line is
``speedup_vs_pytorch3d=<ratio>`` (batch 1 on the benchmark device: pytorch3d time / fast time).

Usage (from the repository root)::

    python benchmarks/render.py [--device cpu|cuda|auto] [--threads 2] [--repeats 3]

OpenMP's default busy-waiting makes multi-threaded torch ops on a shared, busy CPU tens of times
slower (each op waits for a descheduled worker); this script sets ``OMP_WAIT_POLICY=PASSIVE``
(unless already set) before importing torch, which removes that.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see docstring

import numpy as np  # noqa: E402
import torch  # noqa: E402

from facedetail.render import interpolate, pytorch3d_available, rasterize  # noqa: E402
from facedetail.utils import resolve_device  # noqa: E402

DEFAULT_ICT_PATH = Path(__file__).resolve().parents[2] / "shared" / "assets" / "ict_facekit" / "ict_face_only_9409.npz"
IMAGE_SIZE = 224


def load_ict(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Neutral vertices (cm) and triangles of the ICT face mesh."""
    if not path.exists():
        raise FileNotFoundError(f"ICT-FaceKit mesh not found at {path} (set --ict-path or FACEDETAIL_ICT_PATH)")
    data = np.load(path)
    return data["neutral"].astype(np.float32), data["tris"].astype(np.int64)


def subdivide(vertices: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One loop-free midpoint subdivision (4x faces)."""
    import trimesh

    new_vertices, new_triangles = trimesh.remesh.subdivide(vertices, triangles)
    return new_vertices.astype(np.float32), new_triangles.astype(np.int64)


def project(vertices: torch.Tensor) -> torch.Tensor:
    """Deng-style pinhole projection of the ICT head (cm) into a 224 crop: (x_px, y_px, depth)."""
    depth = 130.0 - vertices[..., 2]
    x = 1015.0 * vertices[..., 0] / depth + IMAGE_SIZE / 2
    y = IMAGE_SIZE / 2 - 1015.0 * (vertices[..., 1] - 0.4) / depth
    return torch.stack([x, y, depth], -1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    backend: str, vertices: torch.Tensor, faces: torch.Tensor, batch: int, device: torch.device, seed: int
) -> float:
    """Seconds for one forward + backward of a masked L1 photometric loss on per-vertex colours."""
    generator = torch.Generator().manual_seed(seed)
    jitter = 0.05 * torch.randn(batch, *vertices.shape, generator=generator)
    screen = project(vertices[None] + jitter).to(device).requires_grad_(True)
    colours = torch.rand(batch, vertices.shape[0], 3, generator=generator).to(device).requires_grad_(True)
    target = torch.rand(batch, IMAGE_SIZE, IMAGE_SIZE, 3, generator=generator).to(device)
    faces = faces.to(device)
    synchronize(device)
    start = time.perf_counter()
    fragments = rasterize(screen, faces, IMAGE_SIZE, backend=backend)
    image = interpolate(fragments, faces, colours)
    loss = ((image - target).abs() * fragments.mask[..., None]).sum() / fragments.mask.sum().clamp(min=1)
    loss.backward()
    synchronize(device)
    return time.perf_counter() - start


def median_time(
    backend: str, vertices: torch.Tensor, faces: torch.Tensor, batch: int, device: torch.device, repeats: int
) -> float:
    """Median of ``repeats`` timed runs after one (batch 1) warm-up run."""
    time_step(backend, vertices, faces, 1, device, seed=0)
    return statistics.median(time_step(backend, vertices, faces, batch, device, seed=i + 1) for i in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median; >= 3)")
    parser.add_argument("--ict-path", type=Path, default=Path(os.environ.get("FACEDETAIL_ICT_PATH", DEFAULT_ICT_PATH)))
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    vertices_np, faces_np = load_ict(args.ict_path)
    vertices, faces = torch.from_numpy(vertices_np), torch.from_numpy(faces_np)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={device} threads={torch.get_num_threads()} repeats={args.repeats} image={IMAGE_SIZE}x{IMAGE_SIZE} "
        f"load_average_1min={load:.1f} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )

    results: dict[tuple[str, int], float] = {}
    backends = ["fast"] + (["pytorch3d"] if pytorch3d_available() else [])
    for batch in (1, 8):
        for backend in backends:
            seconds = median_time(backend, vertices, faces, batch, device, args.repeats)
            results[(backend, batch)] = seconds
            print(f"ict faces={faces.shape[0]} batch={batch} backend={backend}: {seconds * 1000:.1f} ms fwd+bwd")
        if "pytorch3d" in backends:
            ratio = results[("pytorch3d", batch)] / results[("fast", batch)]
            print(f"  batch {batch} speedup fast vs pytorch3d: {ratio:.1f}x")

    big_vertices_np, big_faces_np = subdivide(vertices_np, faces_np)
    big_vertices, big_faces = torch.from_numpy(big_vertices_np), torch.from_numpy(big_faces_np)
    seconds = median_time("fast", big_vertices, big_faces, 8, device, args.repeats)
    print(f"bfm-size faces={big_faces.shape[0]} batch=8 backend=fast: {seconds * 1000:.1f} ms fwd+bwd")

    if "pytorch3d" not in backends:
        print("pytorch3d not available: no speedup measured")
        print("speedup_vs_pytorch3d=nan")
        return
    print(f"speedup_vs_pytorch3d={results[('pytorch3d', 1)] / results[('fast', 1)]:.1f}")


if __name__ == "__main__":
    main()

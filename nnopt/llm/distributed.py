"""Layer-by-layer calibration (GPTQ) data-parallel over processes launched by ``torchrun`` (gloo, CPU).

Every process (rank) runs the whole layer-by-layer engine (:mod:`nnopt.llm.layerwise`) on its own share of
the calibration windows: rank 0 gets the calibration tokens (the shipped calibration text through the
checkpoint's tokenizer, or the caller's ids) and sends them to the others, and each rank keeps a contiguous
block of windows (:func:`shard_tokens`). At each decoder layer, before the statistics are used, the ranks
all-reduce them (:func:`hessian_all_reduce`: the unnormalized Hessian sums ``XᵀX`` and token counts summed,
the per-channel ``max |x|`` maximized), so every rank holds the statistics of the whole calibration set and
reaches the same codes; with a per-matrix algorithm (GPTQ) the matrices of a layer are also shared out
between the ranks and their codes broadcast (:func:`split_per_matrix`), so each solve runs once. Each rank
then carries its own windows through the quantized layer.

The result equals one process on every window: the same statistics (up to the order of float64 additions
where a rank's windows are not exactly one of the single run's batches, see the tests) and the same codes.

Rank 0 writes ``out_dir``. The other ranks run the same writer into a scratch directory beside it
(``.NAME.nnopt-rank<R>``), deleted when the run succeeds; it keeps their carried hidden states so that a
killed run resumes from its last finished layer, as one process does (when every rank kept its partial
work; else every rank starts again). One process (no ``WORLD_SIZE`` above 1) is exactly
:func:`nnopt.llm.layerwise.quantize_checkpoint_layerwise`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nnopt import errors
from nnopt.errors import ConfigError
from nnopt.llm import layerwise, streaming
from nnopt.llm.gptq import GPTQConfig, gptq_codes_consuming
from nnopt.llm.layerwise import CalibrationConfig, InputStats, LayerAlgorithm, LayerContext, LayerMethod, StatsReducer
from nnopt.quantization.weights import WeightQuantConfig

# A collective waits this long for the slowest rank (one layer's forward passes and solves on a big model
# can take tens of minutes on CPUs); torchrun stops every rank when one fails, so nothing waits this long
# for a rank that died.
DEFAULT_TIMEOUT_S = 4 * 3600.0
SCRATCH = ".{}.nnopt-rank{}"


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its node) and the
    process ``group`` its collectives use (None: the default group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the output and reports progress."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


@contextlib.contextmanager
def distributed_context(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistributedContext]:
    """This process's :class:`DistributedContext` from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without ``WORLD_SIZE`` (or with 1), one process.

    With several processes it joins the gloo process group (``env://``) and leaves it when the block ends
    without an exception; a group the caller already initialized is used as it is (through a gloo group
    of its ranks where its backend is not gloo: the engine's tensors live on the CPU) and left open."""
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ConfigError(f"environment variable WORLD_SIZE must be at least 1, got {world}")
    import torch.distributed as dist

    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        yield DistributedContext()
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process (without torchrun)")
    if dist.is_initialized():
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), group)
        return
    rank = _env_int("RANK", -1)
    if not 0 <= rank < world:
        raise ConfigError(f"environment variable RANK must be in [0, {world}) with WORLD_SIZE={world}, got "
                          f"{os.environ.get('RANK')!r}: launch with torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with torchrun")
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    yield DistributedContext(rank, world, _env_int("LOCAL_RANK", 0), None)
    # Left only when every rank got here: a rank that failed leaves the group as it is (tearing it down
    # while the others wait in a collective can hang them; torchrun stops them), and the others leave
    # together, none while another still reads its last message.
    dist.barrier()
    dist.destroy_process_group()


def shard_tokens(tokens: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous block of the ``(windows, window)`` calibration tokens: sizes differ by at
    most one and the blocks, in rank order, are the windows in order (a rank whose windows are whole
    batches of the one-process run then computes exactly that run's partial sums)."""
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not in a world of {world} processes")
    count = int(tokens.shape[0])
    if count < world:
        raise ConfigError(f"{count} calibration windows cannot be shared by {world} processes: every process "
                          "needs at least one window; use more windows or fewer processes")
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return tokens[start:start + base + (1 if rank < extra else 0)]


def _signature(stats: dict[str, InputStats]) -> torch.Tensor:
    """A digest of the names and shapes that this rank is about to reduce, as int64 values."""
    text = "\n".join(f"{name} {tuple(s.hessian.shape)} {tuple(s.absmax.shape)}" for name, s in stats.items())
    digest = hashlib.sha256(text.encode()).digest()
    return torch.tensor([int.from_bytes(digest[i:i + 7], "big") for i in (0, 7, 14)], dtype=torch.int64)


def hessian_all_reduce(stats: dict[str, InputStats], group: Any = None) -> None:
    """A :data:`nnopt.llm.layerwise.StatsReducer`: sums every rank's unnormalized Hessian ``XᵀX`` (float64)
    and token count and takes the maximum of ``absmax``, in place, over the ranks of ``group`` (default:
    the whole process group). First checks that every rank reduces the same names and shapes (a rank
    that resumed at another layer, or read another checkpoint) and raises :class:`ConfigError` on every
    rank if not, instead of adding unrelated statistics."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    mine = _signature(stats)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    if any(not torch.equal(other, mine) for other in everyone):
        layers = sorted({name.rsplit(".", 3)[0] for name in stats}) or ["(no statistics)"]
        raise ConfigError(f"the processes disagree on the layer being calibrated (this one, rank "
                          f"{dist.get_rank()}, is at {', '.join(layers)}): they resumed from different partial "
                          "work or read different checkpoints; delete the partial directories "
                          "(.NAME.nnopt-partial, .NAME.nnopt-rank*) and run again")
    if not stats:
        return
    for entry in stats.values():
        if entry.hessian.is_contiguous():
            dist.all_reduce(entry.hessian, op=dist.ReduceOp.SUM, group=group)
        else:
            reduced = entry.hessian.contiguous()
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
            entry.hessian.copy_(reduced)
    # the small ones in one message each
    peaks = torch.cat([entry.absmax.reshape(-1).float() for entry in stats.values()])
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
    counts = torch.tensor([entry.tokens for entry in stats.values()], dtype=torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for k, entry in enumerate(stats.values()):
        size = entry.absmax.numel()
        entry.absmax.copy_(peaks[offset:offset + size].view_as(entry.absmax).to(entry.absmax.dtype))
        offset += size
        entry.tokens = int(counts[k])


# (full weight name, float32 weight, float64 Hessian, last: this rank's last use of that Hessian, which the
# algorithm may then overwrite) -> codes; GPTQ: nnopt.llm.gptq.gptq_codes_consuming
ConsumingAlgorithm = Callable[[str, torch.Tensor, torch.Tensor, bool], streaming.Codes]


def split_per_matrix(algorithm: ConsumingAlgorithm, context: DistributedContext) -> LayerMethod:
    """:func:`nnopt.llm.layerwise.per_matrix` with each layer's matrices shared out between the ranks
    (largest estimated cost first, each to the least loaded rank; the same plan on every rank) and each
    matrix's codes broadcast from the rank that computed them: every rank gets every code, each solve
    runs once. The codes equal the one-process ones since every rank holds the same reduced Hessians.
    Each Hessian is dropped after this rank's last use of it (at once where another rank solves all its
    matrices), as the one-process GPTQ does: nothing reads the statistics after the method."""
    import torch.distributed as dist

    def cost(module: torch.nn.Linear) -> float:
        out_f, in_f = module.weight.shape  # GPTQ: the lazy updates ~ out·in², the inverse ~ in³
        return float(in_f) * in_f * (out_f + 2 * in_f)

    def method(layer: LayerContext) -> dict[str, streaming.Codes]:
        load = [0.0] * context.world_size
        owner: dict[str, int] = {}
        for name in sorted(layer.linears, key=lambda n: (-cost(layer.linears[n]), n)):
            rank = min(range(context.world_size), key=lambda r: (load[r], r))
            owner[name] = rank
            load[rank] += cost(layer.linears[name])
        stats = layer.stats  # the engine's own dict
        mine = [name for name in layer.linears if owner[name] == context.rank]
        last = {id(stats[name]): name for name in mine}
        for name in [n for n in stats if id(stats[n]) not in last]:
            del stats[name]  # solved elsewhere
        result: dict[str, streaming.Codes] = {}
        for name in mine:
            entry = stats[name]
            final = last[id(entry)] == name
            result[name] = algorithm(name, layer.linears[name].weight.detach().float(), entry.hessian, final)
            if final:
                for user in [n for n, e in stats.items() if e is entry]:
                    del stats[user]
            del entry
        for name in layer.linears:  # the same order on every rank
            src = owner[name]
            if src == context.rank:
                codes, step, zero = (t.contiguous() for t in result[name])
                header = torch.tensor([*step.shape, *codes.shape], dtype=torch.int64)
            else:
                header = torch.empty(4, dtype=torch.int64)
            dist.broadcast(header, src=src, group=context.group)
            if src != context.rank:
                rows, cols, out_f, in_f = (int(v) for v in header)
                codes = torch.empty(out_f, in_f, dtype=torch.int8)
                step = torch.empty(rows, cols, dtype=torch.float32)
                zero = torch.empty(rows, cols, dtype=torch.int8)
            for tensor in (codes, step, zero):
                dist.broadcast(tensor, src=src, group=context.group)
            result[name] = (codes, step, zero)
        return result

    return method


def quantize_checkpoint_gptq_distributed(
    src_dir: str | Path, out_dir: str | Path, config: WeightQuantConfig, *, gptq: GPTQConfig | None = None,
    calibration: CalibrationConfig | None = None, tokens: torch.Tensor | None = None,
    progress: streaming.ProgressFn | None = None, include_lm_head: bool = False,
    shard_bytes: int = streaming.DEFAULT_SHARD_BYTES, context: DistributedContext | None = None,
) -> dict[str, Any]:
    """:func:`nnopt.llm.layerwise.quantize_checkpoint_gptq`, data-parallel over the processes torchrun
    started (every process calls it with the same arguments; rank 0 writes ``out_dir``), each layer's
    matrices shared out between them (:func:`split_per_matrix`). ``context``: an open
    :func:`distributed_context` (default: one for this call). One process is that function itself; with
    several, the output is the one-process output (same method name and settings, so the same
    config.json; the tests compare them). Returns what
    :func:`quantize_checkpoint_layerwise_distributed` returns."""
    if context is None:
        with distributed_context() as opened:
            return quantize_checkpoint_gptq_distributed(
                src_dir, out_dir, config, gptq=gptq, calibration=calibration, tokens=tokens, progress=progress,
                include_lm_head=include_lm_head, shard_bytes=shard_bytes, context=opened)
    gptq = gptq or GPTQConfig()
    config.validate()
    gptq.validate(config)
    if context.world_size == 1:
        result = layerwise.quantize_checkpoint_gptq(src_dir, out_dir, config, gptq=gptq, calibration=calibration,
                                                    tokens=tokens, progress=progress,
                                                    include_lm_head=include_lm_head, shard_bytes=shard_bytes)
        result.update(world_size=1, rank_windows=result["calibration_windows"])
        return result

    def solve(name: str, weight: torch.Tensor, h: torch.Tensor, last: bool) -> streaming.Codes:
        return gptq_codes_consuming(weight, h, config, gptq, consume=last)

    return quantize_checkpoint_layerwise_distributed(
        src_dir, out_dir, config, layer_method=split_per_matrix(solve, context), method="nnopt-gptq",
        settings={"gptq": dataclasses.asdict(gptq)}, calibration=calibration, tokens=tokens, progress=progress,
        include_lm_head=include_lm_head, shard_bytes=shard_bytes, context=context)


def quantize_checkpoint_layerwise_distributed(
    src_dir: str | Path, out_dir: str | Path, config: WeightQuantConfig, algorithm: LayerAlgorithm | None = None,
    *, layer_method: LayerMethod | None = None, method: str, settings: dict[str, Any],
    calibration: CalibrationConfig | None = None, tokens: torch.Tensor | None = None,
    progress: streaming.ProgressFn | None = None, include_lm_head: bool = False,
    shard_bytes: int = streaming.DEFAULT_SHARD_BYTES, quantize: bool = True,
    input_activations: dict[str, Any] | None = None, config_entries: dict[str, Any] | None = None,
    context: DistributedContext | None = None, split_solves: bool = True,
) -> dict[str, Any]:
    """:func:`nnopt.llm.layerwise.quantize_checkpoint_layerwise` data-parallel over torchrun's processes.

    Every rank calls it with the same arguments. A per-matrix ``algorithm`` has its solves shared out
    (``split_solves``, :func:`split_per_matrix`); a ``layer_method`` runs on every rank and must reach the
    same decision everywhere from the reduced ``stats``: ``context.inputs`` and ``context.forward`` only
    see this rank's windows. ``progress`` is called on rank 0 only. Returns rank 0's figures (on every
    rank; ``calibration_windows`` and ``calibration_tokens`` count every rank's) plus ``world_size`` and
    ``rank_windows`` (this rank's share)."""
    if context is None:
        with distributed_context() as opened:
            return quantize_checkpoint_layerwise_distributed(
                src_dir, out_dir, config, algorithm, layer_method=layer_method, method=method,
                settings=settings, calibration=calibration, tokens=tokens, progress=progress,
                include_lm_head=include_lm_head, shard_bytes=shard_bytes, quantize=quantize,
                input_activations=input_activations, config_entries=config_entries, context=opened,
                split_solves=split_solves)
    options: dict[str, Any] = dict(method=method, settings=settings, calibration=calibration,
                                   include_lm_head=include_lm_head, shard_bytes=shard_bytes, quantize=quantize,
                                   input_activations=input_activations, config_entries=config_entries)
    if context.world_size == 1:
        result = layerwise.quantize_checkpoint_layerwise(src_dir, out_dir, config, algorithm,
                                                         layer_method=layer_method, tokens=tokens,
                                                         progress=progress, **options)
        result.update(world_size=1, rank_windows=result["calibration_windows"])
        return result
    if (algorithm is None) == (layer_method is None):
        raise ConfigError("quantize_checkpoint_layerwise_distributed takes an algorithm or a layer_method, "
                          "exactly one")
    import torch.distributed as dist

    src, out = Path(src_dir), Path(out_dir)
    everyone = _from_rank0(lambda: _prepare(src, out, calibration or CalibrationConfig(), tokens), context)
    mine = shard_tokens(everyone, context.rank, context.world_size)
    scratch_root = out.parent / SCRATCH.format(out.name, context.rank)
    target = out if context.is_main else scratch_root / out.name
    _agree_on_resume(target, context)
    if algorithm is not None and split_solves:
        plain = algorithm
        layer_method, algorithm = split_per_matrix(lambda name, w, h, last: plain(name, w, h), context), None
    reducer: StatsReducer = functools.partial(hessian_all_reduce, group=context.group)
    result = layerwise.quantize_checkpoint_layerwise(
        src, target, config, algorithm, layer_method=layer_method, tokens=mine,
        progress=progress if context.is_main else None, reduce_stats=reducer, **options)
    if not context.is_main:
        shutil.rmtree(scratch_root)  # a whole copy of the output: rank 0's is the one kept
    figures = [result]
    dist.broadcast_object_list(figures, src=0, group=context.group)  # also: rank 0's output is in place
    final = dict(figures[0])
    final.update(calibration_windows=int(everyone.shape[0]), calibration_tokens=int(everyone.numel()),
                 world_size=context.world_size, rank_windows=int(mine.shape[0]))
    return final


# ------------------------------------------------------------------------------------------ helpers


def _prepare(src: Path, out: Path, calibration: CalibrationConfig, tokens: torch.Tensor | None) -> torch.Tensor:
    """Rank 0's checks that only it can make, and the calibration tokens every rank will share."""
    calibration.validate()
    if out.exists():
        raise errors.OutputError(f"refusing to write {out}: it exists")
    return layerwise._calibration_tokens(src, calibration, tokens, layerwise._model_config(src))


def _from_rank0(make: Callable[[], torch.Tensor], context: DistributedContext) -> torch.Tensor:
    """``make()`` on rank 0, sent to every rank; an nnopt error raised there is raised on every rank (the
    others would otherwise wait for tokens that never come)."""
    import torch.distributed as dist

    message: list[Any] = [None]
    if context.is_main:
        try:
            message[0] = ("ok", make())
        except errors.NnoptError as exc:
            message[0] = ("error", type(exc).__name__, str(exc))
            dist.broadcast_object_list(message, src=0, group=context.group)
            raise
    dist.broadcast_object_list(message, src=0, group=context.group)
    if message[0][0] == "error":
        kind = getattr(errors, message[0][1], errors.NnoptError)
        raise kind(f"rank 0: {message[0][2]}")
    tokens: torch.Tensor = message[0][1]
    return tokens


def _done_units(target: Path) -> int:
    try:
        state = json.loads((streaming.partial_dir(target) / streaming.PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return 0
    done = state.get("done_units") if isinstance(state, dict) else None
    return len(done) if isinstance(done, list) else 0


def _agree_on_resume(target: Path, context: DistributedContext) -> None:
    """Resume only when every rank kept the same amount of partial work; else every rank starts again
    (a rank that resumed at another layer would add its statistics to another layer's)."""
    import torch.distributed as dist

    if not context.is_main and target.exists():
        shutil.rmtree(target)  # a finished scratch copy whose deletion was interrupted
    done = torch.tensor([_done_units(target)], dtype=torch.int64)
    everyone = [torch.empty_like(done) for _ in range(context.world_size)]
    dist.all_gather(everyone, done, group=context.group)
    counts = [int(t) for t in everyone]
    if len(set(counts)) > 1:
        partial = streaming.partial_dir(target)
        if partial.exists():
            shutil.rmtree(partial)
        if context.is_main:
            print(f"nnopt: the processes' partial work differs (finished units per rank: {counts}); every "
                  "process starts again", flush=True)

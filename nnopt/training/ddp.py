"""Data-parallel fine-tuning with ``torch.distributed`` DistributedDataParallel (DDP).

Every rank walks the same global batch order as :func:`nnopt.training.train` with the same seed
(it runs the very same ``Split.batches`` shuffle) and takes its contiguous shard of each global
batch (``torch.tensor_split``: sizes differ by at most one row). DDP averages gradients over
ranks, so each rank scales its mean shard loss by ``rows_on_rank * world_size / rows_in_batch``:
the averaged gradient is then exactly the gradient of the mean loss over the whole global batch,
for every batch, including a last smaller one and shards of unequal (even zero) size. Nothing is
dropped and no divisibility is required; with the same seed the weights match single-process
training within floating-point tolerance (only summation order differs).

Limits of that equivalence: BatchNorm in training mode normalizes with per-shard statistics (CPU
has no SyncBatchNorm), and dropout draws different masks per rank, so such models train validly
but not bit-comparably to one process. A custom ``loss(logits, x, y)`` must be a mean over rows.

Training callbacks (pruning masks, gradual schedules, QAT observer freezing, best-on-validation)
run on every rank after each step and epoch, exactly as in :func:`nnopt.training.train`; every rank
holds the same weights after each step, so they make the same decisions. Rank 0's final callback
state (``checkpoint_state()``) comes back to the caller's callbacks (``restore_state``), so code
that reads them after training (a pruner's schedule, the best epoch) sees the run that happened.

Backend: ``nccl`` when CUDA is available with a GPU for every rank, else ``gloo`` on CPU. Runs
with callbacks or a custom loss always use ``gloo`` on CPU: their tensors (masks, teachers,
held-out data) live on the CPU. Each rank uses one torch thread, so ``world_size`` ranks use
``world_size`` cores.

The ranks are started with ``spawn``: each imports the caller's ``__main__`` module again, so a
script that trains data-parallel must do so under ``if __name__ == "__main__":`` (the ``nnopt``
command and ``python -m nnopt`` already do). Without the guard nnopt stops with an error naming it.

Two entry points: :func:`ddp_train` (spawns the ranks from Python) and a torchrun command::

    torchrun --nproc_per_node 2 -m nnopt.training.ddp --arch simplenet --epochs 2 --out out/ddp
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt.data import Split
from nnopt.errors import ConfigError
from nnopt.progress import track
from nnopt.training import (
    TrainCallback,
    TrainConfig,
    TrainHistory,
    check_data_parallel,
    epoch_status,
    run_after_epoch,
)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_WEIGHTS = "weights.safetensors"
_HISTORY = "history.json"
_CALLBACKS = "callbacks.pt"  # rank 0's callback states: tensors, numbers, lists, dicts (weights_only)


@dataclasses.dataclass
class DDPHistory(TrainHistory):
    """A :class:`TrainHistory` (global per-epoch loss and accuracy, all ranks pooled) plus how it ran.

    ``seconds`` is rank 0's training loop, comparable to ``train``'s; ``wall_seconds`` also counts
    starting the processes and the process group.
    """

    world_size: int = 1
    backend: str = "gloo"
    wall_seconds: float = 0.0


def ddp_train(
    model: nn.Module,
    data: Split,
    config: TrainConfig = TrainConfig(),
    world_size: int = 2,
    loss: LossFn | None = None,
    eval_data: Split | None = None,
    callbacks: Sequence[TrainCallback] = (),
    progress: bool | None = None,
) -> DDPHistory:
    """Fine-tune ``model`` with ``world_size`` DDP processes; the trained weights are loaded into it.

    Each process gets a private copy of ``model``, ``callbacks`` and ``data`` (pickled by
    ``torch.multiprocessing``, nothing read from disk except rank 0's results in a private temporary
    folder: safetensors weights, JSON history, callback states read with ``weights_only=True``).
    ``loss`` and ``callbacks`` must be picklable (module-level functions or classes). Like
    :func:`nnopt.training.train`, this leaves ``model`` in eval mode; ``progress`` (None: only on
    a terminal) shows rank 0's progress bar.

    >>> model = create_model("simplenet", seed=0)
    >>> history = ddp_train(model, load_digits().train, TrainConfig(epochs=2), world_size=2)  # doctest: +SKIP
    """
    check_data_parallel(world_size, "world_size")
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    require_distributed()
    _refuse_while_bootstrapping()
    _check_picklable(loss, callbacks, world_size)
    from safetensors.torch import load_file

    backend = "gloo" if callbacks or loss is not None else pick_backend(world_size)
    started = time.perf_counter()
    # Private copies: pickling for the child processes moves tensors into shared memory, and the
    # caller's model, callbacks, loss and data should stay as they are. Model, callbacks and loss
    # are copied together, so those that hold the model's layers (pruning masks, a weight penalty)
    # keep holding the copy's.
    private_model, private_callbacks, private_loss = copy.deepcopy((model, list(callbacks), loss))
    show = sys.stderr.isatty() if progress is None else progress  # decided here: children share the terminal
    payload = (private_model.cpu(), private_callbacks, _copy(data), config, private_loss,
               None if eval_data is None else _copy(eval_data), show)
    with tempfile.TemporaryDirectory(prefix="nnopt-ddp-") as tmp:
        _spawn(world_size, backend, payload, tmp)
        model.load_state_dict(load_file(str(Path(tmp) / _WEIGHTS)))  # safetensors: plain tensors, no code
        record = json.loads((Path(tmp) / _HISTORY).read_text())
        callback_states = _load_callback_states(Path(tmp) / _CALLBACKS, callbacks)
    for callback, callback_state in zip(callbacks, callback_states, strict=True):
        if callback_state is not None:
            # A callback that returned a state defines restore_state too (TrainCallback's docstring).
            callback.restore_state(callback_state, model)  # type: ignore[attr-defined]
    model.eval()
    return DDPHistory(**record, wall_seconds=time.perf_counter() - started)


def _refuse_while_bootstrapping() -> None:
    """A spawned process re-imports the caller's ``__main__``; training from its top level would
    start processes from inside a starting process, which Python refuses with a long traceback."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise ConfigError(
            "data-parallel training was started while a new process imported your script: put the code that "
            "trains under `if __name__ == \"__main__\":` (the processes are started with spawn)"
        )


def _spawn(world_size: int, backend: str, payload: tuple[Any, ...], out_dir: str) -> None:
    """Run the ranks; a rank that fails becomes one error carrying its message (the last line it raised)."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_spawn_rank, args=(world_size, _free_port(), backend, payload, out_dir), nprocs=world_size,
                 join=True)
    except mp.ProcessRaisedException as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise ConfigError(f"data-parallel training failed in a process: {lines[-1] if lines else exc}") from None
    except mp.ProcessExitedException as exc:
        raise ConfigError(f"data-parallel training failed: {exc} (if this is a script, is its training under "
                          "`if __name__ == \"__main__\":`?)") from None


def _load_callback_states(path: Path, callbacks: Sequence[TrainCallback]) -> list[Any]:
    """Rank 0's callback states; they may hold tensors, numbers, strings, lists and dicts only."""
    if not callbacks:
        return []
    try:
        states: list[Any] = torch.load(path, weights_only=True, map_location="cpu")
        return states
    except Exception as exc:  # noqa: BLE001  (the unpickler raises several types)
        names = ", ".join(type(c).__name__ for c in callbacks)
        raise ConfigError(f"the trained weights are loaded, but a callback's state ({names}) could not come back "
                          f"from the processes: checkpoint_state() may hold only tensors, numbers, strings, lists "
                          f"and dicts ({type(exc).__name__})") from None


def _check_picklable(loss: LossFn | None, callbacks: Sequence[TrainCallback], world_size: int) -> None:
    """Say which piece cannot travel to the processes, before any process starts."""
    import pickle

    for what, value in (("loss", loss), *((f"callback {type(c).__name__}", c) for c in callbacks)):
        try:
            pickle.dumps(value)
        except Exception as exc:  # noqa: BLE001  (pickling raises many types)
            raise ConfigError(
                f"data-parallel training on {world_size} processes needs a picklable {what} (a module-level "
                f"function or class instance): {type(exc).__name__}: {exc}"
            ) from None


def require_distributed() -> None:
    """Raise ``RuntimeError`` with the reason when this torch build cannot run CPU data parallelism."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available() and not torch.cuda.is_available():
        raise RuntimeError("the gloo backend of torch.distributed is not available in this torch build")


def pick_backend(local_world_size: int) -> str:
    """``nccl`` when every local rank can have its own GPU and nccl is built in, else ``gloo``."""
    import torch.distributed as dist

    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def train_rank(
    model: nn.Module,
    data: Split,
    config: TrainConfig,
    loss: LossFn | None = None,
    eval_data: Split | None = None,
    device: torch.device | str = "cpu",
    callbacks: Sequence[TrainCallback] = (),
    progress: bool = False,
) -> TrainHistory:
    """The per-rank loop; the process group must already be initialized (by ``ddp_train`` or torchrun).

    Mirrors :func:`nnopt.training.train` step for step (same seeds, same shuffle, Adam), with each
    global batch sharded over ranks and the loss weighted as the module docstring explains.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model.to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = TrainHistory()
    start = time.perf_counter()
    with track(f"training on {world} processes", total=config.epochs, enabled=progress and rank == 0) as bar:
        _epochs(ddp, model, data, config, loss, eval_data, callbacks, optimizer, generator, history, bar)
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _copy(split: Split) -> Split:
    """A private copy of a split (labelled rows with one input tensor: train() checks)."""
    return Split(split.x.clone(), None if split.y is None else split.y.clone())


def _epochs(ddp: nn.Module, model: nn.Module, data: Split, config: TrainConfig, loss: LossFn | None,
            eval_data: Split | None, callbacks: Sequence[TrainCallback], optimizer: torch.optim.Optimizer,
            generator: torch.Generator, history: TrainHistory, bar: Any) -> None:
    import torch.distributed as dist

    from nnopt.metrics.accuracy import accuracy

    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(config.epochs):
        ddp.train()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, correct) on this rank
        for x, y in data.batches(config.batch_size, shuffle=True, generator=generator):
            assert y is not None  # train() sends only labelled rows with one input tensor here
            rows = len(y)  # global batch size; the last batch may be smaller
            xs = torch.tensor_split(x, world)[rank].to(device)  # (rows_on_rank, features)
            ys = torch.tensor_split(y, world)[rank].to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = ddp(xs)  # (rows_on_rank, classes)
            if len(ys) == 0:
                # An empty shard still joins the gradient all-reduce, contributing zeros.
                local = value = logits.sum() * 0.0
            else:
                local = loss_fn(logits, ys) if loss is None else loss(logits, xs, ys)
                # DDP divides the summed gradients by world: this weight makes the result the
                # gradient of the mean loss over all `rows` of the global batch.
                value = local * (len(ys) * world / rows)
            value.backward()
            optimizer.step()
            for callback in callbacks:
                callback.after_step(model)
            totals[0] += float(local.detach()) * len(ys)
            totals[1] += int((logits.detach().argmax(-1) == ys).sum())
        dist.all_reduce(totals)
        history.loss.append(float(totals[0]) / len(data))
        history.train_accuracy.append(float(totals[1]) / len(data))
        if eval_data is not None:
            history.eval_accuracy.append(accuracy(model if device.type == "cpu" else copy.deepcopy(model).cpu(),
                                                  eval_data))
        run_after_epoch(callbacks, model, history.epochs - 1)
        bar.advance(status=epoch_status(history))


def _spawn_rank(rank: int, world_size: int, port: int, backend: str, payload: tuple[Any, ...], out_dir: str) -> None:
    # Runs in each spawned process (torch.multiprocessing.spawn passes the rank first).
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # this child's own environment
    os.environ["MASTER_PORT"] = str(port)
    model, callbacks, data, config, loss, eval_data, progress = payload
    # Private storage: the received tensors are shared memory, the same pages for every rank
    # (copied together: callbacks and loss keep pointing at this rank's layers).
    model, callbacks, loss = copy.deepcopy((model, callbacks, loss))
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        history = train_rank(model, data, config, loss, eval_data, device, callbacks, progress)
        if rank == 0:
            states = [c.checkpoint_state() if hasattr(c, "checkpoint_state") else None for c in callbacks]
            torch.save(states, Path(out_dir) / _CALLBACKS)
            # Clone so tensors that share storage (tied weights) serialize independently.
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
                      str(Path(out_dir) / _WEIGHTS))
            record = {**dataclasses.asdict(history), "world_size": world_size, "backend": backend}
            (Path(out_dir) / _HISTORY).write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    # The OS picks a free port; it is released again before the ranks bind it (a small race).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nnopt.training.ddp``: train a registered architecture on digits with DDP.

    Under ``torchrun`` the ranks come from its environment; run plainly, ``--world-size``
    processes are spawned. Rank 0 saves the model with :func:`nnopt.save_model`.
    """
    parser = argparse.ArgumentParser(
        prog="python -m nnopt.training.ddp",
        description="Data-parallel (DDP) training of a registered architecture on digits. "
        "Use under torchrun (torchrun --nproc_per_node 2 -m nnopt.training.ddp ...) or plainly "
        "with --world-size.",
    )
    parser.add_argument("--arch", default="simplenet", help="registered architecture (nnopt.create_model)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, split over ranks")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=2, help="processes to spawn when not under torchrun")
    parser.add_argument("--out", required=True, help="model directory to write (rank 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing nnopt model directory")
    args = parser.parse_args(argv)

    import nnopt
    from nnopt.metrics.accuracy import accuracy

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    dataset = nnopt.load_digits()
    model = nnopt.create_model(args.arch, seed=0)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        history, rank = _torchrun_rank(model, dataset.train, config)
    else:
        history, rank = ddp_train(model, dataset.train, config, world_size=args.world_size), 0
    if rank == 0:
        metrics = {"accuracy": accuracy(model.cpu(), dataset.test), "train_loss": history.loss[-1] if history.loss
                   else None}
        nnopt.save_model(model, args.out, metrics=metrics, overwrite=args.overwrite)
        print(json.dumps({"out": args.out, "world_size": int(os.environ.get("WORLD_SIZE", args.world_size)),
                          "seconds": round(history.seconds, 3), **metrics}))
    return 0


def _torchrun_rank(model: nn.Module, data: Split, config: TrainConfig) -> tuple[TrainHistory, int]:
    import torch.distributed as dist

    require_distributed()
    torch.set_num_threads(1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = pick_backend(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)  # env:// from torchrun
    try:
        history = train_rank(model, data, config, device=device)
        rank = dist.get_rank()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return history, rank


if __name__ == "__main__":
    raise SystemExit(main())

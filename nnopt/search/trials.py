"""Evaluating plans: build each through its recipe, score it on the validation split, write it (its
bytes are measured from the file), note the analytic split of its energy; optionally in spawned worker processes.

Latency is never measured here: timing runs serially afterwards (:func:`screen_latency`), one
model at a time against the baseline, so that trials never compete for the cores being timed. A plan's
energy is active power × that measured time (:func:`timed_energy`); the analytic table gives only its split.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import queue
import re
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnopt.data import Dataset
from nnopt.errors import NnoptError, brief
from nnopt.lineage import note_input
from nnopt.search.plans import Plan, plan_recipe
from nnopt.search.space import BuildOptions, SearchSpace, build_space

if TYPE_CHECKING:
    from nnopt.energy import ActivePower, DeviceEnergy

_POLL_S = 0.5
_START_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class ContextSpec:
    """Everything a process needs to rebuild a :class:`TrialContext` (picklable, for spawned workers)."""

    model_path: str
    data: Dataset | str  # a labelled data set, or bundled data by name (see nnopt.search.tasks.make_task)
    objective: str
    batch: int
    options: BuildOptions
    levels: dict[str, tuple[float, ...]] | None = None
    threads: int = 1
    # A user's own module: what rebuilds its architecture when a trial model is loaded (see ModuleTemplate).
    factory: Callable[[], nn.Module] | None = None
    trust_import: bool | None = None

    def load(self, path: str | Path) -> nn.Module:
        """A model directory of this search (the input model's or a trial's)."""
        from nnopt.loading import load_model

        return load_model(path, factory=self.factory, trust_import=self.trust_import)


class ModuleTemplate:
    """Rebuilds a user's module by copying it as it was given: the architecture its record starts from,
    without importing anything (the weights are replaced by the loaded ones). Picklable with the module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = copy.deepcopy(module)

    def __call__(self) -> nn.Module:
        return copy.deepcopy(self.module)


@dataclasses.dataclass
class TrialContext:
    spec: ContextSpec
    model: nn.Module
    task: Any
    space: SearchSpace


def build_context(spec: ContextSpec, model: nn.Module | None = None, task: Any = None) -> TrialContext:
    """Load the input model and the task (unless given) and find the search space."""
    from nnopt.search.tasks import make_task, prepare

    if model is None:
        model = spec.load(spec.model_path)
        if isinstance(spec.data, Dataset):
            note_input(model, spec.data.train.x)  # a user module's sample shape, as the main process noted it
    if task is None:
        task = make_task(spec.data)
        prepare(task, model)
    space = build_space(model, task, spec.objective, levels=spec.levels)
    return TrialContext(spec, model.eval(), task, space)


def analytic_energy(model: nn.Module, batch: int) -> dict[str, Any]:
    """The analytic table's estimate per inference at ``batch`` (nJ) and its compute/memory split as shares.

    Only the split is used, as shares of the measured-time figure (:func:`timed_energy`): the table counts
    arithmetic and data movement alone and can call a slower plan cheaper, so it never ranks a plan."""
    from nnopt.energy import estimate_energy

    estimate = estimate_energy(model, batch=batch)
    total = estimate.total_mj
    shares = None if not total > 0 else {"compute": estimate.compute_mj / total, "memory": estimate.memory_mj / total,
                                         "table": estimate.table.name}
    return {"energy_analytic_nj": total * 1e6, "energy_shares": shares}  # total_mj is already per inference


def analytic_energy_method(batch: int) -> str:
    from nnopt.energy.estimate import DEFAULT_TABLE

    return (f"estimated (analytic table {DEFAULT_TABLE}, MACs executed and bytes moved, per inference at batch "
            f"{batch}; nnopt.estimate_energy): shown for its compute/memory split only, never ranked")


def timed_energy(latency_ms: float, batch: int, power: ActivePower,
                 shares: Mapping[str, Any] | None = None) -> DeviceEnergy:
    """Energy per inference: ``power`` × the measured median ``latency_ms`` of a call at ``batch`` ÷ ``batch``;
    ``shares`` (from :func:`analytic_energy`) split it into compute and memory."""
    from nnopt.energy import device_energy

    energy = device_energy(latency_ms / 1e3, batch, power)
    if not shares:
        return energy
    return dataclasses.replace(energy, compute_share=shares["compute"], memory_share=shares["memory"],
                               analytic_table=shares["table"])


ENERGY_FIELDS = ("energy_nj", "energy_low_nj", "energy_high_nj", "energy_compute_nj", "energy_memory_nj")


def energy_fields(energy: DeviceEnergy) -> dict[str, float | None]:
    """A row's energy figures (nJ per inference): the total ranked and reported, its bounds and its split."""
    parts = energy.to_nj_dict()
    return dict(zip(ENERGY_FIELDS, (parts["total_nj"], parts["low_nj"], parts["high_nj"], parts["compute_nj"],
                                    parts["memory_nj"])))


def energy_method(batch: int, power: ActivePower) -> str:
    """How :func:`timed_energy` figures are obtained: the power, its source and bounds, and the split (the method
    text does not depend on the time: any positive one gives it)."""
    from nnopt.energy import device_energy
    from nnopt.energy.estimate import DEFAULT_TABLE

    return (f"{device_energy(1.0, batch, power).method}; compute/memory split as shares of that total from the "
            f"analytic table {DEFAULT_TABLE} (never ranked)")


def evaluate_plan(plan: Plan, ctx: TrialContext, out_dir: Path) -> dict[str, Any]:
    """Build ``plan`` on the fit split, score it on the validation split, write it to ``out_dir``."""
    from nnopt.metrics import profile_model
    from nnopt.recipe import apply_recipe
    from nnopt.saving import save_model

    started = time.perf_counter()
    recipe = plan_recipe(plan, ctx.space, ctx.spec.options)
    model = apply_recipe(ctx.model, recipe, data=ctx.task.search_data(), progress=False)
    fidelity = getattr(ctx.task, "fidelity", None)
    if callable(fidelity):  # an encoder: one pass over the validation sentences gives both figures
        stats = fidelity(model, "validation")
        result: dict[str, Any] = {"name": plan.name, "quality": stats["cosine_mean"], "cosine_min": stats["cosine_min"]}
    else:
        result = {"name": plan.name, "quality": ctx.task.quality(model, "validation")}
    saved = save_model(model, out_dir, weights_format=recipe.weights_format, overwrite=True, factory=ctx.spec.factory)
    profile = profile_model(model)
    result.update(bytes=saved.file_bytes, compression_ratio=saved.compression_ratio,
                  **analytic_energy(model, ctx.spec.batch), macs=profile.macs, params=profile.params,
                  nonzeros=profile.nonzeros, layers=layer_summary(ctx.model, model),
                  seconds=time.perf_counter() - started, dir=str(out_dir))
    return result


def safe_evaluate(plan: Plan, ctx: TrialContext, out_dir: Path) -> dict[str, Any]:
    """:func:`evaluate_plan`, with a plan nnopt refuses (a layer it cannot quantize, say) recorded as failed."""
    try:
        result = evaluate_plan(plan, ctx, out_dir)
    except NnoptError as exc:
        return {"name": plan.name, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one broken plan is a failed trial, not a failed search
        return {"name": plan.name, "error": f"failed while building or scoring it: {brief(exc)}"}
    if not math.isfinite(result["quality"]):
        return {"name": plan.name, "error": f"its validation quality is {result['quality']}"}
    return result


_INT_DTYPE = re.compile(r"u?int(\d+)")


def layer_summary(original: nn.Module, model: nn.Module) -> list[dict[str, Any]]:
    """Per weight layer of ``model``: zero share of its parameters, storage width, and the share of its
    output channels removed relative to ``original`` (all read from the models, not from the plan)."""
    from nnopt.metrics import profile_model

    before = {layer.name: layer for layer in profile_model(original).layers}
    rows = []
    for layer in profile_model(model).layers:
        if not layer.shape or layer.name not in before or len(layer.shape) < 2:
            continue
        module = model.get_submodule(layer.name)
        bits = getattr(module, "bits", None)
        if not isinstance(bits, int):
            match = _INT_DTYPE.match(layer.dtype)
            floats = {"float32": 32, "bfloat16": 16, "float16": 16}
            # a float storage label may name its layout first ("csr float32")
            bits = int(match.group(1)) if match else floats.get(layer.dtype.split()[-1] if layer.dtype else "")
        out_before = before[layer.name].shape[0]
        rows.append({"name": layer.name, "sparsity": round(layer.sparsity, 4), "bits": bits,
                     "structured_ratio": round(1 - layer.shape[0] / out_before, 4) if out_before else 0.0,
                     "shape": list(layer.shape)})
    return rows


# ------------------------------------------------------------------------------------- running them


Job = tuple[int, Plan, Path]


def run_trials(jobs: Sequence[Job], ctx: TrialContext, workers: int,
               on_result: Callable[[int, dict[str, Any]], None], may_start: Callable[[], bool]) -> int:
    """Evaluate ``jobs``; ``on_result`` gets each result as it comes (to checkpoint it). A job starts
    only while ``may_start()`` (the time budget). Returns how many jobs were started."""
    if workers <= 1 or len(jobs) <= 1:
        started = 0
        for index, plan, out_dir in jobs:
            if not may_start():
                break
            started += 1
            on_result(index, safe_evaluate(plan, ctx, out_dir))
        return started
    return _run_pool(jobs, ctx.spec, workers, on_result, may_start)


def _worker_main(spec: ContextSpec, tasks: Any, results: Any) -> None:
    # Spawned: a fresh interpreter. Ctrl-C is the parent's to handle: it stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    try:
        ctx = build_context(spec)
    except BaseException:  # reported to the parent, which raises it
        results.put(("error", -1, traceback.format_exc()))
        return
    results.put(("ready", -1, None))
    while True:
        job = tasks.get()
        if job is None:
            return
        index, plan, out_dir = job
        try:
            results.put(("ok", index, safe_evaluate(Plan.from_dict(plan), ctx, Path(out_dir))))
        except Exception:
            results.put(("error", index, traceback.format_exc()))


def _run_pool(jobs: Sequence[Job], spec: ContextSpec, workers: int,
              on_result: Callable[[int, dict[str, Any]], None], may_start: Callable[[], bool]) -> int:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    count = min(workers, len(jobs))
    procs = [context.Process(target=_worker_main, args=(spec, tasks, results), daemon=True) for _ in range(count)]
    pending = list(jobs)
    running: set[int] = set()
    started = 0
    try:
        for proc in procs:
            proc.start()
        _wait(results, procs, {"ready"}, count, _START_TIMEOUT_S)

        def submit() -> None:
            nonlocal started
            if pending and may_start():
                index, plan, out_dir = pending.pop(0)
                tasks.put((index, plan.to_dict(), str(out_dir)))
                running.add(index)
                started += 1

        for _ in range(count):
            submit()
        while running:
            status, index, payload = _next(results, procs)
            if status == "error":
                raise RuntimeError(f"a trial worker failed:\n{payload}")
            running.discard(index)
            on_result(index, payload)
            submit()
        return started
    finally:
        for proc in procs:  # also on Ctrl-C: workers ignore SIGINT, so they are stopped here
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=5)
        for channel in (tasks, results):
            channel.close()
            channel.cancel_join_thread()  # nothing left to deliver: the workers are gone


def _next(results: Any, procs: list[Any]) -> tuple[str, int, Any]:
    while True:
        try:
            return results.get(timeout=_POLL_S)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a trial worker exited unexpectedly (exit codes {dead})") from None


def _wait(results: Any, procs: list[Any], kinds: set[str], count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    ready = 0
    while ready < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"trial workers did not start within {timeout:.0f} s")
        status, _, payload = _next(results, procs)
        if status == "error":
            raise RuntimeError(f"a trial worker failed to start:\n{payload}")
        ready += status in kinds


# ------------------------------------------------------------------------------------- latency


def bind(model: nn.Module, inputs: Any) -> Callable[[], object]:
    """A zero-argument call of ``model`` on ``inputs`` (a tensor, or keyword tensors for an encoder)."""
    model.eval()
    return functools.partial(model, **inputs) if isinstance(inputs, dict) else functools.partial(model, inputs)


def screen_latency(baseline: nn.Module, trials: Sequence[tuple[str, Path]], inputs: Any, batch: int,
                   seconds: float, on_result: Callable[[str, dict[str, Any]], None],
                   progress: bool | None = None, load: Callable[[Path], nn.Module] | None = None) -> None:
    """Time each trial model against the baseline, alternated in rounds, one trial at a time. A trial that
    cannot be loaded or run gets ``{"error": why}`` instead: it is not ranked, and the others are still timed."""
    from nnopt.loading import load_model
    from nnopt.metrics.speed import compare_calls
    from nnopt.progress import track

    with track("latency", total=len(trials), enabled=progress) as bar, torch.inference_mode():
        for name, path in trials:
            try:
                model = (load or load_model)(path)
                timing = compare_calls({"baseline": bind(baseline, inputs), "trial": bind(model, inputs)}, batch,
                                       warmup=3, min_calls=6, min_seconds=seconds, rounds=3)
            except Exception as exc:  # noqa: BLE001 - one plan that does not run is not timed, the search goes on
                on_result(name, {"error": f"not timed: {brief(exc)}"})
            else:
                base, trial = timing["baseline"], timing["trial"]
                on_result(name, {"median": trial.median_ms, "p10": trial.p10_ms, "p90": trial.p90_ms,
                                 "baseline_median": base.median_ms, "speedup": base.median_ms / trial.median_ms})
            bar.advance(status=name)


def time_models(models: dict[str, nn.Module], inputs: Any, batch: int, seconds: float,
                min_calls: int = 20) -> dict[str, dict[str, float]]:
    """Median, p10 and p90 ms per call of every model, alternated in rounds (BENCHMARKS.md protocol:
    warm-up, at least ``min_calls`` (20) calls and ``seconds`` of timing per model)."""
    from nnopt.metrics.speed import compare_calls

    with torch.inference_mode():
        timing = compare_calls({name: bind(m, inputs) for name, m in models.items()}, batch, warmup=3,
                               min_calls=min_calls, min_seconds=seconds, rounds=5)
    return {name: {"median": t.median_ms, "p10": t.p10_ms, "p90": t.p90_ms, "calls": t.calls}
            for name, t in timing.items()}

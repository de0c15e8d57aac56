"""What a search measures a model on: its quality on a validation split, the data recipe steps read,
and the inputs latency is timed with.

Three disjoint parts of the data, so that the numbers a search reports are honest:

- *fit*: what recipe steps read during the search (fine-tuning, calibration, gradients);
- *validation*: held out from the steps; sensitivities and every trial are scored on it;
- *test*: never read by the search; only the chosen plan's final numbers are measured on it.

A labelled :class:`~nnopt.data.Dataset` becomes a :class:`ClassificationTask` (top-1 accuracy), an unlabelled one
a :class:`FidelityTask` (top-1 agreement with the input model, or mean cosine of its embeddings); the user's
tensors, Datasets and files are converted first (:func:`nnopt.as_dataset`); bundled data is also found by
name in :data:`TASKS` (``nnopt auto --data NAME``, ``nnopt.auto(model, "sentences")``). Messages name the
data as the Python argument (``data='sentences'``); the CLI says ``--data sentences``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from nnopt.data import Dataset, Split, as_dataset, call_model, holdout, input_rows, load_dataset, take_rows
from nnopt.errors import ConfigError

VALIDATION_FRACTION = 0.2  # of the training split, stratified, seed 0
# Bundled sentences for encoders: test = the first 200, validation = the next 40; the rest (34) are never
# needed because encoder plans are data-free (int8-dynamic without smoothing).
SENTENCE_TEST, SENTENCE_VALIDATION = slice(0, 200), slice(200, 240)


class Task(Protocol):
    """The data side of a search; see the module docstring for the three splits."""

    name: str
    metric: str  # "accuracy" (top-1) or "cosine" (mean cosine to the input model's embeddings)

    def check_fits(self, model: nn.Module) -> None: ...

    def search_data(self) -> Dataset | None: ...

    def final_data(self) -> Dataset | None: ...

    def quality(self, model: nn.Module, split: str) -> float: ...

    def outputs(self, model: nn.Module, split: str) -> torch.Tensor: ...

    def error(self, outputs: torch.Tensor, reference: torch.Tensor) -> float: ...

    def score(self, outputs: torch.Tensor, split: str) -> float: ...

    def timing_inputs(self, model: nn.Module, batch: int) -> Any: ...

    def describe(self) -> dict[str, Any]: ...


def validation_split(split: Split, fraction: float = VALIDATION_FRACTION, seed: int = 0) -> tuple[Split, Split]:
    """``(fit, validation)``: a stratified, seeded partition of ``split`` (validation gets ``fraction``).

    Train a model on ``fit`` for an unbiased search: the validation rows are then unseen by it too.

    >>> fit, val = validation_split(nnopt.load_digits().train)  # doctest: +SKIP
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction}")
    if split.y is None or not isinstance(split.x, torch.Tensor) or min(torch.bincount(split.y)[split.y.unique()]) < 2:
        return holdout(split, fraction, seed)  # the user's data: stratified only where every class allows it
    import numpy as np
    from sklearn.model_selection import train_test_split

    index = np.arange(len(split))
    fit_idx, val_idx = train_test_split(index, test_size=fraction, stratify=split.y.numpy(), random_state=seed)
    fit_t, val_t = torch.as_tensor(np.sort(fit_idx)), torch.as_tensor(np.sort(val_idx))
    return Split(split.x[fit_t], split.y[fit_t]), Split(split.x[val_t], split.y[val_t])


@dataclasses.dataclass
class ClassificationTask:
    """A labelled data set (digits): top-1 accuracy."""

    dataset: Dataset
    name: str = "digits"
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        self.fit, self.validation = validation_split(self.dataset.train)

    def check_fits(self, model: nn.Module) -> None:
        from nnopt.models.hf_encoder import SentenceEncoder

        if isinstance(model, SentenceEncoder):
            raise ConfigError(f"the model is a sentence encoder; {self.name} is a labelled data set: "
                              "use data='sentences'")
        shape = tuple(getattr(model, "input_shape", ()) or ())
        features = self.dataset.feature_shape
        image = (1, 8, 8) if features == (64,) else features  # digits rows are 8x8 images
        if shape and shape not in (features, image):
            raise ConfigError(f"the model takes inputs of shape {shape or 'unknown'}, but {self.name} rows have "
                              f"{features}")
        with torch.inference_mode():
            out = _run(model.eval(), take_rows(self.validation.x, slice(0, 2)), self.name)
        classes = self.dataset.num_classes or 0
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < classes:
            raise ConfigError(f"the model's outputs {tuple(getattr(out, 'shape', ()))} are not logits for the "
                              f"{self.dataset.num_classes} classes of {self.name}")

    def search_data(self) -> Dataset:
        # Recipe steps read only ``train``: here the fit part; the validation rows stay unseen.
        return dataclasses.replace(self.dataset, name=f"{self.name}-fit", train=self.fit, test=self.validation)

    def final_data(self) -> Dataset:
        return self.dataset  # what `nnopt optimize --data NAME` reads: the whole training split

    def _split(self, split: str) -> Split:
        return self.validation if split == "validation" else self.dataset.test

    def outputs(self, model: nn.Module, split: str) -> torch.Tensor:
        model.eval()
        with torch.inference_mode():
            return call_model(model, self._split(split).x).float()  # (rows, classes) logits

    def score(self, outputs: torch.Tensor, split: str) -> float:
        return float((outputs.argmax(-1) == self._split(split).y).double().mean())

    def quality(self, model: nn.Module, split: str) -> float:
        return self.score(self.outputs(model, split), split)

    def error(self, outputs: torch.Tensor, reference: torch.Tensor) -> float:
        """Increase of the validation cross-entropy over the reference's (nats; negative: better).

        Finer than accuracy on a few hundred rows and, unlike a logit distance, blind to changes that
        keep the predictions (fine-tuning rescales logits freely)."""
        import torch.nn.functional as F

        y = self.validation.y
        return float(F.cross_entropy(outputs.double(), y) - F.cross_entropy(reference.double(), y))

    def timing_inputs(self, model: nn.Module, batch: int) -> Any:
        return data_timing_inputs(model, self.validation, batch)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "fit": len(self.fit), "validation": len(self.validation),
                "test": len(self.dataset.test), "train": len(self.dataset.train),
                "method": f"validation: {VALIDATION_FRACTION:.0%} of the training split (stratified, seed 0), "
                "held out from every recipe step during the search; test: the held-out test split, used only "
                "for the chosen plan, rebuilt on the whole training split as `nnopt optimize` does"}


@dataclasses.dataclass
class SentenceTask:
    """Bundled English sentences for a sentence encoder: mean cosine to the input model's embeddings."""

    name: str = "sentences"
    metric: str = "cosine"

    def __post_init__(self) -> None:
        from nnopt.text import load_sentences

        sentences = load_sentences()
        self.sentences = {"validation": sentences[SENTENCE_VALIDATION], "test": sentences[SENTENCE_TEST]}
        self._reference: dict[str, torch.Tensor] = {}

    def check_fits(self, model: nn.Module) -> None:
        from nnopt.models.hf_encoder import SentenceEncoder

        if not isinstance(model, SentenceEncoder):
            raise ConfigError(f"data='{self.name}' is for sentence encoders; {type(model).__name__} takes "
                              "other inputs (use data='digits')")

    def search_data(self) -> None:
        return None  # encoder plans are data-free, so `nnopt optimize` reproduces them without --data

    def final_data(self) -> None:
        return None

    def set_reference(self, model: nn.Module) -> None:
        """Embeddings of the input model: cosine 1.0 by definition."""
        from nnopt.models.hf_encoder import embed_sentences

        self._reference = {split: embed_sentences(model, text) for split, text in self.sentences.items()}

    def quality(self, model: nn.Module, split: str) -> float:
        return self.fidelity(model, split)["cosine_mean"]

    def outputs(self, model: nn.Module, split: str) -> torch.Tensor:
        from nnopt.models.hf_encoder import embed_sentences

        return embed_sentences(model, self.sentences[split])  # (sentences, hidden)

    def score(self, outputs: torch.Tensor, split: str) -> float:
        from nnopt.text import embedding_fidelity

        return embedding_fidelity(self._reference[split], outputs).cosine_mean

    def error(self, outputs: torch.Tensor, reference: torch.Tensor) -> float:
        """1 − mean cosine to the reference embeddings."""
        from nnopt.text import embedding_fidelity

        return 1.0 - embedding_fidelity(reference, outputs).cosine_mean

    def fidelity(self, model: nn.Module, split: str) -> dict[str, float]:
        from nnopt.models.hf_encoder import embed_sentences
        from nnopt.text import embedding_fidelity

        if not self._reference:
            raise RuntimeError("SentenceTask.set_reference(input_model) must run first")
        stats = embedding_fidelity(self._reference[split], embed_sentences(model, self.sentences[split]))
        return {"cosine_mean": stats.cosine_mean, "cosine_min": stats.cosine_min}

    def timing_inputs(self, model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
        from nnopt.metrics.speed import example_batch

        return example_batch(model, batch)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "validation": len(self.sentences["validation"]),
                "test": len(self.sentences["test"]),
                "method": "cosine between the plan's sentence embeddings and the input model's; validation: "
                "bundled sentences 200-239, test: sentences 0-199 (never seen by the search)"}


@dataclasses.dataclass
class FidelityTask:
    """Unlabelled data: quality is fidelity to the input model on held-out rows: top-1 agreement of the
    predictions (``metric="agreement"``, classifiers) or the mean cosine of the outputs (``"cosine"``,
    embedding models); recipe steps that fine-tune distil from the model they start from."""

    dataset: Dataset
    name: str = "data"
    metric: str = "agreement"
    temperature: float = 1.0  # of the KL divergence that ranks plans finer than agreement

    def __post_init__(self) -> None:
        self.fit, self.validation = validation_split(self.dataset.train)
        self._reference: dict[str, torch.Tensor] = {}

    def check_fits(self, model: nn.Module) -> None:
        with torch.inference_mode():
            out = _run(model.eval(), take_rows(self.validation.x, slice(0, 2)), self.name)
        if not isinstance(out, torch.Tensor) or out.ndim < 2:
            raise ConfigError(f"the model's outputs {tuple(getattr(out, 'shape', ()))} are not one row of outputs per "
                              f"input of {self.name}")
        self._choose_metric(model)

    def _choose_metric(self, model: nn.Module) -> None:
        from nnopt.training.distill import output_kind

        self.metric = "cosine" if output_kind(model) == "embedding" else "agreement"
        if self.metric == "cosine":
            self.fidelity = self._fidelity  # the search reports cosine_mean and cosine_min for embeddings

    def search_data(self) -> Dataset:
        return dataclasses.replace(self.dataset, name=f"{self.name}-fit", train=self.fit, test=self.validation)

    def final_data(self) -> Dataset:
        return self.dataset

    def _split(self, split: str) -> Split:
        return self.validation if split == "validation" else self.dataset.test

    def set_reference(self, model: nn.Module) -> None:
        """The input model's outputs on both splits: agreement 1.0 (cosine 1.0) by definition."""
        self._choose_metric(model)
        self._reference = {split: self.outputs(model, split) for split in ("validation", "test")}

    def outputs(self, model: nn.Module, split: str) -> torch.Tensor:
        from nnopt.metrics.accuracy import model_outputs

        return model_outputs(model, self._split(split))

    def score(self, outputs: torch.Tensor, split: str) -> float:
        from nnopt.metrics.accuracy import output_fidelity

        stats = output_fidelity(outputs, self._reference_of(split))
        return stats.cosine_mean if self.metric == "cosine" else stats.agreement

    def quality(self, model: nn.Module, split: str) -> float:
        return self.score(self.outputs(model, split), split)

    def _fidelity(self, model: nn.Module, split: str) -> dict[str, float]:
        from nnopt.metrics.accuracy import output_fidelity

        stats = output_fidelity(self.outputs(model, split), self._reference_of(split))
        return {"cosine_mean": stats.cosine_mean, "cosine_min": stats.cosine_min}

    def error(self, outputs: torch.Tensor, reference: torch.Tensor) -> float:
        """Classifiers: KL divergence of the outputs' distribution from the reference's (nats per row; finer than
        agreement on a few hundred rows); embeddings: 1 − mean cosine."""
        import torch.nn.functional as F

        if self.metric == "cosine":
            return float(1 - F.cosine_similarity(outputs.flatten(1), reference.flatten(1), dim=-1).mean())
        log_p = F.log_softmax(outputs.double(), dim=-1)
        return float(F.kl_div(log_p, F.softmax(reference.double(), dim=-1), reduction="batchmean"))

    def _reference_of(self, split: str) -> torch.Tensor:
        if not self._reference:
            raise RuntimeError("FidelityTask.set_reference(input_model) must run first")
        return self._reference[split]

    def timing_inputs(self, model: nn.Module, batch: int) -> Any:
        return data_timing_inputs(model, self.validation, batch)

    def describe(self) -> dict[str, Any]:
        what = "mean cosine of the outputs" if self.metric == "cosine" else "top-1 agreement of the predictions"
        return {"name": self.name, "metric": self.metric, "fit": len(self.fit), "validation": len(self.validation),
                "test": len(self.dataset.test), "train": len(self.dataset.train), "labels": False,
                "method": f"no labels: {what} with the input model; validation: {VALIDATION_FRACTION:.0%} of the "
                "training rows (seed 0), held out from every recipe step; test: the held-out test rows, used only "
                "for the chosen plan; fine-tuning steps distil from the model they start from"}


def data_timing_inputs(model: nn.Module, split: Split, batch: int) -> Any:
    """Inputs to time ``model`` at ``batch``: its own example inputs or rows of its ``input_shape`` when it
    declares them, else rows of ``split`` repeated to ``batch`` (the user's model and data)."""
    from nnopt.metrics.speed import example_batch

    if callable(getattr(model, "example_inputs", None)) or getattr(model, "input_shape", None):
        return example_batch(model, batch)
    index = torch.arange(batch) % input_rows(split.x)
    return take_rows(split.x, index)


def _run(model: nn.Module, x: Any, name: str) -> Any:
    try:
        return call_model(model, x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ConfigError(f"the model does not run on rows of {name}: {str(exc).splitlines()[0]}") from None


def _digits() -> ClassificationTask:
    return ClassificationTask(load_dataset("digits"))


TASKS: dict[str, Callable[[], Any]] = {"digits": _digits, "sentences": SentenceTask}


def load_task(name: str) -> Task:
    """The task for bundled data by name (``--data NAME``)."""
    if name not in TASKS:
        raise ConfigError(f"unknown data {name!r} for nnopt auto; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


def make_task(data: Dataset | str | Any) -> Task:
    """The task for ``data``: a labelled :class:`~nnopt.data.Dataset` (top-1 accuracy), an unlabelled one
    (fidelity to the input model), a name in :data:`TASKS`, or the user's data (:func:`nnopt.as_dataset`)."""
    if isinstance(data, str):
        return load_task(data)
    dataset = as_dataset(data)
    if dataset.labelled:
        return ClassificationTask(dataset, name=dataset.name)
    return FidelityTask(dataset, name=dataset.name)


def prepare(task: Task, model: nn.Module) -> None:
    """Anything a task computes from the input model before scoring others (encoders: reference embeddings)."""
    setter = getattr(task, "set_reference", None)
    if callable(setter):
        setter(model)

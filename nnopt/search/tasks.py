"""What a search measures a model on: its quality on a validation split, the data recipe steps read,
and the inputs latency is timed with.

Three disjoint parts of the data, so that the numbers a search reports are honest:

- *fit*: what recipe steps read during the search (fine-tuning, calibration, gradients);
- *validation*: held out from the steps; sensitivities and every trial are scored on it;
- *test*: never read by the search; only the chosen plan's final numbers are measured on it.

A labelled :class:`~nnopt.data.Dataset` becomes a :class:`ClassificationTask`; bundled data is also found by
name in :data:`TASKS` (``nnopt auto --data NAME``, ``nnopt.auto(model, "sentences")``). Messages name the
data as the Python argument (``data='sentences'``); the CLI says ``--data sentences``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from nnopt.data import Dataset, Split, load_dataset
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
        if shape not in (features, image):
            raise ConfigError(f"the model takes inputs of shape {shape or 'unknown'}, but {self.name} rows have "
                              f"{features}")
        with torch.inference_mode():
            out = model.eval()(self.validation.x[:2])
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < self.dataset.num_classes:
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
            return model(self._split(split).x).float()  # (rows, classes) logits

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

    def timing_inputs(self, model: nn.Module, batch: int) -> torch.Tensor:
        from nnopt.metrics.speed import example_batch

        return example_batch(model, batch)

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


def _digits() -> ClassificationTask:
    return ClassificationTask(load_dataset("digits"))


TASKS: dict[str, Callable[[], Any]] = {"digits": _digits, "sentences": SentenceTask}


def load_task(name: str) -> Task:
    """The task for bundled data by name (``--data NAME``)."""
    if name not in TASKS:
        raise ConfigError(f"unknown data {name!r} for nnopt auto; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


def make_task(data: Dataset | str) -> Task:
    """The task for ``data``: a labelled :class:`~nnopt.data.Dataset` (top-1 accuracy), or a name in :data:`TASKS`."""
    if isinstance(data, Dataset):
        return ClassificationTask(data, name=data.name)
    if isinstance(data, str):
        return load_task(data)
    raise ConfigError(f"data must be an nnopt.data.Dataset (nnopt.load_dataset('digits')) or one of "
                      f"{', '.join(sorted(TASKS))}; got {type(data).__name__}")


def prepare(task: Task, model: nn.Module) -> None:
    """Anything a task computes from the input model before scoring others (encoders: reference embeddings)."""
    setter = getattr(task, "set_reference", None)
    if callable(setter):
        setter(model)

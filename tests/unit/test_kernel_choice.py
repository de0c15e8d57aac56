"""DynamicQuantConfig(kernels="measured"): each Linear gets the int8 kernel only where it was measured faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnopt
from nnopt.errors import ConfigError
from nnopt.layers.int8 import Int8DynamicLinear
from nnopt.lineage import get_lineage
from nnopt.quantization import DynamicQuantConfig
from nnopt.quantization import kernel_choice as kc


def test_only_layers_measured_faster_become_int8(monkeypatch):
    calls = []

    def fake(module, shape, smoothing):
        calls.append((module.in_features, module.out_features, shape))
        wide = module.out_features >= 256
        return kc.KernelTiming(rows=shape[0], fp32_ms=1.0, int8_ms=0.5 if wide else 2.0)

    monkeypatch.setattr(kc.choose_kernels, "__defaults__", (fake,))
    model = nnopt.create_model("simplenet", hidden=(256, 256, 256), seed=0).eval()
    q = nnopt.quantize(model, DynamicQuantConfig(kernels="measured", kernel_batch=7))
    assert all(isinstance(q.get_submodule(f"features.{i}"), Int8DynamicLinear) for i in (0, 2, 4))
    assert type(q.classifier) is nn.Linear  # measured slower: stays fp32
    # equal shapes (features.2 and .4) are measured once, at the rows kernel_batch examples give
    assert calls == [(64, 256, (7, 64)), (256, 256, (7, 256)), (256, 10, (7, 256))]
    details = get_lineage(q).applied[-1].details
    assert set(details["layers"]) == {"features.0", "features.2", "features.4"}
    assert details["kernel_choice"]["kept_fp32"]["classifier"]["kernel"] == "fp32"
    x = torch.randn(5, 256)
    torch.testing.assert_close(q.classifier(x), model.classifier(x))


def test_the_choice_is_replayed_on_load_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(kc.choose_kernels, "__defaults__", (
        lambda m, shape, s: kc.KernelTiming(shape[0], 1.0, 0.5 if m.in_features == 64 else 2.0),))
    model = nnopt.create_model("simplenet", seed=0).eval()
    q = nnopt.quantize(model, DynamicQuantConfig(kernels="measured"))
    kinds = {name: type(m).__name__ for name, m in q.named_modules()}
    nnopt.save_model(q, tmp_path / "q")

    def fail(*args, **kwargs):
        raise AssertionError("loading must not measure again")

    monkeypatch.setattr(kc.choose_kernels, "__defaults__", (fail,))
    loaded = nnopt.load_model(tmp_path / "q")
    assert {name: type(m).__name__ for name, m in loaded.named_modules()} == kinds
    assert "Int8DynamicLinear" in kinds.values() and "Linear" in kinds.values()
    x = torch.randn(4, 64)
    torch.testing.assert_close(loaded(x), q(x))


def test_real_measurement_records_timings_that_match_the_decision():
    model = nnopt.create_model("simplenet", seed=0).eval()
    q = nnopt.quantize(model, DynamicQuantConfig(kernels="measured", kernel_batch=8))
    details = get_lineage(q).applied[-1].details
    timings = {**{n: i["measured"] for n, i in details["layers"].items() if "measured" in i},
               **details["kernel_choice"]["kept_fp32"]}
    assert set(timings) == {"features.0", "features.2", "classifier"}
    for name, timing in timings.items():
        assert timing["fp32_ms"] > 0 and timing["int8_ms"] > 0 and timing["rows"] == 8
        int8 = timing["fp32_ms"] >= timing["int8_ms"] * kc.MIN_SPEEDUP
        assert timing["kernel"] == ("int8" if int8 else "fp32")
        assert isinstance(q.get_submodule(name), Int8DynamicLinear) == int8, name


@pytest.mark.parametrize(("field", "value", "message"), [
    ("kernels", "fastest", "kernels must be one of"),
    ("kernel_batch", 0, "kernel_batch must be >= 1"),
])
def test_bad_kernel_choice_options(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DynamicQuantConfig(**{field: value})


class _Twice(nn.Module):
    """One Linear called twice per forward (once by keyword, on more rows) and one called once."""

    input_shape = (16,)

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.once = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(x) + self.shared(input=torch.cat([x, x])).view(2, *x.shape).sum(0)
        return self.once(y)


def test_a_layer_called_several_times_is_judged_on_all_its_calls():
    def fake(module, shape, smoothing):
        # int8 loses on the small call and wins by far on the large one
        return kc.KernelTiming(rows=shape[0], fp32_ms=float(shape[0]), int8_ms=3.0 if shape[0] > 4 else 2 * shape[0])

    model = _Twice().eval()
    chosen = kc.choose_kernels(model, [("shared", model.shared), ("once", model.once)], 3, smoothing=False,
                               measure=fake)
    # shared: a call of 3 rows (fp32 3, int8 6) and one of 6 rows by keyword (fp32 6, int8 3): 9 vs 9
    assert (chosen["shared"].rows, chosen["shared"].fp32_ms, chosen["shared"].int8_ms) == (9, 9.0, 9.0)
    assert not chosen["shared"].int8_faster
    assert (chosen["once"].rows, chosen["once"].fp32_ms, chosen["once"].int8_ms) == (3, 3.0, 6.0)

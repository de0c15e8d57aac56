"""PyTorch models from user code: ``package.module:factory`` plus a weights file.

Naming a factory is the user's explicit choice to run that code (the same trust as ``import``);
nothing else is executed. Weights come from safetensors (header checked first) or, only with
``allow_pickle``, from a ``torch.save`` file read by torch's weights-only unpickler.

Any module saves as an nnopt model directory (as a user module, whose reload needs the user's
factory or ``trust_import``; see :mod:`nnopt.models.user_module`). :func:`to_nnopt` goes further for
a plain chain of layers: it becomes nnopt's ``sequential`` architecture (checked numerically), so that
loading the result never needs the user's module again.

>>> model = load_torch_factory("mypkg.nets:small_mlp", "weights.safetensors")  # doctest: +SKIP
>>> nnopt_model = to_nnopt(model)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError, ModelFormatError, NnoptError, UnsupportedModelError

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"^({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)$")
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# Conversion check: max |difference| allowed between the module and its nnopt twin, on random rows.
CONVERT_ATOL = 1e-5
_CHECK_ROWS = 8


def is_factory_spec(text: str) -> bool:
    """Whether ``text`` has the ``package.module:factory`` form (it says nothing about importing it)."""
    return bool(_SPEC.match(text))


def parse_factory_spec(spec: str) -> tuple[str, str]:
    """``"pkg.mod:make"`` -> ``("pkg.mod", "make")``; a :class:`ConfigError` for any other form."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError(
            f"model factory {spec!r} must look like package.module:function (Python identifiers, "
            "one colon), e.g. mypkg.nets:make_model"
        )
    return match.group(1), match.group(2)


def load_torch_factory(
    spec: str,
    weights: str | Path | None,
    allow_pickle: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Import ``package.module``, call ``factory(**kwargs)``, then load ``weights`` strictly.

    Importing and calling the named factory runs the user's own code: that is the explicit choice
    made by naming it. The weights file is data and is never executed: ``.safetensors`` is checked
    then parsed; ``.pt``/``.pth``/``.bin`` need ``allow_pickle=True`` and are read with
    ``torch.load(weights_only=True)``. Tensor names, shapes and dtypes must match the module's
    state dict exactly; errors name the tensor.
    """
    module_name, attr_path = parse_factory_spec(spec)
    if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
        raise ConfigError(f"factory kwargs must be a dict with string keys, got {kwargs!r}")
    factory = _resolve(module_name, attr_path, spec)
    try:
        model = factory(**(kwargs or {}))
    except NnoptError:
        raise
    except Exception as exc:  # user code: report it as one line naming the factory
        raise ModelFormatError(f"model factory {spec} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model factory {spec} returned {type(model).__name__}, not a torch nn.Module")
    if weights is not None:
        tensors = read_weights(Path(weights), allow_pickle=allow_pickle)
        check_state_dict(model, tensors, str(weights))
        model.load_state_dict(tensors, strict=True)  # names, shapes and dtypes were checked
    return model.eval()


def _resolve(module_name: str, attr_path: str, spec: str) -> Callable[..., Any]:
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"model factory {spec}: no module named {exc.name!r} on the Python path") from None
        raise ModelFormatError(f"importing {module_name} for {spec} failed: {exc}") from None
    except Exception as exc:  # the module's own import-time code failed
        raise ModelFormatError(f"importing {module_name} for {spec} failed: {type(exc).__name__}: {exc}") from None
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model factory {spec}: {module_name} has no attribute {attr_path!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"model factory {spec}: {attr_path} is a {type(target).__name__}, not callable")
    return target


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a weights file by suffix: safetensors (checked), or a weights-only pickle when allowed."""
    from nnopt.io.safetensors_check import load_safetensors
    from nnopt.io.safety import load_pickled_weights, refuse_unsafe

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such weights file")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return load_pickled_weights(path, allow_pickle=allow_pickle)
    refuse_unsafe(path)  # other pickles and HDF5 files are named as what they are
    raise ModelFormatError(
        f"{path}: unknown weights format {path.suffix or '(no suffix)'!r}; use .safetensors "
        f"(or {', '.join(PICKLE_SUFFIXES)} with --allow-pickle)"
    )


def check_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Names, shapes and dtypes must match exactly (``load_state_dict`` would silently cast dtypes)."""
    from nnopt.io.model_dir import check_tensors

    check_tensors(where, model.state_dict(), tensors)


# --- conversion of a plain chain into nnopt's ``sequential`` architecture -------------------------

_Converter = Callable[[nn.Module], str]


def _linear(m: nn.Module) -> str:
    return f"linear:{m.in_features}:{m.out_features}" + ("" if m.bias is not None else ":nobias")


def _conv2d(m: nn.Module) -> str:
    if not (isinstance(m.padding, tuple) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"):
        raise _Unsupported("only numeric zero padding, dilation 1 and groups 1")
    (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
    bias = "" if m.bias is not None else ":nobias"
    return f"conv2d:{m.in_channels}:{m.out_channels}:{kh}:{kw}:{sh}:{sw}:{ph}:{pw}{bias}"


def _batchnorm(kind: str) -> _Converter:
    def convert(m: nn.Module) -> str:
        if not (m.affine and m.track_running_stats):
            raise _Unsupported("only affine BatchNorm with running statistics")
        return f"{kind}:{m.num_features}:{float(m.eps)!r}"
    return convert


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _pool(kind: str) -> _Converter:
    def convert(m: nn.Module) -> str:
        (kh, kw), (sh, sw) = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        plain = _pair(m.padding) == (0, 0) and not m.ceil_mode and _pair(getattr(m, "dilation", 1)) == (1, 1)
        if not plain or getattr(m, "divisor_override", None) is not None:
            raise _Unsupported("only pools without padding, dilation, ceil_mode or divisor_override")
        return f"{kind}:{kh}:{kw}:{sh}:{sw}"
    return convert


def _global_average(m: nn.Module) -> str:
    if _pair(m.output_size) != (1, 1):
        raise _Unsupported("only AdaptiveAvgPool2d(1), a global average")
    return "globalavgpool2d"


def _flatten(m: nn.Module) -> str:
    if (m.start_dim, m.end_dim) != (1, -1):
        raise _Unsupported("only Flatten(start_dim=1, end_dim=-1)")
    return "flatten"


def _gelu(m: nn.Module) -> str:
    if m.approximate != "none":
        raise _Unsupported("only the exact (erf) GELU")
    return "gelu"


class _Unsupported(Exception):
    pass


# Module type -> its layer spec. Dropout is absent from the chain (a no-op at inference);
# Softmax is accepted only as the last layer and recorded as the model's output.
CONVERTERS: dict[type[nn.Module], _Converter] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.BatchNorm1d: _batchnorm("batchnorm1d"),
    nn.BatchNorm2d: _batchnorm("batchnorm2d"),
    nn.MaxPool2d: _pool("maxpool2d"),
    nn.AvgPool2d: _pool("avgpool2d"),
    nn.AdaptiveAvgPool2d: _global_average,
    nn.ReLU: lambda m: "relu",
    nn.Tanh: lambda m: "tanh",
    nn.Sigmoid: lambda m: "sigmoid",
    nn.GELU: _gelu,
    nn.Flatten: _flatten,
    nn.Identity: lambda m: "identity",
}
_SKIPPED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def to_nnopt(module: nn.Module, input_shape: Sequence[int] | None = None, source: str = "") -> nn.Module:
    """An nnopt ``sequential`` model computing what ``module`` (a plain chain of layers) computes.

    ``module`` is an ``nn.Sequential`` (nested ones are flattened) or a single supported layer.
    ``input_shape`` (without the batch) is needed unless the first layer is a Linear. The result
    is compared with ``module`` on random rows and refused if they differ by more than 1e-5.
    Anything else raises :class:`UnsupportedModelError` naming the first unsupported module.
    """
    from nnopt.lineage import has_lineage

    if has_lineage(module):
        return module
    chain = list(_flatten_chain(module, ""))
    specs: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    output = "none"
    for position, (name, layer) in enumerate(chain):
        if isinstance(layer, nn.Softmax) and position == len(chain) - 1 and layer.dim in (-1, 1):
            output = "softmax"  # forward() returns logits, as every nnopt model does
            continue
        if isinstance(layer, _SKIPPED):
            continue
        spec = _spec_of(name, layer)
        for key, value in layer.state_dict().items():
            tensors[f"layers.{len(specs)}.{key}"] = value.detach().cpu()
        specs.append(spec)
    if not specs:
        raise UnsupportedModelError(f"{type(module).__name__} holds no layer to convert")
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else _infer_input_shape(chain)
    return _build(module, specs, tensors, shape, output, source)


def _flatten_chain(module: nn.Module, prefix: str) -> Any:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _flatten_chain(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or "(the model itself)", module


def _spec_of(name: str, layer: nn.Module) -> str:
    from nnopt.models.sequential import SequentialConfig

    supported = ", ".join(sorted(t.__name__ for t in CONVERTERS)) + ", Dropout, and Softmax last"
    converter = CONVERTERS.get(type(layer))
    if converter is None:
        raise UnsupportedModelError(
            f"module {name!r} ({type(layer).__name__}) cannot become an nnopt model: only plain chains "
            f"(nn.Sequential) of {supported} are converted"
        )
    try:
        spec = converter(layer)
    except _Unsupported as exc:
        raise UnsupportedModelError(f"module {name!r} ({layer!r}) is not supported: {exc}") from None
    try:
        SequentialConfig(input_shape=(1,), layers=(spec,))
    except ConfigError:
        raise UnsupportedModelError(
            f"module {name!r} ({type(layer).__name__}) has no equivalent in nnopt's sequential architecture yet"
        ) from None
    return spec


def _infer_input_shape(chain: list[tuple[str, nn.Module]]) -> tuple[int, ...]:
    first_name, first = chain[0]
    if isinstance(first, (nn.Linear, nn.BatchNorm1d)):
        return (first.in_features if isinstance(first, nn.Linear) else first.num_features,)
    raise UnsupportedModelError(
        f"the input shape is unknown: the first module {first_name!r} ({type(first).__name__}) does not fix it; "
        "pass input_shape (CLI: --input-shape C,H,W)"
    )


def _build(
    module: nn.Module, specs: list[str], tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
    output: str, source: str,
) -> nn.Module:
    from nnopt.models.registry import create_model

    try:
        net = create_model("sequential", input_shape=shape, layers=tuple(specs), output=output, source=source)
    except ConfigError as exc:
        raise UnsupportedModelError(f"cannot describe {type(module).__name__} as a sequential model: {exc}") from None
    check_state_dict(net, tensors, f"{type(module).__name__} (converted)")
    net.load_state_dict(tensors, strict=True)
    _verify(module, net.eval(), shape)
    return net


def _verify(module: nn.Module, net: nn.Module, shape: tuple[int, ...]) -> None:
    """Refuse a conversion that does not compute the same function (a forward() doing more than chaining)."""
    x = torch.randn((_CHECK_ROWS, *shape), generator=torch.Generator().manual_seed(0))
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            expected = module(x)
            got = net.predict_proba(x)
    except Exception as exc:  # wrong input shape for the user's module, dtype mismatch, ...
        raise UnsupportedModelError(
            f"{type(module).__name__} failed on a check batch of shape {tuple(x.shape)} "
            f"({type(exc).__name__}: {exc}); pass the right input_shape"
        ) from None
    finally:
        module.train(was_training)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        raise UnsupportedModelError(
            f"{type(module).__name__} does not return one tensor shaped like its chain's output"
        )
    if not got.numel():
        return
    diff = float((expected.float() - got).abs().max())
    # Relative to the output's scale: the same ops in the same order agree to rounding.
    if not diff <= CONVERT_ATOL * max(1.0, float(expected.abs().max())):
        raise UnsupportedModelError(
            f"{type(module).__name__} could not be converted faithfully (max difference {diff:.3g}): its "
            "forward() does more than apply its layers in order"
        )

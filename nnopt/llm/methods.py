"""One entry for every calibrated weight-quantization method of a causal LM checkpoint (GPTQ, AWQ,
SmoothQuant W8A8), in one process or data-parallel under ``torchrun``.

:func:`quantize_checkpoint` runs the method's own function (:func:`nnopt.llm.layerwise.quantize_checkpoint_gptq`,
:func:`nnopt.llm.awq.quantize_checkpoint_awq`, :func:`nnopt.llm.smoothquant.quantize_checkpoint_smoothquant`)
when this is one process, and the same layer method through
:func:`nnopt.llm.distributed.quantize_checkpoint_layerwise_distributed` when torchrun started several
(``WORLD_SIZE`` above 1): each process calibrates on its share of the windows, the statistics are all-reduced,
rank 0 writes the output. The CLI's ``nnopt llm quantize --method gptq|awq|smoothquant`` calls it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from nnopt.errors import ConfigError
from nnopt.llm import streaming
from nnopt.llm.layerwise import CalibrationConfig
from nnopt.quantization.weights import WeightQuantConfig

CALIBRATED_METHODS = ("gptq", "awq", "smoothquant")


def world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE must be an integer, got {raw!r}") from None


def quantize_checkpoint(
    method: str, src_dir: str | Path, out_dir: str | Path, config: WeightQuantConfig, *,
    calibration: CalibrationConfig | None = None, progress: streaming.ProgressFn | None = None,
    include_lm_head: bool = False, gptq: Any = None, awq: Any = None, smooth: Any = None,
) -> dict[str, Any]:
    """Quantize ``src_dir`` to ``out_dir`` with ``method`` (``gptq``, ``awq`` or ``smoothquant``; its own
    settings in ``gptq``/``awq``/``smooth``, defaults where None). SmoothQuant is W8A8: ``config`` must be
    8-bit symmetric per channel, and ``lm_head`` stays float. Returns the writer's figures; under torchrun,
    rank 0's on every rank plus ``world_size``, ``rank_windows`` and ``rank``."""
    if method not in CALIBRATED_METHODS:
        raise ConfigError(f"method must be one of {', '.join(CALIBRATED_METHODS)}, got {method!r}")
    if method == "smoothquant":
        from nnopt.llm.smoothquant import WEIGHTS

        if (config.bits, config.symmetric, config.per_channel, config.group_size) != (
                WEIGHTS.bits, WEIGHTS.symmetric, WEIGHTS.per_channel, WEIGHTS.group_size):
            raise ConfigError("SmoothQuant is W8A8: 8-bit symmetric weights per channel, not "
                              f"{config.bits}-bit {'groups' if config.group_size else 'channels/tensor'}")
        if include_lm_head:
            raise ConfigError("SmoothQuant keeps lm_head in float; include_lm_head does not apply")
        if config.layers:
            raise ConfigError("SmoothQuant quantizes every decoder projection: a layers selection is not supported")
    if world_size() <= 1:
        return _one_process(method, src_dir, out_dir, config, calibration, progress, include_lm_head, gptq, awq,
                            smooth)
    return _distributed(method, src_dir, out_dir, config, calibration, progress, include_lm_head, gptq, awq,
                        smooth)


def _one_process(method: str, src: str | Path, out: str | Path, config: WeightQuantConfig,
                 calibration: CalibrationConfig | None, progress: streaming.ProgressFn | None,
                 include_lm_head: bool, gptq: Any, awq: Any, smooth: Any) -> dict[str, Any]:
    if method == "gptq":
        from nnopt.llm.layerwise import quantize_checkpoint_gptq

        return quantize_checkpoint_gptq(src, out, config, gptq=gptq, calibration=calibration, progress=progress,
                                        include_lm_head=include_lm_head)
    if method == "awq":
        from nnopt.llm.awq import quantize_checkpoint_awq

        return quantize_checkpoint_awq(src, out, config, awq=awq, calibration=calibration, progress=progress,
                                       include_lm_head=include_lm_head)
    from nnopt.llm.smoothquant import quantize_checkpoint_smoothquant

    return quantize_checkpoint_smoothquant(src, out, smooth=smooth, calibration=calibration, progress=progress)


def _distributed(method: str, src: str | Path, out: str | Path, config: WeightQuantConfig,
                 calibration: CalibrationConfig | None, progress: streaming.ProgressFn | None,
                 include_lm_head: bool, gptq: Any, awq: Any, smooth: Any) -> dict[str, Any]:
    from nnopt.llm import distributed

    with distributed.distributed_context() as context:
        if method == "gptq":
            result = distributed.quantize_checkpoint_gptq_distributed(
                src, out, config, gptq=gptq, calibration=calibration, progress=progress,
                include_lm_head=include_lm_head, context=context)
        elif method == "awq":
            from nnopt.llm.awq import AWQConfig, awq_layer_method

            awq = awq or AWQConfig()
            awq.validate(config)
            # the name and settings quantize_checkpoint_awq records (the same config.json as one process)
            result = distributed.quantize_checkpoint_layerwise_distributed(
                src, out, config, layer_method=awq_layer_method(config, awq), method="nnopt-awq",
                settings={"awq": dataclasses.asdict(awq)}, calibration=calibration, progress=progress,
                include_lm_head=include_lm_head, context=context)
        else:
            from nnopt.llm.smoothquant import ACTIVATION_SCHEME, SmoothQuantConfig, smoothquant_layer_method

            smooth = smooth or SmoothQuantConfig()
            smooth.validate()
            result = distributed.quantize_checkpoint_layerwise_distributed(
                src, out, config, layer_method=smoothquant_layer_method(smooth), method="nnopt-smoothquant",
                settings={"smoothquant": dataclasses.asdict(smooth)}, calibration=calibration, progress=progress,
                input_activations=dict(ACTIVATION_SCHEME), context=context)
        result["rank"] = context.rank
    return result

"""``nnopt convert`` (any source -> nnopt directory, .keras or .onnx) and ``nnopt quantize-onnx``
(see nnopt.pipeline.convert_run)."""

from __future__ import annotations

import argparse
from typing import Any

from nnopt.errors import ConfigError


def register(commands: Any) -> None:
    """Add ``convert`` and ``quantize-onnx`` to the CLI's subparsers."""
    convert = commands.add_parser(
        "convert", help="convert a model between formats: nnopt directory, .keras, .onnx, HF encoder, torch factory",
        description="Read SRC (an nnopt model directory, a Keras 3 .keras file, a local Hugging Face BERT encoder "
        "directory, or package.module:factory with --weights) and write OUT: a .keras file, an .onnx file, or "
        "else an nnopt model directory. Nothing is downloaded; pickles are refused unless --allow-pickle, and then "
        "read with torch's weights-only unpickler; Keras .h5 files are always refused.",
    )
    convert.add_argument("source", metavar="SRC",
                         help="model directory, .keras file, HF directory, or pkg.mod:factory (on PYTHONPATH)")
    convert.add_argument("-o", "--out", required=True, metavar="OUT",
                         help="output: NAME.keras, NAME.onnx, NAME.xml (OpenVINO IR + NAME.bin; nnopt[openvino]), "
                         "or a directory for an nnopt model")
    convert.add_argument("--weights", default=None, metavar="W",
                         help="weights for a pkg.mod:factory source (.safetensors; .pt/.pth/.bin need --allow-pickle)")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="read .pt/.pth/.bin weights with torch.load(weights_only=True); still never runs code")
    convert.add_argument("--input-shape", default=None, metavar="D[,D...]",
                         help="input shape without the batch (e.g. 1,28,28), for a factory model whose first layer "
                         "is not a Linear")
    convert.add_argument("--int8-weights", choices=("uint8", "int8"), default="uint8",
                         help=".onnx output of an int8 model: uint8 (default) writes U8U8, right on every CPU; int8 "
                         "writes U8S8/S8S8, about 1.8x faster in ONNX Runtime with VNNI but wrong without it (refused "
                         "on such a CPU)")
    convert.add_argument("--overwrite", action="store_true", help="replace an earlier output at OUT")
    convert.set_defaults(handler=cmd_convert)

    quant = commands.add_parser(
        "quantize-onnx", help="8-bit dynamic quantization of an .onnx file with ONNX Runtime",
        description="Quantize SRC.onnx with ONNX Runtime's dynamic 8-bit quantization (8-bit weights, activations "
        "quantized at run time) and write OUT.onnx atomically; prints file bytes before and after and the largest "
        "output difference on random inputs. External data of SRC must lie in its own directory.",
    )
    quant.add_argument("source", metavar="SRC.onnx", help="the ONNX model to quantize (never modified)")
    quant.add_argument("-o", "--out", required=True, metavar="OUT.onnx", help="output .onnx file")
    quant.add_argument("--per-tensor", action="store_true",
                       help="one weight scale per tensor instead of per output channel")
    quant.add_argument("--weight-type", choices=("uint8", "int8"), default="uint8",
                       help="uint8 (default): U8U8 kernels, exact on every CPU; int8: U8S8, faster with VNNI but "
                       "saturating without it (refused on such a CPU)")
    quant.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx")
    quant.set_defaults(handler=cmd_quantize_onnx)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,28,28"`` -> ``(1, 28, 28)``; a :class:`ConfigError` unless every size is an integer >= 1."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ConfigError(f"--input-shape takes comma-separated sizes >= 1, e.g. 1,28,28; got {text!r}")
    return tuple(int(p) for p in parts)


def cmd_convert(args: argparse.Namespace) -> int:
    from nnopt.pipeline.convert_run import run_convert

    result = run_convert(args.source, args.out, weights=args.weights, allow_pickle=args.allow_pickle,
                         overwrite=args.overwrite, input_shape=parse_shape(args.input_shape),
                         int8_weights=args.int8_weights)
    print(result)
    return 0


def cmd_quantize_onnx(args: argparse.Namespace) -> int:
    from nnopt.pipeline.convert_run import run_quantize_onnx

    result = run_quantize_onnx(args.source, args.out, per_channel=not args.per_tensor, overwrite=args.overwrite,
                               weight_type=args.weight_type)
    print(result)
    return 0

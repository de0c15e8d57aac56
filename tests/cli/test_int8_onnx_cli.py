"""``nnopt int8-onnx``: a saved CNN and an .npy of images in, an int8 ONNX file and a JSON report out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnopt.cli import main

pytest.importorskip("onnxruntime")


def test_int8_onnx_writes_the_file_and_a_measured_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nnopt
    from nnopt.models.registry import create_model

    model = create_model("mobilenet_v2", image_size=32, width=0.25, num_classes=10, seed=0)
    nnopt.save_model(model, tmp_path / "model")
    images = torch.randn(80, 3, 32, 32).numpy().astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    before = (tmp_path / "images.npy").read_bytes()
    out, report = tmp_path / "model.int8.onnx", tmp_path / "report.json"
    code = main(["int8-onnx", str(tmp_path / "model"), "-o", str(out), "--data", str(tmp_path / "images.npy"),
                 "--calibration-samples", "24", "--validation-samples", "16", "--max-float-layers", "1",
                 "--batch", "4", "--seconds", "0", "--runtimes", "onnxruntime", "--json", str(report),
                 "--distill-steps", "3"])
    assert code == 0 and out.stat().st_size > 0
    doc = json.loads(report.read_text())
    assert doc["held_out"]["rows"] == 16 and 0.0 <= doc["held_out"]["agreement"] <= 1.0
    assert "onnxruntime fp32" in doc["latency_ms"] and "onnxruntime int8" in doc["latency_ms"]
    assert doc["fastest"] in doc["latency_ms"] and doc["int8"]["steps"][0]["float_layers"] == 0
    assert doc["int8"]["options"]["distill_steps"] == 3
    # distillation runs only where the fallback's steps missed the target, and says whether its file was kept
    fallback = [step for step in doc["int8"]["steps"] if not step.get("distilled")]
    distilled = [step for step in doc["int8"]["steps"] if step.get("distilled")]
    missed = max(step["agreement"] for step in fallback) < 0.99
    assert len(distilled) == int(missed) and ("distillation" in doc["int8"]["preparation"]) == missed
    assert "held-out: top-1 agreement" in capsys.readouterr().out
    assert (tmp_path / "images.npy").read_bytes() == before  # the input is never modified
    assert main(["int8-onnx", str(tmp_path / "model"), "-o", str(out), "--data", str(tmp_path / "images.npy")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_int8_onnx_refuses_an_unknown_photo_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nnopt
    from nnopt.models.registry import create_model

    nnopt.save_model(create_model("mobilenet_v2", image_size=32, width=0.25, num_classes=10, seed=0),
                     tmp_path / "model")
    code = main(["int8-onnx", str(tmp_path / "model"), "-o", str(tmp_path / "m.onnx"), "--photo-sources",
                 "sklearn,flickr", "--image-size", "32"])
    assert code == 2 and "unknown photo source(s) flickr" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    np.save(tmp_path / "images.npy", np.zeros((8, 3, 32, 32), np.float32))
    for extra, message in ((["--photo-sources", " , "], "names no source"),
                           (["--data", str(tmp_path / "images.npy"), "--photo-sources", "tuxpaint"],
                            "applies to --data photos only")):
        assert main(["int8-onnx", str(tmp_path / "model"), "-o", str(tmp_path / "m.onnx"), *extra]) == 2
        assert message in capsys.readouterr().err

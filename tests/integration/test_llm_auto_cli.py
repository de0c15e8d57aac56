"""`nnopt llm run` (the example recipes as shipped) and `nnopt llm auto` end to end on a tiny random Llama:
what they write, the choice against the measured report, exit status 3 when nothing meets the budget, and
one-line errors (exit 2) for bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nnopt.cli import main
from nnopt.llm.plan import safetensors_bytes

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "llm"
FAST = ["--window", "64", "--eval-windows", "3", "--calibration-windows", "3", "--calibration-window", "64"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_with_tokenizer):
    return tiny_llama_with_tokenizer




@pytest.mark.parametrize("recipe", ["wanda-2of4-int8", "awq-int4-g128"])
def test_llm_run_runs_each_example_recipe_as_shipped(tiny, tmp_path, capsys, recipe):
    out, report = tmp_path / "out", tmp_path / "run.json"
    assert main(["llm", "run", str(EXAMPLES / f"{recipe}.yaml"), str(tiny), "-o", str(out),
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    measured = json.loads(report.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run.json"]
    assert (out / "nnopt_plan.yaml").is_file() and measured["output_bytes"] == safetensors_bytes(out)
    assert measured["output_bytes"] < measured["source_bytes"] and "peak RSS" in printed
    assert f"wrote {out}" in printed
    if recipe.startswith("wanda"):
        assert measured["sparsity"] == 0.5 and "sparsity 0.5000 (measured in the written file)" in printed
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.quantization_config


def test_llm_run_bad_input_is_one_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - kind: llm-prune\n  - kind: llm-quantize\n    method: gptq\n")
    (tmp_path / "taken").mkdir()
    for args, message in [
        ([str(bad), str(tiny), "-o", str(tmp_path / "o")], f"{bad}: steps[1] (kind llm-quantize): method gptq after"),
        ([str(EXAMPLES / "awq-int4-g128.yaml"), str(tiny), "-o", str(tmp_path / "taken")], "exists"),
        ([str(EXAMPLES / "awq-int4-g128.yaml"), str(tmp_path / "absent"), "-o", str(tmp_path / "o")],
         "not a Hugging Face checkpoint directory"),
    ]:
        assert main(["llm", "run", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("nnopt: error:") and message in err, err
    assert not (tmp_path / "o").exists()


def test_auto_with_a_loose_budget_keeps_the_smallest_and_its_recipe_reproduces_it(tiny, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["llm", "auto", str(tiny), "--max-increase", "1000%", "-o", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    # the default ladder, smallest first: the first candidate (AWQ int4, groups of 128) is within any budget
    assert report["chosen"] == "awq-int4-g128" and [c["name"] for c in report["candidates"]] == ["awq-int4-g128"]
    # the chosen plan is also measured on windows the choice never read, after the selection windows
    held = report["held_out"]
    assert held["windows"] == 3 and held["perplexity"] > 1 and held["source_perplexity"] > 1
    assert held["perplexity"] != report["candidates"][0]["perplexity"] and "held out" in printed
    assert report["not_tried"] == ["gptq-int4-g128", "awq-int4-g64", "gptq-int4-g64", "rtn-int8-channel"]
    (chosen,) = report["candidates"]
    assert chosen["chosen"] and chosen["meets_budget"] and chosen["output_bytes"] == safetensors_bytes(out / "model")
    assert chosen["perplexity"] > 0 and chosen["kl_mean"] > 0 and report["source_perplexity"] > 0
    assert chosen["increase"] == pytest.approx(chosen["perplexity"] / report["source_perplexity"] - 1)
    assert report["method"].startswith("measured: perplexity on 3 windows of 64 tokens of nnopt's evaluation text")
    assert report["peak_rss_bytes"] > 0 and "| awq-int4-g128 |" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["model", "recipe.yaml", "report.json", "report.md"]
    assert "[1/5] awq-int4-g128" in printed and "chosen     awq-int4-g128" in printed
    # the written recipe runs with `nnopt llm run` and gives the same checkpoint
    again = tmp_path / "again"
    assert main(["llm", "run", str(out / "recipe.yaml"), str(tiny), "-o", str(again)]) == 0
    for file in (out / "model").glob("*.safetensors"):
        assert (again / file.name).read_bytes() == file.read_bytes()


def test_auto_choice_agrees_with_its_measured_report(tiny, tmp_path):
    """No budget slack: whichever candidates raise perplexity on this random model, the choice (or exit 3) must
    be what the measurements in the report say."""
    out = tmp_path / "auto"
    code = main(["llm", "auto", str(tiny), "--max-increase", "0", "-o", str(out),
                 "--candidates", "rtn-int8-channel,rtn-int2-channel,rtn-int4-g32", *FAST])
    report = json.loads((out / "report.json").read_text())
    tried = report["candidates"]
    assert [c["name"] for c in tried][0] == "rtn-int2-channel"  # smallest expected size first
    for c in tried:
        assert c["meets_budget"] == (c["perplexity"] <= report["source_perplexity"])
    within = [c for c in tried if c["meets_budget"]]
    if within:
        assert code == 0 and report["chosen"] == min(within, key=lambda c: c["output_bytes"])["name"]
        assert (out / "model").is_dir() and tried[-1]["meets_budget"]  # it stopped at the first one within
    else:
        assert code == 3 and report["chosen"] is None and not (out / "model").exists()
        assert len(tried) == 3


def test_auto_exits_3_with_the_reports_when_no_candidate_meets_the_budget(tiny, tmp_path, monkeypatch, capsys):
    from nnopt.llm import auto, quality

    def worse(model, reference, ids, window, eval_windows):  # every candidate measured 100 times worse
        measured = quality.evaluate(model, ids, reference=reference, window=window, max_windows=eval_windows)
        return dataclasses.replace(measured, perplexity=measured.perplexity * 100)

    monkeypatch.setattr(auto, "_measure", worse)
    out, text = tmp_path / "auto", tmp_path / "held-out.txt"
    text.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 30)
    assert main(["llm", "auto", str(tiny), "--max-increase", "5%", "-o", str(out), "--text", str(text),
                 "--candidates", "rtn-int8-channel,rtn-int4-g64", *FAST]) == 3
    assert "none of the 2 candidates keeps perplexity within +5.00%" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["method"].startswith(f"measured: perplexity on 3 windows of 64 tokens of {text} (the selection")
    assert report["chosen"] is None and [c["meets_budget"] for c in report["candidates"]] == [False, False]
    assert "No candidate meets the budget (exit status 3)" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--max-increase", "lots"], "--max-increase takes a fraction"),
    (["--max-increase=-1%"], "--max-increase must be >= 0"),
    (["--max-increase", "2%", "--candidates", "awq-int3"], "candidate 'awq-int3': expected METHOD-intB-gN"),
    (["--max-increase", "2%", "--window", "1000"], "window 1000 is longer than the model's 128 positions"),
    (["--max-increase", "2%", "--eval-windows", "0"], "--eval-windows must be an integer >= 1"),
    (["--max-increase", "2%", "--candidates", "rtn-int4-g512", "--window", "64", "--eval-windows", "1"],
     "no candidate could run on"),
])
def test_auto_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, args, message):
    assert main(["llm", "auto", str(tiny), "-o", str(tmp_path / "auto"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nnopt: error:") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_auto_measures_an_asymmetric_candidate(tiny, tmp_path, capsys):
    # transformers runs compressed-tensors' asymmetric layers only dequantized at load: nnopt's loader does that
    out = tmp_path / "auto"
    assert main(["llm", "auto", str(tiny), "--candidates", "rtn-int4-g32-asym", "--max-increase", "1000%",
                 "-o", str(out), *FAST]) == 0
    (candidate,) = json.loads((out / "report.json").read_text())["candidates"]
    assert candidate["error"] is None and candidate["chosen"] and candidate["perplexity"] > 1
    capsys.readouterr()

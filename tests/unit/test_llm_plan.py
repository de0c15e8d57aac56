"""LLM recipes (nnopt.llm.plan): parsing with errors that name their place, the YAML round trip, and running a
prune-then-quantize plan on a tiny random Llama (the zeros survive, the intermediate is gone, a failed run
leaves nothing); the selection rule of nnopt.llm.auto."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from checkpoint_files import checkpoint_tensors as _tensors

from nnopt.errors import ConfigError, OutputError
from nnopt.llm.auto import CandidateResult, expected_bits, parse_candidate, select
from nnopt.llm.plan import (
    PLAN_FILE,
    LLMCalibration,
    load_plan,
    parse_plan,
    plan_to_dict,
    plan_to_yaml,
    run_plan,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "llm"
SMALL = {"windows": 3, "window": 32, "batch": 3}
PRUNE = {"kind": "llm-prune", "method": "wanda", "pattern": "2:4"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plan(*steps, **top):
    return {"calibration": SMALL, **top, "steps": list(steps)}


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("data, message", [
    (_plan({"kind": "llm-prunes"}), "plan: steps[0]: unknown kind 'llm-prunes'; known kinds: llm-prune, llm-quantize"),
    (_plan({"method": "rtn"}), "plan: steps[0]: missing key 'kind'"),
    (_plan({"kind": "llm-quantize", "bitz": 4}),
     "plan: steps[0] (kind llm-quantize): unknown key 'bitz' for method rtn; allowed: bits, group_size,"),
    (_plan({"kind": "llm-quantize", "method": "gptq", "clip": False}),
     "unknown key 'clip' for method gptq ('clip' is a setting of method awq); allowed: act_order, bits, block, "
     "damp,"),
    (_plan({"kind": "llm-quantize"}, PRUNE),
     "plan: steps[1] (kind llm-prune): a plan prunes at most once, before it quantizes"),
    (_plan({"kind": "llm-quantize"}, {"kind": "llm-quantize"}),
     "plan: steps[1] (kind llm-quantize): a plan quantizes at most once"),
    (_plan(PRUNE, {"kind": "llm-quantize", "method": "gptq"}),
     "plan: steps[1] (kind llm-quantize): method gptq after llm-prune would fill the pruned zeros"),
    (_plan({**PRUNE, "pattern": "2-4"}), "plan: steps[0] (kind llm-prune): pattern: expected \"N:M\" such as"),
    (_plan({**PRUNE, "pattern": 124}), "YAML 1.1 reads an unquoted 2:4 as the base-60 number 124"),
    (_plan({**PRUNE, "pattern": "4:4"}), "plan: steps[0] (kind llm-prune): PruneConfig.n_m: N:M keeps N of every M"),
    (_plan({**PRUNE, "sparsity": 0.5}), "give sparsity (unstructured) or pattern (N:M), not both"),
    (_plan({"kind": "llm-prune", "method": "obs"}),
     "method: must be one of magnitude, wanda, sparsegpt, got str 'obs'"),
    (_plan({"kind": "llm-prune", "sparsity": 1.5}), "PruneConfig.sparsity: must be a fraction in (0, 1), got 1.5"),
    (_plan({"kind": "llm-quantize", "method": "smoothquant", "bits": 4}), "SmoothQuant is W8A8"),
    (_plan({"kind": "llm-quantize", "group_size": "row"}),
     "group_size: expected a positive integer (inputs per scale) or 'channel'"),
    (_plan({"kind": "llm-quantize", "bits": 9}), "WeightQuantConfig.bits"),
    (_plan({"kind": "llm-quantize", "bits": True}),
     "steps[0] (kind llm-quantize): bits: expected an integer, got bool"),
    (_plan({"kind": "llm-quantize", "method": "gptq", "damp": "1e-3"}),
     "damp: expected a number, got str '1e-3' (YAML reads exponents without a dot as text"),
    (_plan({"kind": "llm-quantize", "method": "gptq", "damp": 2.0}), "GPTQConfig.damp: must be in (0, 1)"),
    (_plan({"kind": "llm-quantize", "method": "gptq", "act_order": True}), "GPTQConfig.act_order with group_size"),
    (_plan({"kind": "llm-quantize", "method": "awq", "grid": 1}), "AWQConfig.grid: needs at least 2 points"),
    (_plan({"kind": "llm-quantize", "method": "smoothquant", "alpha": 1.5}), "SmoothQuantConfig.alpha"),
    ({"steps": [{"kind": "llm-quantize"}], "calibration": {"windowz": 2}},
     "plan: calibration: unknown key 'windowz'; allowed: batch, text, window, windows"),
    ({"steps": [{"kind": "llm-quantize"}], "calibration": {"window": 1}},
     "CalibrationConfig.window: must be at least 2"),
    ({"steps": [{"kind": "llm-quantize"}], "recipe": "x"}, "plan: unknown key 'recipe'; allowed: calibration,"),
    ({"steps": []}, "plan: steps: expected a non-empty list"),
    ({"name": "x"}, "plan: missing key 'steps'"),
    ([1, 2], "plan: expected a mapping with a 'steps' list, got list"),
])
def test_bad_plans_name_the_place_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as info:
        parse_plan(data)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "R.yaml"
    path.write_text("steps:\n  - kind: llm-prune\n    pattern: 2:4\n  - kind: llm-quantize\n    bitz: 4\n")
    with pytest.raises(ConfigError, match=rf"^{path}: steps\[0\] \(kind llm-prune\): pattern: .* base-60"):
        load_plan(path)
    path.write_text("steps: [kind: llm-quantize\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line \d+, column \d+: invalid YAML"):
        load_plan(path)
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_plan(tmp_path / "absent.yaml")


@pytest.mark.parametrize("data", [
    _plan(PRUNE, {"kind": "llm-quantize", "method": "rtn", "bits": 8, "group_size": "channel"}, name="a",
          description="b"),
    _plan({"kind": "llm-prune", "method": "sparsegpt", "sparsity": 0.6, "damp": 0.05, "block": 64},
          {"kind": "llm-quantize", "method": "awq", "group_size": 32, "symmetric": False, "clip": False}),
    _plan({"kind": "llm-quantize", "method": "gptq", "group_size": "channel", "act_order": True, "damp": 0.02}),
    _plan({"kind": "llm-quantize", "method": "smoothquant", "alpha": 0.8}),
    {"steps": [{"kind": "llm-prune", "method": "magnitude"}], "calibration": {"text": "mine.txt"}},
])
def test_yaml_round_trip(data, tmp_path):
    plan = parse_plan(data)
    assert parse_plan(plan_to_dict(plan)) == plan
    path = tmp_path / "plan.yaml"
    path.write_text(plan_to_yaml(plan))
    assert load_plan(path) == plan


def test_defaults_and_the_mapping_to_the_configs():
    plan = parse_plan({"steps": [{"kind": "llm-prune"}, {"kind": "llm-quantize", "method": "awq"}]})
    assert plan.prune.config.method == "wanda" and plan.prune.config.target_sparsity == 0.5
    q = plan.quantize
    assert (q.weights.bits, q.weights.group_size, q.weights.symmetric, q.include_lm_head) == (4, 128, True, False)
    assert q.settings.clip is True and plan.calibration == LLMCalibration(32, 512, 4, None)
    sq = parse_plan({"steps": [{"kind": "llm-quantize", "method": "smoothquant"}]}).quantize
    assert (sq.weights.bits, sq.weights.per_channel, sq.weights.group_size) == (8, True, None)


@pytest.mark.parametrize("name", ["wanda-2of4-int8", "awq-int4-g128"])
def test_the_example_recipes_parse_and_round_trip(name):
    plan = load_plan(EXAMPLES / f"{name}.yaml")
    assert plan.name == name and parse_plan(plan_to_dict(plan)) == plan


def test_gptq_fills_pruned_zeros_and_rtn_keeps_them():
    """Why GPTQ is refused after pruning: with correlated inputs its updates make pruned weights non-zero."""
    from nnopt.llm.gptq import gptq_codes, hessian
    from nnopt.llm.streaming import dequantize_rtn, rtn_codes
    from nnopt.quantization.weights import WeightQuantConfig

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    pruned = torch.rand(32, 64, generator=g) < 0.5
    w[pruned] = 0
    x = torch.randn(2048, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(2048, 64, generator=g)
    for config in (WeightQuantConfig(bits=4, group_size=32), WeightQuantConfig(bits=4, group_size=32, symmetric=False),
                   WeightQuantConfig(bits=8, per_channel=True)):
        gptq = dequantize_rtn(*gptq_codes(w, hessian(x), config), config.group_size)
        rtn = dequantize_rtn(*rtn_codes(w, config), config.group_size)
        assert bool((rtn[pruned] == 0).all())
        assert int((gptq[pruned] != 0).sum()) > 10, config


# ------------------------------------------------------------------------------------------ candidates of auto


def test_candidate_names_and_their_expected_sizes():
    assert expected_bits(parse_candidate("awq-int4-g128")) == 4.25
    # a float32 scale and a zero point packed at 4 bits per group
    assert expected_bits(parse_candidate("rtn-int4-g64-asym")) == 4 + (32 + 4) / 64
    assert expected_bits(parse_candidate("rtn-int8-channel")) == 8
    assert parse_candidate("smoothquant-w8a8").quantize.method == "smoothquant"
    plan = parse_candidate("gptq-int4-g32", LLMCalibration(4, 64, 2))
    assert plan.calibration == LLMCalibration(4, 64, 2) and plan.quantize.weights.group_size == 32
    with pytest.raises(ConfigError, match="candidate 'awq-int3'"):
        parse_candidate("awq-int3")
    assert parse_candidate(str(EXAMPLES / "wanda-2of4-int8.yaml")).prune is not None


def _measured(name, increase, size, within):
    return CandidateResult(name=name, description="", recipe={}, expected_bits=4, perplexity=10 * (1 + increase),
                           increase=increase, kl_mean=0.01, output_bytes=size, seconds=1.0, meets_budget=within)


def test_select_takes_the_smallest_measured_within_the_budget():
    tried = [_measured("a", 0.05, 100, False), _measured("b", 0.01, 120, True), _measured("c", 0.0, 110, True),
             _measured("d", 0.0, 110, True), dataclasses.replace(_measured("e", 0, 0, False), error="no")]
    assert select(tried) == 2  # c: the smallest within; d has the same size and comes later
    assert select([_measured("a", 0.05, 100, False), _measured("b", 0.5, 90, False)]) is None
    assert select([]) is None


# ------------------------------------------------------------------------------------------ running


@pytest.fixture(scope="module")
def tiny(tiny_llama_with_tokenizer):
    return tiny_llama_with_tokenizer



def _zero_codes(stored, base, bits):
    """Where the written codes of ``base`` dequantize to exactly 0 (code == zero point)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(stored[f"{base}.weight_shape"].tolist())
    codes = unpack_from_int32(stored[f"{base}.weight_packed"], bits, shape)
    zero = stored.get(f"{base}.weight_zero_point")
    if zero is None:
        return codes == 0
    groups = stored[f"{base}.weight_scale"].shape[1]
    zero = unpack_from_int32(zero, bits, torch.Size((shape[0], groups)), packed_dim=0)  # packed along rows
    return codes == zero.to(codes.dtype).repeat_interleave(shape[1] // groups, dim=1)


@pytest.mark.parametrize("quantize, bits", [
    ({"kind": "llm-quantize", "method": "awq", "bits": 4, "group_size": 32, "symmetric": False, "grid": 4,
      "clip_grid": 3}, 4),
    ({"kind": "llm-quantize", "method": "rtn", "bits": 8, "group_size": "channel"}, 8),
    ({"kind": "llm-quantize", "method": "smoothquant"}, 8),
])
def test_prune_then_quantize_keeps_the_zeros_and_leaves_no_intermediate(tiny, tmp_path, quantize, bits):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    plan = parse_plan(_plan(PRUNE, quantize))
    steps = []
    result = run_plan(plan, tiny, tmp_path / "out", progress=lambda title: (
        lambda done, total, unit: steps.append((title, done, total))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no intermediate, no partial
    assert load_plan(tmp_path / "out" / PLAN_FILE) == plan
    assert [s["kind"] for s in result["steps"]] == ["llm-prune", "llm-quantize"]
    assert {title for title, _, _ in steps} == {"pruning", "quantizing"} and steps[-1][1] == steps[-1][2]
    assert result["sparsity"] == 0.5 and result["steps"][0]["pattern_holds"]
    assert result["output_bytes"] == sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert result["output_bytes"] < result["source_bytes"] and result["peak_rss_bytes"] > 0
    stored = _tensors(tmp_path / "out")
    bases = [k.removesuffix(".weight_packed") for k in stored if k.endswith(".weight_packed")]
    assert len(bases) == 14
    for base in bases:  # at least the pruned zeros: every group of 4 inputs still holds 2 exact zeros
        zeros = _zero_codes(stored, base, bits)
        assert bool((zeros.reshape(-1, 4).sum(dim=1) >= 2).all()), base
    kwargs = {}
    if not plan.quantize.weights.symmetric:  # transformers 5.25's default path mis-sizes packed zero points
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", **kwargs).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(20).reshape(2, 10)).logits).all()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] and config["nnopt_sparsity"]["pattern"] == "2:4"


def test_a_failed_step_leaves_no_output_and_no_intermediate(tiny, tmp_path):
    # groups of 256 inputs fit down_proj but not q_proj (128): the quantize step fails after the prune step ran
    plan = parse_plan(_plan({"kind": "llm-prune", "method": "magnitude"},
                            {"kind": "llm-quantize", "group_size": 256}))
    with pytest.raises(ConfigError, match="group_size: 256 exceeds the input dimension 128"):
        run_plan(plan, tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="exists"):
        run_plan(plan, tiny, tmp_path / "out")


def test_own_calibration_text(tiny, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    plan = parse_plan({"calibration": {"windows": 2, "window": 32, "text": str(text)},
                       "steps": [{"kind": "llm-prune", "sparsity": 0.25}]})
    result = run_plan(plan, tiny, tmp_path / "out")
    assert result["steps"][0]["calibration_windows"] == 2 and len(result["calibration_text_sha256"]) == 64
    assert result["sparsity"] == 0.25 and result["format"] == "safetensors"
    short = parse_plan({"calibration": {"windows": 2, "window": 100_000, "text": str(text)},
                        "steps": [{"kind": "llm-prune"}]})
    with pytest.raises(ConfigError, match=f"calibration text {text}: the text has .* fewer than one window"):
        run_plan(short, tiny, tmp_path / "out2")


def test_a_plan_built_in_python_is_checked_as_a_parsed_one(tiny, tmp_path):
    parsed = parse_plan(_plan({"kind": "llm-prune", "method": "magnitude"}, {"kind": "llm-quantize"}))
    gptq = dataclasses.replace(parsed.quantize, method="gptq")
    with pytest.raises(ConfigError, match="method gptq after llm-prune would fill the pruned zeros"):
        run_plan(dataclasses.replace(parsed, quantize=gptq), tiny, tmp_path / "out")
    with pytest.raises(ConfigError, match="the plan has no step"):
        run_plan(dataclasses.replace(parsed, prune=None, quantize=None), tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

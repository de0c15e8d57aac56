"""Known-answer checks of int8 kernels, and int8 layers that stay exact whichever kernels pass here.

Run twice by `make test`: as is, and with ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN then uses its AVX2 kernels,
whose u8×s8 pair sums saturate), so both outcomes of the checks are exercised on any CI machine.
"""

from __future__ import annotations

import time

import pytest
import torch

import nnopt
from nnopt import cpu, envinfo
from nnopt.layers import kernel_checks as KC
from nnopt.layers import kernels as K
from nnopt.layers.int8 import Int8DynamicLinear, Int8StaticLinear


def _saturating_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What ``vpmaddubsw`` computes: products summed in adjacent pairs into saturating int16 lanes, then
    added up exactly (a u8×s8 GEMM on an x86 CPU without VNNI)."""
    products = x[:, None, :] * w[None, :, :]  # (m, n, k)
    pairs = products.reshape(*products.shape[:2], -1, 2).sum(-1).clamp(-32768, 32767)
    return pairs.sum(-1)


def test_a_saturating_kernel_fails_and_an_exact_one_passes():
    assert KC.known_answer_error(lambda x, w: x @ w.t()) == 0
    assert KC.known_answer_error(_saturating_gemm) > 1e5  # 255·127·2 = 64770 does not fit in 16 bits
    # codes that cannot saturate (7-bit activations: 127·127·2 < 32768) pass through the same fake kernel
    assert KC.known_answer_error(_saturating_gemm, activation_range=(0, 127)) == 0
    check = KC.run_check("fake-u8s8", _saturating_gemm, (0, 255))
    assert check.passed is False and "saturating" in check.detail and "FAILED" in check.summary()


def test_a_kernel_that_raises_or_returns_the_wrong_shape_fails():
    def broken(x, w):
        raise RuntimeError("no kernel for this shape")

    check = KC.run_check("broken", broken, (0, 255))
    assert check.passed is False and "RuntimeError" in check.detail
    assert KC.known_answer_error(lambda x, w: (x @ w.t())[:, :-1]) == float("inf")
    assert KC.known_answer_error(lambda x, w: (x @ w.t()).double() * float("nan")) == float("inf")


def test_extreme_codes_hold_the_saturating_pairs():
    x, w = KC.extreme_codes(6, 8, 6, (0, 255))
    assert (x[0] == 255).all() and (x[1] == 0).all() and (w[0] == 127).all() and (w[1] == -127).all()
    assert int(w.min()) >= -127 and int(x.max()) <= 255


def test_every_torch_kernel_has_a_verdict_and_the_fallback_is_exact():
    checks = {c.kernel: c for c in KC.check_all(KC.TORCH_KERNELS)}
    assert checks["fp32-exact"].passed is True
    for check in checks.values():
        assert check.passed in (True, False, None) and check.summary()
    if envinfo.onednn_isa_cap() == "AVX2" and checks["onednn-u8s8"].passed is not None:
        # oneDNN's AVX2 u8×s8 kernels sum pairs into 16 bits: the check must catch it
        assert checks["onednn-u8s8"].passed is False


def test_fp32_exact_matmul_blocks_where_one_float32_product_would_round():
    """Σ = 2048 · 127 · 127 + 127 = 33,032,319: odd and above 2^24, so a single float32 GEMM cannot hold it."""
    x = torch.full((1, 2049), 127, dtype=torch.int8)
    x[0, -1] = 1
    w = torch.full((3, 2049), 127, dtype=torch.int8)
    assert int((x.float() @ w.float().t())[0, 0]) != 33_032_319  # what the blocks are for
    assert K.fp32_exact_int8_matmul(x, w).tolist() == [[33_032_319] * 3]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast must not turn it into bf16
        assert K.fp32_exact_int8_matmul(x, w).tolist() == [[33_032_319] * 3]
    assert K.int8_matmul(x, w).tolist() == [[33_032_319] * 3]


def test_a_kernel_failure_has_a_one_line_summary_even_without_an_error_figure():
    def raises(x, w):
        raise RuntimeError("first line\n\nsecond line")

    check = KC.run_check("raising", raises, (0, 255))
    assert check.max_abs_error is None and "\n" not in check.summary()
    assert check.summary() == "FAILED (raised RuntimeError: first line); not used"
    nan = KC.run_check("nan", lambda x, w: (x @ w.t()).double() * float("nan"), (0, 255))
    assert nan.passed is False and nan.max_abs_error is None and "non-finite" in nan.summary()
    import json

    json.dumps(nan.to_dict(), allow_nan=False)  # `nnopt env --json` stays valid JSON


def test_a_check_first_asked_under_autocast_is_still_exact(monkeypatch):
    monkeypatch.delitem(KC._RESULTS, "fp32-exact", raising=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert KC.check_kernel("fp32-exact").passed is True


def test_fp32_exact_matmul_is_exact_past_its_block_depth():
    x, w = KC.extreme_codes(5, 3000, 7, (-128, 127))
    x[0], w[0] = -128, -127  # 3000 · 128 · 127 > 2^24: a single float32 GEMM would round
    got = K.fp32_exact_int8_matmul(x.to(torch.int8), w.to(torch.int8))
    assert got.dtype == torch.int32 and torch.equal(got.long(), x @ w.t())


def _force(monkeypatch, **verdicts: bool) -> None:
    for name, passed in verdicts.items():
        monkeypatch.setitem(KC._RESULTS, name, KC.KernelCheck(name, passed, 1.0 if not passed else 0.0, "forced"))


@pytest.mark.parametrize("verdicts", [{}, {"torch-int-mm": False}, {"torch-int-mm": False, "fp32-exact": False}])
def test_int8_matmul_is_exact_whichever_kernels_pass(monkeypatch, verdicts):
    _force(monkeypatch, **verdicts)
    x, w = KC.extreme_codes(9, 1500, 11, (-128, 127))
    assert torch.equal(K.int8_matmul(x.to(torch.int8), w.to(torch.int8)).long(), x @ w.t())


def _extreme_dynamic_linear() -> tuple[Int8DynamicLinear, torch.Tensor]:
    """A layer and an input whose codes saturate a u8×s8 kernel without VNNI: positive activations at the
    top of the range meet rows of same-signed weights at ±127."""
    source = torch.nn.Linear(256, 12, bias=False)
    with torch.no_grad():
        source.weight.fill_(0.5)
        source.weight[1::2] = -0.5
    module = Int8DynamicLinear(source)
    module.set_weight(source.weight.detach())
    x = torch.full((4, 256), 3.0)
    x[:, 0] = -0.01  # the range holds 0, as dynamic quantization needs; all other codes are 255
    return module.eval(), x


def _integer_reference(module: Int8DynamicLinear, x: torch.Tensor) -> torch.Tensor:
    """The exact output for the codes the layer uses: int64 GEMM, then the float scales."""
    _, step, zero = K.quantize_activation_u8(x)
    codes = torch.quantize_per_tensor(x, step, zero, torch.quint8).int_repr()  # the same codes, as a plain tensor
    acc = (codes.long() - zero) @ module.weight_q.long().t()
    return acc.double() * step * module.weight_step.double()


@pytest.mark.parametrize("verdicts", [{}, {"onednn-u8s8": False}, {"onednn-u8s8": False, "torch-int-mm": False}])
def test_dynamic_int8_linear_is_exact_on_saturating_codes(monkeypatch, verdicts):
    _force(monkeypatch, **verdicts)
    module, x = _extreme_dynamic_linear()
    with torch.inference_mode():
        out = module(x)
    exact = _integer_reference(module, x)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-3)
    # and so the output is within the quantization error of the fp32 product
    fp32 = x @ module.dense_weight().t()
    assert float((out - fp32).abs().max()) <= float(K.quantize_activation_u8(x)[1]) * 256 * 0.5 * 0.5 + 1e-3


@pytest.mark.parametrize("verdicts", [{}, {"torch-int-mm": False}])
def test_static_int8_linear_is_exact_on_saturating_codes(monkeypatch, verdicts):
    _force(monkeypatch, **verdicts)
    source = torch.nn.Linear(512, 6)
    module = Int8StaticLinear(source)
    with torch.no_grad():
        weight = torch.full((6, 512), 0.25)
        weight[::2] *= -1
    module.set_weight(weight)
    module.set_input(torch.tensor(40.0), torch.tensor(-128, dtype=torch.int32))  # 0 → code −128, 6.375 → 127
    x = torch.full((3, 512), 6.375)
    with torch.inference_mode():
        out = module(x)
    codes = module.quantize_input(x).long()
    exact = ((codes + 128) @ module.weight_q.long().t()).double() / 40.0 * module.weight_step.double()
    torch.testing.assert_close(out.double(), exact + source.bias.double(), rtol=1e-5, atol=1e-3)


def test_onnxruntime_kernels_are_checked_when_installed():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    checks = {c.kernel: c for c in KC.check_all()}
    # u8×u8 widens to 16 bits before multiplying: exact on every x86 CPU, and so what nnopt's exports use
    assert checks["onnxruntime-u8u8"].passed is True and checks["onnxruntime-qdq-u8u8"].passed is True
    if envinfo.has_vnni(envinfo.cpu_features()):
        assert checks["onnxruntime-u8s8"].passed is True


def test_env_and_advise_report_the_checks(capsys):
    from nnopt.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "int8 kernel fp32-exact" in out and "passed" in out and "ISA class" in out


def test_isa_class_and_features_under_a_cap():
    epyc_zen3 = "flags : fpu sse4_2 fma avx avx2 bmi2\n"
    xeon = "flags : fma avx2 avx512f avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16\n"
    assert envinfo.isa_class(envinfo.effective_cpu_features(epyc_zen3, cap=None)) == "AVX2"
    assert envinfo.isa_class(envinfo.effective_cpu_features(xeon, cap=None)) == "AMX"
    assert envinfo.isa_class(envinfo.effective_cpu_features(xeon, cap="AVX512_CORE_VNNI")) == "AVX-512 VNNI"
    assert envinfo.isa_class(envinfo.effective_cpu_features(xeon, cap="avx2")) == "AVX2"
    assert envinfo.isa_class(envinfo.effective_cpu_features(xeon, cap="AVX2_VNNI")) == "AVX-VNNI"
    # oneDNN's levels are no single chain: AVX512_CORE does not include AVX2_VNNI
    assert envinfo.isa_class(envinfo.effective_cpu_features(xeon, cap="AVX512_CORE")) == "AVX-512"
    assert envinfo.has_vnni(envinfo.effective_cpu_features(xeon, cap="AVX512_CORE")) is False
    assert envinfo.has_vnni(envinfo.effective_cpu_features(epyc_zen3, cap=None)) is False
    assert envinfo.has_vnni(envinfo.effective_cpu_features(xeon, cap="AVX2")) is False
    capped = envinfo.effective_cpu_features(xeon, cap="AVX512_CORE_BF16")
    assert capped["avx512_bf16"] and not capped["amx_bf16"] and not capped["amx_int8"]
    assert envinfo.isa_class(dict.fromkeys(envinfo.CPU_FEATURES)) == "unknown"


def test_the_cap_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert envinfo.onednn_isa_cap() == "AVX2"
    assert envinfo.environment()["onednn_max_cpu_isa"] == "AVX2"
    assert envinfo.environment()["isa"] in ("AVX2", "other", "unknown")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert envinfo.onednn_isa_cap() is None


def test_bf16_without_native_support_is_refused_in_under_a_second(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_features", lambda cpuinfo=None: dict.fromkeys(envinfo.CPU_FEATURES, False))
    native, why = envinfo.bf16_support()
    assert native is False and "neither AVX-512 BF16 nor AMX-BF16" in why
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    start = time.monotonic()
    with pytest.raises(nnopt.NnoptError, match="needs native bf16 and the CPU has neither"):
        nnopt.quantize(model, nnopt.DynamicQuantConfig(attention_dtype="bfloat16"))
    assert time.monotonic() - start < 1.0


def test_bf16_under_the_avx2_cap_names_the_cap(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_features", lambda cpuinfo=None: dict.fromkeys(envinfo.CPU_FEATURES, True))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    native, why = envinfo.bf16_support()
    assert native is False and "ONEDNN_MAX_CPU_ISA=AVX2" in why


def test_nnopt_env_under_the_avx2_cap_shows_the_failed_check(tmp_path):
    """docs/cpus.md's example: `ONEDNN_MAX_CPU_ISA=AVX2 nnopt env` reads as an AVX2 CPU."""
    import os
    import subprocess
    import sys

    if not K.onednn_int8_available() or not envinfo.cpu_features().get("avx2"):
        pytest.skip("needs an x86 CPU with AVX2 and torch's oneDNN int8 kernels")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "nnopt", "env"], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "AVX2 (ONEDNN_MAX_CPU_ISA=AVX2)" in out
    assert "int8 kernel onednn-u8s8" in out and "FAILED" in out and "int8 kernel fp32-exact" in out


def test_bf16_on_arm_reads_the_bf16_feature(monkeypatch, tmp_path):
    """On aarch64 the x86 flags are all absent: bf16 is native where Arm's bf16 extension is listed, and
    unknown (not refused) where it is not."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu, "CPUINFO", info)
    info.write_text("processor : 0\nFeatures : fp asimd sve bf16 i8mm\n")
    assert cpu.bf16_support()[0] is True
    info.write_text("processor : 0\nFeatures : fp asimd\n")
    native, why = cpu.bf16_support()
    assert native is None and "aarch64" in why
    cpu.require_native_bf16("anything")  # unknown is not refused


def test_the_fp32_fallback_keeps_float_codes_only_where_it_runs_and_drops_them_on_new_weights(monkeypatch):
    source = torch.nn.Linear(16, 4)
    module = Int8StaticLinear(source)
    module.set_weight(source.weight.detach())
    _force(monkeypatch, **{"torch-int-mm": True})
    monkeypatch.setitem(K._FASTER, "cpu", "torch-int-mm")  # and timed faster than the float32 product here
    assert module.gemm_codes_fp32() is None  # an int8 kernel runs: no float copy of the weights
    _force(monkeypatch, **{"torch-int-mm": False, "fp32-exact": True})
    codes = module.gemm_codes_fp32()
    assert codes is not None and torch.equal(codes, module.weight_q.float()) and module.gemm_codes_fp32() is codes
    module.set_weight(-source.weight.detach())
    assert torch.equal(module.gemm_codes_fp32(), module.weight_q.float())  # refreshed with the codes


def test_where_both_exact_products_pass_the_faster_one_here_runs(monkeypatch):
    """torch._int_mm is exact on AVX2-only CPUs too, but far slower there than the float32 product."""
    _force(monkeypatch, **{"onednn-u8s8": False, "torch-int-mm": True, "fp32-exact": True})
    for faster in ("torch-int-mm", "fp32-exact"):
        monkeypatch.setitem(K._FASTER, "cpu", faster)
        assert K.int8_gemm_path(dynamic=True) == faster and K.int8_gemm_path(dynamic=False) == faster
    _force(monkeypatch, **{"torch-int-mm": False})
    assert K.int8_gemm_path(dynamic=False) == "fp32-exact"  # only what passed its check is timed
    assert K._time_exact_gemms(rounds=1) in ("torch-int-mm", "fp32-exact")


def test_the_fp32_fallback_runs_a_layer_built_in_inference_mode(monkeypatch):
    """Inference tensors keep no version counter: the float codes' cache must not ask for one."""
    monkeypatch.setitem(K._FASTER, "cpu", "fp32-exact")
    _force(monkeypatch, **{"torch-int-mm": True, "fp32-exact": True})
    with torch.inference_mode():
        source = torch.nn.Linear(8, 4)
        module = Int8StaticLinear(source)
        module.set_weight(source.weight)
        x = torch.randn(3, 8)
        assert module(x).shape == (3, 4) and module.gemm_codes_fp32() is not None

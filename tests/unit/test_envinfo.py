"""The /proc/cpuinfo parser behind `nnopt env`, on fake cpuinfo texts."""

from __future__ import annotations

from nnopt import cpu, envinfo
from nnopt.metrics import system

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu vme sse sse2 fma avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni avx_vnni
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu vme
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
"""


def test_parse_cpu_flags_reads_the_first_processor():
    flags = envinfo.parse_cpu_flags(X86)
    assert {"fma", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni"} <= flags
    assert "sysret_ss_attrs" not in flags  # the bugs line is not flags
    assert envinfo.parse_cpu_flags(ARM) >= {"asimd", "aes"}
    assert envinfo.parse_cpu_flags("processor : 0\n") == frozenset()


def test_cpu_features_present_and_absent():
    features = envinfo.cpu_features(X86)
    assert set(features) == set(envinfo.CPU_FEATURES)
    assert features["avx512_vnni"] is True and features["fma"] is True and features["avx512_bf16"] is True
    assert features["amx_tile"] is False and features["amx_int8"] is False and features["amx_bf16"] is False
    # "avx_vnni" must not count as "avx512_vnni", nor "avx512f" as "avx2": whole flags only
    only_avx_vnni = envinfo.cpu_features("flags : avx_vnni avx512fx\n")
    assert only_avx_vnni["avx_vnni"] is True
    assert {k: v for k, v in only_avx_vnni.items() if k != "avx_vnni"} == dict.fromkeys(envinfo.CPU_FEATURES[:3] +
                                                                                    envinfo.CPU_FEATURES[4:], False)
    assert all(v is False for v in envinfo.cpu_features(ARM).values())


def test_cpu_model_and_unreadable_cpuinfo(monkeypatch, tmp_path):
    assert envinfo.cpu_model(X86) == "AMD EPYC 9R14 96-Core Processor"
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
    assert envinfo.cpu_features() == dict.fromkeys(envinfo.CPU_FEATURES)  # unknown, not "absent"
    assert system.system_report()["cpu_features_source"] == "unavailable"
    assert isinstance(envinfo.cpu_model(), str)

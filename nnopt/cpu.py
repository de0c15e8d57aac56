"""The CPU's facts that decide which kernels run fast and which run right: model, feature flags, the
ISA class as oneDNN may use it (``ONEDNN_MAX_CPU_ISA``), VNNI and native bf16.

A base module: it imports nothing of nnopt's but errors, so that every layer may ask it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flags that decide which kernels run fast, and which run right: fma/avx2 (fp32 GEMM),
# avx512f, VNNI (int8 dot products into 32-bit lanes; without it u8×s8 pairs are summed into saturating
# 16-bit lanes), bf16, and AMX tiles (oneDNN's int8/bf16 matrix units).
CPU_FEATURES = ("fma", "avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                "amx_bf16")

# ONEDNN_MAX_CPU_ISA caps the instructions oneDNN (torch's int8/bf16 matrix kernels) may use. Each level
# (oneDNN's names, "CPU dispatcher control", with aliases) lets oneDNN use these of CPU_FEATURES; the
# levels are not one chain: AVX2_VNNI is not part of AVX512_CORE.
_AVX2 = frozenset({"fma", "avx2"})
_AVX512 = _AVX2 | {"avx512f"}
_AVX512_BF16 = _AVX512 | {"avx512_vnni", "avx512_bf16"}
_AMX = _AVX512_BF16 | {"avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
ONEDNN_ISA_LEVELS: dict[str, frozenset[str]] = {
    "SSE41": frozenset(), "AVX": frozenset(), "AVX2": _AVX2, "AVX2_VNNI": _AVX2 | {"avx_vnni"},
    "AVX2_VNNI_2": _AVX2 | {"avx_vnni"}, "AVX512_CORE": _AVX512, "AVX512_CORE_VNNI": _AVX512 | {"avx512_vnni"},
    "AVX512_CORE_BF16": _AVX512_BF16, "AVX512_CORE_FP16": _AVX512_BF16 | {"avx_vnni"},
    "AVX10_1_512": _AVX512_BF16 | {"avx_vnni"}, "AVX512_CORE_AMX": _AMX, "AVX10_1_512_AMX": _AMX,
    "AVX512_CORE_AMX_FP16": _AMX, "AVX10_1_512_AMX_FP16": _AMX, "AVX10_2_512": _AVX512_BF16 | {"avx_vnni"},
    "AVX10_2_512_AMX_2": _AMX,
}
X86_MACHINES = ("x86_64", "amd64", "i686", "i386")


def _cpuinfo_text() -> str | None:
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def cpu_model(cpuinfo: str | None = None) -> str:
    text = _cpuinfo_text() if cpuinfo is None else cpuinfo
    for line in (text or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in ``/proc/cpuinfo`` text (``flags`` on x86, ``Features`` on ARM)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_features(cpuinfo: str | None = None) -> dict[str, bool | None]:
    """Each of :data:`CPU_FEATURES`: present (True) or absent (False); None for all when the CPU's
    flags cannot be read (no /proc/cpuinfo, e.g. macOS), rather than a guess."""
    text = _cpuinfo_text() if cpuinfo is None else cpuinfo
    if text is None:
        return dict.fromkeys(CPU_FEATURES)
    flags = parse_cpu_flags(text)
    return {name: name in flags for name in CPU_FEATURES}


def onednn_isa_cap() -> str | None:
    """``ONEDNN_MAX_CPU_ISA`` when it names a known level (``ALL``/``DEFAULT``/unknown: None, no cap)."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    level = value.strip().upper() if value else None
    return level if level in ONEDNN_ISA_LEVELS else None


def effective_cpu_features(cpuinfo: str | None = None, cap: str | None = "env") -> dict[str, bool | None]:
    """:func:`cpu_features` as oneDNN may use them: a feature beyond ``ONEDNN_MAX_CPU_ISA`` counts as absent.

    ``cap="env"`` reads the variable; None means no cap; a level name (``"AVX2"``) applies that cap.
    """
    features = cpu_features(cpuinfo)
    level = onednn_isa_cap() if cap == "env" else (cap.upper() if cap else None)
    allowed = ONEDNN_ISA_LEVELS.get(level) if level else None
    if allowed is None:
        return features
    return {name: (present and name in allowed) if present is not None else None
            for name, present in features.items()}


def isa_class(features: dict[str, bool | None] | None = None) -> str:
    """The CPU's class for int8 and bf16 kernels: ``AMX``, ``AVX-512 VNNI``, ``AVX-VNNI``, ``AVX-512`` (no
    VNNI), ``AVX2`` (no VNNI), ``other`` or ``unknown``; from :func:`effective_cpu_features` by default, so
    ``ONEDNN_MAX_CPU_ISA=AVX2`` reads as ``AVX2``.

    >>> isa_class({"avx2": True, "avx512f": False, "avx_vnni": False, "avx512_vnni": False, "amx_int8": False})
    'AVX2'
    """
    f = effective_cpu_features() if features is None else features
    if all(value is None for value in f.values()):
        return "unknown"
    for name, flag in (("AMX", "amx_int8"), ("AVX-512 VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"),
                       ("AVX-512", "avx512f"), ("AVX2", "avx2")):
        if f.get(flag):
            return name
    return "other"


def has_vnni(features: dict[str, bool | None] | None = None) -> bool | None:
    """Whether int8 dot products accumulate into 32 bits (AVX-512 VNNI, AVX-VNNI or AMX); None if unknown."""
    if features is None and platform.machine().lower() not in X86_MACHINES:
        return None  # VNNI is x86's; other CPUs' int8 dot products are not described by these flags
    f = effective_cpu_features() if features is None else features
    if all(f.get(flag) is None for flag in ("avx_vnni", "avx512_vnni", "amx_int8")):
        return None
    return bool(f.get("avx_vnni") or f.get("avx512_vnni") or f.get("amx_int8"))


def bf16_support(device: str = "cpu") -> tuple[bool | None, str]:
    """Whether ``device`` computes bf16 natively (True), emulates it (False) or cannot tell (None), and why.

    CPU: AVX-512 BF16 or AMX-BF16 in ``/proc/cpuinfo``, within ``ONEDNN_MAX_CPU_ISA`` (oneDNN runs torch's
    bf16 matrix products); CUDA: torch's ``is_bf16_supported``.
    """
    if device == "cuda":
        import torch

        native = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return native, "the GPU supports bf16" if native else "this GPU has no native bf16"
    if platform.machine().lower() not in X86_MACHINES:
        text = _cpuinfo_text()
        if text is not None and "bf16" in parse_cpu_flags(text):  # Arm's BF16 extension (Graviton 3/4, ...)
            return True, f"the {platform.machine()} CPU has the bf16 extension"
        return None, f"whether this {platform.machine()} CPU computes bf16 natively is not known to nnopt"
    features = effective_cpu_features()
    if features.get("avx512_bf16") is None and features.get("amx_bf16") is None:
        return None, "the CPU's features could not be read, so whether bf16 is native is unknown"
    present = [name for name, flag in (("AMX-BF16", "amx_bf16"), ("AVX-512 BF16", "avx512_bf16"))
               if features.get(flag)]
    if present:
        return True, f"the CPU has {' and '.join(present)}"
    cap = onednn_isa_cap()
    raw = cpu_features()
    if cap and (raw.get("avx512_bf16") or raw.get("amx_bf16")):
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from this CPU's native bf16 instructions"
    return False, "the CPU has neither AVX-512 BF16 nor AMX-BF16"


def require_native_bf16(what: str, device: str = "cpu") -> None:
    """Refuse ``what`` in one line where bf16 would be emulated (often 10-100x slower than fp32)."""
    from nnopt.errors import UnsupportedModelError

    native, why = bf16_support(device)
    if native is False:
        raise UnsupportedModelError(f"{what} needs native bf16 and {why}; emulated bf16 is far slower than "
                                    "float32 here, so use float32")

"""Fuzzing every loader with random bytes and mutated valid files (deterministic, bounded in time).

Targets: ``nnopt.load_model`` on model directories whose ``model.safetensors`` / ``model.nnpk`` /
``nnopt.json`` is replaced by mutated bytes (the recorded sha256 and size are updated for mutated
weights, so that the damage reaches the parsers instead of stopping at the hash check), the packed
reader itself, and — once ``nnopt.io.sources`` exists — every entry of its ``LOADERS``.

Mutations: bit flips, byte overwrites with boundary values, insertions, deletions, duplicated chunks,
truncation at many points, header-length edits, and structural edits of the JSON inside each format
(wrong types, huge or negative numbers, NaN, deep nesting, missing and unknown keys).

The only acceptable outcomes are success or an ``nnopt.errors.NnoptError``. Every other exception, an
input that uses more than ``PER_INPUT_SECONDS`` of CPU (or blocks past ``HANG_SECONDS``), or one that
raises the peak resident memory by more than ``RSS_LIMIT`` fails the test, naming the case so that it
can be replayed: each case draws from ``np.random.default_rng([SEED, target, index])``, and the message
lists the mutations applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import nnopt
from nnopt.errors import NnoptError
from nnopt.io.packed import pack_tensors, unpack_tensors

SEED = 20250917
# Per input: CPU seconds (robust to a busy shared machine; a valid load takes ~10 ms, ~100 ms for Keras),
# and wall-clock seconds after which an alarm interrupts it (catches inputs that block instead of spin).
PER_INPUT_SECONDS = 2.0
HANG_SECONDS = 5.0
RSS_LIMIT = 256 << 20  # peak resident memory an input may add (the valid files are a few kB)
# Safety net while fuzzing: the address space may grow by at most this much, so that a claimed size the
# loaders fail to bound is refused by the kernel instead of swamping a shared machine. Claims between
# RSS_LIMIT and this still get allocated, and fail the peak-memory check.
ADDRESS_HEADROOM = 2 << 30

_PRE = struct.Struct("<4sBBII")  # the packed format's preamble: magic, version, flags, header_len, crc32
_U64 = struct.Struct("<Q")  # safetensors: little-endian header length


# --------------------------------------------------------------------------- the harness


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that loaders' ``except Exception`` cannot swallow it."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak resident memory per input: Linux resets VmHWM to the current RSS on ``echo 5 > clear_refs``."""

    def __init__(self) -> None:
        self.enabled = self._reset() and _status_kb("VmHWM") is not None

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def start(self) -> int:
        if not self.enabled:
            return 0
        self._reset()
        return (_status_kb("VmRSS") or 0) * 1024

    def growth(self, base: int) -> int:
        return (_status_kb("VmHWM") or 0) * 1024 - base if self.enabled else 0


@dataclasses.dataclass
class Fuzzer:
    """Runs inputs one by one and records every unacceptable outcome with its case name."""

    failures: list[str] = dataclasses.field(default_factory=list)
    outcomes: Counter = dataclasses.field(default_factory=Counter)
    memory: _PeakMemory = dataclasses.field(default_factory=_PeakMemory)

    def run(self, case: str, call: Callable[[], Any]) -> None:
        base = self.memory.start()
        armed = signal.getsignal(signal.SIGALRM) is _alarm  # only inside _guarded(), on the main thread
        if armed:
            signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
        start = time.process_time()
        try:
            try:
                result = call()
                del result
            finally:  # inside the outer try: an alarm that fires just as the call returns is still caught
                if armed:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            self.outcomes["loaded"] += 1
        except _Hang:
            self.outcomes["hung"] += 1
            self.failures.append(f"{case}: still running after {HANG_SECONDS} s (interrupted)")
            return
        except NnoptError:
            self.outcomes["rejected"] += 1
        except Exception as exc:  # noqa: BLE001 - the point: anything else is a finding
            self.outcomes["foreign exception"] += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.failures.append(f"{case}: {type(exc).__name__}: {str(exc)[:300]} "
                                 f"(raised at {where.filename}:{where.lineno})")
        elapsed = time.process_time() - start
        if elapsed > PER_INPUT_SECONDS:
            self.failures.append(f"{case}: took {elapsed:.2f} CPU s (limit {PER_INPUT_SECONDS} s)")
        grown = self.memory.growth(base)
        if grown > RSS_LIMIT:
            self.failures.append(f"{case}: peak memory grew by {grown >> 20} MiB (limit {RSS_LIMIT >> 20} MiB)")

    def check(self, what: str) -> None:
        assert sum(self.outcomes.values()) > 0, f"{what}: no input was run"
        assert not self.failures, (
            f"{what}: {len(self.failures)} inputs failed (outcomes {dict(self.outcomes)}); a case's "
            "'rng [a, b, c]' replays as np.random.default_rng([a, b, c]):\n" + "\n".join(self.failures[:15])
        )


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    """An alarm handler for hangs and an address-space cap as a safety net, both restored afterwards."""
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGALRM, _alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = _status_kb("VmSize")
    capped = False
    if size is not None:
        cap = size * 1024 + ADDRESS_HEADROOM
        if (soft == resource.RLIM_INFINITY or cap < soft) and (hard == resource.RLIM_INFINITY or cap <= hard):
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
            capped = True
    try:
        yield
    finally:
        if capped:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if old_handler is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)


# --------------------------------------------------------------------------- byte mutations

_BOUNDARY = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x20, 0x5B, 0x7B, 0x22]


def _mutate_bytes(data: bytes, rng: np.random.Generator, rounds: int | None = None) -> tuple[bytes, list[str]]:
    """1..4 random byte-level edits; returns the bytes and a description of each edit."""
    buf, notes = bytearray(data), []
    for _ in range(rounds or int(rng.integers(1, 5))):
        n = len(buf)
        op = rng.choice(["flip", "set", "insert", "delete", "truncate", "duplicate", "splice"])
        at = int(rng.integers(0, n + 1)) if n else 0
        if op == "flip" and n:
            at = min(at, n - 1)
            bit = int(rng.integers(8))
            buf[at] ^= 1 << bit
            notes.append(f"flip bit {bit} of byte {at}")
        elif op == "set" and n:
            at = min(at, n - 1)
            buf[at] = int(rng.choice(_BOUNDARY))
            notes.append(f"byte {at} = {buf[at]:#x}")
        elif op == "insert":
            chunk = rng.bytes(int(rng.integers(1, 17)))
            buf[at:at] = chunk
            notes.append(f"insert {chunk.hex()} at {at}")
        elif op == "delete" and n:
            k = int(rng.integers(1, 33))
            del buf[at:at + k]
            notes.append(f"delete {k} bytes at {at}")
        elif op == "truncate" and n:
            del buf[at:]
            notes.append(f"truncate to {at}")
        elif op == "duplicate" and n:
            k = int(rng.integers(1, 65))
            buf[at:at] = buf[at:at + k]
            notes.append(f"duplicate {k} bytes at {at}")
        elif op == "splice":
            k = int(rng.integers(1, 33))
            buf[at:at + k] = rng.bytes(k)
            notes.append(f"random {k} bytes at {at}")
    return bytes(buf), notes


# --------------------------------------------------------------------------- JSON mutations

_DEEP = "__DEEP__"
# Sizes that no allocation can satisfy (or absurd ones): a loader must refuse them, never try.
_HUGE_NUMBERS: list[Any] = [2**31, 2**32 + 1, 2**40, 2**63, -(2**63), 2**64, 10**30, 1e308, -1e308, 1e-320,
                            -1, 0]
_WEIRD: list[Any] = [None, True, False, "", "x" * 1000, "\u00e9\u2603", [], {}, [[]], {"": None}, [None] * 3,
                     0.5, -0.0, float("nan"), float("inf"), _DEEP]


def _paths(obj: Any, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    """Every path (keys / indices) into a JSON value, up to a depth."""
    out = [prefix]
    if depth > 8:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k), depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:64]):
            out += _paths(v, (*prefix, i), depth + 1)
    return out


def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _mutate_json(obj: Any, rng: np.random.Generator) -> tuple[Any, list[str]]:
    """1..3 structural edits of a copy of ``obj``."""
    obj = json.loads(json.dumps(obj))
    notes = []
    for _ in range(int(rng.integers(1, 4))):
        paths = _paths(obj)
        path = paths[int(rng.integers(len(paths)))]
        if not path:  # the root itself
            choice = [_WEIRD[int(rng.integers(len(_WEIRD)))], [obj], {"wrapped": obj}][int(rng.integers(3))]
            obj, note = choice, "replace the root"
            notes.append(note)
            continue
        parent, key = _get(obj, path[:-1]), path[-1]
        value = parent[key]
        op = rng.choice(["huge", "weird", "delete", "add", "number", "string", "swap"])
        if op == "huge":
            parent[key] = _HUGE_NUMBERS[int(rng.integers(len(_HUGE_NUMBERS)))]
        elif op == "weird":
            parent[key] = _WEIRD[int(rng.integers(len(_WEIRD)))]
        elif op == "delete":
            del parent[key]
        elif op == "add":
            target = value if isinstance(value, dict | list) else parent
            if isinstance(target, dict):
                target[f"unknown_{int(rng.integers(100))}"] = _HUGE_NUMBERS[int(rng.integers(len(_HUGE_NUMBERS)))]
            else:
                target.append(target[0] if target else 1)
        elif op == "number" and isinstance(value, int | float) and not isinstance(value, bool):
            parent[key] = [value + 1, value - 1, -value, value * 2**40, value * 1.5, 2**31 - 1][int(rng.integers(6))]
        elif op == "string" and isinstance(value, str):
            parent[key] = [value[:-1], value + "x", value.upper(), "../" + value, value * 3][int(rng.integers(5))]
        elif op == "swap":
            parent[key] = list(value.values()) if isinstance(value, dict) else (
                {str(i): v for i, v in enumerate(value)} if isinstance(value, list) else [value])
        else:
            parent[key] = _HUGE_NUMBERS[int(rng.integers(len(_HUGE_NUMBERS)))]
            op = "huge"
        notes.append(f"{op} at {list(path)!r}")
    return obj, notes


def _dump_json(obj: Any) -> bytes:
    text = json.dumps(obj)
    if _DEEP in text:  # 100 000 nested lists: the parser's recursion limit
        text = text.replace(json.dumps(_DEEP), "[" * 100_000 + "]" * 100_000, 1)
    return text.encode()


# --------------------------------------------------------------------------- format-aware mutations


def _mutate_safetensors(data: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    (n,) = _U64.unpack_from(data)
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    op = rng.choice(["length", "json", "json", "offsets"])
    if op == "length":
        new = [0, 1, n - 1, n + 1, len(data), len(data) - 8, 2**32, 2**63 - 1, 2**64 - 1,
               int(rng.integers(0, 2**31))][int(rng.integers(10))]
        return _U64.pack(new) + data[8:], [f"header length {n} -> {new}"]
    if op == "offsets":
        names = [k for k in header if k != "__metadata__"]
        name = names[int(rng.integers(len(names)))]
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [[end, begin], [begin, end + 4], [0, 2**62], [begin, begin],
                                        [-4, end]][int(rng.integers(5))]
        notes = [f"data_offsets of {name} -> {header[name]['data_offsets']}"]
    else:
        header, notes = _mutate_json(header, rng)
    text = _dump_json(header)
    text += b" " * (-len(text) % 8)
    return _U64.pack(len(text)) + text + body, notes


def _packed_parts(data: bytes) -> tuple[int, int, list, bytes]:
    _, version, flags, hlen, _ = _PRE.unpack_from(data)
    head = data[_PRE.size:_PRE.size + hlen]
    return version, flags, json.loads(zlib.decompress(head) if flags & 1 else head), data[_PRE.size + hlen:]


def _packed_frame(records_json: bytes, blobs: bytes, compress: bool, version: int = 1) -> bytes:
    head = zlib.compress(records_json) if compress else records_json
    body = head + blobs
    return _PRE.pack(b"NNPK", version, int(compress), len(head), zlib.crc32(body)) + body


def _fix_crc(data: bytes) -> bytes:
    if len(data) < _PRE.size or data[:4] != b"NNPK":
        return data
    return data[:10] + struct.pack("<I", zlib.crc32(data[_PRE.size:])) + data[_PRE.size:]


def _mutate_packed(data: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    version, flags, records, blobs = _packed_parts(data)
    op = rng.choice(["bytes", "bytes", "header_len", "json", "json", "shape", "lengths", "flags"])
    if op == "bytes":  # damage anywhere; half the time the checksum is fixed so the parser sees it
        out, notes = _mutate_bytes(data, rng)
        if rng.random() < 0.5:
            out, notes = _fix_crc(out), [*notes, "crc fixed"]
        return out, notes
    if op == "header_len":
        _, v, f, hlen, crc = _PRE.unpack_from(data)
        new = [0, 1, hlen - 1, hlen + 1, 2**32 - 1, len(data)][int(rng.integers(6))] % 2**32
        return _PRE.pack(b"NNPK", v, f, new, crc) + data[_PRE.size:], [f"header_len {hlen} -> {new}"]
    if op == "flags":
        f, v = int(rng.integers(0, 4)), int(rng.choice([0, 1, 2, 255]))
        _, _, _, hlen, crc = _PRE.unpack_from(data)
        return _PRE.pack(b"NNPK", v, f, hlen, crc) + data[_PRE.size:], [f"version {v} flags {f}"]
    i = int(rng.integers(len(records)))
    if op == "shape":  # a plausible record that claims a huge tensor (up to the format's 2^31 elements)
        shapes = [[2**31], [2**16, 2**15], [2**30, 2], [2**31, 1], [0], [2**20] * 2, [3] * 64]
        records[i][2] = shapes[int(rng.integers(len(shapes)))]
        if rng.random() < 0.5:
            records[i][1] = ["f8", "i8", "u1", "b", "bf"][int(rng.integers(5))]
        notes = [f"record {i} shape -> {records[i][2]}, dtype {records[i][1]}"]
    elif op == "lengths":  # move bytes between blobs, keeping the total consistent with the file
        j = int(rng.integers(len(records)))
        k = int(rng.integers(1, 5))
        records[i][7] += k
        records[j][9] -= k
        notes = [f"positions of record {i} +{k}, values of record {j} -{k}"]
    else:
        records, notes = _mutate_json(records, rng)
    return _packed_frame(_dump_json(records), blobs, bool(rng.random() < 0.5), version), notes


def _random_bytes(rng: np.random.Generator, magic: bytes = b"") -> tuple[bytes, list[str]]:
    n = int(rng.choice([0, 1, 7, 8, 13, 14, 64, 1000, 5000]))
    data = rng.bytes(n)
    if magic and rng.random() < 0.5:
        data = magic + data
    return data, [f"{len(data)} random bytes" + (f" after {magic!r}" if data.startswith(magic) and magic else "")]


# --------------------------------------------------------------------------- model directories


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Valid model directories: pruned safetensors, pruned int4 packed, pruned clustered packed, and
    structurally pruned (its record re-creates smaller layers on load)."""
    root = tmp_path_factory.mktemp("fuzz_models")
    dense = nnopt.create_model("simplenet", seed=0)
    pruned = nnopt.prune(dense, nnopt.MagnitudePruneConfig(sparsity=0.7))
    dirs = {
        "safetensors": (pruned, "safetensors"),
        "packed-int4": (nnopt.quantize(pruned, nnopt.WeightQuantConfig(bits=4)), "packed"),
        "packed-cluster": (nnopt.quantize(pruned, nnopt.ClusterConfig(bits=3, iterations=5)), "packed"),
        "structured": (nnopt.prune(dense, nnopt.StructuredPruneConfig(ratio=0.5, importance="l1")), "safetensors"),
    }
    out = {}
    for name, (model, fmt) in dirs.items():
        nnopt.save_model(model, root / name, weights_format=fmt)
        nnopt.load_model(root / name)  # the seeds themselves are valid
        out[name] = root / name
    return out


def _weights_name(directory: Path) -> str:
    meta = json.loads((directory / "nnopt.json").read_text())
    return next(n for n in meta["files"] if n in ("model.safetensors", "model.nnpk"))


def _write_dir(src: Path, dst: Path, weights: bytes | None = None, meta: bytes | None = None) -> Path:
    """A copy of ``src`` with the weights file and/or nnopt.json replaced; for new weights the recorded
    sha256 and size are updated so that load_model parses them instead of stopping at the hash."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    name = _weights_name(src)
    if weights is not None:
        (dst / name).write_bytes(weights)
        record = json.loads((dst / "nnopt.json").read_text())
        record["files"][name] = {"bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
        (dst / "nnopt.json").write_text(json.dumps(record, indent=2))
    if meta is not None:
        (dst / "nnopt.json").write_bytes(meta)
    return dst


def _model_dir_cases(src: Path, rng: np.random.Generator) -> tuple[dict[str, bytes | None], list[str]]:
    """One mutated directory: the weights (format-aware or raw bytes) or nnopt.json."""
    name = _weights_name(src)
    weights = (src / name).read_bytes()
    choice = rng.random()
    if choice < 0.45:
        mutate = _mutate_packed if name == "model.nnpk" else _mutate_safetensors
        data, notes = mutate(weights, rng)
        return {"weights": data}, [f"{name}: {n}" for n in notes]
    if choice < 0.6:
        data, notes = _mutate_bytes(weights, rng)
        return {"weights": data}, [f"{name}: {n}" for n in notes]
    if choice < 0.65:
        data, notes = _random_bytes(rng, b"NNPK" if name == "model.nnpk" else b"")
        return {"weights": data}, [f"{name}: {n}" for n in notes]
    meta = json.loads((src / "nnopt.json").read_text())
    if choice < 0.92:
        obj, notes = _mutate_json(meta, rng)
        return {"meta": _dump_json(obj)}, [f"nnopt.json: {n}" for n in notes]
    data, notes = _mutate_bytes(json.dumps(meta).encode(), rng)
    return {"meta": data}, [f"nnopt.json bytes: {n}" for n in notes]


def test_load_model_survives_mutated_directories(model_dirs, tmp_path):
    fuzzer = Fuzzer()
    per_seed = 50
    with _guarded():
        for t, (label, src) in enumerate(sorted(model_dirs.items())):
            for i in range(per_seed):
                rng = np.random.default_rng([SEED, t, i])
                change, notes = _model_dir_cases(src, rng)
                target = _write_dir(src, tmp_path / "case", change.get("weights"), change.get("meta"))
                fuzzer.run(f"{label} rng [{SEED}, {t}, {i}] [{'; '.join(notes)[:400]}]",
                           lambda target=target: nnopt.load_model(target))
            # truncation at many points of the weights file (hash updated: the parser sees the cut)
            weights = (src / _weights_name(src)).read_bytes()
            for cut in sorted({*range(0, 24, 3), *range(24, len(weights), max(1, len(weights) // 15))}):
                target = _write_dir(src, tmp_path / "case", weights[:cut])
                fuzzer.run(f"{label} truncated to {cut}", lambda target=target: nnopt.load_model(target))
    fuzzer.check("load_model")


def test_packed_reader_survives_mutations(model_dirs):
    seeds = [(model_dirs[k] / "model.nnpk").read_bytes() for k in ("packed-int4", "packed-cluster")]
    g = torch.Generator().manual_seed(0)
    extra, _ = pack_tensors({
        "codes": torch.randint(-4, 4, (33, 7), generator=g, dtype=torch.int8),
        "sparse": torch.randn(300, generator=g) * (torch.rand(300, generator=g) < 0.05),
        "empty": torch.zeros(0, 3), "flags": torch.rand(17, generator=g) < 0.5, "half": torch.randn(5).half(),
    }, {"codes": 3})
    seeds.append(extra)
    fuzzer = Fuzzer()
    with _guarded():
        for t, seed in enumerate(seeds):
            for i in range(200):
                rng = np.random.default_rng([SEED, 100 + t, i])
                data, notes = _mutate_packed(seed, rng) if i % 10 else _random_bytes(rng, b"NNPK")
                fuzzer.run(f"seed {t} rng [{SEED}, {100 + t}, {i}] [{'; '.join(notes)[:400]}]",
                           lambda data=data: unpack_tensors(data))
            for cut in sorted({*range(0, 40), *range(40, len(seed), max(1, len(seed) // 80))}):
                fuzzer.run(f"seed {t} truncated to {cut} (crc fixed)",
                           lambda data=_fix_crc(seed[:cut]): unpack_tensors(data))
    fuzzer.check("unpack_tensors")
    assert fuzzer.outcomes["rejected"] > 0


def test_packed_reader_does_not_allocate_what_the_header_only_claims():
    """A 70-byte file may declare 2^31 mostly-zero elements: memory must follow the bytes really present."""
    t = torch.zeros(1000)
    t[5], t[900] = 1.0, 2.0
    data, _ = pack_tensors({"w": t})
    _, _, records, blobs = _packed_parts(data)
    fuzzer = Fuzzer()
    if not fuzzer.memory.enabled:
        pytest.skip("no /proc/self/clear_refs here: peak memory cannot be measured per input")
    with _guarded():
        for dtype, shape in (("f4", [2**31]), ("f8", [2**31]), ("i8", [2**16, 2**15]), ("f4", [2**28])):
            records[0][1], records[0][2] = dtype, shape
            crafted = _packed_frame(_dump_json(records), blobs, compress=False)
            fuzzer.run(f"{dtype} {shape}", lambda crafted=crafted: unpack_tensors(crafted))
            fuzzer.run(f"{dtype} {shape} with max_bytes", lambda crafted=crafted: unpack_tensors(crafted, 1 << 20))
    fuzzer.check("claimed sizes")
    with pytest.raises(NnoptError, match="more than the 1048576 allowed"):
        unpack_tensors(crafted, max_bytes=1 << 20)


def test_huge_sizes_in_nnopt_json_are_not_allocated(model_dirs, tmp_path):
    """nnopt.json claims a ~400 MB model beside a 27 kB weights file: loading must refuse it cheaply.

    Fails today (reported, nnopt/io/model_dir.py load_model): the architecture is built from the recorded
    config, and recorded passes replay their shapes, before anything is compared with the weights file,
    so a hand-edited record allocates whatever it names (here ~400-500 MiB and ~1.5 s each; hidden=[2**22, 32]
    takes 1.7 GiB and ~9 s). The Hugging Face loader already guards against this (parameter_count()
    against the stored values before building).
    """
    fuzzer = Fuzzer()
    if not fuzzer.memory.enabled:
        pytest.skip("no /proc/self/clear_refs here: peak memory cannot be measured per input")
    meta = json.loads((model_dirs["safetensors"] / "nnopt.json").read_text())
    meta["config"]["hidden"] = [2**20, 32]
    config = _write_dir(model_dirs["safetensors"], tmp_path / "config", meta=json.dumps(meta).encode())
    meta = json.loads((model_dirs["structured"] / "nnopt.json").read_text())
    meta["applied"][0]["details"]["shapes"]["features.2"] = {"type": "Linear", "out": 2**20, "in": 128}
    replay = _write_dir(model_dirs["structured"], tmp_path / "replay", meta=json.dumps(meta).encode())
    with _guarded():
        fuzzer.run("config.hidden = [2**20, 32]", lambda: nnopt.load_model(config))
        fuzzer.run("structured shapes: features.2 = Linear(128, 2**20)", lambda: nnopt.load_model(replay))
    fuzzer.check("huge sizes in nnopt.json")


def test_applied_pass_details_that_are_not_a_mapping_are_a_format_error(model_dirs, tmp_path):
    """Fails today (reported, nnopt/lineage.py AppliedPass.from_dict): ``dict(details)`` raises ValueError
    for a list of 3-item lists, and only KeyError/TypeError are converted (["ab"] even becomes {"a": "b"})."""
    meta = json.loads((model_dirs["safetensors"] / "nnopt.json").read_text())
    meta["applied"][0]["details"] = [["a", "b", "c"]]
    target = _write_dir(model_dirs["safetensors"], tmp_path / "details", meta=json.dumps(meta).encode())
    fuzzer = Fuzzer()
    with _guarded():
        fuzzer.run("applied[0].details = [['a', 'b', 'c']]", lambda: nnopt.load_model(target))
    fuzzer.check("details list")


def test_deeply_nested_nnopt_json_is_a_format_error(model_dirs, tmp_path):
    """Fails today (reported, nnopt/io/model_dir.py read_meta): json.loads raises RecursionError on deep
    nesting, and read_meta converts only UnicodeDecodeError and JSONDecodeError."""
    meta = json.loads((model_dirs["safetensors"] / "nnopt.json").read_text())
    meta["metrics"] = _DEEP
    target = _write_dir(model_dirs["safetensors"], tmp_path / "deep", meta=_dump_json(meta))
    fuzzer = Fuzzer()
    with _guarded():
        fuzzer.run("metrics = 100 000 nested lists", lambda: nnopt.load_model(target))
    fuzzer.check("deep nnopt.json")


# --------------------------------------------------------------------------- nnopt.io.sources.LOADERS


def _keras_seed(root: Path) -> Path | None:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # what nnopt's Keras support uses
    try:
        import keras
    except Exception:  # noqa: BLE001 - any import failure means the optional dependency is missing
        return None
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
    model.save(root / "seed.keras")
    return root / "seed.keras"


def _onnx_seed(root: Path) -> Path | None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return None
    path = root / "seed.onnx"
    path.write_bytes(nnopt.export_onnx(nnopt.create_model("simplenet", seed=0).eval(), torch.zeros(2, 64)))
    return path


def _safetensors_seed(root: Path) -> Path:
    from safetensors.torch import save

    state = nnopt.create_model("simplenet", seed=0).state_dict()
    path = root / "seed.safetensors"
    path.write_bytes(save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"}))
    return path


def _hf_seed(root: Path) -> Path | None:
    """A tiny BERT directory (config.json + model.safetensors) as Hugging Face writes it."""
    try:
        import transformers
    except ImportError:
        return None
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    torch.manual_seed(0)
    path = root / "seed-bert"
    transformers.BertModel(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def _seed_for(name: str, root: Path, model_dirs: dict[str, Path]) -> Path | None:
    """A small valid input for the loader called ``name``; None when there is none (its optional
    dependency is missing, or the name is one this test does not know: it then gets random bytes)."""
    key = name.lower()
    if "keras" in key:
        return _keras_seed(root)
    if "onnx" in key:
        return _onnx_seed(root)
    if "safetensors" in key:
        return _safetensors_seed(root)
    if "packed" in key or "nnpk" in key:
        return model_dirs["packed-int4"] / "model.nnpk"
    if "hf" in key:
        return _hf_seed(root)
    if "nnopt" in key:
        return model_dirs["packed-int4"]
    return None


# Fields that size a model in the configs inside .keras files and Hugging Face directories.
_SIZE_KEYS = {"units", "batch_shape", "input_shape", "shape", "filters", "kernel_size", "hidden_size",
              "intermediate_size", "vocab_size", "max_position_embeddings", "num_hidden_layers", "type_vocab_size"}


def _inflate(obj: Any, factor: int, sized: bool = False) -> Any:
    """Every integer under a size field multiplied by ``factor``: a config that claims a huge model."""
    if isinstance(obj, dict):
        return {k: _inflate(v, factor, sized or k in _SIZE_KEYS) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_inflate(v, factor, sized) for v in obj]
    if sized and isinstance(obj, int) and not isinstance(obj, bool) and obj > 1:
        return obj * factor
    return obj


def _mutate_zip(data: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    """Rewrite one member of a zip (a .keras file) with a mutation of it, so the damage gets past the CRCs."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zin:
        members = {info.filename: zin.read(info) for info in zin.infolist()}
    victim = sorted(members)[int(rng.integers(len(members)))]
    if victim.endswith(".json") and rng.random() < 0.3:
        factor = int(rng.choice([2**20, 2**31, 2**40]))
        members[victim], notes = _dump_json(_inflate(json.loads(members[victim]), factor)), [f"sizes x{factor}"]
    else:
        members[victim], notes = _mutate_any(victim, members[victim], rng)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for member, content in members.items():
            zout.writestr(member, content)
    return out.getvalue(), [f"{victim}: {n}" for n in notes]


_EXTERNAL = "fuzz_external.bin"  # a 256-byte file written beside mutated ONNX files, for external data


def _mutate_onnx(data: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    """Edits of the parsed ModelProto: claimed tensor sizes, external data, types, versions, input shapes."""
    import onnx

    model = onnx.load_from_string(data)
    inits = list(model.graph.initializer)
    tensor = inits[int(rng.integers(len(inits)))]
    op = rng.choice(["inflate", "claim", "external", "dtype", "version", "input"])
    if op == "inflate":  # the dims claim far more than raw_data holds
        factor = int(rng.choice([2**20, 2**31, 2**40]))
        tensor.dims[0] = tensor.dims[0] * factor
        note = f"{tensor.name}.dims[0] x{factor}"
    elif op == "claim":
        del tensor.dims[:]
        tensor.dims.extend([2**31] if rng.random() < 0.5 else [2**20, 2**20])
        tensor.ClearField("raw_data")
        note = f"{tensor.name} claims dims {list(tensor.dims)} with no data"
    elif op == "external":
        location = [_EXTERNAL, "../" + _EXTERNAL, "/etc/hostname", "missing.bin", _EXTERNAL + "\x00"][
            int(rng.integers(5))]
        offset, length = [("0", str(len(tensor.raw_data))), ("0", str(2**40)), ("-4", "16"), (str(2**63), "4"),
                          ("x", "y"), ("0", "0"), ("250", "16")][int(rng.integers(7))]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        note = f"{tensor.name} external {location} offset {offset} length {length}"
    elif op == "dtype":
        tensor.data_type = int(rng.integers(0, 30))
        note = f"{tensor.name}.data_type = {tensor.data_type}"
    elif op == "version":
        model.ir_version = int(rng.choice([0, 99, 2**62]))
        model.opset_import[0].version = int(rng.choice([0, 1, 99, 2**40]))
        note = f"ir_version {model.ir_version}, opset {model.opset_import[0].version}"
    else:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[-1].dim_value = int(rng.choice([0, 2**31, 2**40]))
        note = f"input dim -> {dims[-1].dim_value}"
    return model.SerializeToString(), [note]


def _mutate_any(name: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    """Format-aware mutations where the format is known, byte-level ones everywhere."""
    choice = rng.random()
    if choice < 0.1:
        return _random_bytes(rng, data[:4])
    if choice < 0.6:
        try:
            if name.endswith(".keras"):
                return _mutate_zip(data, rng)
            if name.endswith(".onnx"):
                return _mutate_onnx(data, rng)
            if name.endswith(".safetensors"):
                return _mutate_safetensors(data, rng)
            if name.endswith(".nnpk"):
                return _mutate_packed(data, rng)
            if name.endswith(".json"):
                obj = json.loads(data)
                if rng.random() < 0.3:
                    factor = int(rng.choice([2**20, 2**31, 2**40]))
                    return _dump_json(_inflate(obj, factor)), [f"sizes x{factor}"]
                obj, notes = _mutate_json(obj, rng)
                return _dump_json(obj), notes
        except Exception:  # noqa: BLE001 - not parseable as that format (DecodeError, ...): mutate the bytes
            pass
    return _mutate_bytes(data, rng)


def _mutated_input(seed: Path, rng: np.random.Generator, dst: Path) -> tuple[Path, list[str]]:
    """A mutated copy of a seed file, or of one file of a seed directory (an nnopt directory gets its
    recorded sha256 updated, as in the load_model campaign)."""
    if seed.is_dir():
        if (seed / "nnopt.json").is_file():
            change, notes = _model_dir_cases(seed, rng)
            return _write_dir(seed, dst, change.get("weights"), change.get("meta")), notes
        files = sorted(p.name for p in seed.iterdir() if p.is_file())
        victim = files[int(rng.integers(len(files)))]
        data, notes = _mutate_any(victim, (seed / victim).read_bytes(), rng)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(seed, dst)
        (dst / victim).write_bytes(data)
        return dst, [f"{victim}: {n}" for n in notes]
    data, notes = _mutate_any(seed.name, seed.read_bytes(), rng)
    dst = dst.with_suffix(seed.suffix)
    dst.write_bytes(data)
    return dst, notes


def test_every_source_loader_survives_mutations(model_dirs, tmp_path):
    sources = pytest.importorskip("nnopt.io.sources", reason="nnopt.io.sources is not there yet")
    loaders = sources.LOADERS
    assert isinstance(loaders, dict) and loaders
    fuzzer, skipped = Fuzzer(), []
    (tmp_path / _EXTERNAL).write_bytes(bytes(range(256)))
    with _guarded():
        for t, (name, load) in enumerate(sorted(loaders.items())):
            seed = _seed_for(name, tmp_path, model_dirs)
            if seed is None and any(k in name.lower() for k in ("keras", "onnx", "hf")):
                skipped.append(f"{name}: optional dependency missing")
                continue
            if seed is not None:
                try:
                    load(seed)
                except NnoptError as exc:  # sources turns a missing import into UnsupportedModelError
                    if "install" in str(exc).lower() or "needs" in str(exc).lower():
                        skipped.append(f"{name}: {exc}")
                        continue
                    raise AssertionError(f"LOADERS[{name!r}] refuses the valid seed {seed}: {exc}") from None
            # Keras loads take ~0.1 s each; the others ~1 ms.
            count = 20 if "keras" in name.lower() else 60
            for i in range(count):
                rng = np.random.default_rng([SEED, 200 + t, i])
                if seed is not None and i % 8:
                    target, notes = _mutated_input(seed, rng, tmp_path / f"case_{t}")
                else:  # random bytes, under the seed's name when there is one
                    data, notes = _random_bytes(rng, b"")
                    target = tmp_path / f"random_{t}{seed.suffix if seed is not None else '.bin'}"
                    if seed is not None and seed.is_dir():
                        target = _write_random_dir(seed, tmp_path / f"random_{t}", data)
                    else:
                        target.write_bytes(data)
                fuzzer.run(f"LOADERS[{name!r}] rng [{SEED}, {200 + t}, {i}] [{'; '.join(notes)[:400]}]",
                           lambda load=load, p=target: load(p))
    if not fuzzer.outcomes and skipped:
        pytest.skip("; ".join(skipped))
    fuzzer.check("nnopt.io.sources.LOADERS")


def _write_random_dir(seed: Path, dst: Path, data: bytes) -> Path:
    """A copy of a seed directory whose every file holds the same random bytes."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(seed, dst)
    for p in dst.iterdir():
        if p.is_file():
            p.write_bytes(data)
    return dst

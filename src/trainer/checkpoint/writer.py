"""Checkpoint writes on a background thread (`checkpoint.async_write`).

Writing a checkpoint (torch.save, fsync, rename, directory fsync) stalls the
training loop for as long as the disk takes. Like Lightning's AsyncCheckpointIO
and torch.distributed.checkpoint.async_save, the loop instead copies the state
(a memory copy, cheap next to the write) and hands the write to one worker
thread. Crash safety is unchanged: the write is the same atomic
temp-file-and-rename, so a crash during it leaves the previous checkpoint.

Writes run in the order they were handed over: a linked checkpoint (best.pt
as the step file) runs after best.pt's write, without the loop waiting for it,
and is skipped if that write failed. A write that carries a snapshot first
waits for the ones before it, so at most one snapshot is held in memory.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

log = logging.getLogger(__name__)

# Every write of this process not yet finished, for `settle` (fault-injection tests).
_IN_FLIGHT: set[Future] = set()


def snapshot(state: Any, _copies: dict | None = None) -> Any:
    """A copy of `state` that later in-place updates of the training state cannot change.

    Tensors are copied to the CPU (the optimizer step mutates params and moments in
    place), containers are copied recursively, other leaves (numbers, strings) are
    immutable and kept as they are. Tensors that share storage (tied weights) share
    one copy, so the file is as large as a synchronous write's.
    """
    copies = {} if _copies is None else _copies
    if isinstance(state, torch.Tensor):
        return _copy_tensor(state, copies)
    if isinstance(state, dict):
        # copy.copy keeps the dict's type and attributes (a state_dict's `_metadata`),
        # so the file holds what a synchronous write of `state` would.
        copied = copy.copy(state)
        for key in copied:
            copied[key] = snapshot(state[key], copies)
        return copied
    if isinstance(state, list):
        return [snapshot(value, copies) for value in state]
    if isinstance(state, tuple):
        values = [snapshot(value, copies) for value in state]
        return type(state)(*values) if hasattr(state, "_fields") else type(state)(values)
    return state


def _copy_tensor(tensor: torch.Tensor, copies: dict) -> torch.Tensor:
    if type(tensor) is not torch.Tensor or tensor.layout != torch.strided:
        return tensor.detach().to("cpu", copy=True)  # subclasses, sparse: copied alone
    storage = tensor.untyped_storage()
    key = (storage.data_ptr(), storage.device, storage.nbytes())
    if key not in copies:
        copies[key] = storage.clone() if storage.device.type == "cpu" else storage.cpu()
    copied = torch.empty(0, dtype=tensor.dtype)
    return copied.set_(copies[key], tensor.storage_offset(), tensor.size(), tensor.stride())


class BackgroundWriter:
    """One worker thread that runs writes one at a time, in order.

    The thread starts with the first write (a run that saves nothing starts none)
    and ends at `close`. It is a ThreadPoolExecutor's worker: not a daemon, so the
    interpreter never exits with it frozen mid-write, but joined at exit once its
    write is done, so it cannot keep the process alive.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        # Set by a failed write: the writes queued after it (a link of the file it
        # should have written) are skipped until `wait` has reported the failure.
        self._failed = False

    def submit(self, write: Callable[..., None], *args: Any, after_pending: bool = True) -> None:
        """Run `write(*args)` on the worker, after the writes handed over before it.

        `after_pending` first waits for those (a write that carries a state snapshot:
        at most one snapshot is held); a cheap one (a link) just joins the queue.
        """
        if after_pending:
            self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-write")
        future = self._pool.submit(self._run, write, *args)
        _IN_FLIGHT.add(future)
        future.add_done_callback(_IN_FLIGHT.discard)
        self._pending.append(future)

    def _run(self, write: Callable[..., None], *args: Any) -> None:
        if self._failed:
            return
        try:
            write(*args)
        except BaseException:
            self._failed = True
            raise

    def wait(self) -> None:
        """Block until no write is pending; a failed write's error is raised here, once."""
        pending, self._pending = self._pending, []
        error: BaseException | None = None
        for future in pending:
            try:
                future.result()
            except Exception as e:
                error = error or e
        self._failed = False
        if error is not None:
            raise error

    def close(self, raise_error: bool = True) -> None:
        """Wait for the pending writes and stop the thread (a later write starts another).

        With `raise_error=False` (the caller is already failing with its own error,
        which must not be masked) a failed write is logged instead of raised.
        """
        try:
            self.wait()
        except Exception as e:
            if raise_error:
                raise
            log.error("a background checkpoint write failed as well: %s", e)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def settle() -> None:
    """Block until no background write of this process is running (errors stay pending).

    Used by trainer.testing so that a kill "mid-epoch" lands between checkpoint
    writes, as it does with synchronous writes; a kill inside a write is what
    `fault_point("save", ...)` is for.
    """
    wait_futures(list(_IN_FLIGHT))

"""Server-side batching with TF Serving's parameters.

Concurrent requests to one (model version, signature) are queued and merged
into one call of at most `max_batch_size` examples: a batch runs as soon as it
is full, or `batch_timeout_micros` after its first request arrived.
`num_batch_threads` batches run at once.  When more than
`max_enqueued_batches` batches' worth of examples are waiting, new requests
are refused with RESOURCE_EXHAUSTED instead of queueing without bound (TF
Serving does the same, so clients back off rather than time out).

One bad request must not fail its batch-mates: if a merged call fails with
INVALID_ARGUMENT (e.g. one malformed tf.Example), each request of the batch
is rerun on its own, so only the faulty one gets the error.

A request of `max_batch_size` examples or more runs on its own, outside the
queue (`run` calls the model on the calling thread; the server sends such a
request to its executor instead of `submit`): it is already a full batch,
nothing could merge with it, and splitting a larger one would only add copies.

`allowed_batch_sizes` (TF Serving's rule): every batch taken from the queue
is padded up to the smallest allowed size that holds it, repeating its last
row, and the padding rows' outputs are dropped; so the model only ever sees
those shapes (one XLA compilation each, all compiled at warmup).
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Callable, Dict, List

import grpc
import numpy as np

from serving.config import BatchingParameters
from serving.tensors import ServingError

RunFn = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


class _Task:
    __slots__ = ("inputs", "size", "future", "enqueued")

    def __init__(self, inputs, size):
        self.inputs = inputs
        self.size = size
        self.future: Future = Future()
        self.enqueued = time.monotonic()


class Batcher:
    """Queues requests for one signature of one model version and runs them in merged batches."""

    def __init__(self, run: RunFn, params: BatchingParameters, name: str = "batcher"):
        self._run = run
        self._params = params
        self._queue: collections.deque[_Task] = collections.deque()
        self._queued_examples = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(params.num_batch_threads)]
        for t in self._threads:
            t.start()

    @property
    def max_batch_size(self) -> int:
        return self._params.max_batch_size

    def run(self, inputs: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
        """Blocking call: returns this request's rows of the merged batch's outputs."""
        if size >= self._params.max_batch_size:
            return self._run(inputs)  # a full batch on its own: nothing can merge with it
        return self.submit(inputs, size).result()

    def submit(self, inputs: Dict[str, np.ndarray], size: int) -> Future:
        """Queue a request of `size` < max_batch_size examples; the future gets its rows of the batch's outputs.

        Never blocks (the asyncio server awaits the future on its event loop).  Cancelling the future before a
        batch thread takes the request drops it from the batch.
        """
        if size >= self._params.max_batch_size:
            raise ValueError(f"a request of {size} examples is a full batch on its own; call run()")
        task = _Task(inputs, size)
        p = self._params
        with self._cond:
            if self._stopped:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the model version is being unloaded")
            # Waiting work, in batches of max_batch_size, must stay within max_enqueued_batches.
            waiting = -(-(self._queued_examples + size) // p.max_batch_size)
            if waiting > p.max_enqueued_batches:
                raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the batching queue is full ({p.max_enqueued_batches} batches of up to "
                                   f"{p.max_batch_size} examples waiting); retry later")
            # Wake a batch thread only when it has something to do: the queue was empty (an idle thread starts
            # collecting) or a batch is now full (the collecting thread need not wait for the timeout).  Waking
            # one on every request made each request pay a thread switch with no effect.
            was_empty = not self._queue
            self._queue.append(task)
            self._queued_examples += size
            if self._queued_examples >= p.max_batch_size:
                self._cond.notify_all()
            elif was_empty:
                self._cond.notify()
        return task.future

    def stop(self) -> None:
        """Finish everything queued, then end the threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)

    # -- batch threads ----------------------------------------------------------------------------

    def _take_batch(self) -> List[_Task]:
        p = self._params
        timeout = p.batch_timeout_micros / 1e6
        with self._cond:
            while True:
                while not self._queue:
                    if self._stopped:
                        return []  # only now does the thread end: stopped and nothing left to run
                    self._cond.wait()
                # Wait for a full batch or the timeout of the oldest request, whichever comes first.
                deadline = self._queue[0].enqueued + timeout
                while self._queued_examples < p.max_batch_size and not self._stopped:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, total, taken = [], 0, 0
                while self._queue and total + self._queue[0].size <= p.max_batch_size:
                    task = self._queue.popleft()
                    taken += task.size
                    # False when its client gave up (cancelled) while it waited: it leaves the batch.  Once
                    # running, the future can no longer be cancelled, so setting its result cannot fail.
                    if task.future.set_running_or_notify_cancel():
                        batch.append(task)
                        total += task.size
                self._queued_examples -= taken
                if self._queue:
                    self._cond.notify()  # another batch thread can start on the rest
                if batch:
                    return batch
                # Another batch thread, collecting at the same time, took these requests: keep serving.

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            self._execute(batch)

    def padded_size(self, size: int) -> int:
        """The smallest allowed batch size >= size (size itself when allowed_batch_sizes is empty)."""
        for allowed in self._params.allowed_batch_sizes:
            if allowed >= size:
                return allowed
        return size

    def _run_padded(self, inputs: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
        """Run `size` rows padded up to the next allowed batch size (repeating the last row); outputs cut back."""
        padded = self.padded_size(size)
        if padded == size:
            return self._run(inputs)
        inputs = {k: np.concatenate([v, np.repeat(v[-1:], padded - size, axis=0)]) for k, v in inputs.items()}
        return {k: v[:size] for k, v in self._run(inputs).items()}

    def _execute(self, batch: List[_Task]) -> None:
        if len(batch) == 1:
            self._finish(batch[0])
            return
        try:
            merged = {k: np.concatenate([t.inputs[k] for t in batch]) for k in batch[0].inputs}
            outputs = self._run_padded(merged, sum(t.size for t in batch))
        except ServingError as err:
            if err.code != grpc.StatusCode.INVALID_ARGUMENT:
                for t in batch:
                    t.future.set_exception(err)
                return
            # Isolate the faulty request(s): rerun each on its own.
            for t in batch:
                self._finish(t)
            return
        except BaseException as err:  # never leave a client waiting
            for t in batch:
                t.future.set_exception(err)
            return
        start = 0
        for t in batch:
            t.future.set_result({k: v[start:start + t.size] for k, v in outputs.items()})
            start += t.size

    def _finish(self, task: _Task) -> None:
        try:
            task.future.set_result(self._run_padded(task.inputs, task.size))
        except BaseException as err:
            task.future.set_exception(err)

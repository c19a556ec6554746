"""Data parallelism for the MLX trainer over `mx.distributed` (ring, MPI, JACCL, NCCL), launched by `mlx.launch`.

    mlx.launch -n 2 -- t5r-train-mlx --config configs/quickstart.yaml               # two processes, one machine
    mlx.launch --hostfile hosts.json -- t5r-train-mlx --config configs/quickstart.yaml   # several Macs

Every rank reads the same data and draws the same global batches (same seed); each trains on its own
slice of every global batch (`World.shard`). The summed token losses' gradients are averaged with
`mlx.nn.utils.average_gradients` and the token counts summed, so an N-rank step is the 1-rank step on
the same global batch, up to float rounding. Rank 0 alone evaluates and writes; see docs/distributed.md.

Failures never hang: a peer that dies closes its sockets and the ring raises at once; a peer that stops
answering (a frozen process, a pulled cable) trips the watchdog after `timeout` seconds of waiting.
"""

import hashlib
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.nn.utils import average_gradients


class DistributedError(RuntimeError):
    """The ranks of a data-parallel launch disagree, or one of them was lost; the message says which."""


class _Watchdog:
    """Ends this process when a collective waits longer than `timeout` seconds.

    A collective blocks inside MLX's C++ code, where Python cannot interrupt it, so the watchdog thread
    prints why and exits the process (exit code 3); the launcher then stops the other ranks.
    """

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self._waiting: Optional[tuple[str, float]] = None
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="distributed-watchdog", daemon=True).start()

    @contextmanager
    def waiting(self, what: str):
        with self._lock:
            self._waiting = (what, time.monotonic() + self.timeout)
        try:
            yield
        finally:
            with self._lock:
                self._waiting = None

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            with self._lock:
                waiting = self._waiting
            if waiting is not None and time.monotonic() > waiting[1]:
                sys.stderr.write(f"error: rank {self.rank}: no answer from the other ranks for {self.timeout:g} s "
                                 f"during {waiting[0]}; a rank has died or hung (raise distributed_timeout if "
                                 f"rank 0's evaluations take longer). Stopping.\n")
                sys.stderr.flush()
                os._exit(3)


@dataclass
class World:
    """This process's place in the launch: rank, size and the group the collectives run over."""

    rank: int = 0
    size: int = 1
    group: Optional[object] = None
    timeout: float = 300.0
    _watchdog: Optional[_Watchdog] = field(default=None, repr=False)

    @classmethod
    def init(cls, timeout: float = 300.0) -> "World":
        """The launch's world: size 1 when started without `mlx.launch` (or without a distributed backend)."""
        if not mx.distributed.is_available() or not _launched():
            return cls(timeout=timeout)
        watchdog = _Watchdog(int(os.environ.get("MLX_RANK", 0)), timeout)
        with watchdog.waiting("connecting to the other ranks"):
            group = mx.distributed.init(strict=True)
        return cls(group.rank(), group.size(), group, timeout, watchdog)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices) -> np.ndarray:
        """This rank's contiguous slice of a global batch's row indices (length-sorted batches stay tight)."""
        return np.array_split(np.asarray(indices), self.size)[self.rank]

    def reduce_step(self, loss_sum: mx.array, ntoks: mx.array, grads, votes: tuple = ()):
        """Sum the losses, token counts and votes; average the gradients: (loss_sum, ntoks, grads, votes).

        The step divides the gradients by the token count: give it ntoks / size, as averaged gradients
        over the mean count are the summed gradients over the summed count (the 1-rank step). A vote
        (stop on a signal, stop at the time budget) carries when any rank casts it, so all stop together.
        """
        if self.size == 1:
            return loss_sum, ntoks, grads, tuple(votes)
        with self._collective("the gradient all-reduce"):
            local = mx.concatenate([mx.stack([loss_sum, ntoks.astype(mx.float32)]), mx.array(votes, mx.float32)])
            totals = mx.distributed.all_sum(local, group=self.group)
            grads = average_gradients(grads, group=self.group)
            mx.eval(totals, grads)
        return totals[0], totals[1], grads, tuple(bool(v > 0) for v in totals[2:].tolist())

    def barrier(self, what: str):
        """Wait until every rank gets here (e.g. while rank 0 evaluates or saves)."""
        if self.size > 1:
            with self._collective(what):
                mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def agree(self, facts: dict[str, str]):
        """Fail fast unless every rank holds the same facts (config values, data file digests, ...).

        Each rank raises DistributedError naming the facts that differ and its own values of them.
        """
        if self.size == 1:
            return
        names = sorted(facts)
        digests = [_digest(repr(names))] + [_digest(f"{k}={facts[k]}") for k in names]
        with self._collective("the check that all ranks run the same job"):
            table = mx.distributed.all_gather(mx.array(digests, dtype=mx.int32)[None], group=self.group)
            table = np.array(table)
        if table.shape[1] != len(digests) or (table[:, 0] != digests[0]).any():
            raise DistributedError(f"rank {self.rank}: the ranks run different versions of the config (this rank's "
                                   f"settings: {', '.join(names)}); install the same code on every machine")
        differ = [name for i, name in enumerate(names, 1) if (table[:, i] != digests[i]).any()]
        if differ:
            ranks = sorted({r for i, n in enumerate(names, 1) if n in differ for r in np.nonzero(table[:, i] !=
                                                                                        table[0, i])[0]})
            raise DistributedError(
                f"rank {self.rank}: the ranks were launched with different " + ", ".join(differ)
                + f" (rank(s) {', '.join(map(str, ranks))} differ from rank 0; this rank has "
                + "; ".join(f"{k}={facts[k]}" for k in differ)
                + "). Launch every rank with the same config and data files.")

    @contextmanager
    def _collective(self, what: str):
        try:
            with self._watchdog.waiting(what):
                yield
        except RuntimeError as err:  # the ring's "connection to a peer was lost" and the like
            raise DistributedError(f"rank {self.rank}: lost the other ranks during {what} ({err}); "
                                   "a rank has died, see its log") from err


def _launched() -> bool:
    """Started by mlx.launch (or mpirun) for more than one process."""
    return bool(os.environ.get("MLX_HOSTFILE") or os.environ.get("MLX_IBV_DEVICES") or os.environ.get("MLX_JACCL_COORDINATOR")
                or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("MLX_WORLD_SIZE"))


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def file_digest(path) -> str:
    """sha256 of a file's bytes (to check that every rank reads the same data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]

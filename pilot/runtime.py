"""Where and how tensors are computed: device, precision, loader workers, progress bars."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from pilot import distributed
from pilot.errors import ConfigError
from pilot.schema import Device, NonNegativeInt, PositiveFloat, PositiveInt, Precision

if TYPE_CHECKING:
    from pilot.modules.feature_store import FeatureSource

log = logging.getLogger(__name__)
T = TypeVar("T")


class Flushable(Protocol):
    """A cache whose new entries are saved by :meth:`flush` (:class:`pilot.modules.feature_store.FeatureStore`)."""

    def flush(self) -> None: ...


@dataclass
class Runtime:
    """Execution settings shared by the pipeline, the learners and the evaluator.

    ``precision``: ``bf16`` = bfloat16 autocast on CUDA (the default; TF32 matmuls too when
    ``tf32``); on a CPU it falls back to fp32, which is faster there. ``fp32`` turns autocast off.
    """

    device: torch.device
    precision: str = "bf16"
    tf32: bool = True
    num_workers: int = 8
    data_on_device: bool = True
    channels_last: bool = True
    progress: bool = True
    cpu_inference_chunk: int | None = 32
    scale_batch: bool = False  # data-parallel runs: global batch = batch_size x ranks (default: batch_size)
    feature_cache: bool = True
    feature_cache_dir: str | None = None
    feature_cache_gb: float = 20.0
    feature_source: FeatureSource | None = field(default=None, repr=False, compare=False)
    feature_stores: list[Flushable] = field(default_factory=list, repr=False, compare=False)
    # Set by the run loop for one session: called after every training epoch with (epoch, loss, lr).
    on_epoch: Callable[[int, float, float], None] | None = field(default=None, repr=False, compare=False)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if (self.precision == "bf16" and self.is_cuda) else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when enabled, otherwise a no-op context."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """``fn(images)`` for inference, split into chunks of ``cpu_inference_chunk`` on a CPU.

        Large batches run several times slower than small ones on a CPU (cache effects); outputs are
        the same because inference treats samples independently. On CUDA the batch runs whole.
        """
        chunk = self.cpu_inference_chunk
        if self.is_cuda or not chunk or len(images) <= chunk:
            return fn(images)
        return torch.cat([fn(part) for part in images.split(chunk)])

    def progress_bar(
        self, iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False
    ) -> Iterator[T]:
        """``iterable`` with a tqdm bar on stderr, shown only when ``progress`` is on and someone watches:
        stderr is a terminal (or tqdm draws notebook widgets). In a log file (SLURM, ``> log 2>&1``,
        pytest) every refresh would stay as text, so there the bar is off; the run's one line per
        session (``pilot.loop``) still reports progress."""
        stream = sys.stderr
        try:
            interactive = bool(stream.isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            interactive = False
        interactive = interactive or any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
        return tqdm(
            iterable,
            desc=desc,
            total=total,
            leave=leave,
            disable=not (self.progress and interactive),
            file=stream,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def flush_feature_stores(self) -> None:
        """Save the features the registered stores computed since the last call, and log their hits
        and misses (the run loop calls this after every session)."""
        for store in self.feature_stores:
            store.flush()

    def peak_memory_mb(self) -> float:
        """Peak memory allocated by torch on the device since the last reset (0 on a CPU)."""
        if not self.is_cuda:
            return 0.0
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def reset_peak_memory(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


def make_runtime(
    device: Device = "auto",
    precision: Precision = "bf16",
    tf32: bool = True,
    num_workers: NonNegativeInt = 8,
    data_on_device: bool = True,
    channels_last: bool = True,
    progress: bool = True,
    cpu_threads: PositiveInt | None = None,
    cpu_inference_chunk: PositiveInt | None = 32,
    scale_batch: bool = False,
    feature_cache: bool = True,
    feature_cache_dir: str | None = None,
    feature_cache_gb: PositiveFloat = 20.0,
) -> Runtime:
    """Build a :class:`Runtime` from the ``runtime`` config; ``device=auto`` picks CUDA when present.

    Under torchrun each process takes the GPU of its ``LOCAL_RANK`` (``cuda`` or ``auto``)."""
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"runtime.precision={precision!r}: use bf16 or fp32")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={device} but no CUDA device is visible; use runtime.device=cpu or auto")
    if device == "cuda" and distributed.active():
        device = f"cuda:{distributed.local_rank()}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    return Runtime(
        dev,
        precision,
        tf32,
        num_workers,
        data_on_device,
        channels_last,
        progress,
        cpu_inference_chunk,
        scale_batch,
        feature_cache=feature_cache,
        feature_cache_dir=feature_cache_dir,
        feature_cache_gb=float(feature_cache_gb),
    )

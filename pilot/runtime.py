"""Where and how tensors are computed: device, precision, loader workers, progress bars, compiled steps."""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, Literal, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from pilot import distributed
from pilot.errors import ConfigError
from pilot.schema import Device, NonNegativeInt, PositiveFloat, PositiveInt, Precision

if TYPE_CHECKING:
    from pilot.modules.feature_store import FeatureSource

log = logging.getLogger(__name__)
T = TypeVar("T")
COMPILE_MODES = ("off", "default", "reduce-overhead")
GPU_DECODE_MODES = ("auto", "on", "off")
# torch.compile recompiles a graph when a guarded value changes (the smaller last batch of an epoch, a
# learner's class counts in a new session, its last session): a few times per run, more with many learners'
# graph breaks; dynamo's default limit of 8 per function would silently leave some of them eager.
RECOMPILE_LIMIT = 64


class Flushable(Protocol):
    """A cache whose new entries are saved by :meth:`flush` (:class:`pilot.modules.feature_store.FeatureStore`)."""

    def flush(self) -> None: ...


@dataclass
class Runtime:
    """Execution settings shared by the pipeline, the learners and the evaluator.

    ``precision``: ``bf16`` = bfloat16 autocast on CUDA (the default; TF32 matmuls too when
    ``tf32``); on a CPU it falls back to fp32, which is faster there. ``fp32`` turns autocast off.

    ``compile``: how the shared training loop runs a step's loss (:meth:`compiled`): ``off`` (eager),
    ``default`` (``torch.compile``) or ``reduce-overhead`` (``torch.compile`` with CUDA graphs on a GPU).
    ``gpu_decode``: whether image files are decoded on the device (:mod:`pilot.data.gpu_decode`).
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
    compile: str = "off"
    gpu_decode: str = "auto"
    compile_backend: str | Callable[..., Any] = "inductor"  # torch.compile's backend (tests: "aot_eager")
    # Functions whose compiled form failed (code object -> reason): they run eagerly for the rest of the run.
    compile_failures: dict[Any, str] = field(default_factory=dict, repr=False, compare=False)
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

    def compiled(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` as ``compile`` asks: itself when ``off``, else a :class:`CompiledStep` (torch.compile
        with an eager fallback). Compiling the same function again reuses torch's compiled code."""
        return fn if self.compile == "off" else CompiledStep(fn, self)

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


class CompiledStep(Generic[T]):
    """``fn`` through ``torch.compile`` (``runtime.compile``: ``default``, or ``reduce-overhead`` = CUDA graphs,
    which on a CPU is ``default``), and random ops on the eager random number generators (``fallback_random``),
    so a compiled step draws what an eager one draws. Sizes are specialised until they change, then
    compiled as symbols (torch's automatic dynamic shapes), integer attributes of modules included
    (``allow_unspec_int_on_nn_module``): a learner's class counts (``known``, ``total``) change at every
    session, and without this each session would compile the loss anew (measured: the tail of L2P's
    step recompiled at every session; with it, three times per run). CUDA graphs record one graph per
    batch size.

    Graph breaks (code dynamo cannot trace: hook registration, data-dependent Python) are allowed: the
    untraceable part runs eagerly between compiled graphs. An *error* of the compiled call (tracing,
    backend or code-generation failure) is answered by running ``fn`` eagerly on the same arguments, with
    the random number generators rewound to where the compiled call found them, and that function is
    not compiled again in this run: a warning gives the reason, kept in ``runtime.compile_failures``.
    A genuine error of ``fn`` is raised again by the eager call.
    """

    def __init__(self, fn: Callable[..., T], runtime: Runtime) -> None:
        if runtime.compile not in COMPILE_MODES[1:]:
            raise ConfigError(f"runtime.compile={runtime.compile!r}: use one of {', '.join(COMPILE_MODES)}")
        self.fn, self.runtime = fn, runtime
        self.key = _code_of(fn)
        self.graphs = runtime.compile == "reduce-overhead" and runtime.is_cuda
        self._compiled: Callable[..., T] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        runtime = self.runtime
        if self.key in runtime.compile_failures:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            self._compiled = self._compile()
        rng = _rng_state(runtime.device)
        try:
            if self.graphs:  # a new iteration: outputs of the previous replay may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure of the compiled path falls back to eager
            reason = _failure_reason(error)
            runtime.compile_failures[self.key] = reason
            log.warning(
                "runtime.compile=%s: %s runs eagerly for the rest of this run, its compiled form failed (%s)",
                runtime.compile,
                getattr(self.fn, "__qualname__", repr(self.fn)),
                reason,
            )
            _set_rng_state(runtime.device, rng)
            return self.fn(*args, **kwargs)

    def _compile(self) -> Callable[..., T]:
        import torch._dynamo
        import torch._inductor.config

        dynamo_config: Any = torch._dynamo.config
        for name in ("recompile_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), RECOMPILE_LIMIT))
        dynamo_config.allow_unspec_int_on_nn_module = True
        inductor_config: Any = torch._inductor.config
        inductor_config.fallback_random = True
        mode = "reduce-overhead" if self.graphs else None
        backend = self.runtime.compile_backend
        compiled: Callable[..., T] = torch.compile(self.fn, mode=mode, backend=backend)
        return compiled


def _failure_reason(error: BaseException) -> str:
    """``Name: first line`` of a compile failure, naming the error dynamo wrapped (a backend's own) too."""

    def first_line(e: BaseException) -> str:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[0] if lines else ''}"

    inner = getattr(error, "inner_exception", None) or error.__cause__
    reason = first_line(error) if inner is None else f"{type(error).__name__} ({first_line(inner)})"
    return reason[:500]


def _code_of(fn: Callable[..., Any]) -> Any:
    """What identifies ``fn`` across calls: its code object (the same for every bound copy of a method
    and every closure made by one ``def``), else the object itself."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code if isinstance(code, types.CodeType) else fn


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
    compile: Literal["off", "default", "reduce-overhead"] = "off",
    gpu_decode: Literal["auto", "on", "off"] = "auto",
) -> Runtime:
    """Build a :class:`Runtime` from the ``runtime`` config; ``device=auto`` picks CUDA when present.

    Under torchrun each process takes the GPU of its ``LOCAL_RANK`` (``cuda`` or ``auto``).
    ``gpu_decode=on`` needs a CUDA device (``auto`` decodes image files on the GPU when there is one)."""
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"runtime.precision={precision!r}: use bf16 or fp32")
    if compile not in COMPILE_MODES:
        raise ConfigError(f"runtime.compile={compile!r}: use one of {', '.join(COMPILE_MODES)}")
    if gpu_decode not in GPU_DECODE_MODES:
        raise ConfigError(f"runtime.gpu_decode={gpu_decode!r}: use one of {', '.join(GPU_DECODE_MODES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={device} but no CUDA device is visible; use runtime.device=cpu or auto")
    if device == "cuda" and distributed.active():
        device = f"cuda:{distributed.local_rank()}"
    dev = torch.device(device)
    if gpu_decode == "on" and dev.type != "cuda":
        raise ConfigError(
            f"runtime.gpu_decode=on decodes image files on a GPU, but runtime.device is {dev}; "
            "use runtime.gpu_decode=auto (GPU decoding where there is a GPU) or off"
        )
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
        compile=compile,
        gpu_decode=gpu_decode,
    )

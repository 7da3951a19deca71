"""``runtime.compile``: the shared training loop runs each step's loss through ``torch.compile``
(pilot/runtime.py ``CompiledStep``), with an eager fallback, and trains exactly as eagerly.

On this CPU the compiled steps use ``backend="aot_eager"`` (dynamo's tracing, graph breaks, guards and
AOTAutograd's joint forward/backward graphs, eager kernels): inductor works here too but takes minutes to
generate C++ for the tiny ViT. The CUDA test at the end (skipped without a GPU) runs inductor with CUDA
graphs (``reduce-overhead``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import FAST, compose_config
from torch import nn

from pilot.errors import ConfigError
from pilot.learners.training import train_epochs
from pilot.loop import build_data, build_model
from pilot.runtime import CompiledStep, Runtime, make_runtime

CPU_BACKEND = "aot_eager"
# Two sessions of two classes, 16 training images a session and batches of 16: one step per epoch, so the
# epoch losses the loop reports are the per-step losses. A 2-block ViT keeps tracing short.
ONE_STEP_EPOCHS = [
    "dataset.num_classes=4",
    "scenario=b0inc2",
    "dataset.train_per_class=8",
    "backbone.model_kwargs.depth=2",
    "++method.epochs=4",
    "++method.batch_size=16",
]


def _train(method: str, compile_mode: str, backend: str | None = CPU_BACKEND, extra: tuple[str, ...] = ()):
    """Both sessions of ``method``; returns the per-step losses, the final state and the runtime."""
    cfg = compose_config(FAST + ONE_STEP_EPOCHS + [f"+method={method}", f"runtime.compile={compile_mode}", *extra])
    parts = build_data(cfg)
    model = build_model(cfg, parts)
    runtime, learner = parts.runtime, model.learner
    if backend is not None:
        runtime.compile_backend = backend
    losses: list[float] = []
    runtime.on_epoch = lambda epoch, loss, lr: losses.append(loss)
    for info in parts.scenario.sessions:
        learner.train()
        learner.fit(model.pipeline.session(info))
    return losses, {k: v.detach().clone() for k, v in learner.state_dict().items()}, runtime, learner


def _assert_same_training(eager, compiled, atol: float = 1e-5) -> None:
    (eager_losses, eager_state, *_), (compiled_losses, compiled_state, *_) = eager, compiled
    assert len(eager_losses) == len(compiled_losses) == 8
    assert compiled_losses == pytest.approx(eager_losses, abs=atol, rel=0)
    assert eager_state.keys() == compiled_state.keys()
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, atol=atol, rtol=0, msg=key)


def test_l2p_trains_the_same_compiled_as_eager():
    """L2P's prompts enter the ViT through a forward hook: dynamo breaks the graph at the hook's
    registration and compiles the rest; per-step losses and the learned prompts, keys and head agree."""
    from torch._dynamo.utils import counters

    eager = _train("l2p", "off")
    graphs = counters["stats"]["unique_graphs"]
    compiled = _train("l2p", "default")
    assert counters["stats"]["unique_graphs"] > graphs  # the steps did run compiled
    assert compiled[2].compile_failures == {}
    _assert_same_training(eager, compiled)
    assert eager[0][0] != eager[0][1]  # the losses change from step to step: training happened


@pytest.mark.parametrize(
    "method, extra",
    [
        ("dualprompt", ("method.g_prompt_layers=[0]", "method.e_prompt_layers=[1]")),  # the 2-block ViT
        ("coda", ("method.prompt_layers=[0,1]", "method.pool_size=12", "method.batch_size=8")),
    ],
)
def test_prefix_learners_compile_and_train_the_same_as_eager(method, extra):
    """DualPrompt and CODA replace the prefixed blocks' ``attn.forward`` for one call. The patching runs
    outside the graph (``torch.compiler.disable``) and installs one stable forward per block, so the steps
    compile without a fallback, train as eagerly, and leave no block patched."""
    from torch._dynamo.utils import counters

    eager = _train(method, "off", extra=extra)
    graphs = counters["stats"]["unique_graphs"]
    compiled = _train(method, "default", extra=extra)
    assert counters["stats"]["unique_graphs"] > graphs
    assert compiled[2].compile_failures == {}
    _assert_same_training(eager, compiled)
    learner = compiled[3]
    blocks = learner.backbone.vit.blocks
    assert not [i for i, block in enumerate(blocks) if {"forward", "_pilot_prefix"} & set(vars(block.attn))]


# ------------------------------------------------------------------------------------------ fallback
class _Noisy(nn.Module):
    """A loss with random draws before a graph break, so a failed compiled call consumes random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(batch)
        torch._dynamo.graph_break()
        return ((self.linear(batch + 0.1 * noise) - 1) ** 2).mean()


def _noisy_run(runtime: Runtime) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    model = _Noisy()
    data = torch.randn(3, 8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = train_epochs(lambda epoch: [data[epoch]], 3, model.loss, optimizer, runtime)
    return losses, model.linear.weight.detach().clone()


def test_a_failing_compiler_falls_back_to_eager_with_the_same_random_numbers(caplog):
    calls = []

    def failing_on_second_graph(graph: torch.fx.GraphModule, inputs: list) -> object:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("the backend says no")
        return graph.forward

    eager = _noisy_run(Runtime(torch.device("cpu"), precision="fp32", progress=False))
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False, compile="default")
    runtime.compile_backend = failing_on_second_graph
    with caplog.at_level(logging.WARNING, logger="pilot.runtime"):
        fell_back = _noisy_run(runtime)
    assert len(calls) == 2  # the first graph (the draws) ran compiled, the second failed: not tried again
    assert fell_back[0] == eager[0] and torch.equal(fell_back[1], eager[1])  # rewound RNG, same draws
    (reason,) = runtime.compile_failures.values()
    assert "the backend says no" in reason
    assert "runs eagerly" in caplog.text and "_Noisy.loss" in caplog.text and "the backend says no" in caplog.text
    _noisy_run(runtime)  # a later session: the failed function is not compiled again
    assert len(calls) == 2


def test_the_switch():
    def loss(batch: torch.Tensor) -> torch.Tensor:
        return batch.sum()

    assert make_runtime(device="cpu").compile == "off"
    assert make_runtime(device="cpu").compiled(loss) is loss  # off: the function itself, nothing compiled
    step = make_runtime(device="cpu", compile="reduce-overhead").compiled(loss)
    assert isinstance(step, CompiledStep) and not step.graphs  # no CUDA graphs on a CPU: plain torch.compile
    with pytest.raises(ConfigError, match="runtime.compile='max'"):
        make_runtime(device="cpu", compile="max")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_l2p_with_cuda_graphs_matches_eager_to_bf16_tolerance():
    gpu = ("runtime.device=cuda", "runtime.cpu_threads=null")
    eager = _train("l2p", "off", None, gpu)
    graphs = _train("l2p", "reduce-overhead", None, gpu)
    assert graphs[2].compile_failures == {}
    assert graphs[0] == pytest.approx(eager[0], rel=2e-2, abs=2e-2)

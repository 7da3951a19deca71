"""Side-by-side check of our DualPrompt and CODA-Prompt learners against LAMDA-PILOT's own code.

Protocol (docs/fidelity.md)
---------------------------
Both sides run on the CPU in float32, on the same seeded *random* ViT-B/16 weights (timm
``vit_base_patch16_224`` architecture, random init, saved with timm's key names), the same batch
of images in [0, 1] (no normalisation, as both codebases feed ViTs) and the same prompt parameters.
LAMDA-PILOT's code is imported from a checkout given on the command line and runs in its own
environment (timm 0.6.x); ours runs in the project's venv (timm 1.0.x). Nothing is downloaded:
PILOT's networks are built with ``pretrained=False`` and then loaded with the shared weights.

The setting is LAMDA-PILOT's JSON (``exps/dualprompt.json``, ``exps/coda_prompt.json``) on a
100-class, 10-session scenario (B0Inc10). For each learner the script runs, on each side and with
each side's own code path:

* a training step of session 0 and of session 1 (PILOT: its learner's ``_train`` on a one-batch
  loader, with the optimizer's ``step`` made a no-op so the recorded gradients belong to the loaded
  parameters; ours: ``learner.loss(batch).backward()``). Session 1 starts with each side's own
  session-start code: DualPrompt copies E-prompt 0 to slot 1 (PILOT ``_init_prompt``, ours
  ``begin_session``); CODA runs its Gram-Schmidt init of slice 1 (PILOT ``process_task_count``,
  ours ``begin_session``), whose structure is recorded, and then both sides load the same values;
* an evaluation forward after each of these sessions (PILOT ``_compute_accuracy``, ours ``predict``).

Recorded: the frozen query feature, the selected E-prompt ids (DualPrompt), the prefixes the blocks
receive (DualPrompt's E-prefixes, CODA's mixed prompts), the logits over the seen classes, the
training loss (PILOT: the tensor its loop calls ``backward`` on; with logit masking, DualPrompt's
pull term), the pull term itself, the gradient of every trainable tensor (mapped to one neutral
layout), eval predictions and accuracy on the batch, the trainable parameter counts, and CODA's
learning rate in every epoch for K = 1, 2, 5, 20, 50 (PILOT's ``CosineSchedule`` stepped once per
epoch as its loop does; ours ``coda_cosine`` stepped as ``pilot.learners.training.train_epochs``).
CODA's step uses a constant learning rate on PILOT's side (``scheduler='constant'``): its
``CosineSchedule`` cannot be built for one epoch, and the lr does not enter a step that is not applied.

Neutral layout (``inputs.pt``)
------------------------------
``vit``: timm state dict (no head). ``images`` ``[B, 3, 224, 224]``; ``labels[t]`` ``[B]`` in
session t's classes. ``dualprompt[t]`` (values at the start of session t, before its prompt copy):
``g`` ``[G layers, 2 (key, value), length, 768]``, ``e`` ``[E layers, 2, pool, length, 768]``,
``e_keys`` ``[pool, 768]``, ``head_w``, ``head_b``. PILOT's ``g_prompt``/``e_prompt.prompt`` are
these tensors with the last axis split into (heads, head_dim); our ``g_prompt`` rows are
``[key; value]`` per layer and our ``e_pool.prompts[i]`` rows are ordered (layer, key/value, length).
``coda[t]``: ``P`` ``[layers, pool, length, 768]``, ``K``, ``A`` ``[layers, pool, 768]``, ``fc_w``,
``fc_b``, and ``pre`` (P, K, A before session t's Gram-Schmidt init: trained rows, zeros beyond).
PILOT's ``e_p_l``/``e_k_l``/``e_a_l`` are layer ``l`` of these; ours are
``pool.prompts`` (= ``P`` flattened over (length, 768)), ``pool.keys``, ``pool.attention``.

Commands
--------
::

    # LAMDA-PILOT and its environment (outside the repository)
    git clone /work/.mirror/sun-hailong+LAMDA-PILOT/repo /work/pilot_ref_src
    python3 -m venv /work/pilot_ref_env
    /work/pilot_ref_env/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==0.6.13 easydict numpy scipy tqdm
    # 1. inputs (our venv)
    .venv/bin/python scripts/compare_with_pilot.py make-inputs --out /tmp/fidelity
    # 2. LAMDA-PILOT's learners (its venv)
    /work/pilot_ref_env/bin/python scripts/compare_with_pilot.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/fidelity --out /tmp/fidelity/pilot.pt
    # 3. ours (our venv)
    .venv/bin/python scripts/compare_with_pilot.py ours --inputs /tmp/fidelity --out /tmp/fidelity/ours.pt
    # 4. compare; --markdown writes the tables pasted into docs/fidelity.md
    .venv/bin/python scripts/compare_with_pilot.py compare /tmp/fidelity/pilot.pt /tmp/fidelity/ours.pt \\
        --markdown /tmp/fidelity/table.md

This file imports only the standard library and torch at module level: PILOT's modules are imported
inside the ``pilot`` subcommand, ours inside ``make-inputs``/``ours``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (shared 2-core machines)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ------------------------------------------------------------------------------------------ setting
NUM_CLASSES, SESSIONS, INCREMENT = 100, 10, 10  # CIFAR-100 B0Inc10, the JSONs' setting
DIM, HEADS = 768, 12
COMPARED_SESSIONS = (0, 1)
SCHEDULE_EPOCHS = (1, 2, 5, 20, 50)
# exps/dualprompt.json
G_LAYERS, G_LENGTH, E_LAYERS, E_LENGTH, E_POOL, TOP_K = (0, 1), 5, (2, 3, 4), 5, 10, 1
# exps/coda_prompt.json: prompt_param [100, 8, 0.0], prompted layers 0-4
CODA_POOL, CODA_LENGTH, CODA_LAYERS = 100, 8, 5
CODA_PER_SESSION = CODA_POOL // SESSIONS

Record = dict[str, Any]


# ------------------------------------------------------------------------------------ shared helpers
def detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().float() if t.is_floating_point() else t.detach().clone()


@contextlib.contextmanager
def forward_outputs(module: torch.nn.Module, store: list, fn: Callable[[Any], Any]) -> Iterator[None]:
    """Append ``fn(output)`` of every forward of ``module`` to ``store`` while in the context."""
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(fn(out)))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def spy(obj: Any, name: str, store: list, fn: Callable[[Any], Any] = detached) -> Iterator[None]:
    """Replace ``obj.name`` (a bound method, or a module's function) by a wrapper that appends ``fn(result)`` to
    ``store``; restored on exit."""
    original = getattr(obj, name)
    own = name in vars(obj)  # a module's function (put back), not a method found on the class (removed)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        store.append(fn(out))
        return out

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def captured_backward(store: list) -> Iterator[None]:
    """Record every tensor ``backward`` is called on (the loss a training loop builds)."""
    original = torch.Tensor.backward

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        store.append(detached(self))
        return original(self, *args, **kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]


def gram_schmidt_report(before: torch.Tensor, after: torch.Tensor, start: int, stop: int) -> dict[str, float]:
    """Structure of a Gram-Schmidt init of rows ``[start, stop)`` of ``[rows, dim]`` matrices."""
    before, after = before.detach(), after.detach()
    new = after[start:stop].double()
    unit = F.normalize(new, dim=1)
    gram = unit @ unit.T
    old = F.normalize(after[:start].double(), dim=1)
    return {
        "earlier rows: max change": float((after[:start] - before[:start]).abs().max()) if start else 0.0,
        "new rows: max abs(norm - 1)": float((new.norm(dim=1) - 1).abs().max()),
        "new vs new: max abs cos": float((gram - torch.eye(len(new), dtype=gram.dtype)).abs().max()),
        "new vs earlier: max abs cos": float((unit @ old.T).abs().max()) if start else 0.0,
        "later rows: max abs": float(after[stop:].abs().max()) if stop < len(after) else 0.0,
    }


def merge_reports(reports: list[dict[str, float]]) -> dict[str, float]:
    return {key: max(r[key] for r in reports) for key in reports[0]}


def trainable_count(params: Any) -> int:
    return int(sum(p.numel() for p in params))


def git_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}


# --------------------------------------------------------------------------------------- make-inputs
def orthonormal_rows(earlier: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` unit rows orthogonal to each other and to ``earlier`` ``[n, dim]`` (float64 QR)."""
    new = torch.randn(count, earlier.shape[1], generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.cat([earlier.double(), new]).T)
    n = earlier.shape[0]
    return (q[:, n:] * torch.sign(torch.diagonal(r)[n:])).T.float()


def random_images(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random images in [0, 1] (low-resolution noise upsampled, plus fine noise): distinct queries."""
    low = torch.rand(batch, 3, 7, 7, generator=gen)
    smooth = F.interpolate(low, size=224, mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(batch, 3, 224, 224, generator=gen)).clamp(0, 1)


def dualprompt_inputs(gen: torch.Generator) -> dict[int, dict[str, torch.Tensor]]:
    """Session 0: fresh U(-1, 1) prompts and keys, a random head. Session 1: the same, "trained" (drifted)."""

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) * 2 - 1

    s0 = {
        "g": uniform(len(G_LAYERS), 2, G_LENGTH, DIM),
        "e": uniform(len(E_LAYERS), 2, E_POOL, E_LENGTH, DIM),
        "e_keys": uniform(E_POOL, DIM),
        "head_w": 0.02 * torch.randn(NUM_CLASSES, DIM, generator=gen),
        "head_b": 0.01 * torch.randn(NUM_CLASSES, generator=gen),
    }
    s1 = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in s0.items()}
    return {0: s0, 1: s1}


def coda_values(pre: dict[str, torch.Tensor], session: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``pre`` plus orthonormal rows for ``session``'s slice (what a Gram-Schmidt init produces)."""
    start, stop = session * CODA_PER_SESSION, (session + 1) * CODA_PER_SESSION
    out = {}
    for name, tensor in pre.items():
        flat = tensor.flatten(2).clone()
        for layer in range(CODA_LAYERS):
            flat[layer, start:stop] = orthonormal_rows(flat[layer, :start], stop - start, gen)
        out[name] = flat.view_as(tensor)
    return out


def coda_inputs(gen: torch.Generator) -> dict[int, dict[str, Any]]:
    """Session 0: orthonormal slice 0, zeros beyond. Session 1: slice 0 trained away from
    orthogonality (small drift), slice 1 orthonormal to it, zeros beyond; ``pre`` = before the init."""
    zeros = {
        "P": torch.zeros(CODA_LAYERS, CODA_POOL, CODA_LENGTH, DIM),
        "K": torch.zeros(CODA_LAYERS, CODA_POOL, DIM),
        "A": torch.zeros(CODA_LAYERS, CODA_POOL, DIM),
    }
    bound = 1 / math.sqrt(DIM)  # nn.Linear's default init, as PILOT's CodaPromptVitNet.fc
    fc = {
        "fc_w": (torch.rand(NUM_CLASSES, DIM, generator=gen) * 2 - 1) * bound,
        "fc_b": (torch.rand(NUM_CLASSES, generator=gen) * 2 - 1) * bound,
    }
    s0 = coda_values(zeros, 0, gen)
    pre1 = {}
    for name, tensor in s0.items():
        drifted = tensor.clone()
        drifted[:, :CODA_PER_SESSION] += 0.002 * torch.randn(drifted[:, :CODA_PER_SESSION].shape, generator=gen)
        pre1[name] = drifted
    s1 = coda_values(pre1, 1, gen)
    fc1 = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in fc.items()}
    return {0: {**s0, **fc, "pre": zeros}, 1: {**s1, **fc1, "pre": pre1}}


def make_inputs(out: Path, seed: int, batch: int) -> None:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = {t: torch.randint(t * INCREMENT, (t + 1) * INCREMENT, (batch,), generator=gen) for t in COMPARED_SESSIONS}
    inputs = {
        "meta": {
            "seed": seed,
            "batch": batch,
            "made_with": versions(),
            "our_commit": git_commit(Path(__file__).resolve().parent),
        },
        "vit": {k: v.clone() for k, v in vit.state_dict().items()},
        "images": random_images(batch, gen),
        "labels": labels,
        "dualprompt": dualprompt_inputs(gen),
        "coda": coda_inputs(gen),
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(inputs, out / "inputs.pt")
    print(f"wrote {out / 'inputs.pt'}: {batch} images, ViT-B/16 with {len(inputs['vit'])} tensors (seed {seed})")


def load_inputs(directory: Path) -> dict[str, Any]:
    return torch.load(directory / "inputs.pt", weights_only=False)


# --------------------------------------------------------------------------------- LAMDA-PILOT side
def pilot_args(pilot_src: Path, name: str) -> dict[str, Any]:
    """PILOT's JSON for the learner, on the CPU, without hub weights, one epoch per session step."""
    args = json.loads((pilot_src / "exps" / f"{name}.json").read_text())
    args.update(pretrained=False, device=["cpu"], nb_classes=NUM_CLASSES, nb_tasks=SESSIONS, tuned_epoch=1)
    return args


def load_vit(module: torch.nn.Module, state: dict[str, torch.Tensor], allowed_missing: tuple[str, ...]) -> None:
    """Load the shared ViT weights into a PILOT ViT; everything but its prompts/head must match."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"shared ViT does not fit: missing {missing}, unexpected {result.unexpected_keys}")


def no_step_optimizers(learner: Any) -> None:
    """PILOT's own ``get_optimizer``, with ``step`` a no-op: parameters stay as loaded, gradients remain."""
    make = learner.get_optimizer

    def get_optimizer() -> torch.optim.Optimizer:
        optimizer = make()
        optimizer.step = lambda *args, **kwargs: None
        return optimizer

    learner.get_optimizer = get_optimizer


def one_batch(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """A loader of PILOT's ``(index, inputs, targets)`` batches holding our one batch."""
    return [(torch.arange(len(labels)), images, labels)]


def pilot_dual_load(vit: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        vit.g_prompt.copy_(values["g"].view(vit.g_prompt.shape))
        vit.e_prompt.prompt.copy_(values["e"].view(vit.e_prompt.prompt.shape))
        vit.e_prompt.prompt_key.copy_(values["e_keys"])
        vit.head.weight.copy_(values["head_w"])
        vit.head.bias.copy_(values["head_b"])


def pilot_dual_snapshot(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What PILOT's DualPrompt ViT returned, before its loop masks the logits in place."""
    e = out["batched_prompt"]  # [E layers, B, 2, top_k * length, heads, head_dim], as the blocks receive it
    snap = {
        "logits": detached(out["logits"]),
        "prompt_ids": detached(out["prompt_idx"]),
        "e_prefixes": detached(e.flatten(-2).permute(0, 2, 1, 3, 4)),  # -> [layers, key/value, B, K, C]
    }
    if "reduce_sim" in out:
        snap["pull"] = detached(out["reduce_sim"])
    return snap


def pilot_dual_grads(vit: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        "g": detached(vit.g_prompt.grad.flatten(-2)),
        "e": detached(vit.e_prompt.prompt.grad.flatten(-2)),
        "e_keys": detached(vit.e_prompt.prompt_key.grad),
        "head_w": detached(vit.head.weight.grad),
        "head_b": detached(vit.head.bias.grad),
    }


def pilot_dual_record(queries: list, outputs: list, total: int) -> Record:
    out = outputs[0]
    return {
        "query": queries[0],
        "prompt_ids": out["prompt_ids"],
        "e_prefixes": out["e_prefixes"],
        "logits": out["logits"][:, :total],
        **({"pull": out["pull"]} if "pull" in out else {}),
    }


def pilot_dualprompt(pilot_src: Path, inputs: dict[str, Any]) -> tuple[dict[str, Record], int]:
    """PILOT's DualPrompt learner: training step and evaluation of sessions 0 and 1."""
    from models.dualprompt import Learner

    learner = Learner(pilot_args(pilot_src, "dualprompt"))
    net = learner._network
    load_vit(net.backbone, inputs["vit"], ("head.", "g_prompt", "e_prompt."))
    load_vit(net.original_backbone, inputs["vit"], ("head.",))
    count = trainable_count(p for group in learner.get_optimizer().param_groups for p in group["params"])
    no_step_optimizers(learner)
    images, records = inputs["images"], {}
    for session in COMPARED_SESSIONS:
        labels = inputs["labels"][session]
        learner._cur_task = session  # incremental_train
        learner._total_classes = learner._known_classes + INCREMENT
        pilot_dual_load(net.backbone, inputs["dualprompt"][session])
        if session > 0:  # after session 0's training the prompt has a gradient; _init_prompt zeroes it
            net.backbone.e_prompt.prompt.grad = torch.zeros_like(net.backbone.e_prompt.prompt)
        queries, outputs, losses = [], [], []
        with (
            forward_outputs(net.original_backbone, queries, lambda o: detached(o["pre_logits"])),
            forward_outputs(net, outputs, pilot_dual_snapshot),
            captured_backward(losses),
        ):
            learner._train(one_batch(images, labels), None)  # E-prompt copy, optimizer, _init_train
        records[f"train s{session}"] = {
            **pilot_dual_record(queries, outputs, learner._total_classes),
            "loss": losses[0],
            "grads": pilot_dual_grads(net.backbone),
        }
        records[f"eval s{session}"] = pilot_eval(learner, net, net.original_backbone, images, labels, "dualprompt")
        learner.after_task()
    return records, count


def pilot_eval(learner: Any, net: Any, query_module: Any, images: Any, labels: Any, kind: str) -> Record:
    """PILOT's ``_compute_accuracy`` on the batch, with the forward's intermediate values recorded."""
    queries, outputs = [], []
    if kind == "dualprompt":
        hooks = (
            forward_outputs(query_module, queries, lambda o: detached(o["pre_logits"])),
            forward_outputs(net, outputs, pilot_dual_snapshot),
        )
    else:
        hooks = (
            forward_outputs(query_module, queries, lambda o: detached(o[0][:, 0])),
            forward_outputs(net, outputs, lambda o: {"logits": detached(o)}),
        )
    prompts: list = []
    with hooks[0], hooks[1], pilot_coda_prompts(net, prompts, kind):
        accuracy = learner._compute_accuracy(net, one_batch(images, labels))
    total = learner._total_classes
    record = (
        pilot_dual_record(queries, outputs, total)
        if kind == "dualprompt"
        else pilot_coda_record(queries, outputs, prompts, total)
    )
    record["predictions"] = record["logits"].argmax(dim=1)
    record["accuracy"] = float(accuracy)
    return record


@contextlib.contextmanager
def pilot_coda_prompts(net: Any, store: list, kind: str) -> Iterator[None]:
    """Record the [key, value] prompts CODA's ``prompt.forward`` hands to blocks 0-4 (a direct call, no hook)."""
    if kind != "coda":
        yield
        return

    def keep(out: tuple) -> None:
        if out[0] is not None:
            store.append(torch.stack([detached(out[0][0]), detached(out[0][1])]))

    with spy(net.prompt, "forward", [], fn=keep):
        yield


def pilot_coda_tensors(prompt: Any) -> dict[str, torch.Tensor]:
    layers = range(CODA_LAYERS)
    return {
        "P": torch.stack([getattr(prompt, f"e_p_{layer}").detach() for layer in layers]),
        "K": torch.stack([getattr(prompt, f"e_k_{layer}").detach() for layer in layers]),
        "A": torch.stack([getattr(prompt, f"e_a_{layer}").detach() for layer in layers]),
    }


def pilot_coda_load(net: Any, values: dict[str, torch.Tensor], with_fc: bool = True) -> None:
    with torch.no_grad():
        for layer in range(CODA_LAYERS):
            for name, attr in (("P", "e_p"), ("K", "e_k"), ("A", "e_a")):
                getattr(net.prompt, f"{attr}_{layer}").copy_(values[name][layer])
        if with_fc:
            net.fc.weight.copy_(values["fc_w"])
            net.fc.bias.copy_(values["fc_b"])


def pilot_coda_grads(net: Any) -> dict[str, torch.Tensor]:
    grads = {
        name: torch.stack([detached(getattr(net.prompt, f"{attr}_{layer}").grad) for layer in range(CODA_LAYERS)])
        for name, attr in (("P", "e_p"), ("K", "e_k"), ("A", "e_a"))
    }
    return {**grads, "fc_w": detached(net.fc.weight.grad), "fc_b": detached(net.fc.bias.grad)}


def pilot_coda_record(queries: list, outputs: list, prompts: list, total: int) -> Record:
    return {
        "query": queries[0],  # the first backbone call of the forward: unprompted, CLS after the norm
        "prefixes": torch.stack(prompts[:CODA_LAYERS]),  # [layers, key/value, B, length / 2, C]
        "logits": outputs[0]["logits"][:, :total],
    }


def coda_gram_schmidt(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], session: int) -> Record:
    start, stop = session * CODA_PER_SESSION, (session + 1) * CODA_PER_SESSION
    return {
        name: merge_reports(
            [
                gram_schmidt_report(before[name][layer].flatten(1), after[name][layer].flatten(1), start, stop)
                for layer in range(CODA_LAYERS)
            ]
        )
        for name in ("P", "K", "A")
    }


class CudaLikeZeros:
    """``torch`` as PILOT's CODA ViT module sees it, except that ``zeros(..., requires_grad=True)``
    returns a non-leaf copy.

    Its forward starts ``prompt_loss = torch.zeros((1,), requires_grad=True).to(device=x.device)`` and
    then adds in place (``prompt_loss += loss``). On a GPU ``.to()`` returns a copy (not a leaf) and
    this works; on the CPU ``.to()`` returns the leaf itself and autograd refuses the in-place add, so
    the reference cannot train on a CPU as written. The copy reproduces the GPU behaviour: the value
    is 0 and receives no gradient either way.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        t = torch.zeros(*args, **kwargs)
        return t.clone() if t.requires_grad else t


def pilot_coda(pilot_src: Path, inputs: dict[str, Any]) -> tuple[dict[str, Record], Record, int, Any]:
    """PILOT's CODA-Prompt learner: training step and evaluation of sessions 0 and 1."""
    from models.coda_prompt import Learner

    args = pilot_args(pilot_src, "coda_prompt")
    args["scheduler"] = "constant"  # for the step only (see the module docstring); schedules: pilot_schedules
    learner = Learner(args)
    sys.modules["backbone.vit_coda_promtpt"].torch = CudaLikeZeros()  # the CPU workaround above
    net = learner._network
    load_vit(net.backbone, inputs["vit"], ())
    count = trainable_count(p for group in learner.get_optimizer().param_groups for p in group["params"])
    no_step_optimizers(learner)
    images, records, gram_schmidt = inputs["images"], {}, {}
    for session in COMPARED_SESSIONS:
        labels, values = inputs["labels"][session], inputs["coda"][session]
        learner._cur_task = session  # incremental_train
        if session > 0:
            pilot_coda_load(net, values["pre"], with_fc=False)
            net.prompt.process_task_count()  # PILOT's Gram-Schmidt init of the new slice
            gram_schmidt[f"s{session}"] = coda_gram_schmidt(values["pre"], pilot_coda_tensors(net.prompt), session)
        learner._total_classes = learner._known_classes + INCREMENT
        pilot_coda_load(net, values)
        queries, outputs, prompts, losses = [], [], [], []
        with (
            forward_outputs(net.backbone, queries, lambda o: detached(o[0][:, 0])),
            forward_outputs(net, outputs, lambda o: {"logits": detached(o[0])}),
            pilot_coda_prompts(net, prompts, "coda"),
            captured_backward(losses),
        ):
            learner._train(one_batch(images, labels), None)
        records[f"train s{session}"] = {
            **pilot_coda_record(queries, outputs, prompts, learner._total_classes),
            "loss": losses[0],
            "grads": pilot_coda_grads(net),
        }
        records[f"eval s{session}"] = pilot_eval(learner, net, net.backbone, images, labels, "coda")
        learner.after_task()
    return records, gram_schmidt, count, learner


def pilot_schedules(learner: Any) -> dict[int, list[float] | str]:
    """The lr of every epoch under PILOT's CODA ``get_scheduler`` ('cosine' = its ``CosineSchedule``),
    read during the epoch and stepped after it, as ``_init_train`` does."""
    schedules: dict[int, list[float] | str] = {}
    for epochs in SCHEDULE_EPOCHS:
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=learner.init_lr)
        learner.args.update(scheduler="cosine", tuned_epoch=epochs)
        try:
            scheduler = learner.get_scheduler(optimizer)
        except Exception as err:  # noqa: BLE001 - the reference's own failure is the result
            schedules[epochs] = f"{type(err).__name__}: {err}"
            continue
        lrs = []
        for _ in range(epochs):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            scheduler.step()
        schedules[epochs] = lrs
    return schedules


def run_pilot(pilot_src: Path, inputs: dict[str, Any]) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    dual, dual_count = pilot_dualprompt(pilot_src, inputs)
    coda, gram_schmidt, coda_count, coda_learner = pilot_coda(pilot_src, inputs)
    return {
        "meta": {**versions(), "side": "LAMDA-PILOT", "pilot_commit": git_commit(pilot_src)},
        "learners": {"dualprompt": dual, "coda": coda},
        "gram_schmidt": {"coda": gram_schmidt},
        "schedule": pilot_schedules(coda_learner),
        "trainable_params": {"dualprompt": dual_count, "coda": coda_count},
    }


# ----------------------------------------------------------------------------------------- our side
def our_backbone(state: dict[str, torch.Tensor]) -> Any:
    import timm

    from pilot.backbones.backbone import Backbone

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
    vit.load_state_dict(state, strict=True)
    return Backbone(vit, "vit_base_patch16_224", 224, None, None, pretrained=False)


def our_batch(images: torch.Tensor, labels: torch.Tensor, split: str) -> Any:
    from pilot.data.pipeline import Batch

    # augmented=True: never served from the query cache, so every forward is recorded
    return Batch(images, lambda x: x, labels, torch.arange(len(labels)), split, True, len(labels))


def our_dual_load(learner: Any, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        learner.g_prompt.copy_(values["g"].flatten(1, 2))  # [layers, key rows; value rows, C]
        learner.e_pool.prompts.copy_(values["e"].permute(2, 0, 1, 3, 4).flatten(1, 3))  # rows (layer, k/v, length)
        learner.e_pool.keys.copy_(values["e_keys"])
        learner.head.weight.copy_(values["head_w"])
        learner.head.bias.copy_(values["head_b"])


def our_dual_grads(learner: Any) -> dict[str, torch.Tensor]:
    e = learner.e_pool.prompts.grad.view(E_POOL, len(E_LAYERS), 2, E_LENGTH, DIM).permute(1, 2, 0, 3, 4)
    return {
        "g": detached(learner.g_prompt.grad.view(len(G_LAYERS), 2, G_LENGTH, DIM)),
        "e": detached(e),
        "e_keys": detached(learner.e_pool.keys.grad),
        "head_w": detached(learner.head.weight.grad),
        "head_b": detached(learner.head.bias.grad),
    }


def stacked_prefixes(prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]], layers: tuple[int, ...]) -> torch.Tensor:
    """``{block: (keys, values)}`` -> ``[layers, key/value, B, L, C]``."""
    return torch.stack([torch.stack([detached(prefixes[i][0]), detached(prefixes[i][1])]) for i in layers])


def _our_step(learner: Any, batch: Any, train: bool) -> tuple[Any, Any]:
    """One training step's loss (backward done, gradients on the parameters) or one prediction."""
    if train:
        learner.train()
        learner.zero_grad(set_to_none=True)
        loss = learner.loss(batch)
        loss.backward()
        return loss, None
    learner.eval()
    return None, learner.predict(batch)


def _eval_record(predicted: Any, labels: Any) -> Record:
    """Predictions and accuracy (%) of one evaluated batch."""
    predictions = predicted.argmax(dim=1)
    return {"predictions": predictions, "accuracy": float((predictions == labels).float().mean() * 100)}


def our_dual_pass(learner: Any, batch: Any, total: int, train: bool) -> Record:
    """One training loss + backward, or one ``predict``, with the intermediate values recorded."""
    queries, selections, prefixes, logits = [], [], [], []
    with (
        spy(learner.vit, "query", queries),
        spy(learner.e_pool, "select", selections, fn=lambda s: (detached(s.indices), detached(s.pull))),
        spy(learner, "prefixes", prefixes, fn=lambda p: stacked_prefixes(p, E_LAYERS)),
        spy(learner, "logits", logits),
    ):
        loss, predicted = _our_step(learner, batch, train)
    record = {
        "query": queries[0],
        "prompt_ids": selections[0][0],
        "e_prefixes": prefixes[0],
        "logits": logits[0][:, :total],
    }
    if train:
        record.update(pull=selections[0][1], loss=detached(loss), grads=our_dual_grads(learner))
    else:
        record.update(_eval_record(predicted, batch.labels))
    return record


def our_dualprompt(inputs: dict[str, Any], backbone: Any, reference_layout: bool) -> tuple[dict[str, Record], int]:
    from functools import partial

    from pilot.data.scenario import make_scenario
    from pilot.runtime import Runtime

    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    cpu = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    adam = partial(torch.optim.Adam, lr=1e-3)
    from pilot.api import make_learner

    learner = make_learner(
        "dualprompt", backbone, scenario, cpu, optimizer=adam, reference_prefix_layout=reference_layout
    )
    records, count = {}, 0
    for session in COMPARED_SESSIONS:
        info, labels = scenario.sessions[session], inputs["labels"][session]
        our_dual_load(learner, inputs["dualprompt"][session])
        learner.begin_session(info)  # session 1: E-prompt 0 copied to slot 1
        if session == 0:
            count = trainable_count(p for p in learner.parameters() if p.requires_grad)
        records[f"train s{session}"] = our_dual_pass(
            learner, our_batch(inputs["images"], labels, "train"), info.total, True
        )
        records[f"eval s{session}"] = our_dual_pass(
            learner, our_batch(inputs["images"], labels, "test"), info.total, False
        )
    return records, count


def our_coda_load(learner: Any, values: dict[str, torch.Tensor], with_fc: bool = True) -> None:
    with torch.no_grad():
        learner.pool.prompts.copy_(values["P"].flatten(2))
        learner.pool.keys.copy_(values["K"])
        learner.pool.attention.copy_(values["A"])
        if with_fc:
            learner.head.weight.copy_(values["fc_w"])
            learner.head.bias.copy_(values["fc_b"])


def our_coda_tensors(learner: Any) -> dict[str, torch.Tensor]:
    pool = learner.pool
    return {
        "P": pool.prompts.detach().view(CODA_LAYERS, CODA_POOL, CODA_LENGTH, DIM),
        "K": pool.keys,
        "A": pool.attention,
    }


def our_coda_grads(learner: Any) -> dict[str, torch.Tensor]:
    pool = learner.pool
    return {
        "P": detached(pool.prompts.grad.view(CODA_LAYERS, CODA_POOL, CODA_LENGTH, DIM)),
        "K": detached(pool.keys.grad),
        "A": detached(pool.attention.grad),
        "fc_w": detached(learner.head.weight.grad),
        "fc_b": detached(learner.head.bias.grad),
    }


def our_coda_pass(learner: Any, batch: Any, total: int, train: bool) -> Record:
    queries, prefixes, logits = [], [], []
    layers = tuple(learner.layers)
    with (
        spy(learner.vit, "query", queries),
        spy(learner, "prefixes", prefixes, fn=lambda out: stacked_prefixes(out[0], layers)),
        spy(learner, "logits", logits),
    ):
        loss, predicted = _our_step(learner, batch, train)
    record = {"query": queries[0], "prefixes": prefixes[0], "logits": logits[0][:, :total]}
    if train:
        record.update(loss=detached(loss), grads=our_coda_grads(learner))
    else:
        record.update(_eval_record(predicted, batch.labels))
    return record


def our_coda(inputs: dict[str, Any], backbone: Any) -> tuple[dict[str, Record], Record, int]:
    from functools import partial

    from pilot.data.scenario import make_scenario
    from pilot.runtime import Runtime

    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    cpu = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    from pilot.api import make_learner

    learner = make_learner(
        "coda", backbone, scenario, cpu, optimizer=partial(torch.optim.Adam, lr=1e-3), scheduler=None
    )
    records, gram_schmidt, count = {}, {}, 0
    for session in COMPARED_SESSIONS:
        info, labels, values = scenario.sessions[session], inputs["labels"][session], inputs["coda"][session]
        if session > 0:
            our_coda_load(learner, values["pre"], with_fc=False)
        learner.begin_session(info)  # our Gram-Schmidt init of the session's slice
        if session > 0:
            gram_schmidt[f"s{session}"] = coda_gram_schmidt(values["pre"], our_coda_tensors(learner), session)
        else:
            count = trainable_count(p for p in learner.parameters() if p.requires_grad)
        our_coda_load(learner, values)
        records[f"train s{session}"] = our_coda_pass(
            learner, our_batch(inputs["images"], labels, "train"), info.total, True
        )
        records[f"eval s{session}"] = our_coda_pass(
            learner, our_batch(inputs["images"], labels, "test"), info.total, False
        )
    return records, gram_schmidt, count


def our_schedules(shifted: bool | None) -> dict[int, list[float]]:
    """The lr of every epoch under ``coda_cosine`` (``shifted=None``: its default), stepped as ``train_epochs``."""
    from pilot.learners.schedules import coda_cosine

    schedules = {}
    for epochs in SCHEDULE_EPOCHS:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.Adam([param], lr=1e-3)
        kwargs = {} if shifted is None else {"shifted": shifted}
        scheduler = coda_cosine(optimizer, epochs=epochs, **kwargs)
        lrs = []
        for _ in range(epochs):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            scheduler.step()
        schedules[epochs] = lrs
    return schedules


def run_ours(inputs: dict[str, Any]) -> Record:
    backbone = our_backbone(inputs["vit"])
    learners, counts = {}, {}
    for layout in (True, False):
        name = f"dualprompt (reference_prefix_layout={str(layout).lower()})"
        learners[name], counts[name] = our_dualprompt(inputs, backbone, layout)
    learners["coda"], gram_schmidt, counts["coda"] = our_coda(inputs, backbone)
    return {
        "meta": {**versions(), "side": "ours", "our_commit": git_commit(Path(__file__).resolve().parent)},
        "learners": learners,
        "gram_schmidt": {"coda": gram_schmidt},
        "schedule": our_schedules(None),
        "schedule_unshifted": our_schedules(False),
        "trainable_params": counts,
    }


# ------------------------------------------------------------------------------------------ compare
def tensor_diff(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Max abs difference, the reference's max abs, and the relative L2 difference ||a - b|| / ||b||."""
    if ours.shape != ref.shape:
        return {"shape": f"{tuple(ours.shape)} vs {tuple(ref.shape)}", "max_abs": math.inf, "rel": math.inf}
    a, b = ours.double(), ref.double()
    diff = (a - b).abs()
    norm = float(b.norm())
    return {
        "shape": "x".join(str(s) for s in ref.shape) or "scalar",
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "ref_max": float(b.abs().max()) if b.numel() else 0.0,
        "rel": float((a - b).norm()) / norm if norm > 0 else float((a - b).norm()),
    }


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x):
        return "shape differs"
    return f"{x:.1e}"


def same_count(ours: torch.Tensor, ref: torch.Tensor) -> str:
    if ours.shape != ref.shape:
        return f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    rows = (ours == ref).view(len(ref), -1).all(dim=1)
    return f"{int(rows.sum())}/{len(rows)} same"


def pilot_name(our_name: str) -> str:
    return our_name.split(" ")[0]


def summary_rows(ours: Record, ref: Record) -> list[list[str]]:
    """One row per learner and case: max abs differences of the forward quantities and loss."""
    rows = []
    for name, cases in ours["learners"].items():
        for case, record in cases.items():
            reference = ref["learners"][pilot_name(name)][case]
            cells = [name, case]
            for key in ("query", "prompt_ids", "prefixes", "logits", "pull", "loss"):
                if key == "prefixes":
                    key = "e_prefixes" if "e_prefixes" in record else "prefixes"
                if key not in record:
                    cells.append("-")
                elif key == "prompt_ids":
                    cells.append(same_count(record[key], reference[key]))
                else:
                    cells.append(fmt(tensor_diff(record[key], reference[key])["max_abs"]))
            if "grads" in record:
                worst = max(tensor_diff(g, reference["grads"][k])["rel"] for k, g in record["grads"].items())
                cells.append(fmt(worst))
            else:
                cells.append("-")
            if "predictions" in record:
                cells.append(
                    f"{same_count(record['predictions'], reference['predictions'])}; "
                    f"acc {record['accuracy']:.1f} vs {reference['accuracy']:.1f}"
                )
            else:
                cells.append("-")
            rows.append(cells)
    return rows


def gradient_rows(ours: Record, ref: Record) -> list[list[str]]:
    rows = []
    for name, cases in ours["learners"].items():
        for case, record in cases.items():
            for tensor, grad in record.get("grads", {}).items():
                d = tensor_diff(grad, ref["learners"][pilot_name(name)][case]["grads"][tensor])
                rows.append([name, case, tensor, d["shape"], fmt(d["max_abs"]), fmt(d["ref_max"]), fmt(d["rel"])])
    return rows


def schedule_rows(ours: Record, ref: Record) -> list[list[str]]:
    rows = []
    for epochs in SCHEDULE_EPOCHS:
        mine, theirs = ours["schedule"][epochs], ref["schedule"][epochs]
        unshifted = ours["schedule_unshifted"][epochs]
        short = ", ".join(f"{lr / 1e-3:.4f}" for lr in (mine if len(mine) <= 5 else mine[:2] + mine[-1:]))
        if isinstance(theirs, str):
            rows.append([str(epochs), f"not built ({theirs})", short, "-", f"{unshifted[-1] / 1e-3:.4f}"])
            continue
        worst = max(abs(a - b) for a, b in zip(mine, theirs)) if len(mine) == len(theirs) else math.inf
        rows.append([str(epochs), f"{len(theirs)} epochs", short, fmt(worst), f"{unshifted[-1] / 1e-3:.4f}"])
    return rows


def gram_schmidt_rows(ours: Record, ref: Record) -> list[list[str]]:
    rows = []
    for side, record in (("LAMDA-PILOT", ref), ("ours", ours)):
        for session, tensors in record["gram_schmidt"]["coda"].items():
            for tensor, metrics in tensors.items():
                rows.append([side, session, tensor, *(fmt(v) for v in metrics.values())])
    return rows


def layout_rows(ours: Record, ref: Record) -> list[list[str]]:
    """Which half of each sample's E-prompt PILOT feeds as key and as value prefix.

    Our default layout holds each sample's own (key, value) prefixes, so PILOT's prefixes are
    classified against them: ``(key, value)`` is the paper's pairing, ``(key, key)`` the key half
    used twice, and so on (exact equality; ``other`` where neither matches)."""
    default = next((v for k, v in ours["learners"].items() if k.endswith("reference_prefix_layout=false)")), None)
    if default is None:
        return []
    rows = []
    for case, record in default.items():
        theirs, mine = ref["learners"]["dualprompt"][case]["e_prefixes"], record["e_prefixes"]
        groups: dict[str, list[int]] = {}
        for b in range(theirs.shape[2]):
            halves = []
            for slot in (0, 1):
                match = [
                    name for name, h in (("key", 0), ("value", 1)) if torch.equal(theirs[:, slot, b], mine[:, h, b])
                ]
                halves.append(match[0] if match else "other")
            groups.setdefault(f"({halves[0]}, {halves[1]})", []).append(b)
        rows.append([case, "; ".join(f"{pair}: samples {ranges(ids)}" for pair, ids in groups.items())])
    return rows


def ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(ours: Record, ref: Record) -> str:
    parts = [
        f"LAMDA-PILOT {ref['meta'].get('pilot_commit', '?')} (timm {ref['meta']['timm']}, torch {ref['meta']['torch']})"
        f" vs ours {ours['meta'].get('our_commit', '?')} (timm {ours['meta']['timm']}, torch {ours['meta']['torch']});"
        " CPU, float32.",
        "",
        "Forward and loss: max abs difference (prompt ids, predictions: samples that agree); "
        "gradients: worst relative L2 difference over the trainable tensors.",
        "",
        table(
            [
                "learner",
                "case",
                "query",
                "prompt ids",
                "prefixes",
                "logits",
                "pull term",
                "loss",
                "grads (rel)",
                "eval",
            ],
            summary_rows(ours, ref),
        ),
        "",
        "Gradients per trainable tensor (neutral layout; rel = ||ours - PILOT|| / ||PILOT||):",
        "",
        table(
            ["learner", "case", "tensor", "shape", "max abs diff", "max abs (PILOT)", "rel"],
            gradient_rows(ours, ref),
        ),
        "",
        "DualPrompt E-prefixes PILOT hands to the blocks, per sample (key prefix, value prefix), "
        "as halves of the sample's own E-prompt:",
        "",
        table(["case", "PILOT's (key, value) prefixes"], layout_rows(ours, ref)),
        "",
        "CODA learning rate per epoch (factor of the base lr; ours = coda_cosine default, i.e. shifted):",
        "",
        table(
            ["K", "PILOT CosineSchedule", "ours (epochs 0, 1, ..., last)", "max abs diff", "ours shifted=false, last"],
            schedule_rows(ours, ref),
        ),
        "",
        "CODA Gram-Schmidt init of slice 1 (random on both sides; structure only):",
        "",
        table(
            ["side", "session", "tensor", *next(iter(ours["gram_schmidt"]["coda"].values()))["P"].keys()],
            gram_schmidt_rows(ours, ref),
        ),
        "",
        "Trainable parameters:",
        "",
        table(
            ["learner", "LAMDA-PILOT", "ours"],
            [
                [name, f"{ref['trainable_params'][pilot_name(name)]:,}", f"{count:,}"]
                for name, count in ours["trainable_params"].items()
            ],
        ),
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    """The command line of ``scripts/fidelity/common.py`` (shared with the scripts there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "fidelity"))
    import common

    common.main(__doc__, make_inputs, run_pilot, run_ours, report, batch=12, argv=argv)


if __name__ == "__main__":
    main()

"""Side-by-side check of our LAE learner against LAMDA-PILOT's LAE code (``models/lae.py``,
``utils/inc_net.py: LAE``, ``backbone/vit_lae.py``).

Protocol (as scripts/compare_with_pilot.py, whose helpers this script imports)
-------------------------------------------------------------------------------
Both sides run on the CPU in float32, on the same seeded *random* ViT-B/16 weights (timm key names),
the same batch of images in [0, 1], the same PET values (online and offline) and the same head. The
setting is ``exps/lae.json`` on 100 classes in sessions of 10 (B0Inc10), with LAMDA-PILOT's schedule on
our side (``offline_from_start=true``, ``freeze_first_session=true``) and two changes on both sides so
that one step shows everything: ``num_freeze_epochs=0`` (the PET learns in the one epoch that runs)
and ``ema_decay=0.9`` (so that the offline PET visibly moves in one step). For each PET kind (prefix,
adapter, LoRA) and for sessions 0 and 1 (session 1 with the old classes masked), each side runs its
own code:

* a training epoch of one batch with a real Adam step (PILOT: ``Learner._train`` on a one-batch
  loader; ours: ``LAE.train_session``), recording the online logits over the seen classes, the loss,
  the gradients of the head rows of the seen classes and of every PET tensor, the parameters after the
  step, and the offline PET after the step's EMA update;
* an evaluation of the batch (PILOT: ``_compute_accuracy``, ours: ``predict``), recording the online
  and offline logits, the ensemble ``max(softmax(online), softmax(offline))`` (PILOT's formula on its
  logits; ours is ``predict``'s output) and the predictions.

PILOT attaches adapters to ``blocks[b].attn`` where its attention never calls them (the adapters do
nothing), and its LoRA branch raises ``AttributeError`` (``self.cfg``). For these two kinds the PILOT
side uses the placement of the official code (gqk/LAE ``attach_pets_vit``: the adapter on the block,
parallel to ``attn``; KVLoRA on ``attn.qkv``) with PILOT's own modules and loop; what PILOT does as
shipped is recorded separately (``shipped``).

Commands
--------
::

    .venv/bin/python scripts/fidelity/lae.py make-inputs --out /tmp/lae_fidelity
    /work/pilot_ref_env/bin/python scripts/fidelity/lae.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/lae_fidelity --out /tmp/lae_fidelity/pilot.pt
    .venv/bin/python scripts/fidelity/lae.py ours --inputs /tmp/lae_fidelity --out /tmp/lae_fidelity/ours.pt
    .venv/bin/python scripts/fidelity/lae.py compare /tmp/lae_fidelity/pilot.pt /tmp/lae_fidelity/ours.pt \\
        --markdown /tmp/lae_fidelity/table.md
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Any, Iterator

import common
import torch
from common import Record, cwp, diff_row

NUM_CLASSES, SESSIONS, INCREMENT, DIM = 100, 10, 10, 768
SESSIONS_COMPARED = (0, 1)
KINDS = {"prefix": "Prefix", "adapter": "Adapter", "lora": "LoRA"}
BLOCKS, LENGTH, RANK, EMA_DECAY = 5, 10, 5, 0.9


# --------------------------------------------------------------------------------------- make-inputs
def pet_values(kind: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """ "Trained" PET values in the neutral layout (one row per adapted block), large enough to matter."""

    def normal(std: float, *shape: int) -> torch.Tensor:
        return std * torch.randn(BLOCKS, *shape, generator=gen)

    bound = 1 / math.sqrt(DIM)
    if kind == "prefix":
        return {
            "key_tokens": normal(0.5, LENGTH, DIM),
            "key_scale": 1 + normal(0.1),
            "value_tokens": normal(0.5, LENGTH, DIM),
            "value_scale": 1 + normal(0.1),
        }
    if kind == "adapter":
        return {
            "down_w": (torch.rand(BLOCKS, RANK, DIM, generator=gen) * 2 - 1) * bound,
            "down_b": normal(0.02, RANK),
            "up_w": normal(0.05, DIM, RANK),
            "up_b": normal(0.02, DIM),
            "scale": 1 + normal(0.1),
        }
    return {
        "a": (torch.rand(BLOCKS, 2, RANK, DIM, generator=gen) * 2 - 1) * bound,
        "b": normal(0.05, 2, DIM, RANK),
        "scale": 1 + normal(0.1, 2),
    }


def make_inputs(out: Path, seed: int, batch: int) -> None:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = {t: torch.randint(t * INCREMENT, (t + 1) * INCREMENT, (batch,), generator=gen) for t in SESSIONS_COMPARED}
    values: dict[str, dict[int, Record]] = {}
    for kind in KINDS:
        online = pet_values(kind, gen)
        values[kind] = {}
        for t in SESSIONS_COMPARED:
            drift = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in online.items()}
            values[kind][t] = {
                "online": online if t == 0 else drift,
                "offline": {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in online.items()},
                "head_w": 0.03 * torch.randn(NUM_CLASSES, DIM, generator=gen),
                "head_b": 0.01 * torch.randn(NUM_CLASSES, generator=gen),
            }
    inputs = {
        "meta": common.input_meta(seed, batch=batch),
        "vit": {k: v.clone() for k, v in vit.state_dict().items()},
        "images": cwp.random_images(batch, gen),
        "labels": labels,
        "values": values,
    }
    common.save_inputs(inputs, out, f": {batch} images, ViT-B/16 with {len(inputs['vit'])} tensors (seed {seed})")


# ----------------------------------------------------------------------------------- PET parameters
def block_parameters(m: Any, kind: str, side: str) -> dict[str, list[torch.nn.Parameter]]:
    """One block's PET module: neutral name -> the parameters that hold it (stacked along a new axis 0)."""
    if kind == "prefix":
        if side == "pilot":
            return {
                "key_tokens": [m.key.tokens],
                "key_scale": [m.key.scaler.scale],
                "value_tokens": [m.val.tokens],
                "value_scale": [m.val.scaler.scale],
            }
        return {
            "key_tokens": [m.key_tokens],
            "key_scale": [m.key_scale],
            "value_tokens": [m.value_tokens],
            "value_scale": [m.value_scale],
        }
    if kind == "adapter":
        down, up, scale = (m.layer[0], m.layer[2], m.layer[3].scale) if side == "pilot" else (m.down, m.up, m.scale)
        return {
            "down_w": [down.weight],
            "down_b": [down.bias],
            "up_w": [up.weight],
            "up_b": [up.bias],
            "scale": [scale],
        }
    if side == "pilot":
        return {"a": list(m.lora_A), "b": list(m.lora_B), "scale": [s.scale for s in m.scale]}
    return {"a": [m.lora_a], "b": [m.lora_b], "scale": [m.scale]}


def pet_parameters(pets: Any, kind: str, side: str) -> list[dict[str, list[torch.nn.Parameter]]]:
    return [block_parameters(m, kind, side) for m in pets]


def _neutral(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.stack(params) if len(params) > 1 else params[0]


def load_pets(pets: Any, kind: str, side: str, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, block in enumerate(pet_parameters(pets, kind, side)):
            for name, params in block.items():
                _neutral_copy(params, values[name][i])


def _neutral_copy(params: list[torch.nn.Parameter], value: torch.Tensor) -> None:
    parts = list(value) if len(params) > 1 else [value]
    for p, v in zip(params, parts):
        p.copy_(v)


def pet_tensors(pets: Any, kind: str, side: str, grad: bool = False) -> dict[str, torch.Tensor]:
    """The PET (or its gradient; None = zeros) in the neutral layout ``{name: [blocks, ...]}``."""

    def get(p: torch.nn.Parameter) -> torch.Tensor:
        return (p.grad if p.grad is not None else torch.zeros_like(p)) if grad else p

    blocks = pet_parameters(pets, kind, side)
    return {
        name: cwp.detached(torch.stack([_neutral([get(p) for p in b[name]]) for b in blocks])) for name in blocks[0]
    }


def ensemble(online: torch.Tensor, offline: torch.Tensor) -> torch.Tensor:
    """PILOT's ``_compute_accuracy`` rule on two logit tensors."""
    return torch.stack([online.softmax(dim=1), offline.softmax(dim=1)], dim=-1).max(dim=-1)[0]


# --------------------------------------------------------------------------------- LAMDA-PILOT side
@contextlib.contextmanager
def official_attach(lae_class: Any) -> Iterator[None]:
    """PILOT's LAE network with the official code's PET placement (gqk/LAE ``main.py: attach_pets_vit``)."""
    shipped = lae_class.attach_pets_vit

    def attach(self: Any, pets: Any) -> None:
        for i, b in enumerate(self.adapt_blocks):
            if self.pet_cls == "Adapter":
                self.backbone.blocks[b].attach_adapter(attn=pets[i])
            elif self.pet_cls == "LoRA":
                self.backbone.blocks[b].attn.attach_adapter(qkv=pets[i])
            else:
                self.backbone.blocks[b].attn.attach_prefix(pets[i])

    lae_class.attach_pets_vit = attach
    try:
        yield
    finally:
        lae_class.attach_pets_vit = shipped


def pilot_learner(pilot_src: Path, inputs: dict[str, Any], kind: str) -> Any:
    """PILOT's LAE Learner on the shared weights (its ``get_backbone`` would download them)."""
    import timm
    import utils.inc_net as inc_net
    from backbone import vit_lae  # noqa: F401  (registers vit_base_patch16_224_lae)
    from models.lae import Learner

    def get_backbone(args: dict[str, Any], pretrained: bool = False) -> torch.nn.Module:
        model = timm.create_model(args["backbone_type"], pretrained=False)
        cwp.load_vit(model, inputs["vit"], ())
        return model

    inc_net.get_backbone = get_backbone
    args = cwp.pilot_args(pilot_src, "lae")
    args.update(pet_cls=KINDS[kind], num_freeze_epochs=0, ema_decay=EMA_DECAY)
    return Learner(args)


def pilot_session(learner: Any, kind: str, values: Record, images: torch.Tensor, labels: torch.Tensor) -> Record:
    net, session = learner._network, learner._cur_task + 1
    learner._cur_task, learner._total_classes = session, learner._known_classes + INCREMENT
    total = learner._total_classes
    net.update_fc(total)
    with torch.no_grad():
        net.fc.weight.copy_(values["head_w"][:total])
        net.fc.bias.copy_(values["head_b"][:total])
    load_pets(net.pets, kind, "pilot", values["online"])
    load_pets(net.pets_emas, kind, "pilot", values["offline"])
    outputs: list = []
    losses: list = []
    with cwp.forward_outputs(net, outputs, lambda o: cwp.detached(o["logits"])), cwp.captured_backward(losses):
        learner._train(cwp.one_batch(images, labels), None)
    train = {
        "logits": outputs[0],
        "loss": losses[0],
        "grads": {
            "head_w": cwp.detached(net.fc.weight.grad),
            "head_b": cwp.detached(net.fc.bias.grad),
            **pet_tensors(net.pets, kind, "pilot", grad=True),
        },
        "after_step": {"head_w": cwp.detached(net.fc.weight), **pet_tensors(net.pets, kind, "pilot")},
        "offline_after_step": pet_tensors(net.pets_emas, kind, "pilot"),
    }
    outputs.clear()
    with cwp.forward_outputs(net, outputs, lambda o: cwp.detached(o["logits"])):
        accuracy = learner._compute_accuracy(net, cwp.one_batch(images, labels))
    online, offline = outputs[0][:, :total], outputs[1][:, :total]
    evaluation = {"online": online, "offline": offline, "ensemble": ensemble(online, offline)}
    evaluation.update(predictions=evaluation["ensemble"].argmax(dim=1), accuracy=float(accuracy))
    learner.after_task()
    return {"train": train, "eval": evaluation}


def pilot_shipped(pilot_src: Path, inputs: dict[str, Any], kind: str) -> Record:
    """What PILOT's own attachment does: LoRA fails to build; adapters leave the logits unchanged."""
    try:
        learner = pilot_learner(pilot_src, inputs, kind)
    except AttributeError as err:
        return {"builds": False, "error": f"AttributeError: {err}"}
    net, images = learner._network, inputs["images"]
    net.update_fc(INCREMENT)
    net.eval()
    with torch.no_grad():
        plain = net(images)["logits"]
        load_pets(net.pets, kind, "pilot", inputs["values"][kind][0]["online"])
        adapted = net(images)["logits"]
    return {"builds": True, "logit change from the PET values": float((adapted - plain).abs().max())}


def run_pilot(pilot_src: Path, inputs: dict[str, Any]) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    from utils.inc_net import LAE

    results, counts, shipped = {}, {}, {}
    for kind in KINDS:
        if kind != "prefix":
            shipped[kind] = pilot_shipped(pilot_src, inputs, kind)
        with official_attach(LAE) if kind != "prefix" else contextlib.nullcontext():
            learner = pilot_learner(pilot_src, inputs, kind)
            counts[kind] = cwp.trainable_count(learner._network.pets.parameters())
            results[kind] = {
                t: pilot_session(learner, kind, inputs["values"][kind][t], inputs["images"], inputs["labels"][t])
                for t in SESSIONS_COMPARED
            }
    meta = common.pilot_meta(pilot_src)
    return {"meta": meta, "results": results, "pet_params": counts, "shipped": shipped}


# ----------------------------------------------------------------------------------------- our side
def our_session(learner: Any, kind: str, values: Record, images: torch.Tensor, labels: torch.Tensor) -> Record:
    from types import SimpleNamespace

    session = learner.session + 1 if learner.total else 0
    info = learner.scenario.sessions[session]
    learner.begin_session(info)
    total = info.total
    with torch.no_grad():
        learner.head.weight.copy_(values["head_w"])
        learner.head.bias.copy_(values["head_b"])
    load_pets(learner.online, kind, "ours", values["online"])
    load_pets(learner.offline, kind, "ours", values["offline"])
    batch = cwp.our_batch(images, labels, "train")
    logits: list = []
    losses: list = []
    learner.train()
    with cwp.spy(learner, "logits", logits), cwp.spy(learner, "loss", losses):
        learner.train_session(SimpleNamespace(info=info, train_batches=lambda size: [batch]))
    train = {
        "logits": logits[0][:, :total],
        "loss": losses[0],
        "grads": {
            "head_w": cwp.detached(learner.head.weight.grad[:total]),
            "head_b": cwp.detached(learner.head.bias.grad[:total]),
            **pet_tensors(learner.online, kind, "ours", grad=True),
        },
        "after_step": {
            "head_w": cwp.detached(learner.head.weight[:total]),
            **pet_tensors(learner.online, kind, "ours"),
        },
        "offline_after_step": pet_tensors(learner.offline, kind, "ours"),
    }
    logits.clear()
    learner.eval()
    with cwp.spy(learner, "logits", logits):
        probs = learner.predict(cwp.our_batch(images, labels, "test"))
    evaluation = {"online": logits[0][:, :total], "offline": logits[1][:, :total], "ensemble": cwp.detached(probs)}
    predictions = probs.argmax(dim=1)
    evaluation.update(predictions=predictions, accuracy=float((predictions == labels).float().mean() * 100))
    return {"train": train, "eval": evaluation}


def run_ours(inputs: dict[str, Any]) -> Record:
    from functools import partial

    from pilot.data.scenario import make_scenario
    from pilot.runtime import Runtime

    backbone = cwp.our_backbone(inputs["vit"])
    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    cpu = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    adam = partial(torch.optim.Adam, lr=0.0028125, weight_decay=0.0)  # exps/lae.json
    results, counts = {}, {}
    for kind in KINDS:
        from pilot.api import make_learner

        learner = make_learner(
            "lae",
            backbone,
            scenario,
            cpu,
            optimizer=adam,
            epochs=1,
            num_freeze_epochs=0,
            pet=kind,
            ema_decay=EMA_DECAY,
            offline_from_start=True,
            freeze_first_session=True,
        )  # cwp.fmt: skip
        counts[kind] = cwp.trainable_count(learner.online.parameters())
        results[kind] = {
            t: our_session(learner, kind, inputs["values"][kind][t], inputs["images"], inputs["labels"][t])
            for t in SESSIONS_COMPARED
        }
    meta = common.our_meta()
    return {"meta": meta, "results": results, "pet_params": counts}


# ------------------------------------------------------------------------------------------ compare
def report(ours: Record, ref: Record) -> str:
    header = ["quantity", "shape", "max abs diff", "PILOT max abs", "rel. L2 diff"]
    parts = [f"{common.headline(ours, ref, 40)}; CPU, float32; ema_decay {EMA_DECAY}, num_freeze_epochs 0."]
    for kind in KINDS:
        rows, worst = [], 0.0
        for t in SESSIONS_COMPARED:
            o, r = ours["results"][kind][t], ref["results"][kind][t]
            items = [
                ("train logits", o["train"]["logits"], r["train"]["logits"]),
                ("loss", o["train"]["loss"], r["train"]["loss"]),
            ]
            items += [(f"grad {k}", o["train"]["grads"][k], r["train"]["grads"][k]) for k in r["train"]["grads"]]
            items += [
                (f"{k} after step", o["train"]["after_step"][k], r["train"]["after_step"][k])
                for k in r["train"]["after_step"]
            ]
            items += [
                (f"offline {k} after step", o["train"]["offline_after_step"][k], v)
                for k, v in r["train"]["offline_after_step"].items()
            ]
            items += [(f"eval {k}", o["eval"][k], r["eval"][k]) for k in ("online", "offline", "ensemble")]
            for name, a, b in items:
                rows.append(diff_row(f"s{t} {name}", a, b))
                worst = max(worst, cwp.tensor_diff(a, b)["rel"])
            same = bool(torch.equal(o["eval"]["predictions"], r["eval"]["predictions"]))
            rows.append([f"s{t} eval predictions", "", "identical" if same else "DIFFER", "", ""])
        counts = f"PET parameters: ours {ours['pet_params'][kind]:,}, PILOT {ref['pet_params'][kind]:,}"
        parts += [
            f"\n### {kind}\n",
            f"{counts}; largest relative difference {cwp.fmt(worst)}.\n",
            cwp.table(header, rows),
        ]
    shipped = ref.get("shipped", {})
    if shipped:
        parts.append("\n### PILOT as shipped (its own attach_pets_vit)\n")
        parts += [f"- {kind}: {value}" for kind, value in shipped.items()]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ device check
def device_options(parser: Any) -> None:
    parser.add_argument("--batch", type=int, default=128)


def device_command(args: Any) -> None:
    device_check(args.batch)


def device_check(batch: int) -> None:
    """On CUDA (a lent GPU): our LAE on a random ViT-B/16 under bf16 autocast vs fp32 (TF32 off) for each
    PET kind: the ensemble probabilities of one test batch, and the time and peak memory of a training
    step of ``batch`` images at 224 px."""
    import time
    from functools import partial
    from types import SimpleNamespace

    import timm

    from pilot.backbones.backbone import Backbone
    from pilot.data.pipeline import Batch
    from pilot.data.scenario import make_scenario
    from pilot.runtime import Runtime

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).to(device)
    backbone = Backbone(vit, "vit_base_patch16_224", 224, None, None, pretrained=False)
    scenario = make_scenario(NUM_CLASSES, INCREMENT, INCREMENT, class_order="natural")
    images, labels = torch.rand(batch, 3, 224, 224, device=device), torch.randint(0, INCREMENT, (batch,), device=device)

    def make_batch(split: str) -> Batch:
        return Batch(images, lambda x: x, labels, torch.arange(batch), split, split == "train", batch)

    adam = partial(torch.optim.Adam, lr=0.0028125)
    print(torch.cuda.get_device_name() if device.type == "cuda" else "cpu", flush=True)
    for kind in KINDS:
        probs = {}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(1)
            runtime = Runtime(device, precision=precision, tf32=False, progress=False)
            settings = {"epochs": 1, "num_freeze_epochs": 0, "pet": kind, "offline_from_start": True}
            from pilot.api import make_learner

            learner = make_learner("lae", backbone, scenario, runtime, optimizer=adam, **settings)
            learner.to(device).begin_session(scenario.sessions[0])
            with torch.no_grad():  # a PET away from its initialisation (adapter and LoRA start as the identity)
                for p in learner.online.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            probs[precision] = learner.eval().predict(make_batch("test"))
            session = SimpleNamespace(info=scenario.sessions[0], train_batches=lambda size: [make_batch("train")] * 6)
            learner.train().train_session(session)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            learner.train_session(session)
            if device.type == "cuda":
                torch.cuda.synchronize()
            memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            step = (time.perf_counter() - start) / 6 * 1000
            print(f"{kind} {precision}: training step {step:.0f} ms (batch {batch}), peak memory {memory:.1f} GiB")
        diff = (probs["bf16"] - probs["fp32"]).abs().max().item()
        agree = (probs["bf16"].argmax(1) == probs["fp32"].argmax(1)).float().mean().item()
        print(f"{kind}: bf16 vs fp32 ensemble probabilities max abs diff {diff:.2e}, top-1 agreement {agree:.3f}")


if __name__ == "__main__":
    device = ("bf16 vs fp32 and step time/memory on a GPU (our venv or the GPU's)", device_options, device_command)
    common.main(__doc__, make_inputs, run_pilot, run_ours, report, batch=6, commands={"device": device})

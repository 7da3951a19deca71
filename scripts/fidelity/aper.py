"""Side-by-side check of our APER learners (pilot/learners/aper.py) against LAMDA-PILOT's ``models/aper_*.py``.

Protocol (as scripts/compare_with_pilot.py, whose helpers this script imports)
------------------------------------------------------------------------------
Both sides run on the CPU in float32 on the same seeded *random* ViT-B/16 weights (timm
``vit_base_patch16_224``, timm key names), the same images in [0, 1] and the same PET and head values
("trained" values; for finetune a few weights of the tuned copy drift from the pretrained ones, so the
two branches differ).
PILOT's code runs in its own environment (timm 0.6.x) from a checkout; nothing is downloaded: every
``timm.create_model`` call of PILOT (its adapter ViT takes its weights from one, its VPT ViT from
another, the pretrained branch is one) is answered with ``pretrained=False`` and the shared weights.

Setting: 8 classes in two sessions of 4 (PILOT ``init_cls = increment = 4``), 8 images per session (two
per class). For each variant (``adapter``, ``ssf``, ``vpt_shallow``, ``vpt_deep``, ``finetune``):

* session 0, one training step of each side's own session-0 code (PILOT: ``_train`` with ``tuned_epoch
  = 1`` on a one-batch loader, which builds its SGD, runs ``_init_train``, then
  ``construct_dual_branch_network`` and ``replace_fc``; ours: ``begin_session``, ``train_session``,
  ``end_session``). ``SGD.step`` is a recorder on both sides: it keeps the gradients and the trainable
  parameter count and leaves the parameters as loaded, so the compared gradients belong to the shared
  values. The adapter's dropout is set to 0 on both sides (two random masks cannot agree);
* recorded: the tuned feature and the head's logits of the training forward, the loss (the tensor
  ``backward`` is called on), the gradient of every trainable tensor (PET in a neutral layout, head
  weight and sigma; finetune: every ViT weight by timm name), then the two-branch feature, the
  prototypes and the eval logits on the session's images;
* session 1: each side's session start and ``replace_fc`` / ``end_session``, then prototypes of all 8
  classes and eval logits of all 16 images.

Commands::

    .venv/bin/python scripts/fidelity/aper.py make-inputs --out /tmp/aper_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/aper.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/aper_fid --out /tmp/aper_fid/pilot.pt
    .venv/bin/python scripts/fidelity/aper.py ours --inputs /tmp/aper_fid --out /tmp/aper_fid/ours.pt
    .venv/bin/python scripts/fidelity/aper.py compare /tmp/aper_fid/pilot.pt /tmp/aper_fid/ours.pt \\
        --markdown /tmp/aper_fid/table.md
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import common
import torch
from common import Record, cwp

VARIANTS = ("adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune")
JSON = {
    "adapter": "aper_aperpter",
    "ssf": "aper_ssf",
    "vpt_shallow": "aper_vpt_shallow",
    "vpt_deep": "aper_vpt_deep",
    "finetune": "aper_finetune",
}
PER_SESSION, SESSIONS, IMAGES_PER_SESSION = 4, 2, 8
DIM, DEPTH, RANK, TOKENS = 768, 12, 64, 5
SSF_SITES = ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")
SSF_WIDTH = {"norm1": DIM, "qkv": 3 * DIM, "proj": DIM, "norm2": DIM, "fc1": 4 * DIM, "fc2": DIM}


# --------------------------------------------------------------------------------------- make-inputs
def make_inputs(out: Path, seed: int) -> None:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = [torch.arange(s * PER_SESSION, (s + 1) * PER_SESSION).repeat_interleave(2) for s in range(SESSIONS)]

    def uniform(bound: float, *shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) * bound

    ssf = {"patch_embed": DIM, "norm": DIM} | {f"blocks.{i}.{s}": SSF_WIDTH[s] for i in range(DEPTH) for s in SSF_SITES}
    pet = {  # "trained" values: a fresh adapter (up = 0) or zero prompts would make the tuned branch trivial
        "adapter": {
            f"blocks.{i}.{name}": t
            for i in range(DEPTH)
            for name, t in (
                ("down.weight", uniform(DIM**-0.5, RANK, DIM)),
                ("down.bias", uniform(0.05, RANK)),
                ("up.weight", uniform(RANK**-0.5, DIM, RANK)),
                ("up.bias", uniform(0.05, DIM)),
            )
        },
        "ssf": {
            f"{site}.{kind}": (1.0 if kind == "scale" else 0.0) + 0.1 * torch.randn(width, generator=gen)
            for site, width in ssf.items()
            for kind in ("scale", "shift")
        },
        "vpt_shallow": {"prompts": 0.5 * torch.randn(1, TOKENS, DIM, generator=gen)},
        "vpt_deep": {"prompts": 0.5 * torch.randn(DEPTH, TOKENS, DIM, generator=gen)},
        # finetune: the tuned copy drifts from the pretrained weights (the step itself applies nothing)
        "finetune": {
            name: vit.state_dict()[name] + 0.05 * torch.randn(vit.state_dict()[name].shape, generator=gen)
            for name in ["cls_token", "norm.weight", "norm.bias"] + [f"blocks.{i}.mlp.fc2.bias" for i in range(DEPTH)]
        },
    }
    inputs = {
        "meta": common.input_meta(seed),
        "vit": {k: v.clone() for k, v in vit.state_dict().items()},
        "images": [cwp.random_images(IMAGES_PER_SESSION, gen) for _ in range(SESSIONS)],
        "labels": labels,
        "pet": pet,
        "head": {"weight": uniform(DIM**-0.5, PER_SESSION, DIM), "sigma": torch.ones(1)},
    }
    common.save_inputs(inputs, out)


# ------------------------------------------------------------------------------- recording SGD.step
class StepRecorder:
    """Replaces ``SGD.step``: keeps each parameter's gradient and the trainable count; no update."""

    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}
        self.count = 0

    def step(self, optimizer: torch.optim.Optimizer, closure: Any = None) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.count = sum(p.numel() for p in params)
        self.grads = {id(p): cwp.detached(p.grad) for p in params if p.grad is not None}


@contextlib.contextmanager
def recorded_step(recorder: StepRecorder) -> Iterator[None]:
    original = torch.optim.SGD.step
    torch.optim.SGD.step = lambda self, closure=None: recorder.step(self, closure)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.optim.SGD.step = original  # type: ignore[method-assign]


def grads_by_name(tensors: dict[str, torch.Tensor], recorder: StepRecorder) -> dict[str, torch.Tensor]:
    return {name: recorder.grads[id(t)] for name, t in tensors.items()}


def train_record(recorder: StepRecorder, feats: list, logits: list, losses: list, pet: dict, head: dict) -> Record:
    """The session-0 step as both sides record it: trainable count, feature, logits, loss, PET and head grads."""
    grads = {**grads_by_name(pet, recorder), **grads_by_name({f"head.{k}": v for k, v in head.items()}, recorder)}
    step = {"tuned feature": feats[0], "logits": logits[0], "loss": losses[0], "grads": grads}
    return {"trainable": recorder.count, "train s0": step}


def load_values(tensors: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            tensors[name].copy_(value.view_as(tensors[name]))


# --------------------------------------------------------------------------------- LAMDA-PILOT side
def shared_weights(state: dict[str, torch.Tensor]) -> None:
    """Every ``timm.create_model`` builds without downloading and loads the shared ViT weights."""
    import timm

    original = timm.create_model

    def create(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        model = original(name, pretrained=False, **kwargs)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if "ssf_" not in k and not k.startswith("head.")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"shared ViT does not fit {name}: {missing[:5]}, {result.unexpected_keys[:5]}")
        return model

    timm.create_model = create


def pilot_pet(backbone: Any, variant: str) -> dict[str, torch.Tensor]:
    """PILOT's PET tensors in the neutral layout (finetune: every weight by timm name)."""
    if variant == "adapter":
        out = {}
        for i, block in enumerate(backbone.blocks):
            block.adaptmlp.dropout = 0.0  # see the module docstring
            for ours, theirs in (("down", "down_proj"), ("up", "up_proj")):
                for kind in ("weight", "bias"):
                    out[f"blocks.{i}.{ours}.{kind}"] = getattr(getattr(block.adaptmlp, theirs), kind)
        return out
    if variant == "ssf":
        owners = {"norm1": ("", 1), "norm2": ("", 2), "qkv": ("attn", 1), "proj": ("attn", 2)}
        owners |= {"fc1": ("mlp", 1), "fc2": ("mlp", 2)}
        sites: dict[str, tuple[Any, int]] = {"patch_embed": (backbone.patch_embed, 1), "norm": (backbone, 1)}
        for i, block in enumerate(backbone.blocks):
            for site, (child, k) in owners.items():
                sites[f"blocks.{i}.{site}"] = (getattr(block, child) if child else block, k)
        return {
            f"{site}.{kind}": getattr(module, f"ssf_{kind}_{k}")
            for site, (module, k) in sites.items()
            for kind in ("scale", "shift")
        }
    if variant.startswith("vpt"):
        return {"prompts": backbone.Prompt_Tokens}
    return dict(backbone.named_parameters())


def pilot_variant(pilot_src: Path, variant: str, inputs: dict[str, Any]) -> Record:
    args = json.loads((pilot_src / "exps" / f"{JSON[variant]}.json").read_text())
    args.update(device=["cpu"], init_cls=PER_SESSION, increment=PER_SESSION, tuned_epoch=1, batch_size=8)
    learner = importlib.import_module(f"models.{args['model_name']}").Learner(args)
    images, labels = inputs["images"], inputs["labels"]
    first = learner._network
    first.update_fc(PER_SESSION)  # incremental_train, session 0
    pet = pilot_pet(first.backbone, variant)
    load_values(pet, inputs["pet"][variant])
    head = {"weight": first.fc.weight, "sigma": first.fc.sigma}
    load_values(head, inputs["head"])
    learner._cur_task, learner._total_classes = 0, PER_SESSION
    learner.train_dataset = SimpleNamespace(labels=labels[0].numpy())
    recorder, feats, logits, losses = StepRecorder(), [], [], []
    loader = cwp.one_batch(images[0], labels[0])
    with (
        recorded_step(recorder),
        cwp.forward_outputs(first.backbone, feats, cwp.detached),
        cwp.forward_outputs(first.fc, logits, lambda o: cwp.detached(o["logits"])),
        cwp.captured_backward(losses),
    ):
        learner._train(loader, loader, loader)  # optimizer, _init_train, dual branch, replace_fc
    record = train_record(recorder, feats, logits, losses, pet, head)
    record["eval s0"] = pilot_eval(learner._network, images[0], PER_SESSION)
    learner._known_classes, learner._cur_task, learner._total_classes = PER_SESSION, 1, 2 * PER_SESSION
    learner._network.update_fc(2 * PER_SESSION)
    learner.train_dataset = SimpleNamespace(labels=labels[1].numpy())
    learner._train(cwp.one_batch(images[1], labels[1]), None, cwp.one_batch(images[1], labels[1]))  # replace_fc only
    record["eval s1"] = pilot_eval(learner._network, torch.cat(images), 2 * PER_SESSION)
    return record


def pilot_eval(net: Any, images: torch.Tensor, total: int) -> Record:
    net.eval()
    with torch.no_grad():
        out = net(images)
    return {
        "branch feature": cwp.detached(out["features"]),
        "prototypes": cwp.detached(net.fc.weight[:total]),
        "logits": cwp.detached(out["logits"][:, :total]),
    }


def run_pilot(pilot_src: Path, inputs: dict[str, Any], variants: list[str]) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    shared_weights(inputs["vit"])
    return {
        "meta": common.pilot_meta(pilot_src),
        "variants": {v: pilot_variant(pilot_src, v, inputs) for v in variants},
    }


# ----------------------------------------------------------------------------------------- our side
def our_pet(learner: Any, variant: str) -> dict[str, torch.Tensor]:
    """Our PET tensors in the neutral layout (finetune: the tuned copy's weights by timm name)."""
    pet = learner.pet
    if variant == "adapter":
        return {
            f"blocks.{i}.{part}.{kind}": getattr(getattr(pet[i], part), kind)
            for i in range(len(pet))
            for part in ("down", "up")
            for kind in ("weight", "bias")
        }
    if variant == "ssf":
        sites = {"patch_embed": pet.patch_embed, "norm": pet.norm}
        sites |= {f"blocks.{i}.{s}": getattr(pet.block(i), s) for i in range(len(pet)) for s in SSF_SITES}
        return {f"{site}.{kind}": getattr(m, kind) for site, m in sites.items() for kind in ("scale", "shift")}
    if variant.startswith("vpt"):
        return {"prompts": pet.prompts}
    return dict(learner.tuned_backbone.model.named_parameters())


class FakeSession:
    """The two streams our hooks read, each one batch of the given images."""

    def __init__(self, info: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.info, self.images, self.labels = info, images, labels

    def train_batches(self, batch_size: int, **_: Any) -> list[Any]:
        return [cwp.our_batch(self.images, self.labels, "train")]

    def prototype_batches(self, batch_size: int) -> list[Any]:
        return [cwp.our_batch(self.images, self.labels, "train")]


def our_variant(variant: str, inputs: dict[str, Any], backbone_state: dict[str, torch.Tensor]) -> Record:
    from torch.optim import SGD
    from torch.optim.lr_scheduler import CosineAnnealingLR

    from pilot.data.scenario import make_scenario
    from pilot.learners import aper
    from pilot.runtime import Runtime

    cls = {
        "adapter": aper.AperAdapter,
        "ssf": aper.AperSSF,
        "vpt_shallow": aper.AperVPTShallow,
        "vpt_deep": aper.AperVPTDeep,
        "finetune": aper.AperFinetune,
    }[variant]
    weight_decay = 0.05 if variant == "finetune" else 5e-4
    scenario = make_scenario(SESSIONS * PER_SESSION, PER_SESSION, PER_SESSION, class_order="natural")
    cpu = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    learner = cls.create(
        cwp.our_backbone(backbone_state),
        scenario,
        cpu,
        optimizer=partial(SGD, lr=0.01, momentum=0.9, weight_decay=weight_decay),
        scheduler=partial(CosineAnnealingLR, T_max=1, eta_min=0.0),
        epochs=1,
        batch_size=8,
        **({"adapter_dropout": 0.0} if variant == "adapter" else {}),
    )
    images, labels = inputs["images"], inputs["labels"]
    info0 = scenario.sessions[0]
    learner.begin_session(info0)
    pet = our_pet(learner, variant)
    load_values(pet, inputs["pet"][variant])
    head = {"weight": learner.first_head.weight, "sigma": learner.first_head.sigma}
    load_values(head, inputs["head"])
    recorder, feats, logits, losses = StepRecorder(), [], [], []
    session0 = FakeSession(info0, images[0], labels[0])
    learner.train()
    with (
        recorded_step(recorder),
        cwp.spy(learner, "tuned_features", feats),
        cwp.forward_outputs(learner.first_head, logits, cwp.detached),
        cwp.captured_backward(losses),
    ):
        learner.train_session(session0)
    learner.end_session(session0)
    record = train_record(recorder, feats, logits, losses, pet, head)
    record["eval s0"] = our_eval(learner, images[0], labels[0])
    learner.train()
    session1 = FakeSession(scenario.sessions[1], images[1], labels[1])
    learner.begin_session(session1.info)
    learner.train_session(session1)
    learner.end_session(session1)
    record["eval s1"] = our_eval(learner, torch.cat(images), torch.cat(labels))
    return record


def our_eval(learner: Any, images: torch.Tensor, labels: torch.Tensor) -> Record:
    learner.eval()
    with torch.no_grad():
        feats = learner.branch_features(images)
    return {
        "branch feature": cwp.detached(feats),
        "prototypes": cwp.detached(learner.head.weight),
        "logits": cwp.detached(learner.predict(cwp.our_batch(images, labels, "test"))),
    }


def run_ours(inputs: dict[str, Any], variants: list[str]) -> Record:
    return {
        "meta": common.our_meta(),
        "variants": {v: our_variant(v, inputs, inputs["vit"]) for v in variants},
    }


# ------------------------------------------------------------------------------------------ compare
def grad_cells(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Worst relative L2 difference over the PET tensors, then head weight, then sigma."""
    pet = [cwp.tensor_diff(g, ref[k])["rel"] for k, g in ours.items() if not k.startswith("head.")]
    cells = [cwp.fmt(max(pet)) if pet else "-"]
    return cells + [cwp.fmt(cwp.tensor_diff(ours[k], ref[k])["rel"]) for k in ("head.weight", "head.sigma")]


def report(ours: Record, ref: Record) -> str:
    train, evals, counts = [], [], []
    for variant, mine in ours["variants"].items():
        theirs = ref["variants"][variant]
        counts.append([variant, f"{theirs['trainable']:,}", f"{mine['trainable']:,}"])
        a, b = mine["train s0"], theirs["train s0"]
        train.append(
            [variant]
            + [cwp.fmt(cwp.tensor_diff(a[k], b[k])["max_abs"]) for k in ("tuned feature", "logits", "loss")]
            + grad_cells(a["grads"], b["grads"])
            + [f"{len(a['grads']) - 2} + 2"]
        )
        for case in ("eval s0", "eval s1"):
            a, b = mine[case], theirs[case]
            proto = cwp.tensor_diff(a["prototypes"], b["prototypes"])
            evals.append(
                [variant, case]
                + [cwp.fmt(cwp.tensor_diff(a["branch feature"], b["branch feature"])["max_abs"])]
                + [cwp.fmt(proto["max_abs"]), cwp.fmt(proto["rel"])]
                + [cwp.fmt(cwp.tensor_diff(a["logits"], b["logits"])["max_abs"])]
                + [cwp.same_count(a["logits"].argmax(1), b["logits"].argmax(1))]
                + [cwp.fmt(float((a["branch feature"][:, DIM:] - a["branch feature"][:, :DIM]).abs().max()))]
            )
    head = f"{common.headline(ours, ref, 40)}; CPU, float32."
    return "\n".join(
        [
            head,
            "",
            "Session-0 training step: max abs differences; gradients: relative L2 ||ours - PILOT|| / ||PILOT||.",
            "",
            cwp.table(
                [
                    "variant",
                    "tuned feature",
                    "head logits",
                    "loss",
                    "PET grads (worst rel)",
                    "head W grad",
                    "sigma grad",
                    "tensors",
                ],
                train,
            ),
            "",
            "Two-branch network: [pretrained ; tuned] feature, prototypes (cosine classifier rows), eval logits.",
            "",
            cwp.table(
                [
                    "variant",
                    "case",
                    "branch feature",
                    "prototypes max abs",
                    "prototypes rel",
                    "logits",
                    "predictions",
                    "max abs f_tuned - f_pre (ours)",
                ],
                evals,
            ),
            "",
            "Trainable parameters in session 0 (PET + head over 4 classes + sigma):",
            "",
            cwp.table(["variant", "LAMDA-PILOT", "ours"], counts),
        ]
    )


# ---------------------------------------------------------------------------------------------- CLI
def variant_option(parser: Any, side: str) -> None:
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report, add_side_arguments=variant_option)

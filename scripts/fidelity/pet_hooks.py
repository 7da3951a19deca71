"""Side-by-side check of our SSF and VPT hooks against LAMDA-PILOT's SSF ViT and VPT ViT.

Protocol (as scripts/compare_with_pilot.py, whose helpers this script imports)
-----------------------------------------------------------------------------
Both sides run on the CPU in float32, on the same seeded *random* ViT-B/16 weights (timm
``vit_base_patch16_224``, random init, timm key names), the same batch of images in [0, 1] and the
same SSF / VPT parameter values. LAMDA-PILOT's networks come from its own files, imported from a
checkout given on the command line, in its own environment (timm 0.6.x), built without hub weights
and loaded with the shared weights:

* SSF: ``timm.create_model("vit_base_patch16_224_ssf", num_classes=0)`` after importing
  ``backbone/vit_ssf.py`` (what ``utils/inc_net.get_backbone`` builds for ``*_ssf`` backbones), with
  APER-SSF's freezing rule (``models/aper_ssf.py``: everything but ``ssf_scale*``/``ssf_shift_*``);
* VPT: ``backbone/vpt.VPT_ViT`` with ``Prompt_Token_num`` P, ``VPT_type`` Deep or Shallow, head
  replaced by Identity and ``Freeze()``d, as ``build_promptmodel`` does.

Ours: :func:`pilot.backbones.ssf.ssf_active` / :func:`pilot.backbones.vpt.visual_prompts_active` on
timm 1.0's plain ``vit_base_patch16_224`` (the pooled feature of our ``Backbone``).

Cases: ``plain`` (no PET module: the floor set by the two timm versions), ``ssf`` (random
scale 1 + 0.1 N(0,1), shift 0.1 N(0,1) at every site), ``vpt deep``/``vpt shallow`` with random
prompts (N(0, 0.5^2)) and with PILOT's zero init. Recorded per case: the feature ``[B, 768]``
(CLS after the final norm, and SSF's final scale/shift), the loss ``sum(feature * probe)`` for a
fixed random ``probe`` ``[B, 768]``, the gradient of every SSF / prompt tensor, and the trainable
parameter count.

Neutral layout (``inputs.pt``): ``vit`` timm state dict; ``images``; ``probe``; ``ssf`` keyed by
our :class:`SSFParams` state-dict names (mapped to PILOT's by :func:`pilot_ssf_key`); ``vpt``
``{"deep random": [12, P, 768], "shallow random": [1, P, 768], ...}`` (PILOT's ``Prompt_Tokens``
shape, our ``VisualPrompts.prompts``).

Commands
--------
::

    .venv/bin/python scripts/fidelity/pet_hooks.py make-inputs --out /tmp/pet_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/pet_hooks.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/pet_fid --out /tmp/pet_fid/pilot.pt
    .venv/bin/python scripts/fidelity/pet_hooks.py ours --inputs /tmp/pet_fid --out /tmp/pet_fid/ours.pt
    .venv/bin/python scripts/fidelity/pet_hooks.py compare /tmp/pet_fid/pilot.pt /tmp/pet_fid/ours.pt \\
        --markdown /tmp/pet_fid/table.md

Module level imports only the standard library, torch and scripts/fidelity/common.py (which does the
same, with scripts/compare_with_pilot.py); PILOT's modules are imported in ``pilot``, ours in
``make-inputs``/``ours``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import common
import torch
from common import Record, cwp

DIM, DEPTH = 768, 12
VPT_CASES = {"deep random": (True, "random"), "shallow random": (False, "random")}
VPT_CASES |= {"deep zeros": (True, "zeros"), "shallow zeros": (False, "zeros")}


def pilot_ssf_key(our_key: str) -> str:
    """Our ``SSFParams`` state-dict name -> PILOT's ``vit_ssf`` parameter name.

    ``patch_embed.scale`` -> ``patch_embed.ssf_scale_1``; ``norm.scale`` (final norm) -> ``ssf_scale_1``;
    in block i: ``norm1``/``norm2`` -> ``blocks.i.ssf_*_1``/``_2``, ``qkv``/``proj`` ->
    ``blocks.i.attn.ssf_*_1``/``_2``, ``fc1``/``fc2`` -> ``blocks.i.mlp.ssf_*_1``/``_2``.
    """
    site, kind = our_key.rsplit(".", 1)
    if site == "patch_embed":
        return f"patch_embed.ssf_{kind}_1"
    if site == "patch_embed_norm":
        return f"patch_embed.ssf_{kind}_2"
    if site == "norm":
        return f"ssf_{kind}_1"
    match = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|qkv|proj|fc1|fc2)", site)
    if match is None:
        raise KeyError(f"no PILOT name for SSF parameter {our_key}")
    block, name = match.groups()
    owner, index = {
        "norm1": ("", 1),
        "norm2": ("", 2),
        "qkv": ("attn.", 1),
        "proj": ("attn.", 2),
        "fc1": ("mlp.", 1),
        "fc2": ("mlp.", 2),
    }[name]
    return f"blocks.{block}.{owner}ssf_{kind}_{index}"


def site_group(our_key: str) -> str:
    """``blocks.3.qkv.scale`` -> ``blocks.*.qkv.scale`` (gradient rows per kind of site)."""
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", our_key)


# --------------------------------------------------------------------------------------- make-inputs
def make_inputs(out: Path, seed: int, batch: int, tokens: int) -> None:
    import timm

    from pilot.backbones.ssf import SSFParams

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    gen = torch.Generator().manual_seed(seed + 1)
    ssf = {}
    for name, p in SSFParams.for_vit(vit).state_dict().items():
        noise = 0.1 * torch.randn(p.shape, generator=gen)
        ssf[name] = (1.0 + noise) if name.endswith("scale") else noise
    vpt = {}
    for case, (deep, init) in VPT_CASES.items():
        shape = (DEPTH if deep else 1, tokens, DIM)
        vpt[case] = 0.5 * torch.randn(shape, generator=gen) if init == "random" else torch.zeros(shape)
    inputs = {
        "meta": common.input_meta(seed, batch=batch, tokens=tokens),
        "vit": {k: v.clone() for k, v in vit.state_dict().items()},
        "images": cwp.random_images(batch, gen),
        "probe": torch.randn(batch, DIM, generator=gen),
        "ssf": ssf,
        "vpt": vpt,
    }
    common.save_inputs(inputs, out, f": {batch} images, {len(ssf)} SSF tensors, P = {tokens}")


def record(features: torch.Tensor, probe: torch.Tensor, params: dict[str, torch.Tensor], count: int) -> Record:
    """Loss sum(features * probe), its backward, and the gradients of ``params`` (neutral names)."""
    loss = (features * probe).sum()
    loss.backward()
    grads = {}
    for name, p in params.items():
        if p.grad is None:
            raise RuntimeError(f"no gradient reached {name}")
        grads[name] = p.grad.detach().clone()
    return {"features": features.detach().clone(), "loss": loss.detach().clone(), "grads": grads, "trainable": count}


# --------------------------------------------------------------------------------- LAMDA-PILOT side
def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], missing_ok: set[str]) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - missing_ok
    if missing or result.unexpected_keys:
        raise RuntimeError(f"shared weights do not fit: missing {sorted(missing)}, unexpected {result.unexpected_keys}")


def pilot_ssf(inputs: dict[str, Any]) -> Record:
    import timm
    from backbone import vit_ssf  # noqa: F401  (registers vit_base_patch16_224_ssf)

    net = timm.create_model("vit_base_patch16_224_ssf", pretrained=False, num_classes=0).eval()
    names = {our: pilot_ssf_key(our) for our in inputs["ssf"]}
    theirs = {n for n, _ in net.named_parameters() if "ssf_" in n}
    if set(names.values()) != theirs:
        raise RuntimeError(
            f"SSF names differ: only PILOT {sorted(theirs - set(names.values()))}, only ours "
            f"{sorted(set(names.values()) - theirs)}"
        )
    state = {**inputs["vit"], **{names[k]: v for k, v in inputs["ssf"].items()}}
    net.load_state_dict(state, strict=True)
    for name, param in net.named_parameters():  # models/aper_ssf.py's freezing rule
        if "head." not in name and "ssf_scale" not in name and "ssf_shift_" not in name:
            param.requires_grad = False
    count = sum(p.numel() for p in net.parameters() if p.requires_grad)
    params = dict(net.named_parameters())
    return record(net(inputs["images"]), inputs["probe"], {k: params[v] for k, v in names.items()}, count)


def pilot_vpt(inputs: dict[str, Any], prompts: torch.Tensor, deep: bool) -> Record:
    from backbone.vpt import VPT_ViT

    net = VPT_ViT(Prompt_Token_num=prompts.shape[1], VPT_type="Deep" if deep else "Shallow")
    net.head = torch.nn.Identity()  # build_promptmodel
    strict_load(net, inputs["vit"], {"Prompt_Tokens"})
    net.Freeze()
    net.eval()  # get_backbone returns model.eval()
    with torch.no_grad():
        net.Prompt_Tokens.copy_(prompts)
    count = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return record(net(inputs["images"]), inputs["probe"], {"prompts": net.Prompt_Tokens}, count)


def pilot_plain(inputs: dict[str, Any]) -> Record:
    import timm

    net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    net.load_state_dict(inputs["vit"], strict=True)
    with torch.no_grad():
        return {"features": net(inputs["images"])}


def run_pilot(pilot_src: Path, inputs: dict[str, Any]) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    out: Record = {"plain": pilot_plain(inputs), "ssf": pilot_ssf(inputs)}
    for case, (deep, _init) in VPT_CASES.items():
        out[f"vpt {case}"] = pilot_vpt(inputs, inputs["vpt"][case], deep)
    out["meta"] = common.pilot_meta(pilot_src)
    return out


# ----------------------------------------------------------------------------------------- our side
def run_ours(inputs: dict[str, Any]) -> Record:
    from pilot.backbones.ssf import SSFParams, ssf_active
    from pilot.backbones.vpt import VisualPrompts, visual_prompts_active

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compare_with_pilot import our_backbone

    backbone = our_backbone(inputs["vit"]).freeze()
    vit, images, probe = backbone.vit, inputs["images"], inputs["probe"]
    with torch.no_grad():
        out: Record = {"plain": {"features": backbone(images)}}
    ssf = SSFParams.for_vit(vit)
    ssf.load_state_dict(inputs["ssf"], strict=True)
    with ssf_active(vit, ssf):
        features = backbone(images)
    out["ssf"] = record(features, probe, dict(ssf.named_parameters()), sum(p.numel() for p in ssf.parameters()))
    for case, (deep, _init) in VPT_CASES.items():
        prompts = VisualPrompts.for_vit(vit, inputs["meta"]["tokens"], deep)
        with torch.no_grad():
            prompts.prompts.copy_(inputs["vpt"][case])
        with visual_prompts_active(vit, prompts):
            features = backbone(images)
        out[f"vpt {case}"] = record(features, probe, {"prompts": prompts.prompts}, prompts.prompts.numel())
    out["meta"] = common.our_meta()
    return out


# ------------------------------------------------------------------------------------------ compare
def rows(ours: Record, ref: Record) -> tuple[list[list[str]], list[list[str]]]:
    summary, grads = [], []
    for case in [k for k in ref if k != "meta"]:
        a, b = ours[case], ref[case]
        d = cwp.tensor_diff(a["features"], b["features"])
        moved = cwp.tensor_diff(b["features"], ref["plain"]["features"]) if case != "plain" else None
        row = [case, d["shape"], cwp.fmt(d["max_abs"]), cwp.fmt(d["ref_max"]), cwp.fmt(d["rel"])]
        row.append(cwp.fmt(moved["max_abs"]) if moved else "–")
        if "loss" in b:
            loss = cwp.tensor_diff(a["loss"], b["loss"])
            diffs = [cwp.tensor_diff(a["grads"][k], b["grads"][k]) for k in b["grads"]]
            worst_abs, worst_rel = max(x["max_abs"] for x in diffs), max(x["rel"] for x in diffs)
            row += [cwp.fmt(loss["max_abs"]), cwp.fmt(float(b["loss"])), cwp.fmt(worst_abs), cwp.fmt(worst_rel)]
            row.append(f"{a['trainable']:,} / {b['trainable']:,}")
        else:
            row += ["–"] * 5
        summary.append(row)
        if case == "ssf":  # per kind of site: the worst of the 12 blocks
            groups: dict[str, list[dict[str, Any]]] = {}
            for key in b["grads"]:
                groups.setdefault(site_group(key), []).append(cwp.tensor_diff(a["grads"][key], b["grads"][key]))
            for group, diffs in groups.items():
                grads.append(
                    [
                        group,
                        pilot_ssf_key(group.replace("*", "0")).replace(".0.", ".*."),
                        cwp.fmt(max(x["max_abs"] for x in diffs)),
                        cwp.fmt(max(x["ref_max"] for x in diffs)),
                        cwp.fmt(max(x["rel"] for x in diffs)),
                    ]
                )
    return summary, grads


def report(ours: Record, ref: Record) -> str:
    summary, grads = rows(ours, ref)
    head = f"{common.headline(ours, ref, 12)}; CPU, float32, random ViT-B/16 weights."
    header = [
        "case",
        "feature",
        "max abs diff",
        "max abs",
        "rel L2",
        "moved from plain",
        "loss diff",
        "loss",
        "grad max abs diff (all tensors)",
        "grad rel L2 (worst tensor)",
        "trainable (ours / PILOT)",
    ]
    parts = [head, "", cwp.table(header, summary), "", "SSF gradients per site (worst block):", ""]
    parts.append(cwp.table(["our site", "PILOT name", "max abs diff", "max abs", "rel L2"], grads))
    return "\n".join(parts)


def make_options(parser: Any) -> None:
    parser.add_argument("--tokens", type=int, default=5, help="prompt tokens (exps/aper_vpt*.json: 5)")


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report, batch=4, add_make_arguments=make_options)

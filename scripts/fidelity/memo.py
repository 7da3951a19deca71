"""Side-by-side check of our MEMO learner against LAMDA-PILOT's ``models/memo.py`` / ``AdaptiveNet`` /
``backbone/vit_memo.py`` (protocol and helpers of ``scripts/fidelity/der.py``: CPU float32, random ViT-B/16
weights loaded on PILOT's side through timm 0.6's npz loader, ``exps/memo.json`` on CIFAR B0Inc10, one
epoch of one batch per session, ``SGD.step`` recording the gradients instead of stepping).

* **how PILOT builds the split ViT** (``timm.create_model("vit_base_patch16_224_memo", pretrained=True)``):
  the generalised part (11 blocks) against the shared weights, and the specialised part's
  ``last_block`` against the shared block 11 (not loaded: PyTorch's default init) and its ``norm``.
* **session 0**: both sides load the same specialised block s_0 (a default-init block, as PILOT's) and
  head ``fc0``; PILOT ``_train`` -> ``_init_train``, ours ``MEMO.train_session``: loss, logits, features,
  gradients of the generalised blocks g, of s_0 and of the head, SGD settings, trainable count.
* **session 1**: given "trained" g and s_0 on both sides (PILOT ``after_task`` freezes g first), then each
  side grows (PILOT ``update_fc(20)`` + ``incremental_train``'s loop with ``train_adaptive`` false; ours
  ``begin_session``): s_1 against the trained s_0; then the same ``fc1``/``aux1`` and the step (PILOT
  ``_update_representation`` with ``set_network``): loss, CE terms, logits, auxiliary logits, features,
  gradients (g and s_0 get none on both sides), SGD settings, trainable count.
* **evaluation after session 1**: logits and ``extract_vector`` / ``exemplar_features``.

Commands::

    .venv/bin/python scripts/fidelity/memo.py make-inputs --out /tmp/memo_fid
    /work/pilot_ref_env/bin/python scripts/fidelity/memo.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/memo_fid --out /tmp/memo_fid/pilot.pt
    .venv/bin/python scripts/fidelity/memo.py ours --inputs /tmp/memo_fid --out /tmp/memo_fid/ours.pt
    .venv/bin/python scripts/fidelity/memo.py compare /tmp/memo_fid/pilot.pt /tmp/memo_fid/ours.pt
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import common
import der as fid  # the shared DER/MEMO helpers
import torch
from common import DIM, KNOWN, TOTAL, Record, cwp

PILOT_RULES = [
    (r"^TaskAgnosticExtractor\.", "g."),
    (r"^AdaptiveExtractors\.(\d+)\.last_block\.", r"s\1.block."),
    (r"^AdaptiveExtractors\.(\d+)\.norm\.", r"s\1.norm."),
    (r"^AdaptiveExtractors\.(\d+)\.", r"s\1.unused."),  # PILOT's Specialized_Vit also holds a whole ViT
    (r"^aux_fc\.", "aux."),
]
OUR_RULES = [
    (r"^backbone\.model\.", "g."),
    (r"^grown\.(\d+)\.0\.", r"s\1.block."),
    (r"^grown\.(\d+)\.1\.", r"s\1.norm."),
    (r"^classifier\.", ""),
]
GROUPS = ["g", "s0.block", "s0.norm", "s1.block", "s1.norm", "s0.unused", "s1.unused", "fc", "aux"]
LAST = 11  # ViT-B/16: blocks 0-10 shared, block 11 specialised


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def make_inputs(out: Path, seed: int, batch: int) -> None:
    import timm

    from pilot.learners.memo import reset_to_default_init

    inputs = fid.base_inputs(seed, batch)
    gen = inputs.pop("gen")
    inputs.update(fid.head_inputs(gen, 2 * DIM))
    torch.manual_seed(seed + 2)
    block = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).blocks[LAST]
    block = reset_to_default_init(copy.deepcopy(block)).state_dict()
    norm = prefixed(inputs["vit"], "norm.")
    inputs.update(
        s0_block=block,
        s0_norm=norm,
        s0_block_trained={k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in block.items()},
        s0_norm_trained={k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in norm.items()},
    )
    common.save_inputs(inputs, out)


def specialised_state(block: dict, norm: dict) -> dict[str, torch.Tensor]:
    return {**{f"0.{k}": v for k, v in block.items()}, **{f"1.{k}": v for k, v in norm.items()}}


def run_pilot(pilot_src: Path, inputs: Record) -> Record:
    sys.path.insert(0, str(pilot_src.resolve()))
    from models.memo import Learner

    with fid.npz_downloads(inputs["vit"]):
        learner = Learner(fid.pilot_args(pilot_src, "memo"))
        net = learner._network
        learner._cur_task, learner._total_classes = 0, KNOWN
        net.update_fc(KNOWN)
    s0 = net.AdaptiveExtractors[0]
    last = s0.last_block
    block11 = prefixed(inputs["vit"], f"blocks.{LAST}.")
    structure = {
        "g blocks": len(net.TaskAgnosticExtractor.blocks),
        "g - shared weights": fid.max_diff(
            net.TaskAgnosticExtractor.state_dict(),
            {k: v for k, v in inputs["vit"].items() if not k.startswith(f"blocks.{LAST}.")},
        ),
        "s0 last_block - shared block 11 (max abs)": fid.max_diff(last.state_dict(), block11),
        "s0 last_block LayerNorms at (1, 0)": bool(
            (last.norm1.weight == 1).all() and (last.norm1.bias == 0).all() and (last.norm2.weight == 1).all()
        ),
        "s0 last_block qkv max |W| * sqrt(768)": float(last.attn.qkv.weight.detach().abs().max()) * math.sqrt(DIM),
        "s0 norm - shared norm": fid.max_diff(s0.norm.state_dict(), prefixed(inputs["vit"], "norm.")),
        "s0 unused blocks.11 - shared block 11": fid.max_diff(s0.blocks[LAST].state_dict(), block11),
        "s0 parameters (PILOT)": sum(p.numel() for p in s0.parameters()),
    }
    last.load_state_dict(inputs["s0_block"])
    s0.norm.load_state_dict(inputs["s0_norm"])
    fid.load_head(net.fc, inputs["fc0_w"], inputs["fc0_b"])
    step0 = fid.pilot_step(learner, net, inputs, inputs["labels0"], PILOT_RULES)

    learner.after_task()  # train_base false: the generalised blocks are frozen
    g_trained = {k: v for k, v in inputs["vit_trained"].items() if not k.startswith(f"blocks.{LAST}.")}
    net.TaskAgnosticExtractor.load_state_dict(g_trained)
    last.load_state_dict(inputs["s0_block_trained"])
    s0.norm.load_state_dict(inputs["s0_norm_trained"])
    learner._cur_task, learner._total_classes = 1, TOTAL
    with fid.npz_downloads(inputs["vit"]):
        net.update_fc(TOTAL)
    s1 = net.AdaptiveExtractors[1]
    structure["s1 - trained s0"] = max(
        fid.max_diff(s1.last_block.state_dict(), inputs["s0_block_trained"]),
        fid.max_diff(s1.norm.state_dict(), inputs["s0_norm_trained"]),
    )
    for i in range(learner._cur_task):  # incremental_train's loop (train_adaptive false)
        for p in net.AdaptiveExtractors[i].parameters():
            p.requires_grad = bool(learner.args["train_adaptive"])
    fid.load_head(net.fc, inputs["fc1_w"], inputs["fc1_b"])
    fid.load_head(net.aux_fc, inputs["aux1_w"], inputs["aux1_b"])
    step1 = fid.pilot_step(learner, net, inputs, inputs["labels1"], PILOT_RULES)
    net.eval()
    with torch.no_grad():
        evaluation = {
            "logits": cwp.detached(net(inputs["images"])["logits"]),
            "features": cwp.detached(net.extract_vector(inputs["images"])),
        }
    meta = common.pilot_meta(pilot_src)
    meta["npz_load_max_diff"] = structure["g - shared weights"]
    return {"meta": meta, "s0": step0, "s1": step1, "structure": structure, "eval": evaluation}


def run_ours(inputs: Record, specialized_init: str = "random") -> Record:
    learner = fid.our_setup("memo", inputs["vit"], specialized_init=specialized_init)
    sessions = learner.scenario.sessions
    learner.train()
    learner.begin_session(sessions[0])
    structure = {"s0 parameters (ours)": sum(p.numel() for p in learner.grown[0].parameters())}
    learner.grown[0].load_state_dict(specialised_state(inputs["s0_block"], inputs["s0_norm"]))
    fid.load_head(learner.classifier.fc, inputs["fc0_w"], inputs["fc0_b"])
    step0 = fid.our_step(learner, inputs, inputs["labels0"], 0, OUR_RULES)

    learner.backbone.model.load_state_dict(inputs["vit_trained"])
    learner.grown[0].load_state_dict(specialised_state(inputs["s0_block_trained"], inputs["s0_norm_trained"]))
    learner.begin_session(sessions[1])
    structure["s1 - trained s0"] = fid.max_diff(
        learner.grown[1].state_dict(), specialised_state(inputs["s0_block_trained"], inputs["s0_norm_trained"])
    )
    fid.load_head(learner.classifier.fc, inputs["fc1_w"], inputs["fc1_b"])
    fid.load_head(learner.classifier.aux, inputs["aux1_w"], inputs["aux1_b"])
    step1 = fid.our_step(learner, inputs, inputs["labels1"], 1, OUR_RULES)
    learner.eval()
    batch = cwp.our_batch(inputs["images"], inputs["labels1"], "test")
    with torch.no_grad():
        evaluation = {
            "logits": cwp.detached(learner.predict(batch)),
            "features": cwp.detached(learner.exemplar_features(batch.images)),
        }
    meta = common.our_meta()
    return {"meta": meta, "s0": step0, "s1": step1, "structure": structure, "eval": evaluation}


def report(ours: Record, ref: Record) -> str:
    return fid.report(ours, ref, GROUPS, "MEMO")


if __name__ == "__main__":
    common.main(__doc__, make_inputs, run_pilot, run_ours, report, batch=6)

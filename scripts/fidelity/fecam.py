"""Side-by-side check of our FeCAM learner (pilot/learners/fecam.py) against LAMDA-PILOT's ``models/fecam.py``.

Protocol: as scripts/fidelity/ranpac.py, whose inputs, helpers and CLI this script shares (CPU,
float32 on PILOT's side; ours: statistics and pseudo-inverses in float64, stored and applied in
float32). PILOT's learner is ``models.fecam.Learner`` from ``exps/fecam.json``; its statistics run
through its own ``replace_fc`` (class means into ``fc.weight``, ``torch.cov``, ``shrink_cov`` with
alpha = 100, ``torch.corrcoef``), its scores through its own ``_maha_dist`` (``pinv``, normalised
feature minus normalised mean). Ours: ``begin_session``, ``end_session``, ``predict`` with
``covariance=pilot``. Cases ``images`` (8 images per session through the adapted ViT on both sides,
2 per class) and ``features`` (synthetic 768-d features, 100 per class: fewer than 768, so every class
covariance is singular, as with CIFAR's 500 images per class).

Recorded per session: the class centres (PILOT: its prototype normalised, as ``_mahalanobis`` uses
it), the pseudo-inverses ``pinv(S_c)`` of all seen classes (PILOT: ``torch.linalg.pinv`` of its
``cov_mats``, as ``_mahalanobis`` computes them), the distances of every test sample to every seen
class (PILOT ``_maha_dist``; ours ``-predict``) and the predictions (argmin). ``covariance=paper`` has
no PILOT counterpart; tests/test_fecam.py checks it against the official formulas in numpy.

Commands::

    .venv/bin/python scripts/fidelity/ranpac.py make-inputs --out /tmp/ranpac_fid   # shared inputs
    /work/pilot_ref_env/bin/python scripts/fidelity/fecam.py pilot --pilot-src /work/pilot_ref_src \\
        --inputs /tmp/ranpac_fid --out /tmp/ranpac_fid/fecam_pilot.pt
    .venv/bin/python scripts/fidelity/fecam.py ours --inputs /tmp/ranpac_fid --out /tmp/ranpac_fid/fecam_ours.pt
    .venv/bin/python scripts/fidelity/fecam.py compare /tmp/ranpac_fid/fecam_pilot.pt \\
        /tmp/ranpac_fid/fecam_ours.pt --markdown /tmp/ranpac_fid/fecam_table.md
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import common
import torch
import torch.nn.functional as F
from common import Record, cwp
from ranpac import CASES, diff_cells, main, our_learner, our_sessions, pilot_learner, run_ours, run_pilot


def pilot_case(pilot_src: Path, inputs: dict[str, Any], case: str) -> Record:
    per, sessions = CASES[case]
    data = inputs[case]
    learner = pilot_learner(pilot_src, "fecam", inputs, per * sessions, identity=case == "features")
    net, record = learner._network, {}
    x_test, y_test = data["test"]
    with torch.no_grad():
        test_vectors = net.backbone.eval()(x_test).numpy()  # what _extract_vectors gives on a test loader
    for s in range(sessions):
        x, y = data["train"][s]
        learner._cur_task, learner._known_classes, learner._total_classes = s, s * per, (s + 1) * per
        net.update_fc((s + 1) * per)
        learner.train_dataset = SimpleNamespace(labels=y.numpy())
        learner.replace_fc(cwp.one_batch(x, y), net, None)
        seen = (y_test < (s + 1) * per).numpy()
        dists = learner._maha_dist(test_vectors[seen], net.fc.weight.data, learner.cov_mats)  # [C, N]
        record[f"s{s}"] = {
            "centres": F.normalize(net.fc.weight.data[: (s + 1) * per].detach().clone(), dim=-1),
            "precisions": torch.stack([torch.linalg.pinv(c).float() for c in learner.cov_mats]),
            "distances": torch.from_numpy(dists.T.copy()).float(),
        }
    return record


def our_case(inputs: dict[str, Any], case: str) -> Record:
    from pilot.learners.fecam import FeCAM

    per, sessions = CASES[case]
    data = inputs[case]
    learner = our_learner(FeCAM, inputs, per, sessions, case == "features", covariance="pilot")
    record = {}
    for info, x, y, seen in our_sessions(learner, inputs, data):
        record[f"s{info.index}"] = {
            "centres": learner.classes.centres.detach().clone(),
            "precisions": learner.classes.precisions.detach().clone(),
            "distances": -learner.predict(cwp.our_batch(x[seen], y[seen], "test")).detach(),
        }
    return record


def report(ours: Record, ref: Record) -> str:
    rows = []
    for case, mine in ours["cases"].items():
        for session, a in mine.items():
            b = ref["cases"][case][session]
            rows.append(
                [case, session]
                + diff_cells(a["centres"], b["centres"])
                + diff_cells(a["precisions"], b["precisions"])
                + diff_cells(a["distances"], b["distances"])
                + [cwp.same_count(a["distances"].argmin(1), b["distances"].argmin(1))]
            )
    head = f"{common.headline(ours, ref, 40)}; CPU, covariance=pilot "
    head += "(ours: statistics and pinv in float64, stored in float32; PILOT: float32)."
    header = ["case", "session", "centres max abs", "centres rel", "pinv(S) max abs", "pinv(S) rel"]
    header += ["distances max abs", "distances rel", "argmin"]
    return "\n".join(
        [head, "", "Max abs and relative L2 differences ||ours - PILOT|| / ||PILOT||.", "", cwp.table(header, rows)]
    )


if __name__ == "__main__":
    main(lambda src, inputs: run_pilot(src, inputs, pilot_case), lambda inputs: run_ours(inputs, our_case), report)

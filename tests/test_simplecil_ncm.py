"""SimpleCIL against a nearest-class-mean classifier computed here, independently of its code:
prototype = mean backbone feature of a class's training images (test transform), prediction =
argmax over seen classes of cos(f(x), prototype) (docs/methods.md §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_ease_slca import fit, tiny_setup, tiny_vit

from pilot.api import make_learner
from pilot.data.pipeline import TEST, TRAIN


def test_simplecil_predicts_the_cosine_nearest_class_mean():
    runtime, scenario, pipeline = tiny_setup(num_classes=6, init_cls=2, increment=2)
    learner = make_learner("simplecil", tiny_vit(), scenario, runtime)
    for info in scenario.sessions:
        fit(learner, pipeline, info)

    backbone = learner.backbone.eval()
    with torch.inference_mode():
        train = list(pipeline.batches(TRAIN, range(6), 64))  # unaugmented: the test transform
        feats = torch.cat([backbone(b.images) for b in train])
        labels = torch.cat([b.labels for b in train])
        means = torch.stack([feats[labels == c].mean(0) for c in range(6)])
        test = list(pipeline.batches(TEST, range(6), 64))
        expected = torch.cat([F.normalize(backbone(b.images), dim=1) @ F.normalize(means, dim=1).T for b in test])
        logits = torch.cat([learner.predict(b) for b in test])

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert logits.shape == (sum(len(b) for b in test), 6)

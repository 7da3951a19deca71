"""Bad input stops the run with a clear message before any expensive work."""

from __future__ import annotations

import pytest
from conftest import compose_config, run_config
from hydra.errors import ConfigCompositionException, MissingConfigException

from pilot.errors import ConfigError, DatasetError, WeightsUnavailableError


def test_unknown_dataset_root(tmp_path, fast):
    overrides = fast + ["+method=simplecil", "dataset=imagenet_r", f"paths.data_dir={tmp_path / 'none'}"]
    with pytest.raises(DatasetError, match=f"{tmp_path / 'none' / 'imagenet-r'} does not exist.*RevisitingCIL"):
        run_config(overrides, tmp_path / "run")
    assert not (tmp_path / "run" / "sessions.csv").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("scenario.init_cls=20", "init_cls=20 exceeds the 10 classes"),
        ("scenario.increment=0", "scenario.increment=0 is not allowed: it must be an integer >= 1"),
    ],
)
def test_split_that_does_not_fit_the_classes(tmp_path, fast, override, message):
    with pytest.raises(ConfigError, match=message):
        run_config(fast + ["+method=simplecil", override], tmp_path / "run")


def test_unknown_method_lists_the_available_ones(tmp_path, fast):
    with pytest.raises(MissingConfigException) as err:
        compose_config(fast + ["+method=simplecl"], tmp_path)
    assert "Could not find 'method/simplecl'" in str(err.value)
    assert "simplecil" in str(err.value.options)


def test_no_method_chosen_lists_the_available_ones(tmp_path, fast):
    with pytest.raises(ConfigError, match=r"No method chosen\. Add \+method=NAME, one of: .*simplecil"):
        run_config(fast, tmp_path / "run")


def test_unavailable_pretrained_weights_stop_before_training(tmp_path, fast, monkeypatch):
    import huggingface_hub

    from pilot.backbones import factory

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(factory, "host_reachable", lambda url, timeout_s=3.0: False)
    overrides = [o for o in fast if not o.startswith("backbone=")] + ["+method=simplecil", "backbone=vit_b16_in1k"]
    with pytest.raises(WeightsUnavailableError, match="not in the local cache.*backbone.checkpoint="):
        run_config(overrides, tmp_path / "run")
    assert not (tmp_path / "run" / "sessions.csv").exists()


def test_results_directory_that_is_not_writable(tmp_path, fast):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not writable.*paths.results_dir"):
        run_config(fast + ["+method=simplecil"], blocker / "run")


def test_misspelt_key_on_the_command_line(tmp_path, fast):
    with pytest.raises(ConfigCompositionException, match="Could not override 'dataset.num_clases'"):
        compose_config(fast + ["+method=simplecil", "dataset.num_clases=4"], tmp_path)


def test_misspelt_key_in_a_config_node_names_the_valid_ones(tmp_path, fast):
    # A typo that reaches the config (e.g. in a user's YAML preset) is caught before anything is built.
    with pytest.raises(
        ConfigError,
        match="method.batchsize is not a parameter of .*SimpleCIL. Its parameters are: batch_size, eval_batch_size",
    ):
        run_config(fast + ["+method=simplecil", "+method.batchsize=8"], tmp_path / "run")


def test_mandatory_value_not_set(tmp_path, fast):
    overrides = [o for o in fast if not o.startswith("dataset=")] + ["+method=simplecil", "dataset=image_folder"]
    with pytest.raises(ConfigError, match="mandatory and not set: dataset.root"):
        run_config(overrides, tmp_path / "run")


def test_cnn_backbone_is_refused_by_a_learner_that_needs_a_vit(tmp_path):
    import timm

    from pilot.backbones.backbone import Backbone
    from pilot.data.scenario import make_scenario
    from pilot.errors import IncompatibleBackboneError
    from pilot.learners.base import Learner
    from pilot.runtime import make_runtime

    class NeedsViT(Learner):
        requires_vit = True

        def predict(self, batch):
            raise AssertionError

    cnn = Backbone(timm.create_model("resnet18", pretrained=False, num_classes=0), "resnet18", 32, None, None, False)
    with pytest.raises(IncompatibleBackboneError, match="NeedsViT works on a timm VisionTransformer.*ResNet"):
        NeedsViT.create(cnn, make_scenario(4, 2, 2), make_runtime(device="cpu"))

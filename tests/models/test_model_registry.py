import re

import pytest
from torch import nn

import models
from models import create_model, list_models, register_model
from models import registry as registry_module
from models.registry import default_input_size
from tests.support import ROOT


@pytest.fixture
def scratch_registry(monkeypatch):
    """Register test builders without leaving them behind."""
    monkeypatch.setattr(registry_module, "_BUILDERS", dict(registry_module._BUILDERS))
    monkeypatch.setattr(registry_module, "_INPUT_SIZES", dict(registry_module._INPUT_SIZES))


def test_duplicate_registration_is_refused(scratch_registry):
    def cbam_resnet50(**kwargs):
        return nn.Identity()

    with pytest.raises(ValueError, match="model 'cbam_resnet50' is already registered"):
        register_model(cbam_resnet50)


def test_registration_records_the_input_size(scratch_registry):
    @register_model(input_size=(48, 64))
    def tiny_test_net(**kwargs):
        return nn.Linear(2, 2)

    @register_model
    def tiny_default_net(**kwargs):
        return nn.Linear(2, 2)

    assert "tiny_test_net" in list_models() and isinstance(create_model("tiny_test_net"), nn.Linear)
    assert default_input_size("tiny_test_net") == (48, 64)
    assert default_input_size("tiny_default_net") == (224, 224)
    with pytest.raises(ValueError, match=r"input_size should be two positive ints \(H, W\), got \(0, 32\)"):
        register_model(input_size=(0, 32))


def test_the_zoo():
    expected = {f"{prefix}resnet{depth}" for prefix in ("", "cbam_") for depth in (18, 34, 50, 101, 152)}
    assert expected | {"cbam_resnet8_cifar", "cbam_resnet20_cifar"} == set(list_models())
    assert list_models() == sorted(list_models())
    assert default_input_size("cbam_resnet50") == (224, 224)
    assert default_input_size("cbam_resnet8_cifar") == (32, 32)


def test_unknown_name_for_input_size():
    with pytest.raises(ValueError, match="unknown model 'nope'; choose one of"):
        default_input_size("nope")


def test_models_are_built_in_train_mode_like_torchvision():
    assert create_model("cbam_resnet8_cifar").training


def test_public_surface_is_what_architecture_md_documents():
    # The names docs/ARCHITECTURE.md shows imported from models, read from the doc itself.
    shown = re.search(r"from models import \(([^)]*)\)", (ROOT / "docs" / "ARCHITECTURE.md").read_text())
    assert shown is not None, "docs/ARCHITECTURE.md shows no `from models import (...)`"
    documented = {name.strip() for name in shown.group(1).split(",")}
    assert set(models.__all__) == documented
    assert len(models.__all__) == len(documented)
    for name in models.__all__:
        assert getattr(models, name) is not None
    public = {n for n in vars(models) if not n.startswith("_")}
    submodules = {"cbam", "resnet", "registry", "checkpoint", "train", "cli"}
    assert public - documented <= submodules, public - documented - submodules

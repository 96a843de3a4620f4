import pytest
import torch
from official_cbam import random_official_state_dict, save_official


@pytest.fixture(scope="session")
def official_resnet18_file(tmp_path_factory) -> tuple[dict[str, torch.Tensor], object]:
    """An authors'-format CBAM-ResNet-18 checkpoint of random weights, and its (unprefixed) state_dict."""
    state_dict = random_official_state_dict("cbam_resnet18")
    return state_dict, save_official(state_dict, tmp_path_factory.mktemp("official") / "cbam18.pth.tar")

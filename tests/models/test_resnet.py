import pytest
import torch

from models import create_model, list_models
from models.registry import default_input_size

# CBAM paper, Table 4 (ImageNet, 1000 classes), counted exactly for the authors' structure.
PAPER_PARAMS = {
    "cbam_resnet18": 11_779_392,
    "cbam_resnet34": 21_960_468,
    "cbam_resnet50": 28_089_624,
    "cbam_resnet101": 49_330_172,
}
# The paper gives plain ResNets to two decimals, in millions.
PAPER_PLAIN_MILLIONS = {"resnet18": 11.69, "resnet34": 21.80, "resnet50": 25.56, "resnet101": 44.55}


def _params_on_meta(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), PAPER_PARAMS.items())
def test_cbam_parameter_counts_match_the_paper(name, expected):
    assert _params_on_meta(name) == expected


@pytest.mark.parametrize(("name", "millions"), PAPER_PLAIN_MILLIONS.items())
def test_plain_parameter_counts_match_the_paper(name, millions):
    assert round(_params_on_meta(name) / 1e6, 2) == millions


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_runs(name):
    # The biggest nets run on the meta device (shapes only): initialising 50M+ weights takes seconds.
    device = "meta" if _params_on_meta(name) > 30_000_000 else "cpu"
    with torch.device(device):
        model = create_model(name, num_classes=10).eval()
        x = torch.randn(2, 3, 32, 32)  # tiny: the global pool takes any size the stem can reduce
    assert model.input_size == default_input_size(name)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x)
        if device == "cpu":
            assert torch.equal(model(x), logits)
    assert logits.shape == (2, 10)
    assert list(maps) == model.attention_blocks
    assert name.startswith("resnet") == (not model.attention_blocks)


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9000'.*cbam_resnet50"):
        create_model("resnet9000")

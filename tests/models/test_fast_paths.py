"""The inference fast paths in models/ give the numbers of the plain composition they replace."""

from __future__ import annotations

import pytest
import torch

from models import create_model
from models.cbam import CBAM


@pytest.mark.parametrize("gates", ["channel_spatial", "channel", "spatial"])
@pytest.mark.parametrize("grad", [False, True])
def test_cbam_adds_the_shortcut_in_its_last_multiply(gates: str, grad: bool) -> None:
    torch.manual_seed(0)
    cbam = CBAM(32, reduction=4, gates=gates, inplace=True).eval()
    if cbam.spatial is not None:
        torch.nn.init.constant_(cbam.spatial.bn.weight, 2.0)  # a spatial map far from constant
    x = torch.randn(2, 32, 6, 6).to(memory_format=torch.channels_last)
    shortcut = torch.randn(2, 32, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = CBAM(32, reduction=4, gates=gates).eval().requires_grad_(False)
        expected.load_state_dict(cbam.state_dict())
        want = expected(x.clone()) + shortcut
    with torch.set_grad_enabled(grad):
        kept = shortcut.clone()
        got, maps = cbam.forward_with_maps(x.clone(), shortcut)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(shortcut, kept)  # the shortcut is never overwritten
    assert (maps.channel is None) == (gates == "spatial") and (maps.spatial is None) == (gates == "channel")


def test_fused_blocks_keep_channels_last_and_match_autograd() -> None:
    # The in-place (no autograd) and out-of-place (autograd) paths run the same kernels: equal logits.
    torch.manual_seed(0)
    model = create_model("cbam_resnet20_cifar", num_classes=10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = model(x)
        block_out = model.layer1[0](model._stem(x))
    assert block_out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(model(x).detach(), fast)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_the_torchscript_onnx_exporter_still_takes_cbam(tmp_path) -> None:
    # Kernel sizes stay static (no pooling sized from x.shape), so the legacy exporter works too.
    pytest.importorskip("onnx")
    model = create_model("cbam_resnet8_cifar", num_classes=10).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), tmp_path / "m.onnx", dynamo=False)
    assert (tmp_path / "m.onnx").stat().st_size > 0

import pickle

import pytest
import torch
from official_cbam import ResNet18CBAM, official_manifest, random_official_state_dict, save_official

from models import CheckpointError, CheckpointMetadata, create_model, load_checkpoint, save_checkpoint
from models.checkpoint import (
    CheckpointKeysError,
    CheckpointNotFoundError,
    CheckpointShapeError,
    NotACheckpointError,
    UnknownArchitectureError,
    convert_official_checkpoint,
    load_official_checkpoint,
    official_key_to_ours,
)


def _meta(arch="cbam_resnet8_cifar", num_classes=3, **kwargs) -> CheckpointMetadata:
    return CheckpointMetadata(
        arch=arch,
        num_classes=num_classes,
        labels=[f"class{i}" for i in range(num_classes)],
        input_size=(32, 32),
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        version="test-1",
        **kwargs,
    )


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    meta = _meta(model_kwargs={"reduction": 8, "spatial_kernel_size": 3})
    model = create_model(meta.arch, num_classes=3, reduction=8, spatial_kernel_size=3).eval()
    save_checkpoint(model, tmp_path / "m.safetensors", meta)
    loaded, loaded_meta = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded_meta == meta
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.layer1[0].attention.spatial.conv.kernel_size == (3, 3)


def test_metadata_is_validated():
    with pytest.raises(ValueError, match="labels should name each of 3 classes, got 2"):
        CheckpointMetadata("cbam_resnet18", 3, ["a", "b"], (224, 224))
    with pytest.raises(ValueError, match="std > 0"):
        CheckpointMetadata("cbam_resnet18", 1, ["a"], (224, 224), std=(0.2, 0.0, 0.2))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint file at .*absent.safetensors"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointNotFoundError):
        convert_official_checkpoint(tmp_path / "absent.pth", tmp_path / "out.safetensors", "cbam_resnet18")


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("certainly not a checkpoint")
    with pytest.raises(NotACheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(NotACheckpointError, match="not a PyTorch checkpoint"):
        load_official_checkpoint(junk, "cbam_resnet18")


def test_a_torch_pickle_is_pointed_to_convert(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pth")
    with pytest.raises(NotACheckpointError, match="cbam-models convert"):
        load_checkpoint(tmp_path / "x.pth")


def test_safetensors_without_our_metadata(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(NotACheckpointError, match="without 'cbam_serve' metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_unknown_architecture(tmp_path):
    model = create_model("cbam_resnet8_cifar", num_classes=3)
    save_checkpoint(model, tmp_path / "m.safetensors", _meta())
    # Rewrite the header's arch by hand, as a file from a newer zoo would have it.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header["cbam_serve"] = header["cbam_serve"].replace("cbam_resnet8_cifar", "cbam_vit_huge")
    save_file(tensors, tmp_path / "m.safetensors", metadata=header)
    with pytest.raises(UnknownArchitectureError, match="'cbam_vit_huge', which is not registered"):
        load_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(UnknownArchitectureError, match="cbam_vit_huge"):
        save_checkpoint(model, tmp_path / "n.safetensors", _meta(arch="cbam_vit_huge"))


def test_saving_the_wrong_architecture_names_the_shapes(tmp_path):
    model = create_model("cbam_resnet8_cifar", num_classes=3)
    with pytest.raises(CheckpointShapeError, match=r"fc.weight: checkpoint \[3, 64\] vs model \[5, 64\]"):
        save_checkpoint(model, tmp_path / "m.safetensors", _meta(num_classes=5))
    with pytest.raises(CheckpointKeysError, match=r"unexpected keys \[layer1.0.attention"):
        save_checkpoint(model, tmp_path / "m.safetensors", _meta(model_kwargs={"gates": "spatial"}))
    assert not list(tmp_path.iterdir())


def test_errors_are_value_errors():
    for cls in (CheckpointNotFoundError, NotACheckpointError, UnknownArchitectureError):
        assert issubclass(cls, CheckpointError)
    assert issubclass(CheckpointError, ValueError)


# --- the authors' checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["cbam_resnet18", "cbam_resnet50"])
def test_every_official_key_maps_onto_ours_with_its_shape(arch):
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in create_model(arch).state_dict().items()}
    mapped = {official_key_to_ours("module." + e["key"]): tuple(e["shape"]) for e in official_manifest(arch)}
    assert mapped == ours


def test_official_checkpoint_converts_and_matches_the_authors_model(official_resnet18_file, tmp_path):
    state_dict, path = official_resnet18_file
    meta = convert_official_checkpoint(path, tmp_path / "cbam18.safetensors", "cbam_resnet18", version="v0")
    assert (meta.arch, meta.num_classes, meta.input_size, meta.version) == (
        "cbam_resnet18",
        1000,
        (224, 224),
        "v0",
    )
    converted, loaded_meta = load_checkpoint(tmp_path / "cbam18.safetensors")
    direct = load_official_checkpoint(path, "cbam_resnet18")
    assert loaded_meta == meta

    reference = ResNet18CBAM().eval()
    reference.load_state_dict(state_dict)  # the authors' names: loads as is
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = converted(x)
        assert torch.equal(ours, direct(x))
        expected = reference(x)
    assert ours.abs().max() > 0.1  # not a degenerate all-zero output
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_official_checkpoint_loads_with_labels(official_resnet18_file, tmp_path):
    _, path = official_resnet18_file
    labels = [f"n{i:08d}" for i in range(1000)]
    meta = convert_official_checkpoint(path, tmp_path / "c.safetensors", "cbam_resnet18", labels=labels)
    assert load_checkpoint(tmp_path / "c.safetensors")[1].labels == labels
    with pytest.raises(CheckpointError, match="2 labels given for a checkpoint with 1000 classes"):
        convert_official_checkpoint(path, tmp_path / "d.safetensors", "cbam_resnet18", labels=["a", "b"])
    assert meta.mean == (0.485, 0.456, 0.406)


def test_official_checkpoint_for_the_wrong_arch_names_keys(official_resnet18_file, tmp_path):
    _, path = official_resnet18_file
    with pytest.raises(CheckpointKeysError, match=r"missing keys \[layer1.0.conv3.weight") as info:
        load_official_checkpoint(path, "cbam_resnet50")
    assert "layer3.5.attention.channel.fc1.weight" in info.value.missing
    with pytest.raises(UnknownArchitectureError, match="'cbam_resnet9'"):
        load_official_checkpoint(path, "cbam_resnet9")


def test_official_checkpoint_with_missing_and_unexpected_keys(tmp_path):
    state_dict = random_official_state_dict("cbam_resnet18")
    del state_dict["layer2.1.cbam.SpatialGate.spatial.conv.weight"]
    state_dict["layer2.1.cbam.extra.weight"] = torch.zeros(1)
    path = save_official(state_dict, tmp_path / "broken.pth")
    with pytest.raises(CheckpointKeysError) as info:
        load_official_checkpoint(path, "cbam_resnet18")
    assert info.value.missing == ["layer2.1.attention.spatial.conv.weight"]
    assert info.value.unexpected == ["layer2.1.cbam.extra.weight"]
    assert "layer2.1.attention.spatial.conv.weight" in str(info.value)


def test_official_checkpoint_with_a_wrong_shape(tmp_path):
    state_dict = random_official_state_dict("cbam_resnet18")
    state_dict["layer1.0.cbam.ChannelGate.mlp.1.weight"] = torch.zeros(8, 64)  # reduction 8, not 16
    path = save_official(state_dict, tmp_path / "r8.pth")
    with pytest.raises(
        CheckpointShapeError,
        match=r"layer1.0.attention.channel.fc1.weight: checkpoint \[8, 64\] vs model \[4, 64\]",
    ):
        load_official_checkpoint(path, "cbam_resnet18")


def test_pre_0_4_1_checkpoints_without_batch_counters_load(tmp_path):
    state_dict = {
        k: v for k, v in random_official_state_dict("cbam_resnet18").items() if "num_batches_tracked" not in k
    }
    # The legacy (non-zip) serialisation, as torch.save wrote before PyTorch 1.6.
    path = save_official(state_dict, tmp_path / "old.pth.tar", _use_new_zipfile_serialization=False)
    model = load_official_checkpoint(path, "cbam_resnet18")
    assert int(model.bn1.num_batches_tracked) == 0


class _Payload:
    """Unpickling this would create a file: the proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("zipfile", [True, False])
def test_a_pickle_holding_an_arbitrary_object_is_refused(tmp_path, zipfile):
    marker = tmp_path / "code-ran"
    state_dict = random_official_state_dict("cbam_resnet18")
    path = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": state_dict, "epoch": _Payload(marker)}, path, _use_new_zipfile_serialization=zipfile
    )
    with pytest.raises(NotACheckpointError, match="refused to load .*weights_only=True"):
        convert_official_checkpoint(path, tmp_path / "out.safetensors", "cbam_resnet18")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    # The payload is real: a plain unpickler would have run it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

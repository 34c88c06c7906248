import pytest
import torch
import torchvision.models._api as torchvision_api

from chest_mnist import UserError
from chest_mnist.model import MedMNISTClassifier, build_resnet18
from chest_mnist.synthetic import LABELS
from tests.conftest import trainer_for_setup


def test_cifar_stem_keeps_28px_through_the_first_stage():
    net = build_resnet18("cifar", num_classes=14)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    stage1 = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    assert stage1(torch.zeros(2, 3, 28, 28)).shape == (2, 64, 28, 28)
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 14)


def test_imagenet_stem_is_torchvisions():
    net = build_resnet18("imagenet", num_classes=14)
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert isinstance(net.maxpool, torch.nn.MaxPool2d)
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 14)


def test_unknown_stem():
    with pytest.raises(
        UserError, match="model.stem='vit' is unknown; choose one of cifar, imagenet"
    ):
        build_resnet18("vit")


def test_pretrained_without_network_names_the_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise OSError(f"<urlopen error [Errno -2] Name or service not known> for {url}")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as error:
        build_resnet18("imagenet", pretrained=True)
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and f"{tmp_path}/hub/checkpoints" in message
    assert "model.pretrained=false" in message


def test_pretrained_needs_the_imagenet_stem():
    with pytest.raises(UserError, match="fit only model.stem=imagenet"):
        build_resnet18("cifar", pretrained=True)


def test_head_runs_in_float32_under_bf16_autocast():
    model = MedMNISTClassifier(LABELS, stem="imagenet")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 3, 28, 28).contiguous(memory_format=torch.channels_last))
    assert logits.dtype == torch.float32 and logits.shape == (4, 14)


def test_pos_weight_must_have_one_value_per_label():
    with pytest.raises(UserError, match="model.pos_weight has 2 values but there are 14 labels"):
        MedMNISTClassifier(LABELS, pos_weight=[1.0, 2.0])


def test_pos_weight_auto_is_the_train_negative_to_positive_ratio(synthetic_npz):
    from chest_mnist.data import MedMNISTDataModule

    datamodule = MedMNISTDataModule(path=str(synthetic_npz))
    datamodule.setup()
    model = MedMNISTClassifier(LABELS, stem="imagenet", pos_weight="auto")
    model._trainer = trainer_for_setup(
        torch.device("cpu"), datamodule=datamodule, precision="32-true"
    )
    model.setup("fit")
    positives = datamodule.splits["train"].labels.float().sum(0)
    expected = (len(datamodule.splits["train"]) - positives) / positives
    torch.testing.assert_close(model.pos_weight, expected)
    # and the loss weighs a missed positive by it
    logits, targets = torch.zeros(1, 14), torch.zeros(1, 14)
    targets[0, 13] = 1  # hernia, the rarest
    weighted = model.loss(logits, targets)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert weighted.item() == pytest.approx(
        plain.item() * (13 + expected[13].item()) / 14, rel=1e-5
    )


def test_tta_flip_makes_evaluation_mirror_invariant():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 28, 28)
    plain = MedMNISTClassifier(LABELS, stem="imagenet").eval()
    with torch.no_grad():
        assert not torch.allclose(plain._eval_logits(x), plain._eval_logits(x.flip(-1)), atol=1e-4)
        tta = MedMNISTClassifier(LABELS, stem="imagenet", tta_flip=True).eval()
        tta.load_state_dict(plain.state_dict())
        torch.testing.assert_close(
            tta._eval_logits(x), tta._eval_logits(x.flip(-1)), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(tta._eval_logits(x), (plain(x) + plain(x.flip(-1))) / 2)

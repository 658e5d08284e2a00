import pytest
import torch

from busseg.devices import available_devices, get_device


def test_cpu_always_available():
    assert get_device("cpu") == torch.device("cpu")
    assert available_devices()[-1] == "cpu"


def test_auto_order(monkeypatch):
    import busseg.devices as dev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert get_device("auto") == torch.device("cpu")
    assert get_device(None) == torch.device("cpu")
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert get_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert get_device("auto").type == "cuda"
    assert get_device("cuda:1") == torch.device("cuda", 1)
    assert available_devices() == ["cuda:0", "cuda:1", "mps", "cpu"]
    with pytest.raises(ValueError, match="2 CUDA device"):
        get_device("cuda:2")


def test_case_and_device_objects():
    assert get_device(" CPU ") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")


def test_absent_device_names_available(monkeypatch):
    import busseg.devices as dev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(ValueError, match="Available: cpu"):
        get_device("cuda")
    with pytest.raises(ValueError, match="Available: cpu"):
        get_device("cuda:0")
    with pytest.raises(ValueError, match="Available: cpu"):
        get_device("mps")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x", "mps:1", "cpu:0:1", ""])
def test_unknown_names(bad):
    with pytest.raises(ValueError, match="auto"):
        get_device(bad)


def test_non_string():
    with pytest.raises(ValueError):
        get_device(3)

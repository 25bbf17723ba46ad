import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from layercrit import LayercritError, apply_weights, create_model, load_checkpoint, load_state_dict, save_checkpoint


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_roundtrip_formats(tmp_path):
    model = create_model("fcn-3x64")
    sd = model.state_dict()
    torch.save(sd, tmp_path / "a.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "b.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "c.safetensors"))
    save_checkpoint(tmp_path / "d.pt", {"_orig_mod." + k: v for k, v in sd.items()}, epoch=0, model={"spec": "fcn-3x64", "kwargs": {}})
    for name in ("a.pt", "b.pth", "c.safetensors", "d.pt"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert load_checkpoint(tmp_path / "d.pt")["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refuses_pickled_code(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"w": torch.zeros(1), "x": Evil()}, f)
    with pytest.raises(LayercritError, match="pickled objects other than tensors"):
        load_state_dict(tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl.pt", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(LayercritError, match="evil.pkl.pt"):
        load_state_dict(tmp_path / "evil.pkl.pt")


def test_not_a_state_dict_truncated_missing(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(LayercritError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")
    torch.save(create_model("fcn-3x64").state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayercritError, match="corrupt or truncated"):
        load_state_dict(tmp_path / "cut.pt")
    with pytest.raises(LayercritError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(LayercritError, match="not a readable safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_mismatch_names_the_keys():
    model = create_model("fcn-3x64")
    sd = dict(create_model("fcn-3x64").state_dict())
    sd.pop("fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(LayercritError, match=r"missing keys fc2.bias; unexpected keys extra.weight; shape mismatch .*fc1.weight \(3, 3\) vs \(64, 64\)"):
        apply_weights(model, sd)


def test_non_persistent_buffers_are_not_a_mismatch():
    """A file that holds a buffer the model keeps out of its state dict (Hugging Face's `position_ids`,
    saved by older versions) loads; a really unknown key is still named."""
    import torch.nn as nn

    class WithIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("position_ids", torch.arange(4), persistent=False)

    state = WithIds().state_dict() | {"position_ids": torch.arange(4)}
    apply_weights(WithIds(), state)
    with pytest.raises(LayercritError, match="unexpected keys nope"):
        apply_weights(WithIds(), state | {"nope": torch.zeros(1)})

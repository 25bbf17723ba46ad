import json

import pytest
import torch

from layercrit import LayercritError, TrainConfig, create_model, load_checkpoint, train


def _cfg(**kw):
    return TrainConfig(**({"model": "fcn-2x256", "data": "digits:train", "epochs": 3} | kw))


def test_checkpoint_zero_is_the_init_and_metadata(tmp_path):
    run = train(_cfg(), tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [c["epoch"] for c in manifest["checkpoints"]] == [0, 1, 2, 3]
    c0 = load_checkpoint(tmp_path / "run" / "epoch_0000.pt")
    torch.manual_seed(0)
    init = create_model("fcn-2x256")
    assert all(torch.equal(c0["state_dict"][k], v) for k, v in init.state_dict().items())
    assert c0["model"] == {"spec": "fcn-2x256", "kwargs": {"num_classes": 10, "input_shape": (1, 8, 8)}}
    assert c0["hparams"]["milestones"] == [1, 2, 3] and c0["hparams"]["lr"] == 0.05
    assert {"train_error", "test_error", "train_loss", "test_loss"} <= c0["metrics"].keys()
    last = load_checkpoint(tmp_path / "run" / "epoch_0003.pt")
    assert last["metrics"]["train_error"] < c0["metrics"]["train_error"]
    assert all(torch.equal(last["state_dict"][k], v) for k, v in run.model.state_dict().items())


def test_deterministic_and_resume_is_bit_exact(tmp_path):
    a = train(_cfg(epochs=4), tmp_path / "a").model.state_dict()
    b = train(_cfg(epochs=4), tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an interrupted run: keep checkpoints up to epoch 2 only, then resume
    train(_cfg(epochs=4), tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["checkpoints"] = manifest["checkpoints"][:3]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    for e in (3, 4):
        (tmp_path / "c" / f"epoch_{e:04d}.pt").unlink()
    c = train(_cfg(epochs=4), tmp_path / "c", resume=True).model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_refuses_to_overwrite_and_bad_config(tmp_path):
    train(_cfg(epochs=1), tmp_path / "r")
    with pytest.raises(LayercritError, match="already holds a training run"):
        train(_cfg(epochs=1), tmp_path / "r")
    with pytest.raises(LayercritError, match="different configuration"):
        train(_cfg(epochs=2), tmp_path / "r", resume=True)
    with pytest.raises(LayercritError, match="Expected `epochs` to be a positive integer"):
        _cfg(epochs=0)


def test_a_transformer_trains_and_gets_zhangs_robustness_table(tmp_path):
    """Zhang et al. §5 on a transformer: the built-in `vit-digits` trains on 8×8 digits, and robustness
    (each block reset to checkpoint τ or re-randomized) and distances run on its checkpoints."""
    from layercrit.analyses.robustness import robustness, weight_distances

    run = train(_cfg(model="vit-digits", epochs=2), tmp_path / "vit")
    manifest = json.loads((tmp_path / "vit" / "manifest.json").read_text())
    assert manifest["checkpoints"][-1]["test_error"] < 0.7  # it learns (chance: 0.9)
    r = robustness(tmp_path / "vit", images=60, trials=1, granularity="block", layers=["L*"])
    t = r.table
    assert sorted(set(t["target"]) - {""}) == ["E0", "E1", "E2", "rerandomize"]
    blocks = t[t["probe"].isin(["reinit", "rerandomize"])]
    reset = blocks[blocks["target"] == "E0"].set_index("label")["error"]
    assert list(reset.index) == ["L00", "L01", "L02", "L03"]
    final = blocks[blocks["target"] == "E2"].set_index("label")["error"]  # resetting to the final weights changes nothing
    base = float(t.loc[t["probe"] == "none", "error"].iloc[0])
    assert final.to_numpy() == pytest.approx(base)
    d = weight_distances(run.out_dir, granularity="block")
    assert set(d["label"]) == {"embed", "L00", "L01", "L02", "L03", "head"}
    assert (d[d["epoch"] == 0]["l2"] == 0).all() and (d[d["epoch"] == 2]["l2"] > 0).all()

"""Checkpoints that never run code and are checked before anything is loaded: a crafted pickle
runs nothing; a file of the right format with a key missing or mistyped names the key; an
old format is refused; a file damaged on disk is found by its digest; what cannot be loaded
safely is refused at save time; a resume into another model, optimizer, scheduler or
precision changes nothing; an unwritable folder is found before the first step."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import OOMAbove, mlp, read_only
from reference import ce, samples
from torch import nn
from torch.utils.data import DataLoader

import autoaccum
from autoaccum import ConfigError
from autoaccum.plan import make_plan
from autoaccum.train.callbacks import Callback, Checkpoint, RunView


def _fit(
    model: nn.Module | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    **kwargs: Any,
) -> autoaccum.FitResult:
    model = model if model is not None else mlp()
    make = make_optimizer or (lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    return autoaccum.fit(
        model,
        DataLoader(samples(40), batch_size=8),
        8,
        loss_fn=ce,
        optimizer=make(model),
        max_micro=4,
        device="cpu",
        progress=False,
        report=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good checkpoint after 2 steps (read-only for the tests: copy before changing)."""
    folder = tmp_path_factory.mktemp("saved")
    _fit(max_steps=2, callbacks=[Checkpoint(folder, every=2)])
    return folder / "step-00000002.pt"


class Plant:
    """Unpickling it opens (creates) ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_runs_nothing_and_is_a_config_error(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    raw = torch.load(saved, weights_only=True)
    raw["position"] = Plant(marker)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(raw, folder / "step-00000009.pt")
    torch.load(folder / "step-00000009.pt", weights_only=False)  # negative control: it runs
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ConfigError, match=r"a Python object \((io|builtins).open\) .* never does"):
        _fit(resume=folder / "step-00000009.pt")
    (folder / "step-00000002.pt").write_bytes(saved.read_bytes())
    with pytest.warns(UserWarning, match="step-00000009.pt is not a readable"):
        _fit(resume=folder, max_steps=3)  # the folder goes on from its newest readable one
    assert not marker.exists()


def _altered(saved: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    raw = torch.load(saved, weights_only=True)
    change(raw)
    path = tmp_path / "step-00000002.pt"
    torch.save(raw, path)
    return path


def _position_steps(raw: dict[str, Any]) -> None:
    raw["position"]["steps"] = "2"


def _micro_sizes(raw: dict[str, Any]) -> None:
    raw["plan"]["micro_sizes"] = (4, "4")


def _model(raw: dict[str, Any]) -> None:
    raw["model"]["0.weight"] = [1.0]


def _ranks(raw: dict[str, Any]) -> None:
    raw["random"] = []


def _losses(raw: dict[str, Any]) -> None:
    raw["position"]["losses"] = (0.5,)


def _python_random(raw: dict[str, Any]) -> None:
    raw["random"][0]["now"]["python"] = (3, [1, 2, 3], None)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda raw: raw.pop("position"), "position is missing"),
        (_position_steps, r"position.steps is a str \('2'\), expected an int"),
        (_micro_sizes, r"plan.micro_sizes\[1\] is a str"),
        (_model, r"model\['0.weight'\] is a list"),
        (_ranks, "random holds 0 ranks' states for 1 ranks"),
        (_losses, "1 losses for 2 steps"),
        (_python_random, r"random\[0\].now.python is not a state of Python's random"),
    ],
)
def test_a_key_missing_or_mistyped_is_a_config_error_naming_it(
    saved: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None], said: str
) -> None:
    model = mlp(seed=3)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=said):
        _fit(model, resume=_altered(saved, tmp_path, change))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights, strict=True))


def test_an_older_format_is_refused_with_a_clear_message(saved: Path, tmp_path: Path) -> None:
    def old(raw: dict[str, Any]) -> None:
        raw["format"] = 1
        raw["autoaccum"] = "0.1.0"

    with pytest.raises(ConfigError, match=r"not an autoaccum checkpoint of format 2 \(written by"):
        _fit(resume=_altered(saved, tmp_path, old))
    # format 1 pickled autoaccum's own objects (a Plan): refused without running them
    torch.save({"format": 1, "plan": make_plan(8, 4, 1)}, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match=r"written by an older autoaccum.*autoaccum.plan.Plan"):
        _fit(resume=tmp_path / "old.pt")


def _flip_a_weight(path: Path) -> None:
    """One bit of a weight flipped in ``path``, in place: a file still perfectly loadable,
    holding another weight (what a bad disk or a copy cut short leaves)."""
    data = bytearray(path.read_bytes())
    first = torch.load(path, weights_only=True)["model"]["0.weight"].flatten()[:4]
    kind = {torch.float32: "f", torch.float64: "d"}[first.dtype]
    at = bytes(data).find(struct.pack(f"<4{kind}", *first.tolist()))
    assert at > 0  # the weights are stored raw
    data[at + 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_checkpoint_damaged_on_disk_is_refused_and_the_folder_resumes_from_an_intact_one(
    tmp_path: Path,
) -> None:
    """latest records each kept checkpoint's SHA-256: a flipped bit is found before anything
    is loaded (resume from the file: an error; from the folder: the next intact one, said)."""
    folder = tmp_path / "ckpt"
    _fit(max_steps=4, callbacks=[Checkpoint(folder, every=2)])
    newest, older = folder / "step-00000004.pt", folder / "step-00000002.pt"
    _flip_a_weight(newest)
    model = mlp(seed=3)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="its bytes are not those its run wrote"):
        _fit(model, resume=newest)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights, strict=True))
    with pytest.warns(UserWarning, match=f"resuming from {older}.*passing over.*not those"):
        result = _fit(resume=folder, max_steps=4)
    assert result.optimizer_steps == 4

    # the negative control: the same file, where no digest was recorded, loads as if intact
    elsewhere = tmp_path / "copied"
    elsewhere.mkdir()
    (elsewhere / newest.name).write_bytes(newest.read_bytes())
    _fit(resume=elsewhere / newest.name, max_steps=4)


def test_latest_keeps_the_digests_of_the_kept_checkpoints_across_a_resume(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _fit(max_steps=2, callbacks=[Checkpoint(folder, every=1, keep=2)])
    _fit(max_steps=4, resume="auto", callbacks=[Checkpoint(folder, every=1, keep=2)])
    said = json.loads((folder / "latest").read_text())
    kept = sorted(p.name for p in folder.glob("step-*.pt"))
    assert kept == ["step-00000003.pt", "step-00000004.pt"]
    assert sorted(said["sha256"]) == kept
    for name in kept:
        assert said["sha256"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


class Helper:
    """An object in a scheduler's state: weights_only cannot rebuild it."""


class HelpedScheduler:
    def __init__(self) -> None:
        self.helper = Helper()

    def step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": 1, "helper": self.helper}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class NumpyMetric(Callback):
    def on_step(self, run: RunView) -> None:
        import numpy as np

        run.metrics.append({"step": run.state().step, "accuracy": np.float64(0.5)})


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"scheduler": HelpedScheduler()}, r"scheduler\['helper'\] is a test_checkpoint_safety"),
        ({"callbacks": [NumpyMetric()]}, r"metrics\[0\]\['accuracy'\] is a numpy.float64"),
    ],
)
def test_what_cannot_be_loaded_safely_is_refused_at_save_time(
    tmp_path: Path, extra: dict[str, Any], said: str
) -> None:
    callbacks = [*extra.pop("callbacks", []), Checkpoint(tmp_path, every=1)]
    with pytest.raises(ConfigError, match=f"cannot save the checkpoint: {said}"):
        _fit(callbacks=callbacks, **extra)
    assert not list(tmp_path.glob("step-*"))


def _wider(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), OOMAbove(10**9), nn.Linear(9, 3)).double()


def _deeper() -> nn.Module:
    return nn.Sequential(*mlp(), nn.Linear(3, 3).double())


def _two_groups(model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)


@pytest.mark.parametrize(
    ("model", "make_optimizer", "said"),
    [
        (_wider, None, r"shapes differ .*: 0.weight \(8, 5\) vs \(9, 5\)"),
        (_deeper, None, "missing from the checkpoint: 4.weight, 4.bias"),
        (lambda: mlp(dtype=torch.float32), None, "0.weight torch.float64 vs torch.float32"),
        (mlp, lambda m: torch.optim.Adam(m.parameters()), "SGD optimizer, this run's is a "),
        (mlp, _two_groups, "has 1 parameter group"),
    ],
)
def test_a_resume_into_another_model_or_optimizer_changes_nothing(
    saved: Path,
    model: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None,
    said: str,
) -> None:
    net = model()
    weights = [p.detach().clone() for p in net.parameters()]
    optimizers: list[torch.optim.Optimizer] = []

    def kept(m: nn.Module) -> torch.optim.Optimizer:
        optimizer = (make_optimizer or (lambda m: torch.optim.SGD(m.parameters(), lr=0.1)))(m)
        optimizers.append(optimizer)
        return optimizer

    with pytest.raises(ConfigError, match=said) as refused:
        _fit(net, kept, resume=saved)
    assert "nothing was loaded" in str(refused.value).lower()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), weights, strict=True))
    assert not optimizers[0].state


def test_the_scheduler_and_the_precision_must_be_the_checkpoints(
    saved: Path, tmp_path: Path
) -> None:
    def scheduled(make: Callable[[torch.optim.Optimizer], Any] | None, **kwargs: Any) -> None:
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = make(optimizer) if make is not None else None
        _fit(model, lambda m: optimizer, scheduler=schedule, **kwargs)

    lr = torch.optim.lr_scheduler
    with pytest.raises(ConfigError, match=r"taken with no scheduler, this run has torch\.optim"):
        scheduled(lambda o: lr.StepLR(o, 2), resume=saved)
    folder = tmp_path / "scheduled"
    scheduled(lambda o: lr.StepLR(o, 2), max_steps=2, callbacks=[Checkpoint(folder, every=2)])
    with pytest.raises(ConfigError, match=r"taken with torch\.optim\.lr_scheduler\.StepLR, this"):
        scheduled(None, resume=folder)
    with pytest.raises(ConfigError, match=r"StepLR scheduler's state, this run's is a .*Cosine"):
        scheduled(lambda o: lr.CosineAnnealingLR(o, 4), resume=folder)

    def fp16(raw: dict[str, Any]) -> None:
        raw["scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5}

    with pytest.raises(ConfigError, match=r"taken with a GradScaler .*this run is without one"):
        _fit(resume=_altered(saved, tmp_path, fp16))


class Steps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step(self, run: RunView) -> None:
        self.steps += 1


def test_an_unwritable_checkpoint_folder_is_found_before_the_first_step(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("a file")
    cases = [(afile / "ckpt", "Not a directory"), (afile, "it exists and is not a folder")]
    for folder, reason in cases:
        steps = Steps()
        with pytest.raises(ConfigError, match=f"cannot write checkpoints to {folder}: {reason}"):
            _fit(callbacks=[steps, Checkpoint(folder, every=3)])
        assert steps.steps == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    steps = Steps()
    with read_only(locked), pytest.raises(ConfigError, match=f"to {locked}: (Permission|Oper)"):
        _fit(callbacks=[steps, Checkpoint(locked, every=3)])
    assert steps.steps == 0

"""Token budgets and schedules (issue 20): every optimizer step trains on exactly T loss tokens
(a sample crossing the budget split between two windows), micro-batches packed under a budget
of padded tokens, targets that ramp; each exact against one big step in float64, and resumed
bit-identically."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import OOM, mlp
from reference import ce, samples, windows_of
from reference import reference as sample_reference
from tokens_data import LR, Rows, TinyLM, collate, lm_loss, reference, stream
from torch import nn
from torch.utils.data import DataLoader

import autoaccum
from autoaccum import ConfigError, Ramp
from autoaccum.train.data.packing import PADDING, pack

TOL = 1e-10


def rel(model: nn.Module, ref: nn.Module) -> float:
    pairs = list(zip(model.parameters(), ref.parameters(), strict=True))
    num = sum(float((p - q).detach().norm() ** 2) for p, q in pairs)
    return math.sqrt(num / sum(float(q.detach().norm() ** 2) for _, q in pairs))


class Steps(autoaccum.Callback):
    """Each step's target and the items (loss tokens) seen after it."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_step(self, run: autoaccum.RunView) -> None:
        state = run.state()
        self.seen.append((state.target, state.items_seen))


class Shapes:
    """``lm_loss``, recording each training micro-batch's shape (samples × padded length)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.shapes.append(tuple(batch["input_ids"].shape))  # type: ignore[arg-type]
        return lm_loss(model, batch)


def train(
    target_tokens: Any,
    model: TinyLM | None = None,
    data: Rows | None = None,
    collate_fn: Any = collate,
    **kwargs: Any,
) -> tuple[TinyLM, autoaccum.FitResult, Steps]:
    """``fit`` of ``model`` (a TinyLM) on ``data`` (Rows()) by loss tokens, SGD, quiet; the
    steps' targets and items seen."""
    model, steps = model if model is not None else TinyLM(), Steps()
    kwargs.setdefault("loss_fn", lm_loss)
    kwargs.setdefault("count_fn", autoaccum.count_tokens(shift=True))
    result = autoaccum.fit(
        model,
        DataLoader(data if data is not None else Rows(), batch_size=4, collate_fn=collate_fn),
        target_tokens=target_tokens,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        progress=False,
        report=kwargs.pop("report", False),
        callbacks=[steps, *kwargs.pop("callbacks", [])],
        **kwargs,
    )
    return model, result, steps


def test_every_step_trains_exactly_t_loss_tokens_and_lands_on_one_big_step() -> None:
    """20 loss tokens a step over 30 rows of 2-11 tokens (155 in all): windows end inside
    rows, whose labels are split; every step is one big step over its 20 tokens."""
    rows = Rows()
    tokens = stream(rows)
    assert len(tokens) == 155
    cuts = [tokens[k][0] == tokens[k - 1][0] for k in range(20, 155, 20)]
    assert any(cuts)  # some window boundary falls inside a row: that row is split
    model, result, steps = train(20, max_micro=3)
    ref = TinyLM()
    reference(ref, rows, [20] * 8)
    assert rel(model, ref) < TOL
    assert [items for _, items in steps.seen] == [20.0 * k for k in range(1, 8)] + [155.0]
    assert {target for target, _ in steps.seen} == {20}
    assert result.items_seen == 155  # every loss token once
    assert result.optimizer_steps == 8


def test_the_naive_fixed_sample_plan_misses_the_token_windows() -> None:
    """The negative control: 4 rows a step, weighted by their tokens, is not the same run
    (its steps hold 5 to 35 tokens)."""
    model, steps = TinyLM(), Steps()
    autoaccum.fit(
        model,
        DataLoader(Rows(), batch_size=4, collate_fn=collate),
        target_batch=4,
        loss_fn=lm_loss,
        count_fn=autoaccum.count_tokens(shift=True),
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        max_micro=2,
        progress=False,
        report=False,
        callbacks=[steps],
    )
    seen = [items for _, items in steps.seen]
    per_step = [b - a for a, b in zip([0.0, *seen[:-1]], seen, strict=True)]
    assert max(per_step) - min(per_step) >= 10  # the spread a token budget removes
    ref = TinyLM()
    reference(ref, Rows(), [20] * 8)
    assert rel(model, ref) > 1e-3


def test_micro_batches_are_packed_longest_first_under_the_budget() -> None:
    """max_micro 3 samples of the longest row (11 tokens): a budget of 33 padded tokens; each
    micro-batch's samples × padded length stays under it (a single longer sample aside)."""
    shapes = Shapes()
    _, result, _ = train(40, max_micro=3, loss_fn=shapes)
    assert result.plan.budget == 33
    assert all(n * length <= 33 for n, length in shapes.shapes)
    assert any(n > 3 for n, _ in shapes.shapes)  # short rows pack more than 3 to a micro-batch


def brute_padded(lengths: list[int], budget: int) -> int:
    """The fewest padded tokens over every cut of ``lengths`` (longest first) into runs."""
    size = sorted(lengths, reverse=True)
    best = 10**9
    for mask in range(2 ** (len(size) - 1)):
        bounds = [0, *(i + 1 for i in range(len(size) - 1) if mask >> i & 1), len(size)]
        runs = [size[a:b] for a, b in itertools.pairwise(bounds)]
        if all(len(r) == 1 or len(r) * r[0] <= budget for r in runs):
            best = min(best, sum(len(r) * r[0] for r in runs))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_packing_covers_every_sample_once_within_the_budget_and_the_padding_bound(
    seed: int,
) -> None:
    """Random lengths: every index once, longest first; each micro-batch within the budget (or
    alone); padding within 5 % of the tokens wherever any cut reaches that, else the least
    padding there is (against every cut, by brute force); fewer micro-steps than samples
    where like lengths can share."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 12, (1,), generator=gen))
    lengths = [int(x) for x in torch.randint(1, 40, (n,), generator=gen)]
    budget = int(torch.randint(1, 120, (1,), generator=gen))
    runs = pack(lengths, budget)
    flat = [i for run in runs for i in run]
    assert sorted(flat) == list(range(n))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert all(len(r) == 1 or len(r) * lengths[r[0]] <= budget for r in runs)
    padded = sum(len(r) * lengths[r[0]] for r in runs)
    least = brute_padded(lengths, budget)
    if least <= (1 + PADDING) * sum(lengths):
        assert padded <= (1 + PADDING) * sum(lengths)
    else:
        assert padded == least


def test_packing_trades_a_little_padding_for_fewer_micro_steps() -> None:
    """Lengths 20, 19, 18, 17 under a budget of 80: one micro-batch of four (80 padded tokens
    for 74, 8 %) is over the 5 % bound; two of two (76, 2.7 %) are within it and win over four
    micro-steps of one (74). Equal lengths go in one micro-batch, as the budget allows."""
    assert pack([10] * 6, 60) == [[0, 1, 2, 3, 4, 5]]
    assert pack([10] * 6, 59) == [[0, 1, 2, 3, 4], [5]]
    runs = pack([17, 18, 19, 20], 80)
    assert runs == [[3, 2], [1, 0]]


def test_a_real_gpt2_with_the_default_loss_and_count() -> None:
    """A GPT2LMHeadModel from a config (no download), float64, its own .loss: the default count
    reads off the model that it shifts its labels, and the windows split on those."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=13,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    ref = transformers.GPT2LMHeadModel(config).double()
    ref.load_state_dict(model.state_dict())
    rows = Rows()
    autoaccum.fit(
        model,
        DataLoader(rows, batch_size=4, collate_fn=collate),
        target_tokens=24,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        max_micro=3,
        progress=False,
        report=False,
    )

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.inner(input_ids=input_ids).logits
            return logits

    reference(Logits(ref), rows, [24] * 7)
    assert rel(model, ref) < 1e-6  # transformers computes its loss in float32


def test_a_count_that_cannot_split_trains_whole_samples_reaching_t() -> None:
    """A count of the user's own: a window holds the fewest whole rows whose tokens reach T,
    normalised by their true count."""

    def count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != -100).sum()

    rows = Rows()
    with pytest.warns(UserWarning, match="count of your own, which says how many but not where"):
        model, _, steps = train(20, count_fn=count, max_micro=3)
    tokens = stream(rows)
    targets, start = [], 0
    while start < len(tokens):  # whole rows until 20 tokens are reached
        end = start
        while end < len(tokens) and (end - start < 20 or tokens[end][0] == tokens[end - 1][0]):
            end += 1
        targets.append(end - start)
        start = end
    ref = TinyLM()
    reference(ref, rows, targets)
    assert rel(model, ref) < TOL
    seen = [items for _, items in steps.seen]
    assert [b - a for a, b in zip([0.0, *seen[:-1]], seen, strict=True)] == targets


def test_labels_made_by_the_collate_fn_fall_back_to_whole_samples_with_a_warning() -> None:
    """Samples without labels (the collate_fn makes them, as DataCollatorForLanguageModeling
    does): nothing to mask per sample, so windows of whole rows, said once; still exact."""

    class Unlabelled(Rows):
        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.rows[index]["input_ids"]}

    def labelling(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate([{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows])

    with pytest.warns(UserWarning, match="samples carry no row of 'labels'") as caught:
        _, result, _ = train(20, data=Unlabelled(), collate_fn=labelling, max_micro=3)
    assert sum("target_tokens:" in str(w.message) for w in caught) == 1
    rows = Unlabelled()
    total = sum(len(r["input_ids"]) - 1 for r in rows.rows)
    assert result.items_seen == total  # every token once, whole rows
    assert result.samples_seen == len(rows)


def test_the_plan_line_says_the_budget_and_each_window_its_packing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before any window: the budget and what it is made of (no made-up split); after the
    run the plan is the last window's packing."""
    _, result, _ = train(20, max_micro=3, report=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "plan: target_tokens 20 = micro-batches of at most 33 padded tokens, each window's "
        "samples packed longest first — max_micro 3 given: that many of the longest sample"
    )
    last = result.plan.describe()
    assert last.startswith("target_tokens 20 = micro-batches of at most 33 padded tokens (packed: ")


def test_a_split_sample_is_seen_once() -> None:
    """A sample split between two windows is trained in both but counted once in
    samples_seen (and its loss tokens once in items_seen)."""
    rows = Rows()
    _, result, _ = train(20, max_micro=3)
    assert result.samples_seen == len(rows.rows)
    assert result.items_seen == len(stream(rows))
    _, twice, _ = train(20, max_micro=3, epochs=2)
    assert twice.samples_seen == 2 * len(rows.rows)


class Budgeted(TinyLM):
    """Runs out of memory above ``budget`` padded tokens, and once more at the training's
    forward number ``once`` whatever its size (a fragmented allocator, another process)."""

    def __init__(self, budget: int, once: int | None = None) -> None:
        super().__init__()
        self.budget, self.once, self.calls = budget, once, -(10**9)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls += 1
            if input_ids.numel() > self.budget or self.calls == self.once:
                raise OOM("CUDA out of memory. Tried to allocate 1 MiB (injected)")
        return super().forward(input_ids)


class Arm(autoaccum.Callback):
    """Counts the model's forwards from the first training step on (the probe's left out)."""

    def __init__(self, model: Budgeted) -> None:
        self.model = model

    def on_train_start(self, run: autoaccum.RunView) -> None:
        self.model.calls = 0


@pytest.mark.parametrize(
    ("budget", "once", "kwargs"),
    [(30, None, {}), (1000, 5, {"max_micro": 3}), (25, 7, {})],
    ids=["probed", "mid-training", "probed-then-mid-training"],
)
def test_out_of_memory_shrinks_the_token_budget_and_every_step_stays_exact(
    budget: int, once: int | None, kwargs: dict[str, Any]
) -> None:
    """The probe finds the budget of padded tokens; an out-of-memory error in a window re-runs
    it under a smaller budget: still T loss tokens a step, still one big step each."""
    model = Budgeted(budget, once)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result, steps = train(20, model, callbacks=[Arm(model)], **kwargs)
    ref = TinyLM()
    reference(ref, Rows(), [20] * 8)
    assert rel(model, ref) < TOL
    assert [items for _, items in steps.seen] == [20.0 * k for k in range(1, 8)] + [155.0]
    assert result.plan.budget <= budget
    assert result.oom_retries == (1 if once is not None else 0)
    if once is not None:
        retried = [w for w in caught if "retrying the window" in str(w.message)]
        assert "padded tokens; retrying the window (nothing was applied) under" in str(
            retried[0].message
        )


class Squeeze(autoaccum.Callback):
    """After step 2 the device holds less (another process took memory): 22 padded tokens."""

    def __init__(self, model: Budgeted) -> None:
        self.model = model

    def on_step(self, run: autoaccum.RunView) -> None:
        if run.state().step == 2:
            self.model.budget = 22


def test_memory_lost_mid_epoch_recuts_the_epochs_packed_windows_under_the_smaller_budget() -> None:
    """The epoch's windows were packed under the first budget; after an out-of-memory error the
    later ones are cut under the smaller budget, not each run out of memory again (which would
    shrink the budget again and again, far below what fits)."""
    rows, model = Rows(n=80), Budgeted(10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, result, steps = train(40, model, rows, max_micro=6, epochs=2, callbacks=[Squeeze(model)])
    total = len(stream(rows))
    targets = [40] * (total // 40) + ([total % 40] if total % 40 else [])
    ref = TinyLM()
    for _ in range(2):  # two epochs, in the loader's (unshuffled) order
        reference(ref, rows, targets)
    assert rel(model, ref) < TOL
    seen = [items for _, items in steps.seen]
    assert [b - a for a, b in zip([0.0, *seen[:-1]], seen, strict=True)] == targets * 2
    assert result.oom_retries <= 3
    assert result.plan.budget >= 0.8 * 22  # within a shrink of what fits


def test_a_token_ramp_is_exact_at_every_step() -> None:
    ramp = Ramp(10, 40, 4)  # 10, 18, 25, 32, then 40
    model, _, steps = train(ramp, max_micro=3)
    per_step = [ramp(k) for k in range(len(steps.seen))]
    assert [t for t, _ in steps.seen] == per_step
    ref = TinyLM()
    reference(ref, Rows(), per_step)
    assert rel(model, ref) < TOL


def test_a_sample_ramp_16_to_100_over_7_steps_is_exact_at_every_step() -> None:
    ramp = Ramp(16, 100, 7)
    assert [ramp(k) for k in range(9)] == [16, 28, 40, 52, 64, 76, 88, 100, 100]
    data = samples(600)
    model, steps = mlp(), Steps()
    autoaccum.fit(
        model,
        DataLoader(data, batch_size=7),
        ramp,
        loss_fn=ce,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        max_micro=10,
        max_steps=9,
        progress=False,
        report=False,
        callbacks=[steps],
    )
    assert [t for t, _ in steps.seen] == [ramp(k) for k in range(9)]
    windows, start = [], 0
    for k in range(9):
        windows.append(tuple(t[start : start + ramp(k)] for t in data.tensors))
        start += ramp(k)
    ref = mlp()
    sample_reference(ref, windows, ce)
    assert rel(model, ref) < TOL
    assert len(windows_of(data, 16)) > 9  # (the data is longer than the run)


def _ramped(folder: Path, upto: int, **kwargs: Any) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(3)
    model = mlp()
    result = autoaccum.fit(
        model,
        DataLoader(samples(300), batch_size=7, shuffle=True),
        Ramp(16, 100, 7),
        loss_fn=ce,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        max_micro=10,
        max_steps=upto,
        epochs=3,
        progress=False,
        report=False,
        **kwargs,
    )
    return model, list(result.losses)


def test_a_ramp_killed_at_step_4_resumes_bit_identically(tmp_path: Path) -> None:
    straight, losses = _ramped(tmp_path, 9)
    _ramped(tmp_path, 4, callbacks=[autoaccum.Checkpoint(tmp_path / "ckpt", every=4)])
    resumed, again = _ramped(tmp_path, 9, resume=tmp_path / "ckpt")
    assert again == losses
    assert all(
        torch.equal(p, q) for p, q in zip(resumed.parameters(), straight.parameters(), strict=True)
    )


def test_a_token_run_stopped_mid_epoch_resumes_bit_identically(tmp_path: Path) -> None:
    straight, full, _ = train(Ramp(10, 30, 3), max_micro=3, epochs=2)
    train(
        Ramp(10, 30, 3),
        max_micro=3,
        epochs=2,
        max_steps=5,
        callbacks=[autoaccum.Checkpoint(tmp_path / "ckpt", every=5)],
    )
    resumed, again, _ = train(Ramp(10, 30, 3), max_micro=3, epochs=2, resume=tmp_path / "ckpt")
    assert again.losses == full.losses
    assert all(
        torch.equal(p, q) for p, q in zip(resumed.parameters(), straight.parameters(), strict=True)
    )


def test_a_resume_with_another_schedule_is_refused(tmp_path: Path) -> None:
    _ramped(tmp_path, 4, callbacks=[autoaccum.Checkpoint(tmp_path / "ckpt", every=4)])
    with pytest.raises(ConfigError, match="at step 4, where this run's target is"):
        autoaccum.fit(
            mlp(),
            DataLoader(samples(300), batch_size=7),
            Ramp(16, 60, 7),
            loss_fn=ce,
            max_micro=10,
            progress=False,
            report=False,
            resume=tmp_path / "ckpt",
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_batch": 8, "target_tokens": 20}, "give one target"),
        ({"target_tokens": 0}, "target_tokens must be ≥ 1"),
        ({"target_tokens": lambda step: -1}, "schedule gave -1 at step 0"),
        ({"target_tokens": 20}, "loss_fn was given without count_fn, so every sample would"),
    ],
)
def test_bad_targets_are_config_errors_before_any_work(kwargs: dict[str, Any], match: str) -> None:
    model = TinyLM()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=match):
        autoaccum.fit(
            model,
            DataLoader(Rows(), batch_size=4, collate_fn=collate),
            loss_fn=lm_loss,
            progress=False,
            report=False,
            **kwargs,
        )
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_target_tokens_needs_a_map_style_loader() -> None:
    batches = [collate([Rows().rows[i] for i in range(k, k + 4)]) for k in range(0, 20, 4)]
    with pytest.raises(ConfigError, match="target_tokens reads every sample's loss tokens up"):
        autoaccum.fit(
            TinyLM(),
            batches,
            target_tokens=20,
            loss_fn=lm_loss,
            count_fn=autoaccum.count_tokens(),
            progress=False,
            report=False,
        )

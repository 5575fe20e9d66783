"""autoaccum.hf: plan_trainer_args against the real Transformers Trainer, on the CPU, in float64.

One Trainer optimizer step (SGD, constant learning rate, no clipping) is compared with the
exact full-window step computed by hand. Exact: a tiny GPT-2 once its labels are counted
shifted (``loss_type = "ForCausalLM"``, which plan_trainer_args sets), up to the float32 in
which Transformers computes the causal-LM loss; a sample-mean loss over equal micro-batches.
Not exact, and shown to fail the same check: GPT-2 as shipped (every step scaled by shifted
over unshifted tokens) and a short last micro-batch under a model without loss kwargs.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import torch
import transformers
from helpers import OOMAbove, hide_package, mlp
from reference import LR, TOL, samples
from torch import nn
from torch.nn import functional as F

from autoaccum.errors import ConfigError, MissingExtraError, PlanError
from autoaccum.hf import count_shifted_labels, plan_trainer_args

VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core machine
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


def training_args(tmp_path: Path, **kwargs: Any) -> Any:
    """One plain SGD step on the CPU: constant learning rate, no clipping, no decay."""
    options: dict[str, Any] = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        max_steps=1,
    )
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def train(model: nn.Module, args: Any, data: Any, collator: Any = None) -> None:
    transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()


def update_error(model: nn.Module, ref: nn.Module, start: nn.Module) -> tuple[float, float]:
    """(‖Δ − Δref‖ / ‖Δref‖, ⟨Δ, Δref⟩ / ‖Δref‖²) of the parameter updates from ``start``."""
    with torch.no_grad():
        pairs = [
            (p - s, q - s)
            for p, q, s in zip(
                model.parameters(), ref.parameters(), start.parameters(), strict=True
            )
        ]
        norm = sum(float((r * r).sum()) for _, r in pairs)
        diff = sum(float(((d - r) ** 2).sum()) for d, r in pairs)
        dot = sum(float((d * r).sum()) for d, r in pairs)
    return math.sqrt(diff / norm), dot / norm


# ------------------------------------------------------------------ GPT-2, token-level loss


def tokenizer() -> Any:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


def texts(n: int, tok: Any) -> list[dict[str, list[int]]]:
    """``n`` tokenized texts of 20 to 40 words."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        words = torch.randint(0, VOCAB - 2, (int(torch.randint(20, 41, (), generator=gen)),))
        out.append({"input_ids": tok(" ".join(f"w{int(w)}" for w in words))["input_ids"]})
    return out


def gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).to(torch.float64)


def exact_step(model: nn.Module, data: list[dict[str, list[int]]]) -> float:
    """Full-window SGD on the token-weighted mean: each text alone (no padding), every
    predicted token weighted alike; the loss in float32, as Transformers computes it."""
    total, tokens = torch.zeros((), dtype=torch.float32), 0
    for sample in data:
        ids = torch.tensor(sample["input_ids"])
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
        total = total + F.cross_entropy(logits.float(), ids[1:], reduction="sum")
        tokens += len(ids) - 1
    (total / tokens).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return tokens / sum(len(s["input_ids"]) for s in data)


def test_gpt2_step_is_exact_once_labels_are_counted_shifted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = tokenizer()
    data = texts(16, tok)
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    start, ref, fixed, shipped = gpt2(), gpt2(), gpt2(), gpt2()
    shifted_share = exact_step(ref, data)
    assert fixed.loss_type is None  # GPT2LMHeadModel names no loss: the model falls back to
    # ForCausalLM, but the Trainer then counts labels unshifted

    args = plan_trainer_args(fixed, data, training_args(tmp_path), 16, collator)
    assert fixed.loss_type == "ForCausalLM"
    assert "autoaccum: set GPT2LMHeadModel.loss_type = 'ForCausalLM'" in capsys.readouterr().out
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16
    args = plan_trainer_args(fixed, data, training_args(tmp_path), 16, collator, max_micro=4)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    train(fixed, args, data, collator)
    error, _ = update_error(fixed, ref, start)
    assert error < TOL  # against a reference that also takes the loss in float32

    args = plan_trainer_args(
        shipped, data, training_args(tmp_path), 16, collator, max_micro=4, exact_count=False
    )
    assert shipped.loss_type is None
    train(shipped, args, data, collator)
    error, scale = update_error(shipped, ref, start)
    assert error > 1e-2  # 1 − shifted/unshifted tokens (benchmarks/hf_trainer_weighting.py)
    assert scale == pytest.approx(shifted_share, abs=1e-6)  # every step scaled, not skewed


def test_count_shifted_labels_leaves_other_models_alone() -> None:
    assert not count_shifted_labels(mlp())  # not a Transformers model
    model = gpt2()
    model.loss_type = "ForMaskedLM"
    assert not count_shifted_labels(model)  # a loss_type set already is the user's
    assert model.loss_type == "ForMaskedLM"


# ------------------------------------------------------------------ a sample-mean loss


class Classifier(nn.Module):
    """A dict-batch model with a mean cross-entropy ``loss``; no loss kwargs."""

    def __init__(self, limit: int = 10**9) -> None:
        super().__init__()
        self.net = mlp(limit)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.net(x), labels)}


def dicts(n: int) -> list[dict[str, Any]]:
    x, y = samples(n).tensors
    return [{"x": x[i], "labels": int(y[i]), "unused": "dropped as the Trainer drops it"}
            for i in range(n)]  # fmt: skip


def test_probe_with_injected_oom_picks_the_divisor_and_prints_the_plan_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model = Classifier(limit=20)
    before = [p.detach().clone() for p in model.parameters()]
    given = training_args(tmp_path, auto_find_batch_size=True, gradient_accumulation_steps=7)
    with caplog.at_level(logging.DEBUG), pytest.warns(UserWarning, match="no loss"):
        args = plan_trainer_args(model, dicts(100), given, target_batch=50)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (10, 5)
    assert not args.auto_find_batch_size  # it would halve the batch and keep accumulation
    assert (given.per_device_train_batch_size, given.gradient_accumulation_steps) == (8, 7)
    assert capsys.readouterr().out.splitlines() == [
        "autoaccum: target_batch 50 = 10 × 5 (gradient_accumulation_steps) × 1 device(s); "
        "per-device share 50, ceiling 19: the Trainer needs equal micro-batches, so 10 × 5 "
        "(autoaccum.fit would use 17+17+16): 7 samples fewer per micro-batch, 2 more "
        "micro-steps per optimizer step"
    ]  # printed: shown whatever the logging set-up, once, one prefix
    assert not [r for r in caplog.records if r.name.startswith("autoaccum")]  # not twice
    oom = next(m for m in model.modules() if isinstance(m, OOMAbove))
    assert max(oom.sizes) > 20  # the probe ran into the limit
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_equal_micro_batches_of_a_sample_mean_equal_full_batch_sgd(tmp_path: Path) -> None:
    data, model, ref = dicts(16), Classifier(), mlp()
    with pytest.warns(UserWarning, match="no loss keyword arguments"):
        args = plan_trainer_args(model, data, training_args(tmp_path), 16, max_micro=4)
    train(model, args, data)
    x, y = samples(16).tensors
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    start = mlp()
    error, _ = update_error(model.net, ref, start)
    assert error < TOL


def test_a_short_last_micro_batch_is_weighted_like_a_full_one(tmp_path: Path) -> None:
    data, model, ref = dicts(14), Classifier(), mlp()  # 4 + 4 + 4 + 2, each divided by 4
    with pytest.warns(UserWarning, match="holds 2 samples and is weighted like a full one"):
        args = plan_trainer_args(model, data, training_args(tmp_path), 16, max_micro=4)
    train(model, args, data)
    x, y = samples(14).tensors
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    error, _ = update_error(model.net, ref, mlp())
    assert error > 1e-3


def test_a_target_that_does_not_divide_among_ranks_is_refused_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = training_args(tmp_path)
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    with pytest.raises(PlanError, match="target_batch=14 or 16"):
        plan_trainer_args(Classifier(), [], args, 15)  # before the (empty) data is read


def test_with_dataloader_drop_last_the_step_is_exact_and_unwarned(tmp_path: Path) -> None:
    data, model, ref = dicts(14), Classifier(), mlp()  # 4 + 4 + 4: the Trainer divides by 3
    given = training_args(tmp_path, dataloader_drop_last=True)
    with pytest.warns(UserWarning, match="no loss keyword arguments") as caught:
        args = plan_trainer_args(model, data, given, 16, max_micro=4)
    assert not [w for w in caught if "weighted like a full one" in str(w.message)]
    seen: list[dict[str, torch.Tensor]] = []

    def collator(batch: list[dict[str, Any]]) -> Any:
        seen.append(transformers.default_data_collator(batch))
        return seen[-1]

    train(model, args, data, collator)
    x, y = (torch.cat([b[k] for b in seen]) for k in ("x", "labels"))  # the 12 it shuffled in
    assert len(x) == 12
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    error, _ = update_error(model.net, ref, mlp())
    assert error < TOL


# ------------------------------------------------------------------ the plan line, errors


def test_the_plan_line_is_printed_on_the_main_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = training_args(tmp_path)
    with pytest.warns(UserWarning, match="no loss"):
        plan_trainer_args(Classifier(), dicts(16), args, 16, max_micro=4)
    assert capsys.readouterr().out.startswith("autoaccum: target_batch 16 = 4 × 4")
    monkeypatch.setattr(type(args), "process_index", property(lambda self: 1))
    with pytest.warns(UserWarning, match="no loss"):
        plan_trainer_args(Classifier(), dicts(16), args, 16, max_micro=4)
    assert capsys.readouterr().out == ""


def test_the_probe_batch_is_the_longest_samples_collated_as_the_trainer_collates(
    tmp_path: Path,
) -> None:
    tok = tokenizer()
    data = texts(40, tok)
    pad = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    seen: list[list[int]] = []

    def collator(batch: list[dict[str, Any]]) -> Any:
        seen.append([len(sample["input_ids"]) for sample in batch])
        return pad(batch)

    plan_trainer_args(gpt2(), data, training_args(tmp_path), 8, collator)
    longest = sorted((len(d["input_ids"]) for d in data), reverse=True)[:8]
    assert sorted(seen[0], reverse=True) == longest


class Wrapper(nn.Module):
    """PEFT-like (``get_base_model``), but not PEFT's: the Trainer inspects it as it is."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def get_base_model(self) -> nn.Module:
        return self.base

    def forward(self, **kwargs: Any) -> Any:
        return self.base(**kwargs)


def test_a_wrapper_the_trainer_does_not_unwrap_is_not_claimed_fixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = tokenizer()
    data = texts(16, tok)
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    model = Wrapper(gpt2())
    args = plan_trainer_args(model, data, training_args(tmp_path), 16, collator, max_micro=4)
    assert model.base.loss_type is None  # left alone: the Trainer reads the wrapper's
    assert "loss_type" not in capsys.readouterr().out
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    assert not trainer._loss_shifts_labels  # what a claim of "counted shifted" would deny


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(
            {"args": {"output_dir": "out"}},
            "args must be a transformers.TrainingArguments",
            id="args",
        ),
        pytest.param({"model": "gpt2"}, "model must be a torch.nn.Module", id="model"),
        pytest.param({"train_dataset": None}, "train_dataset must be a dataset", id="no-data"),
        pytest.param({"data_collator": "pad"}, "data_collator must be callable", id="collator"),
        pytest.param(
            {"optimizer": "adamw"}, "optimizer must be a torch.optim.Optimizer", id="optimizer"
        ),
        pytest.param({"max_micro": 0}, "max_micro must be ≥ 1", id="max-micro"),
        pytest.param(
            {"data_collator": None},
            "data collator failed on the probe batch .* padding collator",
            id="ragged-default-collator",
        ),
        pytest.param({"train_dataset": ["w1 w2", "w3"]}, "must be tokenized", id="untokenized"),
        pytest.param(
            {"data_collator": "no labels"}, "returned no loss for the probe batch", id="no-labels"
        ),
    ],
)
def test_bad_arguments_are_clear_errors_before_anything_changes(
    tmp_path: Path, change: dict[str, Any], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = tokenizer()
    model = gpt2()
    kwargs: dict[str, Any] = {
        "model": model,
        "train_dataset": texts(16, tok),
        "args": training_args(tmp_path),
        "target_batch": 16,
        "data_collator": transformers.DataCollatorForLanguageModeling(tok, mlm=False),
        **change,
    }
    if kwargs["data_collator"] == "no labels":
        kwargs["data_collator"] = transformers.DataCollatorWithPadding(tok)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=match):
        plan_trainer_args(**kwargs)
    assert model.loss_type is None  # nothing half-applied
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------ the benchmark


def test_the_weighting_benchmark_measures_one_minus_the_label_ratio(tmp_path: Path) -> None:
    bench = importlib.import_module("benchmarks.hf_trainer_weighting")
    assert (
        bench.main(["--ranges", "5-15", "--texts", "4", "--micro", "2", "--out", str(tmp_path)])
        == 0
    )
    [row] = json.loads((tmp_path / "hf_trainer_weighting.json").read_text())["rows"]
    assert row["shifted_labels"] == row["unshifted_labels"] - 4
    assert row["shipped_error"] == pytest.approx(1 - row["ratio"], abs=1e-6)  # scaled, not skewed
    assert row["shipped_scale"] == pytest.approx(row["ratio"], abs=1e-6)
    assert row["fixed_error"] < 1e-6  # the float32 loss of Transformers
    # the recorded figures (benchmarks/RESULTS.md): the label counts of the default setup
    tok = bench.tokenizer()
    counts = [
        sum(len(t["input_ids"]) for t in bench.texts(16, words, tok, 0))
        for words in bench.DEFAULT_RANGES
    ]
    assert counts == [476, 560, 164]  # 460/476, 544/560, 148/164 shifted


# ------------------------------------------------------------------ the optional extra


def test_without_transformers_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hide_package(monkeypatch, "transformers", "autoaccum.hf")
    with pytest.raises(MissingExtraError, match=r"pip install 'autoaccum\[hf\]'"):
        importlib.import_module("autoaccum.hf")

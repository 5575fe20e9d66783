"""Hugging Face Transformers: Trainer arguments whose effective batch is what you asked for.

The Trainer's ``auto_find_batch_size`` halves the batch on out-of-memory and keeps
``gradient_accumulation_steps``, so the effective batch shrinks silently.
:func:`plan_trainer_args` probes the micro-batch once, with the model's own loss on a real
batch collated as the Trainer will collate it, and returns a copy of ``args`` in which
``per_device_train_batch_size × gradient_accumulation_steps × world_size == target_batch``.
The Trainer's DataLoader has one batch size, so the micro-batch is the largest divisor of the
per-device share under the probed ceiling.

How the Trainer weights micro-batches: a model whose forward takes loss keyword arguments
gets ``num_items_in_batch``, the label count of the whole window (all ranks with
``average_tokens_across_devices``), and the step is the exact item-weighted mean. A causal LM
whose ``loss_type`` is unset (GPT-2, for one) has its labels counted unshifted, one too many
per row, which scales every step down by shifted/unshifted labels, one over the mean row
length (2.86 % for texts of 2–60 words, 9.76 % for 5–15, measured by
``benchmarks/hf_trainer_weighting.py``): :func:`count_shifted_labels` fixes that. Other
models get the mean of the per-micro-batch means, exact only for a sample-mean loss over
equal micro-batches.

The plan line is printed on the main process (it shows whatever the logging set-up). The
Trainer's loggers (``report_to``) record the plan themselves: they log ``args`` when training
begins, ``per_device_train_batch_size`` and ``gradient_accumulation_steps`` included. The
probe's ceiling is in the printed line only: a ``TrainerCallback`` has no handle on those
loggers (the Trainer calls them itself), so no callback of ours can add it.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.errors import ConfigError, MissingExtraError, check_callable, check_count
from autoaccum.memory.peaks import DEFAULT_MARGIN, check_margin
from autoaccum.plan import Plan, check_target, compare_with_fit, equal_plan
from autoaccum.probing.trials import probe
from autoaccum.step.model import check_model, min_micro, model_device
from autoaccum.step.ranks import Ranks
from autoaccum.step.rng import preserved_rng

try:
    from transformers import (
        DataCollatorWithPadding,
        PreTrainedTokenizerBase,
        SequenceFeatureExtractor,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.trainer import _is_peft_model  # how the Trainer tells a PEFT model
    from transformers.utils.generic import find_labels
except ImportError as exc:
    raise MissingExtraError("hf", "transformers", "autoaccum.hf") from exc

__all__ = ["count_shifted_labels", "plan_trainer_args"]

#: the probe batch is the longest samples among this many of the dataset's first
SCAN = 1024


def count_shifted_labels(model: nn.Module) -> bool:
    """Make the Trainer count a causal LM's labels as its loss uses them: shifted by one.

    The Trainer divides the window's summed loss by ``num_items_in_batch``, and counts
    ``labels[..., 1:]`` only when the model's ``loss_type`` maps to the causal-LM loss. For
    a causal LM whose ``loss_type`` is unset (its class name names no loss), the model
    already falls back to that loss; setting ``loss_type = "ForCausalLM"`` changes nothing
    in the model and makes the count right. Returns whether it set it. Call it before the
    Trainer is built (the Trainer reads it once).
    """
    inner = _inner(model)
    config = getattr(inner, "config", None)
    if (
        getattr(inner, "loss_type", "") is not None  # set already, or not a PreTrainedModel
        or hasattr(inner, "_loss_function")  # a loss of the user's own
        or getattr(config, "is_encoder_decoder", False)  # labels are not shifted there
        or type(inner).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    ):
        return False
    inner.loss_type = "ForCausalLM"  # type: ignore[assignment]
    return True


def plan_trainer_args(
    model: nn.Module,
    train_dataset: Any,
    args: TrainingArguments,
    target_batch: int,
    data_collator: Callable[[list[Any]], Any] | None = None,
    *,
    processing_class: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    max_micro: int | None = None,
    margin: float = DEFAULT_MARGIN,
    exact_count: bool = True,
) -> TrainingArguments:
    """A copy of ``args`` whose effective batch is exactly ``target_batch`` (global).

    The probe runs ``model(**batch).loss`` on the longest samples among the dataset's first
    1024, collated by ``data_collator`` (default: the Trainer's, from ``processing_class``),
    unused columns removed as the Trainer removes them, with an optimizer like the Trainer's
    (or ``optimizer``), under ``args``' precision and gradient checkpointing, on
    ``args.device`` (the model is moved there, as the Trainer would move it). Ranks agree.
    ``max_micro`` skips the probe. With ``exact_count`` a causal LM gets
    :func:`count_shifted_labels`. ``auto_find_batch_size`` is turned off in the copy.
    """
    _check(model, args, data_collator, optimizer)
    check_count("target_batch", target_batch)
    world = args.world_size
    check_target(target_batch, world, equal=True)  # divisible among the ranks? before any work
    check_margin(margin)
    ceiling = None if max_micro is None else check_count("max_micro", max_micro)
    if ceiling is None:
        collator = data_collator or _default_collator(processing_class)
        batch = _probe_batch(model, train_dataset, args, collator, target_batch // world)
        ceiling = _probe(model, batch, args, optimizer, target_batch // world, margin)
    plan = equal_plan(target_batch, ceiling, world, min_micro(model))
    changes: dict[str, Any] = {
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.accum_iter,
        "auto_find_batch_size": False,  # it would halve the micro-batch and keep accumulation
    }
    if world > 1 and _accepts_loss_kwargs(model):
        changes["average_tokens_across_devices"] = True  # count the window's items on all ranks
    out = dataclasses.replace(args, **changes)
    shifted = exact_count and count_shifted_labels(model)  # after every check: all or nothing
    if args.process_index == 0:
        _show(plan, type(_inner(model)).__name__ if shifted else None)
    _warn_weighting(model, train_dataset, plan.micro_batch, world, out)
    return out


def _check(model: object, args: object, data_collator: object, optimizer: object) -> None:
    """Refuse arguments of the wrong kind before any work."""
    if not isinstance(args, TrainingArguments):
        raise ConfigError(
            f"args must be a transformers.TrainingArguments, got {type(args).__name__}; build "
            "one with TrainingArguments(output_dir=...) and pass it"
        )
    check_model(model)
    if data_collator is not None:
        check_callable("data_collator", data_collator, "data_collator(list_of_samples)")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer over the model's parameters, or None "
            f"for one like the Trainer's (args.optim), got {type(optimizer).__name__}"
        )


def _show(plan: Plan, shifted: str | None) -> None:
    """The plan line, printed: it shows without any logging set-up, once, on the main process."""
    print(
        f"autoaccum: target_batch {plan.target_batch} = {plan.micro_batch} × {plan.accum_iter} "
        f"(gradient_accumulation_steps) × {plan.world_size} device(s); "
        f"{compare_with_fit(plan, 'the Trainer')}",
        flush=True,
    )
    if shifted:
        print(
            f"autoaccum: set {shifted}.loss_type = 'ForCausalLM', so the Trainer counts its "
            "labels shifted, as its loss uses them",
            flush=True,
        )


def _inner(model: nn.Module) -> nn.Module:
    """The model the Trainer inspects: a PEFT model's base model, else the model itself (a
    wrapper of another kind, ``get_base_model`` or not, is inspected as it is)."""
    if not _is_peft_model(model):
        return model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()  # type: ignore[no-any-return]
    return model.base_model.model  # type: ignore[union-attr,return-value]  # PeftMixedModel


def _default_collator(processing_class: Any) -> Callable[[list[Any]], Any]:
    """The collator the Trainer picks when given none."""
    if isinstance(processing_class, (PreTrainedTokenizerBase, SequenceFeatureExtractor)):
        return DataCollatorWithPadding(processing_class)  # type: ignore[arg-type,no-any-return]
    return default_data_collator  # type: ignore[no-any-return]


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether the Trainer passes ``num_items_in_batch`` to this model (as it decides it)."""
    inner = _inner(model)
    if hasattr(inner, "accepts_loss_kwargs"):
        return bool(inner.accepts_loss_kwargs)
    params = inspect.signature(inner.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _length(sample: Any) -> int:
    """How long a sample is: its longest sequence (what a padding collator pads to)."""
    values = sample.values() if isinstance(sample, Mapping) else [sample]
    sizes = [len(v) for v in values if isinstance(v, (list, tuple))]
    sizes += [v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0]
    return max(sizes, default=0)


def _probe_batch(
    model: nn.Module,
    dataset: Any,
    args: TrainingArguments,
    collator: Callable[[list[Any]], Any],
    count: int,
) -> Any:
    """The ``count`` longest of the first samples, collated as the Trainer collates them."""
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        samples: Iterable[Any] = (dataset[i] for i in range(min(len(dataset), SCAN)))
    elif isinstance(dataset, Iterable):
        samples = itertools.islice(iter(dataset), SCAN)
    else:
        raise ConfigError(
            f"train_dataset must be a dataset (with __len__ and __getitem__, or iterable), got "
            f"{type(dataset).__name__}; the probe needs real samples (or pass max_micro)"
        )
    with preserved_rng():  # a dataset or collator that draws random numbers draws them again
        first = list(samples)
        if not first:
            raise ConfigError("train_dataset is empty: the probe needs real samples")
        chosen = sorted(first, key=_length, reverse=True)[:count]
        if args.remove_unused_columns and isinstance(chosen[0], Mapping):
            inner = _inner(model)
            keep = set(inspect.signature(inner.forward).parameters) | {"label", "label_ids"}
            keep |= set(args.label_names or find_labels(type(inner)))  # type: ignore[no-untyped-call]
            chosen = [{k: v for k, v in s.items() if k in keep} for s in chosen]
        try:
            batch = collator(chosen)
        except Exception as exc:  # the user's collator on the user's samples
            raise ConfigError(
                f"the data collator failed on the probe batch (the {len(chosen)} longest of the "
                f"first samples): {type(exc).__name__}: {exc}. The Trainer would collate with it "
                "too: samples must be tokenized (dicts such as {'input_ids': [...]}), and "
                "samples of different lengths need a padding collator, e.g. "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) for a causal LM, or "
                "processing_class=tokenizer"
            ) from None
    if not isinstance(batch, Mapping):
        raise ConfigError(
            f"the data collator returned a {type(batch).__name__}; the Trainer calls "
            "model(**batch), so it must return a dict of model inputs"
        )
    return batch


def _probe(
    model: nn.Module,
    batch: Any,
    args: TrainingArguments,
    optimizer: torch.optim.Optimizer | None,
    share: int,
    margin: float,
) -> int:
    """The micro-batch ceiling, agreed by all ranks."""
    device = args.device
    if model_device(model) != device:
        model.to(device)
    if optimizer is None:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)  # type: ignore[arg-type]
        optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    renamed = hasattr(type(model), "is_activation_checkpointing")  # transformers 5
    checkpointing = bool(
        getattr(
            model, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing", True
        )
    )
    if args.gradient_checkpointing and not checkpointing:
        model.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)  # type: ignore[operator]
    ranks = Ranks(D.current())  # every rank probes: they agree on each trial and the ceiling
    try:
        found = probe(
            model,
            batch,
            loss_fn=_trainer_loss,
            optimizer=optimizer,
            upper=share,
            precision=precision,
            margin=margin,
            device=device,
            ranks=ranks,
            choose="largest",  # the Trainer needs equal micro-batches: the ceiling's divisor
        )
    finally:
        ranks.close()
        if args.gradient_checkpointing and not checkpointing:
            model.gradient_checkpointing_disable()  # type: ignore[operator]
    return found.max_micro


def _trainer_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss as the Trainer takes it: ``model(**batch)``'s ``loss`` (or first output)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else out[0] if type(out) is tuple else None
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(
            f"{type(_inner(model)).__name__} returned no loss for the probe batch (keys "
            f"{sorted(batch)}): the Trainer trains on model(**batch).loss, so the batch needs "
            "labels; for a causal LM, data_collator=DataCollatorForLanguageModeling(tokenizer, "
            "mlm=False) adds them"
        )
    return loss


def _warn_weighting(
    model: nn.Module, dataset: Any, micro: int, world: int, args: TrainingArguments
) -> None:
    """Say where the Trainer's weighting of micro-batches is not the full window's mean."""
    if _accepts_loss_kwargs(model):
        return  # num_items_in_batch: every window weighted by its own items
    # one process: the last batch is short; several: Accelerate fills it from the start
    short = len(dataset) % micro if world == 1 and hasattr(dataset, "__len__") else 0
    tail = (
        f" The last micro-batch of an epoch holds {short} samples and is weighted "
        "like a full one; pass dataloader_drop_last=True to drop it."
        if short and not args.dataloader_drop_last
        else ""
    )
    warnings.warn(
        f"{type(model).__name__}.forward takes no loss keyword arguments, so the Trainer "
        "divides each micro-batch's mean loss by gradient_accumulation_steps: exact for a "
        "sample-mean loss over equal micro-batches, per micro-batch (not per token) for "
        f"token-level losses.{tail}",
        stacklevel=3,
    )

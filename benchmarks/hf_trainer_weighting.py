"""How far one update of the shipped Transformers Trainer is from the exact full-window step.

A causal LM whose ``loss_type`` is unset (GPT-2, for one) gets ``num_items_in_batch`` counted
over its *unshifted* labels, one more per row than its loss uses, so every update is scaled
by shifted/unshifted labels. This script measures that on the CPU, reproducibly, with no
download: a tiny ``GPT2LMHeadModel`` built from a config in float64, ``texts`` texts of a
seeded random number of words (a word-level tokenizer, one token per word), one Trainer
update (SGD, constant learning rate, no clipping or decay) over one window of
``micro × texts/micro`` micro-batches padded by ``DataCollatorForLanguageModeling``. The
reference is the exact full-window step computed by hand in float64: every text alone (no
padding), every predicted token weighted alike.

For each range of words it reports the label counts of the window, their ratio, and the
relative error ‖Δ − Δref‖ / ‖Δref‖ of the update Δ (and its scale ⟨Δ, Δref⟩ / ‖Δref‖²):
for the Trainer as shipped, and after ``autoaccum.hf.count_shifted_labels`` (whose error
left is Transformers computing the causal-LM loss in float32).

    python -m benchmarks.hf_trainer_weighting [--ranges 20-40,2-60,5-15] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.tables import md_table, write_outputs

LR = 0.5
VOCAB = 64
DEFAULT_RANGES = ((20, 40), (2, 60), (5, 15))


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``"20-40,2-60"`` → ``[(20, 40), (2, 60)]`` (words per text, both ends included)."""
    ranges = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        low, high = int(lo), int(hi)
        if not 2 <= low <= high:
            raise argparse.ArgumentTypeError(f"a range needs 2 ≤ low ≤ high, got {part!r}")
        ranges.append((low, high))
    return ranges


def tokenizer() -> Any:
    """A word-level tokenizer: ``w0`` … ``w61`` are ids 2 … 63, one token per word."""
    import tokenizers
    import transformers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


def texts(count: int, words: tuple[int, int], tok: Any, seed: int) -> list[dict[str, list[int]]]:
    """``count`` tokenized texts; the number of words of each drawn first, uniformly in
    ``words`` (both ends), then the words, from generators seeded with ``seed``."""
    lengths = torch.Generator().manual_seed(seed)
    sizes = [
        int(torch.randint(words[0], words[1] + 1, (), generator=lengths)) for _ in range(count)
    ]
    draw = torch.Generator().manual_seed(seed + 1)
    out = []
    for size in sizes:
        ids = torch.randint(0, VOCAB - 2, (size,), generator=draw)
        out.append({"input_ids": tok(" ".join(f"w{int(i)}" for i in ids))["input_ids"]})
    return out


def gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).to(torch.float64)


def exact_update(data: list[dict[str, list[int]]]) -> list[torch.Tensor]:
    """Δref: the full-window SGD step on the token-weighted mean, in float64."""
    model = gpt2()
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    for sample in data:
        ids = torch.tensor(sample["input_ids"])
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
        total = total + F.cross_entropy(logits, ids[1:], reduction="sum")
        tokens += len(ids) - 1
    (total / tokens).backward()
    return [-LR * p.grad for p in model.parameters()]  # type: ignore[operator]


def trainer_update(
    data: list[dict[str, list[int]]], tok: Any, micro: int, *, shifted: bool, out: str
) -> list[torch.Tensor]:
    """Δ: one update of the Trainer; with ``shifted``, after ``count_shifted_labels``."""
    import transformers

    from autoaccum.hf import count_shifted_labels

    model, start = gpt2(), gpt2()
    if shifted and not count_shifted_labels(model):
        raise RuntimeError("count_shifted_labels left this GPT-2 alone: nothing to measure")
    args = transformers.TrainingArguments(
        output_dir=out, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, optim="sgd", learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, max_steps=1,
        per_device_train_batch_size=micro, gradient_accumulation_steps=len(data) // micro,
    )  # fmt: skip
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its end-of-training dict
    trainer.train()
    with torch.no_grad():
        return [p - s for p, s in zip(model.parameters(), start.parameters(), strict=True)]


def compare(update: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """(‖Δ − Δref‖ / ‖Δref‖, ⟨Δ, Δref⟩ / ‖Δref‖²)."""
    norm = sum(float((r * r).sum()) for r in ref)
    diff = sum(float(((d - r) ** 2).sum()) for d, r in zip(update, ref, strict=True))
    dot = sum(float((d * r).sum()) for d, r in zip(update, ref, strict=True))
    return math.sqrt(diff / norm), dot / norm


def measure(words: tuple[int, int], count: int, micro: int, seed: int) -> dict[str, Any]:
    """One row: the window's label counts and both updates' errors against Δref."""
    tok = tokenizer()
    data = texts(count, words, tok, seed)
    unshifted = sum(len(s["input_ids"]) for s in data)
    shifted = unshifted - len(data)
    ref = exact_update(data)
    with tempfile.TemporaryDirectory() as out:
        shipped_error, shipped_scale = compare(
            trainer_update(data, tok, micro, shifted=False, out=out), ref
        )
        fixed_error, fixed_scale = compare(
            trainer_update(data, tok, micro, shifted=True, out=out), ref
        )
    return {
        "words": list(words),
        "texts": count,
        "micro": micro,
        "accum": count // micro,
        "seed": seed,
        "unshifted_labels": unshifted,
        "shifted_labels": shifted,
        "ratio": shifted / unshifted,
        "shipped_error": shipped_error,
        "shipped_scale": shipped_scale,
        "fixed_error": fixed_error,
        "fixed_scale": fixed_scale,
    }


def environment() -> dict[str, Any]:
    import transformers

    return {
        "date": _dt.date.today().isoformat(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    table = md_table(
        ["words", "labels shifted/unshifted", "1 − ratio", "shipped: error", "shipped: scale",
         "count_shifted_labels: error"],
        [
            [f"{r['words'][0]}–{r['words'][1]}",
             f"{r['shifted_labels']}/{r['unshifted_labels']} = {r['ratio']:.4f}",
             f"{1 - r['ratio']:.2%}", f"{r['shipped_error']:.2%}", f"{r['shipped_scale']:.4f}",
             f"{r['fixed_error']:.1e}"]
            for r in rows
        ],
    )  # fmt: skip
    head = (
        f"Trainer weighting, {rows[0]['texts']} texts, {rows[0]['micro']} × {rows[0]['accum']} "
        f"micro-batches, seed {rows[0]['seed']}; CPU ({env['machine']}), torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['date']}"
    )
    return f"{head}\n\n{table}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranges", type=parse_ranges, default=list(DEFAULT_RANGES))
    parser.add_argument("--texts", type=int, default=16, help="texts in the window (16)")
    parser.add_argument("--micro", type=int, default=4, help="texts per micro-batch (4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the tiny config's token ids, the loss_type
    if args.texts % args.micro:
        parser.error(f"--texts {args.texts} is not a multiple of --micro {args.micro}")
    rows = [measure(words, args.texts, args.micro, args.seed) for words in args.ranges]
    env = environment()
    text = markdown(env, rows)
    write_outputs(args.out, "hf_trainer_weighting", {"env": env, "rows": rows}, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

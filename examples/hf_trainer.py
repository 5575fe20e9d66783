"""The Hugging Face Trainer: plan its arguments once, then train as usual.

    python examples/hf_trainer.py

``plan_trainer_args`` probes the micro-batch with the model's own loss on a real batch,
collated as the Trainer will collate it, and returns a copy of the ``TrainingArguments`` with
``per_device_train_batch_size × gradient_accumulation_steps × devices == target_batch``
exactly (the Trainer's ``auto_find_batch_size`` would halve the batch instead and keep the
accumulation). For a causal LM such as GPT-2 it also makes the Trainer count the labels
shifted, as the loss uses them (the Trainer as shipped counts one label too many per text,
which scales every update down: by 9.76 % for texts of 5–15 words).

A tiny ``GPT2LMHeadModel`` from a config, a word-level tokenizer, texts in a plain list: no
download, no ``datasets`` package, on the CPU (no bf16 there).
"""

from __future__ import annotations

import random
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from autoaccum.hf import plan_trainer_args

WORDS = [f"w{i}" for i in range(48)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def make_texts(count: int, seed: int) -> list[str]:
    """Texts of 5 to 15 words, each word the one after the last (mod 48)."""
    rng = random.Random(seed)
    return [
        " ".join(WORDS[(start + k) % len(WORDS)] for k in range(rng.randint(5, 15)))
        for start in (rng.randrange(len(WORDS)) for _ in range(count))
    ]


def main() -> None:
    tok = make_tokenizer()
    train_ds = [tok(text) for text in make_texts(256, seed=0)]  # any dataset of tokenized rows
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out, num_train_epochs=2, learning_rate=3e-3, use_cpu=True,
            report_to="none", save_strategy="no", logging_steps=4, disable_tqdm=True,
        )  # fmt: skip
        args = plan_trainer_args(model, train_ds, args, target_batch=32, data_collator=collator)
        print(
            f"per_device_train_batch_size {args.per_device_train_batch_size} × "
            f"gradient_accumulation_steps {args.gradient_accumulation_steps} = 32"
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"{trainer.state.global_step} optimizer steps, loss {losses[0]:.2f} → {losses[-1]:.2f}")
    if args.per_device_train_batch_size * args.gradient_accumulation_steps != 32:
        raise SystemExit("unexpected: the effective batch is not 32")


if __name__ == "__main__":
    main()

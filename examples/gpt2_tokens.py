"""Fine-tune a tiny GPT-2 on variable-length text, every optimizer step token-exact.

    python examples/gpt2_tokens.py

A ``GPT2LMHeadModel`` built from a config (no download), a word-level tokenizer, texts of 4 to
40 words padded per micro-batch by Transformers' ``DataCollatorForLanguageModeling``. With no
``loss_fn`` and no ``count_fn``, ``fit`` takes the model's own ``.loss`` and weights each
micro-batch by its target tokens, counted shifted by one as GPT-2 shifts them: every optimizer
step is the mean over every predicted token of the window, however the window is split.

The second part checks that in float64: one SGD step through ``fit`` (25 texts as 9 + 8 + 8)
against the step of the whole window as one batch, and the usual ``loss / accum_iter`` loop
against the same step.
"""

from __future__ import annotations

import copy
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import (
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

import autoaccum

WORDS = [f"w{i}" for i in range(48)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word; a padding token for the collator."""
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def make_texts(count: int, seed: int) -> list[str]:
    """Texts of 4 to 40 words, each word the one after the last (mod 48): learnable."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        start, length = rng.randrange(len(WORDS)), rng.randint(4, 40)
        texts.append(" ".join(WORDS[(start + k) % len(WORDS)] for k in range(length)))
    return texts


def make_model(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def main() -> None:
    tok = make_tokenizer()
    collator = DataCollatorForLanguageModeling(tok, mlm=False)  # pads; labels -100 on padding
    samples = [tok(text) for text in make_texts(512, seed=0)]  # {"input_ids": [...], ...}

    # fine-tune: 64 texts per optimizer step, whatever the micro-batch
    loader = DataLoader(samples, batch_size=16, shuffle=True, collate_fn=collator)
    model = make_model(len(tok))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    result = autoaccum.fit(
        model, loader, target_batch=64, epochs=3, optimizer=optimizer, report=False
    )
    print(result.plan.describe())
    print(
        f"{result.optimizer_steps} steps over {result.items_seen:.0f} target tokens; "
        f"loss {result.losses[0]:.2f} → {result.losses[-1]:.2f}"
    )

    # the check, in float64: one window of 25 texts, one SGD step
    window = [tok(text) for text in make_texts(25, seed=1)]
    start = make_model(len(tok)).double()

    def delta(model: GPT2LMHeadModel) -> list[torch.Tensor]:
        return [
            (p - s).detach() for p, s in zip(model.parameters(), start.parameters(), strict=True)
        ]

    def sgd_step(model: GPT2LMHeadModel, micro_batches: list[list[dict]]) -> list[torch.Tensor]:
        """The change of the weights after backward over ``micro_batches`` and one SGD step."""
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for micro in micro_batches:
            loss = model(**collator(micro)).loss
            (loss / len(micro_batches)).backward()  # the usual accumulation loop
        optimizer.step()
        return delta(model)

    exact = sgd_step(copy.deepcopy(start), [window])  # the whole window as one batch
    naive = sgd_step(copy.deepcopy(start), [window[:9], window[9:17], window[17:]])

    model = copy.deepcopy(start)
    fitted = autoaccum.fit(
        model,
        DataLoader(window, batch_size=25, collate_fn=collator),
        target_batch=25,
        max_micro=9,  # 9 + 8 + 8
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        progress=False,
        report=False,
    )
    through_fit = delta(model)

    def error(update: list[torch.Tensor]) -> float:
        diff = sum(float(((u - e) ** 2).sum()) for u, e in zip(update, exact, strict=True))
        return (diff / sum(float((e**2).sum()) for e in exact)) ** 0.5

    print(f"float64 check, {fitted.plan.describe()}:")
    print(f"  fit's step against the whole window's: relative error {error(through_fit):.1e}")
    print(f"  loss / accum_iter against the same:    relative error {error(naive):.1e}")
    if not error(through_fit) < 1e-6 < 1e-3 < error(naive):
        raise SystemExit("unexpected: fit's step is not the whole window's")


if __name__ == "__main__":
    main()

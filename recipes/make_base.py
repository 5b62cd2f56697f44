"""Train the embedded base model of the recipe: a small character-level Llama, saved like any hub model.

Run ``python recipes/make_base.py`` (seeded: seed 0, CPU, float32, one thread; 13 minutes on a busy 2-core
machine). It

1. builds a character-level tokenizer with the ``tokenizers`` library (one token per printable ASCII character
   and newline, plus ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; ``<s>`` is prepended like Llama's tokenizer does)
   and wraps it as a ``PreTrainedTokenizerFast``;
2. builds a ``LlamaForCausalLM`` from a ``LlamaConfig`` (3 layers, hidden 128, 4 heads, tied embeddings,
   about 0.5 M parameters) and pre-trains it on the corpus of ``recipes/make_data.py`` (free text plus the
   ``Copy <word>`` and ``Reverse <word>`` instructions, never the ``Encode`` task of the fine-tuning data);
3. saves it with ``save_pretrained`` to ``recipes/assets/base/`` (``config.json``, ``model.safetensors``,
   ``generation_config.json``, tokenizer files), the same layout as a model downloaded from the hub, so the
   recipe loads it through ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

It prints the held-out loss and the greedy exact match of the Copy and Reverse instructions.
"""

from __future__ import annotations

import math
import string
import time

import torch

import make_data

OUT = make_data.ASSETS / "base"
SEED = 0
STEPS = 1500
BATCH = 64
LR = 3e-3
N_LINES = 60_000
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (one token per character; decoding concatenates)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="right", model_max_length=128)


def build_model(vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(SEED)
    return LlamaForCausalLM(cfg)


def batches(tokenizer, lines: list[str], batch: int):
    for i in range(0, len(lines) - batch + 1, batch):
        enc = tokenizer([t + tokenizer.eos_token for t in lines[i:i + batch]], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield enc["input_ids"], enc["attention_mask"], labels


@torch.no_grad()
def heldout_loss(model, tokenizer, lines: list[str]) -> float:
    model.eval()
    losses = [float(model(input_ids=x, attention_mask=m, labels=y).loss) for x, m, y in batches(tokenizer, lines, 100)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def instruction_accuracy(model, tokenizer, verb: str, n: int = 200) -> float:
    import random

    rng, weights = random.Random(99), make_data.letter_weights()
    words = [make_data.random_word(rng, weights) for _ in range(n)]
    want = {"Copy": lambda w: w, "Reverse": lambda w: w[::-1], "Encode": make_data.encode}[verb]
    prompts = [make_data.PROMPT.format(question=f"{verb} {w}") + "#### " for w in words]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    model.eval()
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train()
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip() == want(w) for t, w in zip(texts, words)) / n


def main() -> None:
    torch.set_num_threads(1)  # one core, leaving the other to concurrent jobs
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    lines = make_data.corpus_lines(N_LINES)
    heldout, lines = lines[:1000], lines[1000:]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
    print(f"base model: {n_params:,} parameters; {len(lines)} training lines; {STEPS} steps of {BATCH}")
    print(f"initial held-out loss {heldout_loss(model, tokenizer, heldout):.3f}")
    model.train()
    step, t0 = 0, time.time()
    g = torch.Generator().manual_seed(SEED)
    while step < STEPS:
        order = torch.randperm(len(lines), generator=g).tolist()
        for x, m, y in batches(tokenizer, [lines[i] for i in order], BATCH):
            loss = model(input_ids=x, attention_mask=m, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad()
            step += 1
            if step % 100 == 0:
                print(f"step {step}: train loss {float(loss):.3f} ({time.time() - t0:.0f} s)", flush=True)
            if step >= STEPS:
                break
    print(f"held-out loss {heldout_loss(model, tokenizer, heldout):.3f}")
    for verb in ("Copy", "Reverse", "Encode"):
        print(f"greedy exact match, {verb}: {100 * instruction_accuracy(model, tokenizer, verb):.1f}%")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    print(f"saved to {OUT}")


if __name__ == "__main__":
    main()

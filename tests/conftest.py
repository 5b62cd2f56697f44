"""Shared fixtures: tiny transformers models built from configs (no download), seeded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).to(dtype).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session", autouse=True)
def _tests_leave_the_repository_clean():
    """Tests write into temp dirs only: a run must not leave adapters or logs in the repository root."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    watched = ("matlora_adapter", "lightning_logs", "checkpoints")
    before = {name for name in watched if (root / name).exists()}
    yield
    after = {name for name in watched if (root / name).exists()}
    assert after <= before, f"tests wrote {sorted(after - before)} into {root}: give Trainers a tmp default_root_dir"

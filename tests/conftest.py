"""Shared fixtures: tiny random LLaMA models built from a config (fast, offline, real HF code paths)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests must never touch the user's real cache or a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_LAYERS = 8


def build_tiny_llama(num_layers: int = TINY_LAYERS, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def build_tiny_tokenizer():
    """A real byte-level `PreTrainedTokenizerFast` (256 byte tokens + specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for symbol in sorted(alphabet):
        if len(vocab) >= 256:
            break
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<0>", bos_token="<1>", eos_token="<2>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


def save_tiny_model(path: Path, num_layers: int = TINY_LAYERS, seed: int = 0) -> Path:
    model = build_tiny_llama(num_layers, seed)
    model.save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random LLaMA (8 layers, hidden 64) with a byte-level tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own PRUFED_CACHE unless one is set for the real default model."""
    if "PRUFED_TEST_CACHE" in os.environ:
        monkeypatch.setenv("PRUFED_CACHE", os.environ["PRUFED_TEST_CACHE"])
    else:
        monkeypatch.setenv("PRUFED_CACHE", str(tmp_path_factory.getbasetemp() / "prufed-cache"))


# ---- databases: every store / round / fault / concurrency test runs on SQLite and on a real PostgreSQL --------------
@pytest.fixture(scope="session")
def postgres_cluster():
    """One throwaway PostgreSQL cluster per test worker (127.0.0.1 + unix socket), stopped at the end.

    Missing server binaries fail the tests that need them, with the Debian package's name: never a quiet skip."""
    from postgres_cluster import PostgresCluster, PostgresMissing

    try:
        cluster = PostgresCluster.start()
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.stop()


_DB_COUNTER = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database URL: a SQLite file in tmp_path, or a new database in the session's PostgreSQL."""
    return request.getfixturevalue("new_db")("agg")


@pytest.fixture
def new_db(request, tmp_path):
    """`new_db(name) -> URL` of another fresh database on the same back end as `db_url` (SQLite by default)."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("db_url", "sqlite") if callspec else "sqlite"
    cluster = request.getfixturevalue("postgres_cluster") if backend == "postgresql" else None

    def make(name: str) -> str:
        if cluster is None:
            return f"sqlite:///{tmp_path / name}.db"
        return cluster.create_database(f"t{os.getpid()}_{next(_DB_COUNTER)}")

    return make

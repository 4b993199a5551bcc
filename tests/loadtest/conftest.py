"""Fixtures of the load-test suite: local fake servers and tokenizers, nothing remote."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loadtest.local.fakeserver import FakeOpenAIServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat",
    "Prometheus scrapes metrics from the gateway every few seconds and stores them",
    "grouped query attention shares each key and value head across several query heads",
]


class RawTokenizer:
    """A ``tokenizers`` tokenizer with the encode/decode surface of transformers'."""

    def __init__(self, tokenizer: Tokenizer, bos: str | None = None, chat: bool = False) -> None:
        self._tk = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self._bos = tokenizer.token_to_id(bos) if bos else None
        self.all_special_ids = [
            i
            for i in (tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
            if i is not None
        ]
        self.chat_template = "chatml-like" if chat else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self._bos, *ids] if add_special_tokens and self._bos is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool) -> str:
        assert not tokenize
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _bpe() -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(_CORPUS * 20, trainer)
    return tk


@pytest.fixture(scope="session")
def bpe_tokenizer() -> RawTokenizer:
    """Byte-level BPE (like GPT-2/SmolLM2): decode/encode is not the identity."""
    return RawTokenizer(_bpe(), bos="<|endoftext|>")


@pytest.fixture(scope="session")
def bpe_chat_tokenizer() -> RawTokenizer:
    return RawTokenizer(_bpe(), chat=True)


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Hugging Face tokenizer folder (word level: one token per whitespace word,
    as the fake server counts), loadable offline with AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(500)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"]
    )
    fast.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("word-tokenizer")
    fast.save_pretrained(str(folder))
    return folder


@contextmanager
def _running(server: FakeOpenAIServer) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="session")
def serve() -> Callable[[FakeOpenAIServer], AbstractContextManager[str]]:
    """``with serve(FakeOpenAIServer(...)) as base_url:`` runs it on 127.0.0.1 in a thread."""
    return _running

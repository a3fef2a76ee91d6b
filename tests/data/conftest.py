"""Fixtures for the data tests: a tiny locally trained tokenizer and JSON-lines writers."""

from __future__ import annotations

import json
import os
import tempfile

# datasets caches parquet/CSV conversions; keep them out of the user's cache.
os.environ.setdefault(
    "HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "jaxft-test-hf-datasets")
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from jaxft.data.synthetic import tiny_tokenizer

    return tiny_tokenizer(vocab_size=1024)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="rows.jsonl"):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(r if isinstance(r, str) else json.dumps(r))
                f.write("\n")
        return str(path)

    return write

"""Make the demo dataset with nothing downloaded: text, a tokenizer, a Megatron indexed dataset.

The text is the documentation that ships inside Python itself (docstrings of the standard
library), so every machine can rebuild the same kind of corpus offline. A small byte-level
BPE is trained on it with Hugging Face ``tokenizers`` and the documents are written with
megatron-core's ``IndexedDatasetBuilder``, the format real pre-training data uses.

    python -m tools.demo_data runs/demo-data
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

EOD_TOKEN = "<|endoftext|>"
DATASET_NAME = "demo_text_document"
# Packages whose import has side effects (GUI, test runners, the antigravity web browser).
_SKIP_PREFIXES = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3",
                  "ensurepip", "venv", "pydoc_data", "__")


def stdlib_docstrings(min_chars: int = 200) -> Iterator[str]:
    """Module, class and function docstrings of the standard library, in a stable order."""
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name.startswith(_SKIP_PREFIXES):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # platform-specific modules (winreg, msvcrt...) are simply absent
            continue
        objects = [module] + [obj for _, obj in sorted(vars(module).items())
                              if (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == name]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars:
                yield doc


def write_corpus(path: Path) -> int:
    count = 0
    with path.open("w") as f:
        for doc in stdlib_docstrings():
            f.write(json.dumps({"text": doc}) + "\n")
            count += 1
    return count


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = (json.loads(line)["text"] for line in corpus.open())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(out))


def write_indexed_dataset(corpus: Path, tokenizer_path: Path, prefix: Path) -> int:
    """Each document is its tokens followed by end-of-document (tools.prepare_data's format)."""
    from tools.prepare_data import prepare as prepare_dataset
    from tools.text_filters import Options

    report = prepare_dataset([corpus], tokenizer_path, prefix, Options(), workers=1)
    return report["total"]["tokens"]


def prepare(out_dir: Path, vocab_size: int = 512) -> Path:
    """Build whatever is missing under ``out_dir``; returns the dataset prefix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, prefix = out_dir / "corpus.jsonl", out_dir / "tokenizer.json", out_dir / DATASET_NAME
    if not corpus.exists():
        print(f"demo data: collecting documents into {corpus}", flush=True)
        print(f"demo data: {write_corpus(corpus)} documents", flush=True)
    if not tokenizer.exists():
        print(f"demo data: training a {vocab_size}-token BPE tokenizer", flush=True)
        train_tokenizer(corpus, tokenizer, vocab_size)
    if not Path(f"{prefix}.idx").exists():
        print(f"demo data: tokenized {write_indexed_dataset(corpus, tokenizer, prefix):,} tokens "
              f"into {prefix}.bin/.idx", flush=True)
    return prefix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()
    prepare(args.out_dir, args.vocab_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())

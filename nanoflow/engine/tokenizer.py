"""Loading the tokenizer, with an error that says what is missing and the two ways out.

A checkpoint folder without tokenizer files otherwise fails deep inside transformers, with a message
about installing sentencepiece or tiktoken that points the wrong way. As in vLLM, the tokenizer may
come from another folder (`tokenizer=PATH`, `--tokenizer PATH`), or be skipped altogether
(`skip_tokenizer_init=True`, `--skip-tokenizer-init`): prompts are then token ids and outputs carry
token ids with empty text.
"""

from __future__ import annotations

import glob
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Any one of these (or a pair, for GPT-2 style BPE) is something AutoTokenizer can build from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.txt")
TOKENIZER_FILE_PAIRS = (("vocab.json", "merges.txt"),)
TOKENIZER_GLOBS = ("*.tiktoken",)


def load_tokenizer(model: str, tokenizer: str | None, skip_tokenizer_init: bool) -> PreTrainedTokenizerBase | None:
    """The tokenizer of `tokenizer or model`, or None when `skip_tokenizer_init`. Raises ValueError
    naming the folder, the files looked for and the two ways out when there is none."""
    if skip_tokenizer_init:
        return None
    source = tokenizer or model
    if os.path.isdir(source) and not has_tokenizer_files(source):
        raise ValueError(_no_tokenizer_message(source, tokenizer is not None))
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # transformers raises ValueError, OSError, ImportError, ... by case
        raise ValueError(f"{_no_tokenizer_message(source, tokenizer is not None)}\n"
                         f"(transformers said: {type(e).__name__}: {e})") from e


def has_tokenizer_files(folder: str) -> bool:
    if any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return True
    if any(all(os.path.isfile(os.path.join(folder, f)) for f in pair) for pair in TOKENIZER_FILE_PAIRS):
        return True
    return any(glob.glob(os.path.join(glob.escape(folder), g)) for g in TOKENIZER_GLOBS)


def _looked_for() -> str:
    return ", ".join([*TOKENIZER_FILES, *(" + ".join(pair) for pair in TOKENIZER_FILE_PAIRS), *TOKENIZER_GLOBS])


def _no_tokenizer_message(source: str, explicit: bool) -> str:
    what = "the tokenizer folder given" if explicit else "the model folder"
    return (f"could not load a tokenizer from {source!r} ({what}): looked for {_looked_for()}. "
            "Either name a folder that holds the model's tokenizer (LLM(..., tokenizer=PATH), or "
            "--tokenizer PATH on the command line), or run without one (skip_tokenizer_init=True, or "
            "--skip-tokenizer-init) and send prompts as token ids, e.g. {'prompt_token_ids': [1, 2, 3]}.")

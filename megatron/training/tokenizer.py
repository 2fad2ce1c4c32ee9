"""Tokenizers shared by the training driver and the data tools.

Each class follows the interface megatron-core's datasets use (`vocab_size`,
`eod`) plus `tokenize(text) -> list[int]`, `tokenize_batch(texts)` (the data
tools' fast path) and `detokenize(ids)`. Token ids are the same as
Megatron-LM's tokenizers of the same name produce, so data prepared by either
tool trains with either driver.

`build_tokenizer(tokenizer_type, ...)` picks the class from `TOKENIZERS`, a
table keyed by Megatron-LM's `--tokenizer-type` names.
"""

import os
from typing import Dict, List, Optional, Sequence


class TokenizerError(ValueError):
    pass


class Llama2Tokenizer:
    """A sentencepiece `.model` file, Llama 2 conventions: BOS before each text,
    EOS as end-of-document (Megatron-LM's `Llama2Tokenizer`)."""

    def __init__(self, tokenizer_model: str):
        import sentencepiece

        _require_file(tokenizer_model, "--tokenizer-model", "a sentencepiece tokenizer.model file")
        self.model_path = tokenizer_model
        self._sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
        self.bos = self._sp.bos_id()
        self.eos = self._sp.eos_id()
        self.pad = self._sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eod(self) -> int:
        return self.eos

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids = self._sp.encode(text)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [[self.bos] + ids for ids in self._sp.encode(list(texts))]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class SentencePieceTokenizer(Llama2Tokenizer):
    """A plain sentencepiece model without an implicit BOS."""

    def tokenize(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        return super().tokenize(text, bos=bos, eos=eos)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts))


class HuggingFaceTokenizer:
    """Any tokenizer `transformers.AutoTokenizer` loads from a local directory
    (or a tokenizer.json file). Special tokens are added as the tokenizer's own
    configuration says, like Megatron-LM's `HuggingFaceTokenizer`."""

    def __init__(self, tokenizer_model: str):
        _require_path(tokenizer_model, "--tokenizer-model", "an HF tokenizer directory or tokenizer.json")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        self.model_path = tokenizer_model
        if os.path.isfile(tokenizer_model):
            self._tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_model)
        else:
            self._tok = AutoTokenizer.from_pretrained(tokenizer_model, local_files_only=True)
        self.bos = self._tok.bos_token_id
        self.eos = self._tok.eos_token_id
        self.pad = self._tok.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        if self.eos is None:
            raise TokenizerError(
                f"the tokenizer at {self.model_path} has no eos_token, which marks the end of a "
                "document: set eos_token in its tokenizer_config.json"
            )
        return self.eos

    @property
    def hf_tokenizer(self):
        return self._tok

    def tokenize(self, text: str) -> List[int]:
        return self._tok(text).input_ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._tok(list(texts)).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE from `--vocab-file` (vocab.json) and `--merge-file`
    (merges.txt); `<|endoftext|>` ends a document."""

    def __init__(self, vocab_file: str, merge_file: str):
        _require_file(vocab_file, "--vocab-file", "a GPT-2 vocab.json")
        _require_file(merge_file, "--merge-file", "a GPT-2 merges.txt")
        from transformers import GPT2TokenizerFast

        self._tok = GPT2TokenizerFast(vocab_file=vocab_file, merges_file=merge_file)
        self.eos = self._tok.convert_tokens_to_ids("<|endoftext|>")
        self.bos = self.eos
        self.pad = None

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self.eos

    def tokenize(self, text: str) -> List[int]:
        return self._tok(text).input_ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._tok(list(texts)).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


class NullTokenizer:
    """Text is already token ids separated by spaces; `--vocab-size V` ids plus
    one end-of-document id V (Megatron-LM's `NullTokenizer`)."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or vocab_size <= 0:
            raise TokenizerError("NullTokenizer needs --vocab-size N (the number of token ids in the data)")
        self._vocab = int(vocab_size)
        self.bos = None
        self.pad = None
        self.eos = self._vocab

    @property
    def vocab_size(self) -> int:
        return self._vocab + 1

    @property
    def eod(self) -> int:
        return self.eos

    def tokenize(self, text: str) -> List[int]:
        return [int(t) for t in text.split()]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids)


TOKENIZERS: Dict[str, type] = {
    "Llama2Tokenizer": Llama2Tokenizer,
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "GPT2BPETokenizer": GPT2BPETokenizer,
    "NullTokenizer": NullTokenizer,
}


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
):
    """Build the tokenizer named by a Megatron-LM `--tokenizer-type`."""
    if tokenizer_type not in TOKENIZERS:
        raise TokenizerError(
            f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZERS)}"
        )
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if not tokenizer_model:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH")
    return TOKENIZERS[tokenizer_type](tokenizer_model)


def _require_path(path: Optional[str], flag: str, what: str) -> None:
    if not path:
        raise TokenizerError(f"{flag} is required: give {what}")
    if not os.path.exists(path):
        raise TokenizerError(f"{flag} {path} does not exist: give {what}")


def _require_file(path: Optional[str], flag: str, what: str) -> None:
    _require_path(path, flag, what)
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path} is not a file: give {what}")

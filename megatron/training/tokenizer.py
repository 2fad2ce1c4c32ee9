"""Tokenizers shared by the training driver and the data tools.

Each class follows the interface megatron-core's datasets use (`vocab_size`,
`eod`) plus `tokenize(text) -> list[int]`, `tokenize_batch(texts)` (the data
tools' fast path) and `detokenize(ids)`. Token ids are the same as
Megatron-LM's tokenizers of the same name produce, so data prepared by either
tool trains with either driver.

Megatron-LM has two tokenizer systems and they disagree on special tokens:
- `legacy=True` (the default here): `megatron/training/tokenizer`, what
  Megatron-LM's training driver uses and what its `preprocess_data.py` uses
  with `--legacy-tokenizer`. Llama2Tokenizer puts BOS before every text,
  HuggingFaceTokenizer adds the special tokens its configuration asks for,
  SentencePieceTokenizer appends <CLS> <SEP> <EOD> <MASK> (and pad/bos/eos
  when missing) to the vocabulary and ends documents with <EOD>.
- `legacy=False`: `megatron.core.tokenizers`, what Megatron-LM's
  `preprocess_data.py` uses by default: plain sentencepiece / HF ids with no
  special tokens added, EOS ends a document.

`build_tokenizer(tokenizer_type, ...)` picks the class from `TOKENIZERS`, a
table keyed by Megatron-LM's `--tokenizer-type` names.
"""

import json
import os
import re
from typing import Dict, List, Optional, Sequence

from megatron.training.errors import UserError


class TokenizerError(UserError, ValueError):
    pass


class TokenizerInputError(TokenizerError):
    """A text this tokenizer cannot encode (NullTokenizer: not ids in [0, --vocab-size));
    the data tools skip and count such a line, as any other bad line."""


class _TokenizerBase:
    """What megatron-core's datasets read besides vocab_size and eod: a
    description for their cache hash, and a pad id (-1: none, never in data)."""

    _pad = None

    @property
    def pad(self) -> int:
        return -1 if self._pad is None or self._pad < 0 else self._pad

    @pad.setter
    def pad(self, value) -> None:
        self._pad = value

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "model": getattr(self, "model_path", None),
                "vocab_size": self.vocab_size}


class Llama2Tokenizer(_TokenizerBase):
    """A sentencepiece `.model` file, Llama 2 conventions: EOS ends a document;
    with `legacy=True` BOS goes before each text (Megatron-LM's
    `Llama2Tokenizer`), with `legacy=False` no special token is added."""

    def __init__(self, tokenizer_model: str, legacy: bool = True):
        import sentencepiece

        _require_file(tokenizer_model, "--tokenizer-model", "a sentencepiece tokenizer.model file")
        self.model_path = tokenizer_model
        self.legacy = legacy
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

    def tokenize(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> List[int]:
        bos = self.legacy if bos is None else bos
        ids = self._sp.encode(text)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # one thread: the data tools parallelize with worker processes
        batch = self._sp.encode(list(texts), num_threads=1)
        return [[self.bos] + ids for ids in batch] if self.legacy else batch

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class SentencePieceTokenizer(Llama2Tokenizer):
    """A plain sentencepiece model, no implicit BOS. With `legacy=True`
    (Megatron-LM's `SentencePieceTokenizer`) the special tokens <CLS> <SEP>
    <EOD> <MASK>, pad, bos and eos get ids (appended after the model's pieces
    when the model lacks them), <EOD> ends a document, and those strings in
    the text become their ids."""

    def __init__(self, tokenizer_model: str, legacy: bool = True):
        super().__init__(tokenizer_model, legacy=legacy)
        self._specials: Dict[str, int] = {}
        if legacy:
            self._add_legacy_specials()

    def _add_legacy_specials(self) -> None:
        n = self._sp.get_piece_size()

        def piece_or(idx: int, fallback: str) -> str:
            return self._sp.id_to_piece(idx) if 0 <= idx < n else fallback

        names = ["<CLS>", "<SEP>", "<EOD>", "<MASK>", piece_or(self.pad, "<PAD>"),
                 piece_or(self.bos, "<BOS>"), piece_or(self.eos, "<EOS>")]
        extra = 0
        for name in names:
            if name in self._specials:
                continue
            idx = self._sp.piece_to_id(name)
            if self._sp.id_to_piece(idx) != name:  # unknown piece: appended after the vocabulary
                idx = n + extra
                extra += 1
            self._specials[name] = idx
        self._legacy_vocab_size = n + extra
        self.pad = self._specials[names[4]]
        self.bos = self._specials[names[5]]
        self.eos = self._specials[names[6]]
        # leftmost match, ties to the earliest-added token, as Megatron-LM's scan does
        self._special_re = re.compile("|".join(re.escape(t) for t in self._specials))

    @property
    def vocab_size(self) -> int:
        return self._legacy_vocab_size if self.legacy else self._sp.vocab_size()

    @property
    def eod(self) -> int:
        return self._specials["<EOD>"] if self.legacy else self.eos

    def tokenize(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        if not self.legacy:
            return super().tokenize(text, bos=bos, eos=eos)
        ids: List[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids.extend(self._sp.encode(text[start:m.start()]))
            ids.append(self._specials[m.group()])
            start = m.end()
        ids.extend(self._sp.encode(text[start:]))
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self.legacy:
            return [self.tokenize(t) for t in texts]
        return self._sp.encode(list(texts), num_threads=1)


class HuggingFaceTokenizer(_TokenizerBase):
    """Any tokenizer `transformers.AutoTokenizer` loads from a local directory
    (or a tokenizer.json file). With `legacy=True` special tokens are added as
    the tokenizer's own configuration says (Megatron-LM's
    `HuggingFaceTokenizer`); with `legacy=False` none are (megatron-core's).

    With `legacy=False` and a directory holding tokenizer.json, the `tokenizers`
    library is used directly: the same ids without importing transformers
    (which takes seconds), so the data tools start fast."""

    def __init__(self, tokenizer_model: str, legacy: bool = True):
        _require_path(tokenizer_model, "--tokenizer-model", "an HF tokenizer directory or tokenizer.json")
        self.model_path = tokenizer_model
        self.legacy = legacy
        self._tok = None
        self._fast = None if legacy else _load_plain_tokenizers(tokenizer_model)
        if self._fast is not None:
            self._backend, self.bos, self.eos, self.pad = self._fast
            self._len = self._backend.get_vocab_size(with_added_tokens=True)
        else:
            tok = self.hf_tokenizer
            self._backend = getattr(tok, "_tokenizer", None)
            self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
            self._len = len(tok)

    @property
    def hf_tokenizer(self):
        """The `transformers` tokenizer (loaded on first use)."""
        if self._tok is None:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast

            if os.path.isfile(self.model_path):
                self._tok = PreTrainedTokenizerFast(tokenizer_file=self.model_path)
            else:
                self._tok = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._len

    @property
    def eod(self) -> int:
        if self.eos is None:
            raise TokenizerError(
                f"the tokenizer at {self.model_path} has no eos_token, which marks the end of a "
                "document: set eos_token in its tokenizer_config.json"
            )
        return self.eos

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self._backend is not None and (self._fast is not None or not self.legacy):
            # encode_batch_fast skips offsets; the ids are the same
            encs = self._backend.encode_batch_fast(list(texts), add_special_tokens=self.legacy)
            return [e.ids for e in encs]
        return self.hf_tokenizer(list(texts), add_special_tokens=self.legacy).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        if self._fast is not None:
            return self._backend.decode(list(ids), skip_special_tokens=False)
        return self.hf_tokenizer.decode(list(ids))

    @property
    def special_ids(self) -> set:
        """The ids of the tokenizer's special tokens (BOS, EOS, chat-template markers such as <|eot_id|>)."""
        if self._fast is not None:
            return {i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}
        return set(self.hf_tokenizer.all_special_ids)

    # What BERT-family models and megatron-core's masked-LM dataset read: the
    # tokenizer's own special tokens (transformers' view of its configuration).
    @property
    def cls(self) -> Optional[int]:
        return self.hf_tokenizer.cls_token_id

    @property
    def sep(self) -> Optional[int]:
        return self.hf_tokenizer.sep_token_id

    @property
    def mask(self) -> Optional[int]:
        return self.hf_tokenizer.mask_token_id

    @property
    def inv_vocab(self) -> Dict[int, str]:
        """id -> token string, added tokens included."""
        if self._backend is not None:
            vocab = self._backend.get_vocab(with_added_tokens=True)
        else:
            vocab = self.hf_tokenizer.get_vocab()
        return {i: t for t, i in vocab.items()}


def _load_plain_tokenizers(path: str):
    """(tokenizers.Tokenizer, bos, eos, pad) read without transformers, or None
    when the directory needs transformers to be read the same way."""
    tj = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        return None
    config = {}
    cfg_path = os.path.join(os.path.dirname(tj), "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tj)
    ids = []
    for name in ("bos_token", "eos_token", "pad_token"):
        token = config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        idx = tok.token_to_id(token) if token else None
        if token and idx is None:
            return None  # transformers would add it to the vocabulary: let it
        ids.append(idx)
    return (tok, *ids)


class _TokenizersLibrary:
    """tokenize / tokenize_batch / detokenize on a `tokenizers.Tokenizer` in
    `self._tok`, adding no special token."""

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


class GPT2BPETokenizer(_TokenizersLibrary, _TokenizerBase):
    """GPT-2 byte-level BPE from `--vocab-file` (vocab.json) and `--merge-file`
    (merges.txt); `<|endoftext|>` ends a document; no special token is added
    to a text (Megatron-LM's `GPT2BPETokenizer`, in both systems). Built with
    the `tokenizers` library: GPT-2's byte-level pre-tokenizer and merges."""

    def __init__(self, vocab_file: str, merge_file: str, legacy: bool = True):
        _require_file(vocab_file, "--vocab-file", "a GPT-2 vocab.json")
        _require_file(merge_file, "--merge-file", "a GPT-2 merges.txt")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self._tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self.eos = self._tok.token_to_id("<|endoftext|>")
        if self.eos is None:
            raise TokenizerError(f"--vocab-file {vocab_file} has no <|endoftext|> token: give GPT-2's vocab.json")
        self.bos = self.eos
        self.pad = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eod(self) -> int:
        return self.eos


class BertWordPieceTokenizer(_TokenizersLibrary, _TokenizerBase):
    """Google BERT's WordPiece `vocab.txt` (`--vocab-file`), Megatron-LM's
    `BertWordPieceLowerCase` / `BertWordPieceCase`: BERT's normaliser (lower
    case and accents stripped, or neither), its punctuation pre-tokenizer and
    greedy longest-match WordPiece, as transformers' BertTokenizer. No special
    token is added to a text (the BERT dataset adds [CLS] and [SEP]).
    Megatron-LM also appends [BOS] and [EOS] to the vocabulary; they are never
    produced by tokenizing, so here vocab_size is the file's size (that of the
    Hugging Face model) and every token has the same id as in Megatron-LM."""

    def __init__(self, vocab_file: str, lower_case: bool = True, legacy: bool = True):
        _require_file(vocab_file, "--vocab-file", "a BERT WordPiece vocab.txt")
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        with open(vocab_file, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab = {t: i for i, t in enumerate(tokens) if t}
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]") if t not in self.vocab]
        if missing:
            raise TokenizerError(f"--vocab-file {vocab_file} lacks {', '.join(missing)}: give a BERT vocab.txt")
        self.model_path = vocab_file
        self.lower_case = lower_case
        self._tok = Tokenizer(models.WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        self._tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case)
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok.decoder = decoders.WordPiece()
        self.cls, self.sep, self.mask, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[MASK]", "[UNK]"))
        self.pad = self.vocab["[PAD]"]
        self.bos = self.eos = None
        self._hf = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def unique_identifiers(self) -> dict:
        return dict(super().unique_identifiers, lower_case=self.lower_case)

    @property
    def eod(self) -> int:
        raise TokenizerError("a BERT WordPiece vocabulary has no end-of-document token: prepare BERT data with "
                             "--split-sentences and without --append-eod")

    @property
    def hf_tokenizer(self):
        """transformers' BertTokenizerFast on the same vocab.txt (pair encoding, export)."""
        if self._hf is None:
            from transformers import BertTokenizerFast

            self._hf = BertTokenizerFast(self.model_path, do_lower_case=self.lower_case)
        return self._hf


class NullTokenizer(_TokenizerBase):
    """Text is already token ids separated by spaces; `--vocab-size V` ids plus
    one end-of-document id V (Megatron-LM's `NullTokenizer`)."""

    def __init__(self, vocab_size: int, legacy: bool = True):
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
        """The ids written in `text`; TokenizerInputError for anything but
        whole numbers in [0, --vocab-size) (the end-of-document id is added
        by --append-eod, not read from the text)."""
        ids = []
        for t in text.split():
            try:
                ids.append(int(t))
            except ValueError:
                raise TokenizerInputError(f"{t[:20]!r} is not a token id")
        if ids and not 0 <= min(ids) <= max(ids) < self._vocab:
            bad = next(i for i in ids if not 0 <= i < self._vocab)
            raise TokenizerInputError(f"token id {bad} is outside [0, --vocab-size {self._vocab})")
        return ids

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
    "BertWordPieceLowerCase": BertWordPieceTokenizer,
    "BertWordPieceCase": BertWordPieceTokenizer,
}


def add_tokenizer_file_flags(group) -> None:
    """The files (and size) a --tokenizer-type reads, as the data tools take them."""
    group.add_argument("--tokenizer-model", help="sentencepiece .model, or HF tokenizer directory")
    group.add_argument("--vocab-file", help="GPT2BPETokenizer vocab.json, or BertWordPiece* vocab.txt")
    group.add_argument("--merge-file", help="GPT2BPETokenizer merges.txt")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer: number of token ids")


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
    legacy: bool = True,
):
    """Build the tokenizer named by a Megatron-LM `--tokenizer-type`;
    `legacy` picks which of Megatron-LM's two systems to match (module doc)."""
    if tokenizer_type not in TOKENIZERS:
        raise TokenizerError(
            f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZERS)}"
        )
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size, legacy=legacy)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, legacy=legacy)
    if TOKENIZERS[tokenizer_type] is BertWordPieceTokenizer:
        return BertWordPieceTokenizer(vocab_file, lower_case=tokenizer_type.endswith("LowerCase"), legacy=legacy)
    if not tokenizer_model:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH")
    return TOKENIZERS[tokenizer_type](tokenizer_model, legacy=legacy)


def tokenizer_and_vocab_size(args):
    """(tokenizer, vocab size) for a run's flags, as the training driver and
    the planner both read them: with --tokenizer-type, that tokenizer (built
    with --vocab-size, which NullTokenizer extends by its end-of-document id)
    and its vocab_size; without one, (None, --vocab-size)."""
    if args.tokenizer_type is None:
        return None, args.vocab_size
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                                args.vocab_size)
    return tokenizer, tokenizer.vocab_size


def model_vocabulary(vocab_size: int, saved: Dict) -> int:
    """The vocabulary of a checkpoint's model (its recorded args `saved`) for
    a tokenizer of `vocab_size` tokens: the tokenizer's, except for a
    converted model whose config.json vocab_size (recorded as --vocab-size,
    and as unpadded_vocab_size where recorded) is larger: Qwen2.5-7B has
    152,064 embedding rows for a tokenizer of 151,665 (Llama 3's 128,256 are
    its tokenizer's). Those rows are the model's, not padding: they stay in
    the softmax, as transformers keeps them (its softmax spans
    config.vocab_size); no token id reaches them."""
    model = saved.get("vocab_size")
    if model is not None and model > vocab_size and saved.get("unpadded_vocab_size") in (None, model):
        return model
    return vocab_size


def _require_path(path: Optional[str], flag: str, what: str) -> None:
    if not path:
        raise TokenizerError(f"{flag} is required: give {what}")
    if not os.path.exists(path):
        raise TokenizerError(f"{flag} {path} does not exist: give {what}")


def _require_file(path: Optional[str], flag: str, what: str) -> None:
    _require_path(path, flag, what)
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path} is not a file: give {what}")

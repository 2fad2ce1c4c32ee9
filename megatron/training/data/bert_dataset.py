"""Masked-LM pretraining data for BERT-family models: megatron-core's
`BERTMaskedWordPieceDataset` over sentence-split indexed datasets
(tools/preprocess_data.py --split-sentences), with what it gets wrong fixed.

megatron-core's dataset is right about sampling (sentence runs up to
--seq-length, --short-seq-prob, segment pairs for sentence-order prediction),
masking (--mask-prob of the tokens, n-grams of up to --masking-max-ngram
words, 80% [MASK] / 10% random / 10% kept, [CLS] and [SEP] never masked) and
determinism (the mask of sample i depends on --seed + i only, and a sample of
a later epoch has another index, hence another mask). Fixed here:

- pad id != 0 (RoBERTa's <pad> = 1): it rewrites pads to id 0 (RoBERTa's <s>)
  and leaves the padding mask at 1 there. It pads with a sentinel here; pads
  get the tokenizer's pad id and a padding mask of 0, their token type 0.
- word starts: it only knows WordPiece's "##" continuation mark, and joins a
  segment's first piece to the previous segment's last word. Word starts are
  decided per position here (`WordStarts`): a piece after [CLS] / [SEP], the
  first piece of every sentence, a special token, and a piece that the
  vocabulary's convention marks ("##" continues a word; byte-level BPE "Ġ"
  and sentencepiece "▁" start one). megatron-core's masking then runs
  unchanged on that decision (`_create_masked_lm_predictions`).
- the number of masked tokens: megatron-core caps it at mask_prob x
  (seq_length - 3), which masks 18 of a full 128-token sample (14.1%) at
  0.15; here the cap is mask_prob x seq_length, so a sample gets
  round(mask_prob x its tokens), Google BERT's and Megatron-LM's count.
- documents it cannot use are dropped silently, and with the binary head on
  single-sentence data it loops forever looking for samples: every split is
  counted first (`count_documents`); a split with no usable document is an
  error naming the fix, and the dropped documents are reported.
"""

import dataclasses
from typing import Dict, Optional

import numpy

from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.utils import get_blend_from_list

from megatron.training.bert.arguments import LONG_SENTENCE_TOKENS
from megatron.training.data.pretrain import DataError, check_prefix, train_valid_test_num_samples

_PAD_SENTINEL = -1  # never a token id: marks the padding megatron-core adds

# Vocabulary conventions: (marker, True if the marker starts a word / False if it continues one).
CONVENTIONS = {"wordpiece": ("##", False), "byte-level BPE": ("\u0120", True), "sentencepiece": ("\u2581", True)}


class WordStarts:
    """Which vocabulary pieces start a word, by the vocabulary's convention
    (the marker most of its pieces carry; no marker: every piece is a word)."""

    def __init__(self, inv_vocab: Dict[int, str], special_ids):
        size = max(inv_vocab) + 1
        counts = {name: sum(t.startswith(marker) for t in inv_vocab.values())
                  for name, (marker, _) in CONVENTIONS.items()}
        self.convention = max(counts, key=counts.get) if max(counts.values()) else None
        self.starts = numpy.ones(size, dtype=bool)
        if self.convention is not None:
            marker, marks_start = CONVENTIONS[self.convention]
            for i, token in inv_vocab.items():
                self.starts[i] = token.startswith(marker) == marks_start
        self.starts[[i for i in special_ids if i is not None and 0 <= i < size]] = True

    def __len__(self) -> int:
        return len(self.starts)


class MaskingVocabulary:
    """The tokenizer as megatron-core's masked dataset reads it: special ids,
    and `inv_vocab`, which it only asks whether a piece continues a word. Here
    that question is answered per position: ids at or above `offset` are
    continuation pieces (id + offset), all others start a word."""

    def __init__(self, tokenizer, word_starts: WordStarts):
        self.cls, self.sep, self.mask, self.pad = tokenizer.cls, tokenizer.sep, tokenizer.mask, tokenizer.pad
        self.vocab_size = tokenizer.vocab_size
        self.offset = len(word_starts)
        self.inv_vocab = _ContinuationMarks(self.offset)
        self.unique_identifiers = dict(tokenizer.unique_identifiers, word_starts=word_starts.convention,
                                       pad_fixed=True)


class _ContinuationMarks:
    """A read-only id -> piece mapping with the real ids as keys (the random
    replacement tokens are drawn from them)."""

    def __init__(self, offset: int):
        self.offset = offset

    def __getitem__(self, token_id: int) -> str:
        return "##" if token_id >= self.offset else ""

    def keys(self):
        return range(self.offset)


class _SentenceStarts:
    """The indexed dataset as the sampler reads it, with the first piece of
    every sentence marked (id + offset) as a forced word start: sentences are
    tokenized alone, so a BPE sentence's first word carries no space marker."""

    def __init__(self, dataset, offset: int):
        self._dataset, self._offset = dataset, offset

    def __getattr__(self, name):
        if name.startswith("__") or name == "_dataset":  # unpickling (spawned data workers) sets these first
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def __getitem__(self, idx):
        sentence = numpy.array(self._dataset[idx], dtype=numpy.int64)
        if sentence.size:
            sentence[0] += self._offset
        return sentence


@dataclasses.dataclass
class BertMaskedDatasetConfig(BERTMaskedWordPieceDatasetConfig):
    word_starts: Optional[WordStarts] = None


class BertMaskedDataset(BERTMaskedWordPieceDataset):
    """megatron-core's BERT dataset with the fixes of the module doc. Samples:
    text, types, labels (the original ids at masked positions; 0 elsewhere,
    which the loss mask drops and every cross-entropy kernel accepts),
    is_random, padding_mask (1 at tokens), loss_mask (1 at masked
    positions), truncated."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self._real_pad = config.tokenizer.pad
        self._pad_token_id = _PAD_SENTINEL
        self._offset = config.tokenizer.offset
        self._starts = config.word_starts.starts
        self.dataset = _SentenceStarts(self.dataset, self._offset)

    def _build_sample_index(self, sequence_length: int, min_sentences_per_sample: int) -> numpy.ndarray:
        # A split that owns no document (a small corpus's test share, with --eval-iters 0 so no
        # sample is asked of it) has no samples; megatron-core's builder indexes past the end.
        if len(self.indices) == 0:
            return numpy.empty((0, 3), dtype=numpy.int32)
        return super()._build_sample_index(sequence_length, min_sentences_per_sample)

    def __getitem__(self, idx: int) -> Dict[str, numpy.ndarray]:
        sample = super().__getitem__(idx)
        pads = sample["padding_mask"] == _PAD_SENTINEL
        sample["text"][pads] = self._real_pad
        sample["types"][pads] = 0
        sample["padding_mask"] = (~pads).astype(numpy.int64)
        sample["labels"][sample["loss_mask"] == 0] = 0  # any real id: the loss mask drops them
        return sample

    def _create_masked_lm_predictions(self, token_ids, target_sequence_length, numpy_random_state):
        """megatron-core's masking on per-position word starts (module doc)."""
        offset, tok = self._offset, self.config.tokenizer
        raw = [t - offset if t >= offset else t for t in token_ids]
        encoded = []
        for i, t in enumerate(raw):
            after_special = i == 0 or raw[i - 1] in (tok.cls, tok.sep)
            start = token_ids[i] >= offset or after_special or t in (tok.cls, tok.sep) or self._starts[t]
            encoded.append(t if start else t + offset)
        # The count: round(mask_prob x the sample's tokens), capped at mask_prob x
        # --seq-length (Google BERT's and Megatron-LM's rule); megatron-core caps it at
        # mask_prob x (seq_length - 3), 14.1% of a full 128-token sample at 0.15.
        masked, positions, labels, boundaries, spans = super()._create_masked_lm_predictions(
            encoded, self.config.sequence_length, numpy_random_state)
        unmark = lambda t: t - offset if t >= offset else t  # noqa: E731
        spans = [(indices, [unmark(t) for t in values]) for indices, values in spans]
        return [unmark(t) for t in masked], positions, [unmark(t) for t in labels], boundaries, spans


# ------------------------------------------------------------------ building

@dataclasses.dataclass
class DocumentCounts:
    documents: int = 0
    used: int = 0
    empty: int = 0
    one_sentence: int = 0  # dropped with the binary head (it needs two segments)
    long_sentence: int = 0  # multi-sentence documents with a sentence over LONG_SENTENCE_TOKENS: dropped

    def text(self, name: str, prefix: str) -> str:
        dropped = self.documents - self.used
        parts = [f"{self.one_sentence:,} with a single sentence"] if self.one_sentence else []
        if self.long_sentence:
            parts.append(f"{self.long_sentence:,} with a sentence over {LONG_SENTENCE_TOKENS} tokens")
        if self.empty:
            parts.append(f"{self.empty:,} empty")
        why = f" ({', '.join(parts)})" if parts else ""
        return (f"> BERT {name} split of {prefix}: {self.documents:,} documents, {self.used:,} used, "
                f"{dropped:,} dropped{why}")


def count_documents(document_indices: numpy.ndarray, sentence_lengths: numpy.ndarray, first: int, last: int,
                    binary_head: bool) -> DocumentCounts:
    """How megatron-core's sample builder treats documents [first, last):
    it skips documents with fewer sentences than a sample needs (2 with the
    binary head) and multi-sentence documents holding a sentence longer than
    LONG_SENTENCE_TOKENS."""
    counts = DocumentCounts(documents=last - first)
    if last <= first:
        return counts
    bounds = document_indices[first:last + 1]
    sentences = numpy.diff(bounds)
    too_long = sentence_lengths[bounds[0]:bounds[-1]] > LONG_SENTENCE_TOKENS
    running = numpy.concatenate([[0], numpy.cumsum(too_long, dtype=numpy.int64)])
    long_in_doc = running[bounds[1:] - bounds[0]] - running[bounds[:-1] - bounds[0]]
    counts.empty = int((sentences == 0).sum())
    counts.one_sentence = int((sentences == 1).sum()) if binary_head else 0
    long_docs = (sentences > 1) & (long_in_doc > 0)
    counts.long_sentence = int(long_docs.sum())
    counts.used = int(((sentences >= (2 if binary_head else 1)) & ~long_docs).sum())
    return counts


def check_bert_documents(args, config, log=print) -> None:
    """Count every split's documents as megatron-core will use them; fail on
    a split that must give samples but has no usable document; report drops."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    needed = train_valid_test_num_samples(args)
    for prefix in config.blend[0]:
        check_prefix(prefix, "PREFIX_text_sentence.bin/.idx with --split-sentences")
        data = IndexedDataset(prefix, mmap=True)
        n_docs = data.document_indices.shape[0] - 1
        for name, bounds, samples in zip(("train", "validation", "test"), config.split_matrix, needed):
            if bounds is None or samples == 0:
                continue
            first, last = int(round(bounds[0] * n_docs)), int(round(bounds[1] * n_docs))
            counts = count_documents(data.document_indices, data.sequence_lengths, first, last,
                                     args.bert_binary_head)
            log(counts.text(name, prefix))
            if counts.used == 0:
                raise DataError(_no_documents_message(args, name, prefix, counts))


def _no_documents_message(args, name: str, prefix: str, counts: DocumentCounts) -> str:
    if args.bert_binary_head and counts.one_sentence:
        return (f"--data-path {prefix}: no document of the {name} split has two sentences, which the binary "
                "(sentence-order) head needs: preprocess with --split-sentences, or add --bert-no-binary-head")
    if counts.long_sentence:
        return (f"--data-path {prefix}: every document of the {name} split has a sentence over "
                f"{LONG_SENTENCE_TOKENS} tokens, which megatron-core skips: split the text into sentences "
                "(tools/preprocess_data.py --split-sentences)")
    return (f"--data-path {prefix}: the {name} split has no document with tokens: give it a larger share of "
            f"--split {args.split}, or use more data")


def bert_dataset_config(args, tokenizer) -> BertMaskedDatasetConfig:
    for attr in ("cls", "sep", "mask", "pad"):
        if getattr(tokenizer, attr, None) is None:
            raise DataError(f"--tokenizer-type {args.tokenizer_type}: the tokenizer has no {attr} token, which "
                            "masked-LM data needs: use BertWordPieceLowerCase/BertWordPieceCase with --vocab-file, "
                            "or a HuggingFaceTokenizer that defines cls/sep/mask/pad tokens")
    inv_vocab = tokenizer.inv_vocab
    starts = WordStarts(inv_vocab, [tokenizer.cls, tokenizer.sep, tokenizer.mask, tokenizer.pad,
                                    getattr(tokenizer, "unk", None)])
    return BertMaskedDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=get_blend_from_list(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=MaskingVocabulary(tokenizer, starts),
        word_starts=starts,
        mid_level_dataset_surplus=0.005,
        masking_probability=args.mask_prob,
        short_sequence_probability=args.short_seq_prob,
        masking_max_ngram=args.masking_max_ngram,
        masking_do_full_word=args.whole_word_masking,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        classification_head=args.bert_binary_head,
    )


def build_bert_datasets(args, tokenizer, log=None):
    """(train, valid, test) masked-LM datasets; a split with no share in --split is None."""
    import torch

    if args.mock_data:
        raise DataError("--mock-data is not supported for BERT: preprocess a corpus with tools/preprocess_data.py "
                        "--split-sentences and give --data-path")
    if tokenizer is None:
        raise DataError("BERT data needs a tokenizer: give --tokenizer-type (BertWordPieceLowerCase with --vocab-file, "
                        "or HuggingFaceTokenizer with --tokenizer-model)")
    config = bert_dataset_config(args, tokenizer)
    rank0 = torch.distributed.get_rank() == 0
    check_bert_documents(args, config, log or (lambda msg: rank0 and print(msg, flush=True)))
    return BlendedMegatronDatasetBuilder(
        BertMaskedDataset, train_valid_test_num_samples(args), lambda: True, config).build()

"""A small real English corpus that every Python installation ships, and a
sentencepiece tokenizer trained on it: what the quickstart and the tests use,
so nothing is ever downloaded.

The text is the Python language reference shipped in `pydoc_data.topics`
(about 460 KB of prose and code samples), cut into documents of a few
paragraphs each.
"""

import json
import os
from typing import Iterator, List


def sample_documents(max_chars: int = 2000) -> List[str]:
    """The corpus as a list of documents, in a fixed order."""
    import pydoc_data.topics

    docs = []
    for name in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[name]
        current: List[str] = []
        size = 0
        for para in text.split("\n\n"):
            para = para.strip("\n")
            if not para.strip():
                continue
            current.append(para)
            size += len(para)
            if size >= max_chars:
                docs.append("\n\n".join(current))
                current, size = [], 0
        if current:
            docs.append("\n\n".join(current))
    return docs


def _records(docs: List[str], key: str) -> Iterator[str]:
    for i, doc in enumerate(docs):
        yield json.dumps({"id": i, key: doc}, ensure_ascii=False) + "\n"


def write_sample_corpus(path: str, key: str = "text", repeat: int = 1, max_chars: int = 2000) -> int:
    """Write the corpus as jsonl (`{"id", key}` per line), `repeat` times over.
    Returns the number of documents written. The file is written aside and
    renamed, so a reader never sees half of it."""
    docs = sample_documents(max_chars) * repeat
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_records(docs, key))
    os.replace(tmp, path)
    return len(docs)


def train_sample_tokenizer(corpus_jsonl: str, model_prefix: str, vocab_size: int = 1000, key: str = "text") -> str:
    """Train a Llama-style sentencepiece BPE model (byte fallback, BOS=1,
    EOS=2, UNK=0, no pad) on a jsonl corpus; returns the `.model` path."""
    import sentencepiece

    def sentences():
        with open(corpus_jsonl, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)[key]

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=2,
        minloglevel=2,
    )
    return model_prefix + ".model"


def train_sample_hf_tokenizer(corpus_jsonl: str, out_dir: str, vocab_size: int = 1000, key: str = "text") -> str:
    """Train a GPT-2 style byte-level BPE with the `tokenizers` library on a
    jsonl corpus and save it as a directory `transformers.AutoTokenizer`
    loads (tokenizer.json + tokenizer_config.json, eos `<|endoftext|>`,
    no BOS added). Returns `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus_jsonl, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)[key]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return out_dir


def _texts(corpus_jsonl: str, key: str) -> Iterator[str]:
    with open(corpus_jsonl, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)[key]


def train_sample_wordpiece(corpus_jsonl: str, out_dir: str, vocab_size: int = 1000, key: str = "text") -> str:
    """Train a lower-case BERT WordPiece vocabulary ([PAD] [UNK] [CLS] [SEP]
    [MASK] first, "##" continuation pieces) on a jsonl corpus with the
    `tokenizers` library; returns the vocab.txt path (--vocab-file of
    BertWordPieceLowerCase)."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(_texts(corpus_jsonl, key), vocab_size=vocab_size, show_progress=False,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    os.makedirs(out_dir, exist_ok=True)
    return tok.save_model(out_dir)[0]


def train_sample_roberta_tokenizer(corpus_jsonl: str, out_dir: str, vocab_size: int = 1000, key: str = "text") -> str:
    """Train a RoBERTa-style byte-level BPE (<s>=0 <pad>=1 </s>=2 <unk>=3
    <mask>=4, "Ġ" word starts, pairs as <s> A </s></s> B </s>) and save it as
    a directory `transformers.AutoTokenizer` loads; returns `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(corpus_jsonl, key), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(out_dir)
    return out_dir


# A planted 3-class sentence task, financial-news-like (no download): a
# sentence template filled with a company, a period and a phrase that carries
# the label, so a small encoder can learn it and a held-out split measures it.
PLANTED_PHRASES = {
    "positive": ["profit rose sharply", "earnings beat forecasts", "the stock rallied strongly", "margins improved"],
    "negative": ["losses widened badly", "sales missed targets", "the shares slumped", "debt defaults climbed"],
    "neutral": ["the meeting was scheduled", "the report was filed", "the board met", "the office moved"],
}
_TEMPLATES = ("{company} said that {phrase} in the {period}.", "In the {period}, {phrase} at {company}.",
              "{company} reported that {phrase} during the {period}.",
              "Analysts noted that {phrase} for {company} in the {period}.")
_COMPANIES = ("acme corp", "globex", "initech", "umbrella group", "stark industries", "wayne holdings",
              "cyberdyne", "tyrell inc")
_PERIODS = ("first quarter", "second quarter", "third quarter", "fourth quarter", "last year", "past month")


def planted_classification_records(n: int, seed: int = 0) -> List[dict]:
    """`n` records {"text", "label"}: a random template, company and period around a label phrase."""
    import random

    rng = random.Random(seed)
    labels = sorted(PLANTED_PHRASES)
    out = []
    for _ in range(n):
        label = rng.choice(labels)
        text = rng.choice(_TEMPLATES).format(company=rng.choice(_COMPANIES), period=rng.choice(_PERIODS),
                                             phrase=rng.choice(PLANTED_PHRASES[label]))
        out.append({"text": text[0].upper() + text[1:], "label": label})
    return out


def write_bert_sample_corpus(path: str, planted_documents: int = 100, reference_every: int = 2, seed: int = 11) -> int:
    """Write a masked-LM corpus as jsonl {"text"}: every `reference_every`-th
    document of the Python reference, then `planted_documents` documents of six
    unlabeled planted-task sentences (the domain text a classifier is later
    fine-tuned on). Written aside and renamed; returns the number of documents."""
    planted = planted_classification_records(6 * planted_documents, seed=seed)
    docs = sample_documents()[::reference_every]
    docs += [" ".join(r["text"] for r in planted[i:i + 6]) for i in range(0, len(planted), 6)]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    os.replace(tmp, path)
    return len(docs)


def write_planted_classification(path: str, n: int, seed: int = 0) -> str:
    """Write `planted_classification_records(n, seed)` as jsonl (aside, then renamed); returns `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in planted_classification_records(n, seed))
    os.replace(tmp, path)
    return path

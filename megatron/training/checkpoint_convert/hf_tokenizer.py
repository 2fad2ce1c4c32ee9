"""Tokenizer files beside an HF model: which Megatron tokenizer reads a
model directory, and writing the files `transformers.AutoTokenizer` loads
for a Megatron checkpoint's tokenizer (shared by every model family)."""

import json
import os
import shutil
import tempfile
from typing import Optional

from megatron.training.checkpoint_convert.core import ConversionError

# Megatron-LM's WordPiece tokenizer types -> do_lower_case of transformers' BertTokenizer.
WORDPIECE_LOWER_CASE = {"BertWordPieceLowerCase": True, "BertWordPieceCase": False}
# The files a tokenizer directory ships, copied as they are into an export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
# What save_pretrained writes out of the others' content: an export adds none the source lacks.
DERIVED_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def find_tokenizer(model_dir: str, tokenizer_model: Optional[str]):
    """(Megatron --tokenizer-type, path) for --tokenizer-model or the tokenizer in an HF directory; None if none."""
    path = tokenizer_model
    if path is None:
        if any(os.path.isfile(os.path.join(model_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
            path = model_dir
        elif os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
            path = os.path.join(model_dir, "tokenizer.model")
        else:
            return None
    if not os.path.exists(path):
        raise ConversionError(f"--tokenizer-model {path} does not exist: give a sentencepiece tokenizer.model file "
                              "or an HF tokenizer directory")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return "HuggingFaceTokenizer", path
    return ("HuggingFaceTokenizer" if path.endswith(".json") else "Llama2Tokenizer"), path


def copy_tokenizer_files(path: str, out_dir: str) -> list:
    """Copy the tokenizer files of the directory `path` (TOKENIZER_FILES) into
    `out_dir` byte for byte; the names copied."""
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
    for name in copied:
        shutil.copyfile(os.path.join(path, name), os.path.join(out_dir, name))
    return copied


def check_tokenizer_vocab(tokenizer, vocab_size: int, what: str) -> None:
    """Raise ConversionError when the tokenizer (--tokenizer-type, path) has
    more tokens than config.json's vocab_size (the model's embedding rows);
    `what` names the right files. Fewer is a model's own choice, as
    transformers allows: Qwen2.5-7B has 152,064 rows for 151,665 tokens."""
    from megatron.training.tokenizer import build_tokenizer

    if tokenizer is None:
        return
    n = build_tokenizer(tokenizer[0], tokenizer[1]).vocab_size
    if n > vocab_size:
        raise ConversionError(f"the tokenizer {tokenizer[1]} has {n} tokens but config.json vocab_size is "
                              f"{vocab_size}: give the model's own tokenizer with --tokenizer-model ({what})")


def export_tokenizer(tokenizer_type: str, path: str, out_dir: str) -> dict:
    """Write tokenizer files `transformers.AutoTokenizer` loads; returns the
    special token ids (bos, eos, pad, cls, sep, mask; None when absent).
    From an HF tokenizer directory, its own files are copied byte for byte,
    so the export keeps them as shipped: the chat template and added tokens
    in tokenizer_config.json, a tokenizer_class any transformers version
    knows (transformers 5 would write "TokenizersBackend" for Llama 3's
    "PreTrainedTokenizerFast"), no local_files_only or other loading
    arguments; transformers' save_pretrained only supplies a file the
    tokenizer needs that the directory lacks (not one of DERIVED_FILES)."""
    from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

    if os.path.isdir(path):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        with tempfile.TemporaryDirectory() as saved:
            tok.save_pretrained(saved)  # the names of the files it needs (vocab.txt, tokenizer.model, ...)
            for name in sorted(set(os.listdir(saved)) | set(TOKENIZER_FILES)):
                source, target = os.path.join(path, name), os.path.join(out_dir, name)
                if not os.path.isfile(source):
                    source = os.path.join(saved, name) if name not in DERIVED_FILES else None
                if (source and os.path.isfile(source)
                        and not (os.path.exists(target) and os.path.samefile(source, target))):
                    shutil.copyfile(source, target)
        return _special_ids(tok)
    if tokenizer_type in WORDPIECE_LOWER_CASE:  # a BERT vocab.txt
        tok = BertTokenizerFast(path, do_lower_case=WORDPIECE_LOWER_CASE[tokenizer_type])
    elif tokenizer_type == "HuggingFaceTokenizer":
        tok = PreTrainedTokenizerFast(tokenizer_file=path)
    else:  # a sentencepiece model: what Llama 2 ships as tokenizer.model
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=path)
        shutil.copy(path, os.path.join(out_dir, "tokenizer.model"))
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
        for name, idx in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
            if idx >= 0:
                cfg[name] = sp.id_to_piece(idx)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    tok.save_pretrained(out_dir)
    _loadable_tokenizer_class(out_dir)
    return _special_ids(tok)


def _loadable_tokenizer_class(out_dir: str) -> None:
    """transformers 5 saves a tokenizer built from a tokenizer.json alone as
    "TokenizersBackend", a class no AutoTokenizer before 5 knows: name the
    class every version loads such a file with."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def _special_ids(tok) -> dict:
    return {f"{name}_token_id": getattr(tok, f"{name}_token_id", None)
            for name in ("bos", "eos", "pad", "cls", "sep", "mask")}

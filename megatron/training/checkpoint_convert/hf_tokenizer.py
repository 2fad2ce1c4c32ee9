"""Tokenizer files beside an HF model: which Megatron tokenizer reads a
model directory, and writing the files `transformers.AutoTokenizer` loads
for a Megatron checkpoint's tokenizer (shared by every model family)."""

import json
import os
import shutil
from typing import Optional

from megatron.training.checkpoint_convert.core import ConversionError

# Megatron-LM's WordPiece tokenizer types -> do_lower_case of transformers' BertTokenizer.
WORDPIECE_LOWER_CASE = {"BertWordPieceLowerCase": True, "BertWordPieceCase": False}


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


def check_tokenizer_vocab(tokenizer, vocab_size: int, what: str) -> None:
    """Raise ConversionError when the tokenizer (--tokenizer-type, path) has
    another vocabulary size than config.json; `what` names the right files."""
    from megatron.training.tokenizer import build_tokenizer

    if tokenizer is None:
        return
    n = build_tokenizer(tokenizer[0], tokenizer[1]).vocab_size
    if n != vocab_size:
        raise ConversionError(f"the tokenizer {tokenizer[1]} has {n} tokens but config.json vocab_size is "
                              f"{vocab_size}: give the model's own tokenizer with --tokenizer-model ({what})")


def export_tokenizer(tokenizer_type: str, path: str, out_dir: str) -> dict:
    """Write tokenizer files `transformers.AutoTokenizer` loads; returns the
    special token ids (bos, eos, pad, cls, sep, mask; None when absent)."""
    from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

    if os.path.isdir(path):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            shutil.copy(os.path.join(path, "tokenizer.model"), out_dir)
    elif tokenizer_type in WORDPIECE_LOWER_CASE:  # a BERT vocab.txt
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
    return {f"{name}_token_id": getattr(tok, f"{name}_token_id", None)
            for name in ("bos", "eos", "pad", "cls", "sep", "mask")}

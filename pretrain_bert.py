"""Pretrain a BERT-family model (BERT, RoBERTa, DistilRoBERTa, Megatron-BERT)
with masked-LM (and optionally sentence-order prediction) on megatron-core.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --split-sentences \\
        --tokenizer-type BertWordPieceLowerCase --vocab-file vocab.txt --workers 8
    torchrun --nproc_per_node 8 pretrain_bert.py --tensor-model-parallel-size 2 ... \\
        --data-path data/corpus_text_sentence --tokenizer-type BertWordPieceLowerCase --vocab-file vocab.txt \\
        --apply-residual-connection-post-layernorm [--bert-no-binary-head]

The same driver, flags, layouts and checkpoints as pretrain_gpt.py; the model
is megatron-core's BertModel (megatron/training/bert/model.py), the data its
masked WordPiece dataset (megatron/training/data/bert_dataset.py). Logged:
"lm loss" (mean cross-entropy over the masked tokens, as run_mlm.py's loss;
the validation line adds its perplexity), "mlm accuracy" and, with the binary
head, "sop loss" (the loss trained is their sum, as Megatron-LM).
"""

import os
import sys
from functools import partial

# The repo root first: `megatron.training` is this repo's driver, while
# `megatron.core` resolves to the pinned pip package (a namespace package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron.training.arguments import build_parser as build_driver_parser  # noqa: E402
from megatron.training.bert.arguments import add_bert_args  # noqa: E402
from megatron.training.data.bert_dataset import build_bert_datasets  # noqa: E402
from megatron.training.errors import run_main  # noqa: E402
from megatron.training.initialize import device  # noqa: E402
from megatron.training.bert.model import build_bert_model  # noqa: E402
from megatron.training.training import pretrain  # noqa: E402


def model_provider(args, config, pre_process=None, post_process=None, vp_stage=None):
    return build_bert_model(args, config, pre_process, post_process, vp_stage)


def train_valid_test_datasets_provider(args, tokenizer):
    return build_bert_datasets(args, tokenizer)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.reshape(-1).float()
    return torch.sum(values.float().reshape(-1) * mask) / mask.sum().clamp(min=1.0)


def loss_func(loss_mask: torch.Tensor, sentence_order: torch.Tensor, output):
    """Masked-LM loss (mean over the masked tokens) plus, with the binary head,
    the sentence-order cross-entropy; reports each and the MLM accuracy."""
    lm_losses, correct, binary_logits = output
    lm_loss = masked_mean(lm_losses, loss_mask)
    # The schedule scales the returned loss in place: the reported values are copies.
    report = {"lm loss": lm_loss.detach().clone(), "mlm accuracy": masked_mean(correct, loss_mask).detach()}
    loss = lm_loss
    if binary_logits is not None:
        sop_loss = torch.nn.functional.cross_entropy(binary_logits.float(), sentence_order.view(-1))
        report["sop loss"] = sop_loss.detach().clone()
        loss = lm_loss + sop_loss
    return loss, report


def split_bert_batch(batch: dict, dev):
    """tokens, token types, labels, loss mask, padding mask, sentence-order label on `dev`."""
    return tuple(batch[k].to(dev, non_blocking=True).long()
                 for k in ("text", "types", "labels", "loss_mask", "padding_mask", "is_random"))


def forward_step(args, data_iterator, model):
    tokens, types, labels, loss_mask, padding_mask, is_random = split_bert_batch(next(data_iterator), device())
    output = model(tokens, padding_mask, tokentype_ids=types, lm_labels=labels)
    return output, partial(loss_func, loss_mask, is_random)


def build_parser():
    return build_driver_parser(add_bert_args)


def main(argv=None):
    return pretrain(train_valid_test_datasets_provider, model_provider, forward_step, argv=argv,
                    extra_args_provider=add_bert_args)


if __name__ == "__main__":
    sys.exit(run_main(main))

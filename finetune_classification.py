"""Fine-tune a BERT-family model (BERT, RoBERTa, DistilRoBERTa, Megatron-BERT)
for sequence classification on the training driver, any TP/PP/DP layout.

    python finetune_classification.py --load bert-ckpt --finetune --use-checkpoint-args \\
        --train-data train.jsonl --valid-data test.jsonl --epochs 3 \\
        --micro-batch-size 32 --lr 2e-5 --lr-warmup-fraction 0.1 --seq-length 128 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model bert-base-uncased --save cls-ckpt

Data: jsonl {"text"[, "text_b"], "label"} or FinGPT's {"instruction", "input",
"output"} (tasks/sequence_classification.py). The labels (--labels, default
the sorted labels of the training data) fix --num-classes. The model is the
checkpoint's encoder with a classifier in place of its LM head: BERT's pooler
(dense + tanh on the first token), dropout (--hidden-dropout) and a linear
layer over the classes; a pooler in the checkpoint is used, the classifier
starts fresh. With --epochs, training runs that many passes over the
training data and the held-out file is scored after each: accuracy and
macro-F1 over the whole file, on the validation log line. Export the result
with tools/checkpoint/util.py --model-type BERT --saver hf (a
*ForSequenceClassification that transformers scores the same).
"""

import math
import os
import sys
from functools import partial

# The repo root first: `megatron.training` and `tasks` are this repo's, while
# `megatron.core` resolves to the pinned pip package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron.training.arguments import ArgumentError, env_world_size, parse_args  # noqa: E402
from megatron.training.arguments import build_parser as build_driver_parser  # noqa: E402
from megatron.training.bert.arguments import add_bert_and_classification_args  # noqa: E402
from megatron.training.errors import run_main  # noqa: E402
from megatron.training.initialize import device  # noqa: E402
from megatron.training.bert.model import build_bert_model  # noqa: E402
from megatron.training.training import pretrain  # noqa: E402
from megatron.training.training_log import print_rank_0  # noqa: E402
from tasks import sequence_classification as sc  # noqa: E402


def add_args(parser):
    add_bert_and_classification_args(parser)
    g = parser.add_argument_group("classification data")
    # Megatron-LM's task flag; stored as --data-path, which the driver checks for
    g.add_argument("--train-data", nargs="+", dest="data_path", help="jsonl training file(s)")
    g.add_argument("--valid-data", nargs="+", default=None, help="held-out jsonl file(s), scored after each epoch")
    g.add_argument("--epochs", type=int, default=None,
                   help="passes over the training data (sets --train-iters, --eval-interval to one epoch and "
                        "--eval-iters to the whole held-out file)")
    return parser


def model_provider(args, config, pre_process=None, post_process=None, vp_stage=None):
    return build_bert_model(args, config, pre_process, post_process, vp_stage)


def train_valid_test_datasets_provider(args, tokenizer):
    labels = args.labels.split(",")
    train = sc.read_files(args.data_path)
    sc.label_set(train, args.labels)  # every label known
    token_types = args.num_tokentypes > 1
    arrays = sc.encode(tokenizer, train, labels, args.seq_length, token_types)
    train_ds = sc.ClassificationDataset(arrays, args.global_batch_size, args.train_iters * args.global_batch_size,
                                        seed=args.seed)
    print_rank_0(sc.data_summary("training data", train, labels))
    valid_ds = None
    if args.valid_data:
        valid = sc.read_files(args.valid_data)
        sc.label_set(valid, args.labels)
        valid_ds = sc.ClassificationDataset(sc.encode(tokenizer, valid, labels, args.seq_length, token_types),
                                            args.global_batch_size, shuffle=False)
        print_rank_0(sc.data_summary("held-out data", valid, labels))
    return train_ds, valid_ds, None


def loss_func(labels: torch.Tensor, evaluating: bool, logits: torch.Tensor):
    """Mean cross-entropy over the batch's examples; in evaluation, the counts
    that metrics_from_counts turns into accuracy and macro-F1."""
    valid = labels != sc.IGNORE
    losses = torch.nn.functional.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    examples = valid.sum().clamp(min=1)
    loss = (losses * valid).sum() / examples
    if evaluating:
        return loss, sc.batch_counts(logits, labels, losses)
    accuracy = ((logits.argmax(dim=-1) == labels) & valid).sum().float() / examples
    return loss, {"classification loss": loss.detach().clone(), "accuracy": accuracy.detach()}


def forward_step(args, data_iterator, model):
    batch = next(data_iterator)
    tokens, types, mask, labels = (batch[k].to(device(), non_blocking=True).long()
                                   for k in ("text", "types", "padding_mask", "label"))
    logits = model(tokens, mask, tokentype_ids=types)
    return logits, partial(loss_func, labels, not model.training)


def schedule_argv(argv):
    """`argv` with the flags the data decides: --num-classes and --labels, and
    with --epochs the iterations (one evaluation per epoch over the whole
    held-out file)."""
    args = parse_args(argv, add_args)
    if args.micro_batch_size is None:
        raise ArgumentError("--micro-batch-size is required")
    if not args.data_path:
        raise ArgumentError("--train-data is required: a jsonl file of {\"text\", \"label\"} records")
    train = sc.read_files(args.data_path)
    labels = sc.label_set(train, args.labels)
    if args.num_classes and args.num_classes != len(labels):
        raise ArgumentError(f"--num-classes {args.num_classes} but the labels are {','.join(labels)}: "
                            "drop --num-classes (it follows the labels)")
    extra = ["--labels", ",".join(labels), "--num-classes", str(len(labels))]
    valid = sc.read_files(args.valid_data) if args.valid_data else []
    dp = env_world_size() // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)
    gbs = args.global_batch_size or args.micro_batch_size * max(dp, 1)
    if args.epochs is not None:
        if args.train_iters is not None or args.train_samples is not None:
            raise ArgumentError("give --epochs or --train-iters/--train-samples, not both")
        iters, per_epoch, eval_iters = sc.epoch_schedule(len(train), len(valid), gbs, args.epochs)
        extra += ["--train-iters", str(iters)]
        if "--eval-interval" not in argv:
            extra += ["--eval-interval", str(per_epoch)]
    else:
        eval_iters = math.ceil(len(valid) / gbs)
    if "--eval-iters" not in argv:
        extra += ["--eval-iters", str(eval_iters if valid else 0)]
    return list(argv) + extra


def build_parser():
    return build_driver_parser(add_args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return pretrain(train_valid_test_datasets_provider, model_provider, forward_step, argv=schedule_argv(argv),
                    extra_args_provider=add_args, eval_metrics_func=sc.metrics_from_counts)


if __name__ == "__main__":
    sys.exit(run_main(main))

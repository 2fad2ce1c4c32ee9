"""The BERT-family flags (pretrain_bert.py, finetune_classification.py), with
Megatron-LM's names where it has them, registered with the driver's parser as
an extra group; `finalize_bert_args` fills the defaults that depend on other
flags and checks them (one-line errors naming the flag and the fix).
"""

from megatron.training.errors import ArgumentError

# Megatron-LM's pretrain_bert.py masks n-grams of up to 3 words; run_mlm.py-style
# masking is --masking-max-ngram 1 --no-whole-word-masking.
DEFAULT_MAX_NGRAM = 3
# megatron-core's sample builder drops multi-sentence documents that hold a
# sentence longer than this (helpers.cpp LONG_SENTENCE_LEN).
LONG_SENTENCE_TOKENS = 512


def add_bert_args(parser):
    g = parser.add_argument_group("BERT")
    g.add_argument("--bert-no-binary-head", action="store_false", dest="bert_binary_head",
                   help="no sentence-order prediction head (masked LM only; single-sentence documents are used)")
    g.add_argument("--apply-residual-connection-post-layernorm", action="store_true",
                   help="post-LN layers (original BERT / RoBERTa, Hugging Face compatible); default pre-LN "
                        "(Megatron-BERT)")
    g.add_argument("--num-tokentypes", type=int, default=None,
                   help="token-type (segment) embeddings; default 2 with the binary head, else 0")
    g.add_argument("--position-ids-offset", type=int, default=0,
                   help="the first position id (RoBERTa counts positions from padding_idx + 1 = 2)")
    g = parser.add_argument_group("BERT masked-LM data")
    g.add_argument("--mask-prob", type=float, default=0.15, help="share of the tokens of a sample that are masked")
    g.add_argument("--short-seq-prob", type=float, default=0.1,
                   help="probability of a sample shorter than --seq-length (uniform target length)")
    g.add_argument("--masking-max-ngram", type=int, default=DEFAULT_MAX_NGRAM,
                   help="mask spans of up to N words (P(n) ~ 1/n); 1 masks single words, as run_mlm.py")
    g.add_argument("--no-whole-word-masking", action="store_false", dest="whole_word_masking",
                   help="mask word pieces independently (default: the pieces of a word are masked together)")
    # HF BERT models use the exact (erf) GELU: megatron-core's fused bias-GELU is the tanh approximation.
    parser.set_defaults(bias_gelu_fusion=False)
    return parser


def add_classification_args(parser):
    g = parser.add_argument_group("sequence classification")
    g.add_argument("--num-classes", type=int, default=0,
                   help="a classifier over this many labels in place of the LM head (finetune_classification.py "
                        "sets it from the data)")
    g.add_argument("--labels", type=str, default=None,
                   help="comma-separated label names in class order (default: the sorted labels of the training data)")
    return parser


def add_bert_and_classification_args(parser):
    return add_classification_args(add_bert_args(parser))


def finalize_bert_args(args) -> None:
    """Fill the dependent defaults and check the BERT flags; idempotent."""
    if args.num_tokentypes is None:
        args.num_tokentypes = 2 if args.bert_binary_head else 0
    _check(not args.bert_binary_head or args.num_tokentypes >= 2,
           f"--num-tokentypes {args.num_tokentypes}: the binary (sentence-order) head needs 2 token types; "
           "drop --num-tokentypes or add --bert-no-binary-head")
    _check(args.position_embedding_type == "learned_absolute",
           f"--position-embedding-type {args.position_embedding_type}: BERT models use learned absolute positions; "
           "drop the flag")
    _check(not args.untie_embeddings_and_output_weights,
           "--untie-embeddings-and-output-weights: BERT ties its LM output layer to the word embeddings; drop the flag")
    needed = args.seq_length + args.position_ids_offset
    _check(args.max_position_embeddings >= needed,
           f"--max-position-embeddings {args.max_position_embeddings} is smaller than --seq-length {args.seq_length}"
           f" + --position-ids-offset {args.position_ids_offset}: raise it to at least {needed}")
    _check(0.0 < args.mask_prob < 1.0, f"--mask-prob {args.mask_prob} must be between 0 and 1 (e.g. 0.15)")
    _check(0.0 <= args.short_seq_prob <= 1.0, f"--short-seq-prob {args.short_seq_prob} must be between 0 and 1")
    _check(args.masking_max_ngram >= 1, f"--masking-max-ngram {args.masking_max_ngram} must be at least 1")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ArgumentError(message)

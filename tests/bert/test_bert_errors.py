"""Bad input to the BERT tools gets one line naming the flag or file and the fix."""

import json
import shutil

import pytest

from megatron.training.arguments import ArgumentError, parse_args
from megatron.training.bert.arguments import add_bert_args, finalize_bert_args
from tests.bert.conftest import convert


def bert_flags(*extra):
    args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                       "--micro-batch-size", "1", "--lr", "1", "--train-iters", "1", *extra], add_bert_args)
    finalize_bert_args(args)
    return args


@pytest.mark.parametrize("flags, message", [
    (["--num-tokentypes", "1"], "--num-tokentypes 1: the binary (sentence-order) head needs 2 token types"),
    (["--position-ids-offset", "2", "--bert-no-binary-head"],
     "--max-position-embeddings 32 is smaller than --seq-length 32 + --position-ids-offset 2: raise it to at least 34"),
    (["--use-rotary-position-embeddings"], "BERT models use learned absolute positions"),
    (["--untie-embeddings-and-output-weights"], "BERT ties its LM output layer to the word embeddings"),
    (["--mask-prob", "1.5"], "--mask-prob 1.5 must be between 0 and 1"),
])
def test_flag_errors(flags, message):
    with pytest.raises(ArgumentError) as e:
        bert_flags(*flags)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_defaults_follow_megatron_lm():
    args = bert_flags()
    assert (args.bert_binary_head, args.num_tokentypes, args.mask_prob, args.short_seq_prob) == (True, 2, 0.15, 0.1)
    assert (args.masking_max_ngram, args.whole_word_masking, args.apply_residual_connection_post_layernorm) == (
        3, True, False)
    assert bert_flags("--bert-no-binary-head").num_tokentypes == 0


def test_data_without_masked_lm_tokens_or_with_mock_data(tmp_path):
    from megatron.training.data.bert_dataset import build_bert_datasets
    from megatron.training.data.pretrain import DataError
    from megatron.training.data.sample_corpus import train_sample_hf_tokenizer, write_sample_corpus
    from megatron.training.tokenizer import build_tokenizer

    corpus = str(tmp_path / "c.jsonl")
    write_sample_corpus(corpus)
    gpt2_style = build_tokenizer("HuggingFaceTokenizer", train_sample_hf_tokenizer(corpus, str(tmp_path / "tok"), 300))
    args = bert_flags("--data-path", str(tmp_path / "x"), "--tokenizer-type", "HuggingFaceTokenizer")
    with pytest.raises(DataError, match="the tokenizer has no cls token, which masked-LM data needs: use"):
        build_bert_datasets(args, gpt2_style)
    args.mock_data = True
    with pytest.raises(DataError, match="--mock-data is not supported for BERT: preprocess a corpus"):
        build_bert_datasets(args, gpt2_style)


def failing(capsys, argv):
    from tools.checkpoint import util

    capsys.readouterr()  # what earlier steps printed
    assert util.main([str(a) for a in argv]) == 2  # a user error: one line, exit status 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_converter_errors(hf_models, tmp_path, capsys):
    broken = tmp_path / "gelu_new"
    shutil.copytree(hf_models["bert_pretraining"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu_new")))
    err = failing(capsys, ["--model-type", "BERT", "--loader", "hf", "--load-dir", broken,
                           "--save-dir", tmp_path / "a"])
    assert "hidden_act 'gelu_new'" in err and "exact (erf) GELU" in err

    (broken / "config.json").write_text(json.dumps(dict(config, architectures=["BertForTokenClassification"])))
    err = failing(capsys, ["--model-type", "BERT", "--loader", "hf", "--load-dir", broken,
                           "--save-dir", tmp_path / "b"])
    assert "BertForTokenClassification" in err and "BertForSequenceClassification" in err

    err = failing(capsys, ["--model-type", "GPT", "--loader", "hf", "--load-dir", hf_models["bert_classifier"],
                           "--save-dir", tmp_path / "c"])
    assert "holds a BERT model (config.json): use --model-type BERT" in err

    mg = convert("hf", "megatron", hf_models["bert_classifier"], tmp_path / "mg")
    err = failing(capsys, ["--model-type", "GPT", "--loader", "megatron", "--saver", "hf", "--load-dir", mg,
                           "--save-dir", tmp_path / "d"])
    assert "holds a BERT model (encoder.layers.*): use --model-type BERT" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()


def test_use_checkpoint_args_takes_the_bert_settings():
    """--use-checkpoint-args takes a converted RoBERTa's layer order, position
    offset, token types and heads; a different --num-tokentypes (a tensor
    shape) is one error naming the flag."""
    from megatron.training.checkpoint.settings import take_checkpoint_settings

    saved = {"apply_residual_connection_post_layernorm": True, "position_ids_offset": 2, "num_tokentypes": 1,
             "bert_binary_head": False, "max_position_embeddings": 34}
    args = bert_flags()
    assert take_checkpoint_settings(args, saved, set(), "ckpt") is None
    assert {k: getattr(args, k) for k in saved} == saved
    finalize_bert_args(args)  # the taken settings are consistent (one token type, no binary head)
    with pytest.raises(ArgumentError, match="the command line's --num-tokentypes 2 \\(checkpoint: 1\\) cannot load"):
        take_checkpoint_settings(bert_flags("--num-tokentypes", "2"), saved, {"num_tokentypes"}, "ckpt")


def test_use_checkpoint_args_refuses_the_other_model_family():
    """A Llama checkpoint given to a BERT entry point (or the reverse) used to take the other family's
    settings and fail later on one of them (`--position-embedding-type rope: BERT models use learned
    absolute positions`, a flag the user never passed); now the line names the entry points to use."""
    from megatron.training.checkpoint.settings import take_checkpoint_settings

    llama = {"num_layers": 2, "swiglu": True, "position_embedding_type": "rope", "normalization": "RMSNorm"}
    with pytest.raises(ArgumentError, match="^ckpt holds a GPT \\(Llama\\) model, and this entry point runs a "
                                            "BERT-family encoder: load it with pretrain_gpt.py"):
        take_checkpoint_settings(bert_flags(), llama, set(), "ckpt")
    gpt_args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length",
                           "32", "--micro-batch-size", "1", "--lr", "1", "--train-iters", "1"])
    with pytest.raises(ArgumentError, match="holds a BERT-family encoder, and this entry point runs a GPT "
                                            "\\(Llama\\) model: load it with pretrain_bert.py"):
        take_checkpoint_settings(gpt_args, dict(llama, bert_binary_head=True, position_ids_offset=0), set(), "ckpt")
    # Megatron-LM records bert_binary_head for GPT models too: such a checkpoint is a GPT one
    assert take_checkpoint_settings(gpt_args, dict(llama, bert_binary_head=True), set(), "ckpt") is None


def test_another_padding_is_not_another_vocabulary():
    """--use-checkpoint-args (issue #27): the same vocabulary padded for another TP or
    --make-vocab-size-divisible-by is not an error (the loaders refit the padding rows);
    --make-vocab-size-divisible-by is no longer a tensor shape, only a reported override;
    another vocabulary is, judged by the recorded unpadded_vocab_size, or for a Megatron-LM
    checkpoint (padded rows only) by padding the tokenizer's ids as the checkpoint was."""
    from megatron.training.checkpoint.settings import take_checkpoint_settings, vocabulary_difference

    ours = {"unpadded_vocab_size": 30522, "padded_vocab_size": 30592, "make_vocab_size_divisible_by": 128,
            "tensor_model_parallel_size": 1}
    assert vocabulary_difference(ours, 30522) is None
    assert vocabulary_difference(ours, 30000) == "30522 token ids"
    megatron_lm = dict(ours, unpadded_vocab_size=None, padded_vocab_size=30720, tensor_model_parallel_size=2)
    assert vocabulary_difference(megatron_lm, 30522) is None  # 30522 pads to 30720 at 128 x TP=2
    assert vocabulary_difference(megatron_lm, 30465) is None  # as far as the rows can tell
    assert vocabulary_difference(megatron_lm, 32000) == (
        "30720 rows (padded to a multiple of 128 x TP=2, where 32000 ids would give 32000)")
    assert vocabulary_difference({}, 100) is None  # nothing recorded: nothing to compare

    args = bert_flags("--make-vocab-size-divisible-by", "64")
    saved = dict(ours, bert_binary_head=True, position_ids_offset=0)
    note = take_checkpoint_settings(args, saved, {"make_vocab_size_divisible_by"}, "ckpt")
    assert "--make-vocab-size-divisible-by 64 (checkpoint: 128) from the command line" in note
    assert args.make_vocab_size_divisible_by == 64

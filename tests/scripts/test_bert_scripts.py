"""The BERT-family launch scripts, checked without GPUs: their flags pass the
driver's and the BERT validation at the intended world size, with the
presets' shapes, and they start from the right checkpoint."""

import pytest

from tests.scripts.test_launch_scripts import _cluster, _run

# script -> (entry point, expected flag values)
SCRIPTS = {
    "bert_base.sh": ("pretrain_bert.py", {"--num-layers": "12", "--hidden-size": "768", "--seq-length": "512",
                                          "--max-position-embeddings": "512", "--masking-max-ngram": "3"}),
    "roberta_base.sh": ("pretrain_bert.py", {"--num-layers": "12", "--position-ids-offset": "2",
                                             "--max-position-embeddings": "514", "--num-tokentypes": "1"}),
    "distilroberta.sh": ("pretrain_bert.py", {"--num-layers": "6", "--position-ids-offset": "2"}),
    "finetune_classification.sh": ("finetune_classification.py", {"--epochs": "3", "--seq-length": "128"}),
}


def _command(script, **env):
    out = _run(["bash", f"scripts/{script}"], _cluster(1, DRY_RUN=1, VOCAB_FILE="/models/bert/vocab.txt",
                                                       PRETRAINED_CHECKPOINT="/ckpt/bert", TRAIN_DATA="/data/t.jsonl",
                                                       VALID_DATA="/data/v.jsonl", **env))
    assert out.returncode == 0, out.stderr
    import shlex

    words = shlex.split(out.stdout)
    at = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[at].rsplit("/", 1)[-1], words[at + 1:]


def _parse(entry, flags, world_size):
    import finetune_classification
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.bert.arguments import add_bert_args, finalize_bert_args

    if entry.startswith("finetune"):
        # what --use-checkpoint-args takes from a BERT-base checkpoint, and what --epochs sets from the data
        flags = flags + ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
                         "--train-iters", "100"]
    args = parse_args(flags, finetune_classification.add_args if entry.startswith("finetune") else add_bert_args)
    validate_args(args, world_size)
    finalize_bert_args(args)
    return args


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_flags_pass_validation(script):
    entry, expected = SCRIPTS[script]
    got_entry, flags = _command(script)
    assert got_entry == entry
    for flag, value in expected.items():
        assert flags[flags.index(flag) + 1] == value, flag
    args = _parse(entry, flags, 8)
    assert args.apply_residual_connection_post_layernorm or entry.startswith("finetune")
    assert args.data_parallel_size == 8 and args.tokenizer_type == "BertWordPieceLowerCase"


def test_pretraining_starts_from_a_base_checkpoint_then_resumes_its_own(tmp_path):
    _, flags = _command("roberta_base.sh", BASE_CHECKPOINT_PATH="/ckpt/roberta-base-mg", CHECKPOINT_PATH=tmp_path)
    assert flags[flags.index("--load") + 1] == "/ckpt/roberta-base-mg" and "--finetune" in flags
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("100")
    _, flags = _command("roberta_base.sh", BASE_CHECKPOINT_PATH="/ckpt/roberta-base-mg", CHECKPOINT_PATH=tmp_path)
    assert flags[flags.index("--load") + 1] == str(tmp_path) and "--finetune" not in flags


def test_plan_mode_is_refused_with_the_alternative():
    out = _run(["bash", "scripts/bert_base.sh"], _cluster(1, PLAN=1))
    assert out.returncode == 1 and "for BERT scripts use DRY_RUN=1" in out.stderr

"""scripts/distill.sh: the generate and blend stages run for real with the tiny
teacher on CPU; the train stage (a torchrun launch) is checked by its printed
command: the blend as --data-path, started from the base checkpoint with
--finetune until the run has its own checkpoint."""

import os
import shlex
import subprocess

from megatron.training.data.preprocess import PreprocessConfig, preprocess
from tests.distributed.launcher import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "distill.sh")
VARS = ("DATA_PATH", "INPUT", "TEACHER", "SYNTH_DIR", "ORIGINAL_DATA_PATH", "TOKENIZER_MODEL", "TOKENIZER_TYPE",
        "BASE_CHECKPOINT_PATH", "CHECKPOINT_PATH", "STAGES", "GEN_ARGS", "DRY_RUN", "PLAN")


def _run(**env):
    base = {k: v for k, v in os.environ.items() if k not in VARS}
    base.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", SCRIPT], env=base, capture_output=True, text=True, timeout=400)


def test_generate_and_blend_stages_write_the_blend(corpus, teacher_dir, tmp_path):
    cfg = PreprocessConfig(input=corpus[0], output_prefix=str(tmp_path / "orig"),
                           tokenizer_type="HuggingFaceTokenizer", tokenizer_model=teacher_dir, append_eod=True)
    preprocess(cfg, log=lambda m: None)
    synth = tmp_path / "synth"
    res = _run(STAGES="generate blend", INPUT=corpus[0], TEACHER=teacher_dir, SYNTH_DIR=synth,
               GEN_ARGS="--backend hf --prefix-length 16 --max-new-tokens 24 --min-continuation-tokens 4 --batch-size 8",
               GPUS_PER_NODE=1, WORKERS=1, ORIGINAL_DATA_PATH=cfg.output_name("text"),
               TOKENIZER_TYPE="HuggingFaceTokenizer", TOKENIZER_MODEL=teacher_dir, SYNTHETIC_FRACTION=0.01)
    assert res.returncode == 0, res.stderr[-3000:]
    words = (synth / "data_path.txt").read_text().split()
    assert words[1::2] == [cfg.output_name("text"), str(synth / "synthetic_text_document")]
    assert [float(w) for w in words[::2]] == [0.99, 0.01]


def _train_command(tmp_path, **extra):
    (tmp_path / "data_path.txt").write_text("0.995 /d/orig 0.005 /d/synthetic_text_document\n")
    res = _run(STAGES="train", DRY_RUN=1, SYNTH_DIR=tmp_path, TOKENIZER_MODEL="/m/tok.model",
               CHECKPOINT_PATH=tmp_path / "ckpt", BASE_CHECKPOINT_PATH="/c/base", NNODES=4, NODE_RANK=0,
               MASTER_ADDR="n1", **extra)
    assert res.returncode == 0, res.stderr
    words = shlex.split(res.stdout)
    at = words.index("--data-path")
    return words, words[at + 1:at + 5]


def test_train_stage_starts_from_the_base_checkpoint_on_the_blend(tmp_path):
    words, data_path = _train_command(tmp_path)
    assert data_path == ["0.995", "/d/orig", "0.005", "/d/synthetic_text_document"]
    assert words[-3:] == ["/c/base", "--finetune", "--exit-on-missing-checkpoint"]
    assert words[-4] == "--load"  # after the training script's own --load, so it wins

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("10")
    words, _ = _train_command(tmp_path)
    assert "--finetune" not in words and "/c/base" not in words  # a restarted job resumes its own run


def test_missing_variable_names_the_fix(tmp_path):
    res = _run(STAGES="generate", SYNTH_DIR=tmp_path, TEACHER="/m/t")
    assert res.returncode == 1 and "export INPUT=" in res.stderr

"""One error path for every entry point (megatron/training/errors.py): a
mistake is ONE line on stderr, `error: ...`, naming what, where and the fix,
with exit status 2 and no traceback, on one process, on several (an error
every rank sees and one only a single rank sees), and under torchrun.

The entry points run in forked processes with their file descriptors 1 and 2
sent to files, so everything they write is counted, as a user's terminal
would show it; the torchrun test starts real processes."""

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import traceback

import pytest
import torch

import pretrain_gpt  # noqa: F401 - imported here once: the forked processes inherit it
from tests.distributed.launcher import ROOT, run_distributed
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA

RUN = TINY_LLAMA + MOCK_DATA + SCHEDULE + ["--micro-batch-size", "2", "--global-batch-size", "4"]
# The per-rank torch format: these tests name (and damage) its rank files; the
# default torch_dist format's own cases are in the first test too.
TORCH = RUN + ["--ckpt-format", "torch"]
BERT = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "1", "--lr", "1"]


@contextlib.contextmanager
def _output_to(out_path, err_path):
    """Python's sys.stdout/sys.stderr and the file descriptors 1 and 2 (C-level
    writes) into two files."""
    saved_fds, saved_files = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = out, err
        try:
            yield
        finally:
            out.flush()
            err.flush()
            sys.stdout, sys.stderr = saved_files
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)


def _run_cases(rank, world_size, cases, out_dir):
    """Each (module, argv, env) through errors.run_main(module.main, argv), as
    `python module.py argv` runs it (`module` may be the main function itself);
    [(exit status, stdout, stderr)]. Several
    cases share a process only when it is a world of one (each case's process
    group then gets a port of its own; ranks of a larger world could not agree
    on a new one)."""
    from megatron.training.errors import run_main
    from megatron.training.initialize import destroy
    from megatron.training.local_launch import free_port

    assert world_size == 1 or len(cases) == 1
    results = []
    for i, (module, argv, env) in enumerate(cases):
        out, err = os.path.join(out_dir, f"{rank}_{i}.out"), os.path.join(out_dir, f"{rank}_{i}.err")
        os.environ.update(env, **({"MASTER_PORT": str(free_port())} if world_size == 1 else {}))
        with _output_to(out, err):
            try:
                main = module if callable(module) else importlib.import_module(module).main
                code = run_main(main, [str(a) for a in argv])
            except Exception as e:  # noqa: BLE001 - the traceback switch lets it out: Python would print it
                traceback.print_exc()
                code = type(e).__name__
        for name in env:
            del os.environ[name]
        if torch.distributed.is_initialized():
            destroy()  # the next case starts a process group of its own
        results.append((code, open(out).read(), open(err).read()))
    return results


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_model")
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(path)


def test_errors_of_the_entry_points_are_one_line_naming_the_fix(tmp_path, hf_dir):
    ckpt, empty = tmp_path / "ckpt", tmp_path / "empty"
    empty.mkdir()
    pretrain = "pretrain_gpt"
    dist = tmp_path / "dist"
    cases = {
        "a checkpoint to resume": (pretrain, TORCH + ["--train-iters", 3, "--save", ckpt], {}),
        "a torch_dist checkpoint to resume": (pretrain, RUN + ["--train-iters", 3, "--save", dist], {}),
        "misspelt flag": (pretrain, RUN + ["--train-iters", 3, "--tensor-model-paralel-size", 2], {}),
        # item 3: --finetune with nothing to load used to train from random weights
        "finetune from nothing": (pretrain, RUN + ["--train-iters", 3, "--finetune", "--load", empty], {}),
        "finetune from an HF directory": (pretrain, RUN + ["--train-iters", 3, "--finetune", "--load", hf_dir], {}),
        # item 4: megatron-core's AssertionError on a longer --train-iters
        "resume with another schedule": (pretrain, TORCH + ["--train-iters", 6, "--load", ckpt], {}),
        "the fix it names": (pretrain, TORCH + ["--train-iters", 6, "--load", ckpt, "--lr-decay-iters", 3], {}),
        "torch_dist: resume with another schedule": (pretrain, RUN + ["--train-iters", 6, "--load", dist], {}),
        "torch_dist: the fix it names": (pretrain, RUN + ["--train-iters", 6, "--load", dist,
                                                          "--override-opt_param-scheduler"], {}),
        "torch_dist: another shape": (pretrain, RUN + ["--train-iters", 3, "--load", dist, "--finetune",
                                                       "--hidden-size", 128], {}),
        # item 4: torch's multi-line "size mismatch for ..." with no path
        "another shape": (pretrain, TORCH + ["--train-iters", 3, "--load", ckpt, "--finetune", "--hidden-size", 128],
                          {}),
        "another depth": (pretrain, TORCH + ["--train-iters", 3, "--load", ckpt, "--finetune", "--num-layers", 2], {}),
        "a shape flag against the checkpoint's": (
            pretrain, RUN + ["--train-iters", 3, "--load", ckpt, "--finetune", "--use-checkpoint-args",
                             "--num-layers", 2], {}),
        "a missing tokenizer": (pretrain, RUN + ["--train-iters", 3, "--tokenizer-type", "Llama2Tokenizer",
                                                 "--tokenizer-model", tmp_path / "nowhere.model"], {}),
        # item 6: tasks/main.py --load HF_DIR spoke of --use-checkpoint-args
        "evaluate an HF directory with --load": (
            "tasks.main", ["--task", "perplexity", "--load", hf_dir, "--data-path", "x"], {}),
        "a data tool": ("tools.merge_datasets", ["--input", tmp_path / "no_shards", "--output-prefix", tmp_path / "m"],
                        {}),
        "BERT pretraining": ("pretrain_bert", BERT + ["--train-iters", 1, "--mask-probb", 0.2], {}),
        "BERT classification": ("finetune_classification", BERT + [
            "--epochs", 1, "--train-data", tmp_path / "none.jsonl", "--valid-data", tmp_path / "none.jsonl"], {}),
        "the traceback switch": (pretrain, RUN + ["--train-iters", 3, "--finetune", "--load", empty],
                                 {"FINLLAMA_TRACEBACK": "1"}),
    }
    expected = {  # fragments of the one line each case prints
        "misspelt flag": ["unknown flag --tensor-model-paralel-size; did you mean --tensor-model-parallel-size"],
        "finetune from nothing": [f"--finetune --load {empty}: nothing to load", "latest_checkpointed_iteration.txt"],
        "finetune from an HF directory": [f"{hf_dir} is a Hugging Face model directory",
                                          "tools/checkpoint/util.py --model-type GPT --loader llama2_hf"],
        "resume with another schedule": [f"{ckpt}/iter_0000003/mp_rank_00/model_optim_rng.pt", "LR decay length",
                                         "12 samples (3 iterations of 4)", "24 samples (6 iterations of 4)",
                                         "--lr-decay-iters 3", "--use-checkpoint-opt_param-scheduler",
                                         "--override-opt_param-scheduler"],
        "torch_dist: resume with another schedule": [f"{dist}/iter_0000003: the checkpoint's LR decay length",
                                                     "--lr-decay-iters 3", "--override-opt_param-scheduler"],
        "torch_dist: another shape": [f"{dist}/iter_0000003 holds another model", "--hidden-size 64",
                                      "--use-checkpoint-args"],
        "another shape": [f"{ckpt}/iter_0000003/mp_rank_00/model_optim_rng.pt", "embedding.word_embeddings.weight",
                          "[256, 64] in the checkpoint but [256, 128] in this model", "--hidden-size",
                          "--use-checkpoint-args"],
        "another depth": [f"{ckpt}/iter_0000003/mp_rank_00/model_optim_rng.pt has extra decoder.layers.2.",
                          "--num-layers differs from the checkpoint's", "--use-checkpoint-args"],
        "a shape flag against the checkpoint's": ["--num-layers 2 (checkpoint: 4)", "drop these flags"],
        "a missing tokenizer": [f"--tokenizer-model {tmp_path / 'nowhere.model'} does not exist"],
        "evaluate an HF directory with --load": [f"--load {hf_dir} is a Hugging Face model directory",
                                                 f"--hf-model {hf_dir}"],
        "a data tool": [f"--input {tmp_path / 'no_shards'} is not a folder"],
        "BERT pretraining": ["unknown flag --mask-probb; did you mean --mask-prob?"],
        "BERT classification": [f"{tmp_path / 'none.jsonl'}: no such file", "--train-data / --valid-data"],
    }
    results = dict(zip(cases, run_distributed(_run_cases, 1, (list(cases.values()), str(tmp_path)))[0]))

    for name in ("a checkpoint to resume", "the fix it names", "a torch_dist checkpoint to resume",
                 "torch_dist: the fix it names"):
        code, out, err = results[name]
        assert code == 0, (name, err)
    assert "loaded checkpoint" in results["the fix it names"][1]
    assert "loaded checkpoint" in results["torch_dist: the fix it names"][1]
    for name, fragments in expected.items():
        code, _, err = results[name]
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, code, err)
        for fragment in fragments:
            assert fragment in lines[0], (name, fragment, lines[0])
    code, _, err = results["the traceback switch"]
    assert code == "CheckpointError" and "Traceback (most recent call last)" in err and "nothing to load" in err


def _tp2_checkpoint_with_a_bad_rank_1(path):
    """A TP=2 checkpoint whose rank-1 file holds a tensor of the wrong shape:
    only rank 1 finds out while loading (the loader then tells every rank)."""
    from tests.training.pretrain_runner import run_pretrain

    run_pretrain(TORCH + ["--train-iters", "0", "--tensor-model-parallel-size", "2", "--save", path], world_size=2)
    rank_1 = os.path.join(path, "iter_0000000", "mp_rank_01", "model_optim_rng.pt")
    state = torch.load(rank_1, weights_only=True)
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    state["model"][name] = torch.zeros(64, 8)
    torch.save(state, rank_1)
    return rank_1, name


def rank_1_fails_alone(argv):
    """An entry point's main whose rank 1 meets a UserError that no other rank
    sees, while rank 0 waits for it in a collective."""
    from megatron.training.errors import CheckpointError
    from megatron.training.initialize import initialize_distributed

    initialize_distributed("gloo")
    if torch.distributed.get_rank() == 1:
        raise CheckpointError("only rank 1 reads this file, and it is damaged: copy it again")
    torch.distributed.barrier()  # never returns normally: rank 1 is gone


def test_several_ranks_print_one_line_and_every_rank_exits(tmp_path):
    rank_1, name = _tp2_checkpoint_with_a_bad_rank_1(str(tmp_path / "ckpt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [  # (case, the rank that prints)
        (("pretrain_gpt", RUN + ["--train-iters", 3, "--tensor-model-parallel-size", 2, "--finetune", "--load",
                                 empty], {}), 0),  # every rank sees it: rank 0 speaks
        (("pretrain_gpt", RUN + ["--train-iters", 3, "--tensor-model-parallel-size", 2, "--finetune", "--load",
                                 tmp_path / "ckpt"], {}), 0),  # rank 1's shard: the loader tells rank 0
        ((rank_1_fails_alone, [], {}), 1),  # rank 1 alone: it speaks, rank 0 exits quietly
    ]
    errs_by_case = []
    for case, speaker in cases:
        by_rank = [results[0] for results in run_distributed(_run_cases, 2, ([case], str(tmp_path)))]
        codes, errs = [code for code, _, _ in by_rank], [err for _, _, err in by_rank]
        assert codes == [2, 2], (case, codes, errs)
        assert len(errs[speaker].splitlines()) == 1 and errs[speaker].startswith("error: "), (case, errs)
        assert errs[1 - speaker] == "", (case, errs)
        errs_by_case.append(errs[speaker])
    assert f"{rank_1}: {name} has shape [64, 8] in the checkpoint but [64, 64]" in errs_by_case[1]
    assert errs_by_case[2] == "error: only rank 1 reads this file, and it is damaged: copy it again\n"


def test_under_torchrun_the_workers_print_one_line_and_the_summary_names_it(tmp_path):
    """Real processes (imports included): torchrun with each worker's output in
    its own file. Exit status 2 makes torchrun report a failure (its own exit
    status 1) with its summary, whose rows carry the error line (torchelastic's
    error file) instead of a link to its docs."""
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--redirects", "3",
               "--log-dir", str(logs), os.path.join(ROOT, "pretrain_gpt.py"), *map(str, RUN),
               "--train-iters", "3", "--finetune", "--load", str(tmp_path / "missing")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert run.returncode == 1, run.stderr[-3000:]
    workers = {int(d.parent.name): d.read_text() for d in logs.glob("*/attempt_0/*/stderr.log")}
    line = f"error: --finetune --load {tmp_path / 'missing'}: nothing to load: {tmp_path / 'missing'} does not exist"
    assert workers == {0: line + "\n", 1: ""}, workers
    assert re.search(r"Root Cause.*\n(.*\n)*  traceback : " + re.escape(line), run.stderr), run.stderr[-3000:]

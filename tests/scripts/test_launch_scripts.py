"""The launch scripts and the Slurm wrapper, checked without GPUs or Slurm:
their flags pass the driver's validation (through the planner) at the
intended world size and fit an 80 GB A100; the wrapper starts one torchrun
per node with the allocation's rendezvous."""

import os
import shlex
import stat
import subprocess
import textwrap

import pytest

from megatron.training.planner.plan import GIB, plan_from_argv
from tests.distributed.launcher import ROOT

# Kept free on the 80 GiB device beyond the plan: CUDA context and NCCL
# communicators (~2 GiB), allocator fragmentation and transient buffers
# (all-gathers, fp32 logits), which the plan does not model.
HEADROOM_GIB = 10.0
A100_GIB = 80.0

# script -> (nodes it is planned for, parameter range in billions)
SCRIPTS = {
    "llama_30B.sh": (4, (29, 33)),
    "llama_70B.sh": (4, (63, 67)),
    "llama_130B.sh": (8, (125, 135)),
    "llama13B_stretch_32k.sh": (4, (12.5, 13.5)),
    "llama7B_stretch_8k.sh": (1, (6.5, 7.0)),
}
LLAMA_FLAGS = ["--use-flash-attn", "--use-distributed-optimizer", "--sequence-parallel", "--bf16", "--swiglu",
               "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
CLUSTER_VARS = ("DATA_PATH", "TOKENIZER_MODEL", "CHECKPOINT_PATH", "BASE_CHECKPOINT_PATH", "NNODES", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "DRY_RUN", "PLAN", "PLAN_ARGS")


def _env(**values):
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and not k.startswith("SLURM_")}
    env.update({k: str(v) for k, v in values.items()})
    return env


def _run(args, env, **kwargs):
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def _cluster(nodes, **extra):
    values = dict(DATA_PATH="/data/corpus_text_document", TOKENIZER_MODEL="/models/tokenizer.model",
                  CHECKPOINT_PATH="/ckpt/run", BASE_CHECKPOINT_PATH="/ckpt/base", NNODES=nodes, NODE_RANK=0,
                  MASTER_ADDR="node001")
    return _env(**dict(values, **extra))


def _torchrun_command(text):
    """(torchrun options, pretrain_gpt.py flags) from a printed command line."""
    words = shlex.split(text)
    assert words[0] == "torchrun", text
    at = next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt.py"))
    options = dict(zip(words[1:at:2], words[2:at:2]))
    return options, words[at + 1:]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_flags_pass_validation_and_fit_an_a100(script):
    nodes, (low, high) = SCRIPTS[script]
    out = _run(["bash", f"scripts/{script}"], _cluster(nodes, DRY_RUN=1))
    assert out.returncode == 0, out.stderr
    options, flags = _torchrun_command(out.stdout)
    assert (options["--nnodes"], options["--nproc_per_node"], options["--node_rank"]) == (str(nodes), "8", "0")
    assert all(f in flags for f in LLAMA_FLAGS), set(LLAMA_FLAGS) - set(flags)

    plan = plan_from_argv(flags + ["--world-size", str(8 * nodes), "--vocab-size", "32000", "--gpu", "A100"])
    assert low <= plan.parameters / 1e9 <= high
    peak = plan.peak_stage.total / GIB
    assert peak <= A100_GIB - HEADROOM_GIB, f"{script}: stage {plan.peak_stage.stage} plans {peak:.1f} GiB"


@pytest.mark.parametrize("script, factor", [("llama13B_stretch_32k.sh", "8"), ("llama7B_stretch_8k.sh", "2")])
def test_stretch_scripts_start_from_weights_only_and_resume_their_own_run(script, factor, tmp_path):
    nodes = SCRIPTS[script][0]
    _, flags = _torchrun_command(_run(["bash", f"scripts/{script}"], _cluster(nodes, DRY_RUN=1)).stdout)
    assert flags[flags.index("--rotary-seq-len-interpolation-factor") + 1] == factor
    assert flags[flags.index("--train-iters") + 1] == "1000"
    assert flags[flags.index("--load") + 1] == "/ckpt/base" and "--finetune" in flags
    # A restarted job continues its own checkpoint with optimizer and RNG.
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("250")
    env = _cluster(nodes, DRY_RUN=1, CHECKPOINT_PATH=tmp_path)
    _, flags = _torchrun_command(_run(["bash", f"scripts/{script}"], env).stdout)
    assert flags[flags.index("--load") + 1] == str(tmp_path) and "--finetune" not in flags


def _fake_bin(tmp_path, name, body):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path.parent


def test_launch_runs_torchrun_with_the_environment(tmp_path):
    bin_dir = _fake_bin(tmp_path, "torchrun", f"""\
        #!/bin/bash
        printf '%s\\n' "$CUDA_DEVICE_MAX_CONNECTIONS" "$@" > {tmp_path}/torchrun.args
        """)
    env = _cluster(4, NODE_RANK=3, MASTER_PORT=6123, PATH=f"{bin_dir}:{os.environ['PATH']}")
    out = _run(["bash", "scripts/llama_30B.sh", "--micro-batch-size", "4"], env)
    assert out.returncode == 0, out.stderr
    args = (tmp_path / "torchrun.args").read_text().split("\n")
    assert args[0] == "1"  # CUDA_DEVICE_MAX_CONNECTIONS for sequence-parallel overlap
    assert args[1:11] == ["--nproc_per_node", "8", "--nnodes", "4", "--node_rank", "3", "--master_addr", "node001",
                          "--master_port", "6123"]
    assert args[11] == os.path.join(ROOT, "pretrain_gpt.py")
    assert args[-3:-1] == ["--micro-batch-size", "4"]  # appended flags come last, so they win


@pytest.mark.parametrize("missing", ["DATA_PATH", "TOKENIZER_MODEL", "CHECKPOINT_PATH", "NNODES", "NODE_RANK",
                                     "MASTER_ADDR"])
def test_a_missing_variable_stops_the_launch_and_names_the_fix(missing, tmp_path):
    bin_dir = _fake_bin(tmp_path, "torchrun", f"#!/bin/bash\ntouch {tmp_path}/started\n")
    env = _cluster(4, PATH=f"{bin_dir}:{os.environ['PATH']}")
    del env[missing]
    out = _run(["bash", "scripts/llama_70B.sh"], env)
    assert out.returncode == 1
    assert f"error: {missing} is not set: export {missing}=" in out.stderr
    assert not (tmp_path / "started").exists()


def test_extension_script_needs_its_base_checkpoint():
    env = _cluster(1)
    del env["BASE_CHECKPOINT_PATH"]
    out = _run(["bash", "scripts/llama7B_stretch_8k.sh"], env)
    assert out.returncode == 1 and "export BASE_CHECKPOINT_PATH=" in out.stderr


def test_plan_mode_runs_the_planner_without_any_paths():
    out = _run(["bash", "scripts/llama_130B.sh"], _env(PLAN=1, PLAN_ARGS="--tflops-per-gpu 177"))
    assert out.returncode == 0, out.stderr
    assert "world size 64 = TP 8 x PP 8 x DP 1" in out.stdout
    assert "at 177 TFLOP/s per A100" in out.stdout and "fits: peak" in out.stdout


def test_broken_layout_is_rejected_with_the_fix():
    """64 GPUs with TP 8 and PP 3: the driver's validation, through the planner."""
    out = _run(["bash", "scripts/llama_130B.sh", "--pipeline-model-parallel-size", "3"], _env(PLAN=1))
    assert out.returncode == 2
    assert ("world size 64 is not divisible by TP x PP = 8 x 3 = 24: launch a multiple of 24 processes, "
            "or choose TP x PP dividing 64") in out.stderr


def test_a_plan_that_does_not_fit_exits_1_with_advice():
    out = _run(["bash", "scripts/llama_70B.sh", "--micro-batch-size", "16", "--global-batch-size", "2048"],
               _env(PLAN=1))
    assert out.returncode == 1
    assert "does not fit: stage 0 needs" in out.stdout and "lower --micro-batch-size" in out.stdout


# ---------------------------------------------------------------- Slurm

FAKE_SCONTROL = """\
    #!/bin/bash
    [[ "$1 $2" == "show hostnames" ]] || exit 2
    for i in $(seq 1 "$SLURM_JOB_NUM_NODES"); do printf 'node%03d\\n' "$i"; done
    """

# srun: record the options, then run the command once per node (as Slurm
# would, one task per node) with that node's SLURM_NODEID and --output file.
FAKE_SRUN = """\
    #!/usr/bin/env python3
    import itertools, os, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_SRUN_LOG"], "w") as f:
        f.write("\\n".join(args))
    options = list(itertools.takewhile(lambda a: a.startswith("--"), args))
    command = args[len(options):]
    output = next(a.split("=", 1)[1] for a in options if a.startswith("--output="))
    nodes = int(next(a.split("=", 1)[1] for a in options if a.startswith("--nodes=")))
    for node in range(nodes):
        path = (output.replace("%x", os.environ["SLURM_JOB_NAME"]).replace("%j", os.environ["SLURM_JOB_ID"])
                .replace("%n", str(node)))
        with open(path, "w") as log:
            subprocess.run(command, env=dict(os.environ, SLURM_NODEID=str(node)), stdout=log,
                           stderr=subprocess.STDOUT, check=True)
    """


def _slurm_env(tmp_path, **extra):
    bin_dir = _fake_bin(tmp_path, "scontrol", FAKE_SCONTROL)
    _fake_bin(tmp_path, "srun", FAKE_SRUN)
    return _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SRUN_LOG=tmp_path / "srun.args",
        SLURM_JOB_ID=4242, SLURM_JOB_NAME="llama", SLURM_JOB_NUM_NODES=4, SLURM_JOB_NODELIST="node[001-004]",
        SLURM_SUBMIT_DIR=ROOT, LOG_DIR=tmp_path / "logs", CONTAINER_IMAGE="/images/finllama-ngc.sqsh",
        CONTAINER_MOUNTS="/data:/data", DATA_PATH="/data/corpus", TOKENIZER_MODEL="/data/tokenizer.model",
        CHECKPOINT_PATH="/data/ckpt", DRY_RUN=1, **extra)


def test_sbatch_wrapper_starts_one_torchrun_per_node(tmp_path):
    out = _run(["bash", "scripts/slurm/pretrain.sbatch", "scripts/llama_30B.sh", "--micro-batch-size", "4"],
               _slurm_env(tmp_path))
    assert out.returncode == 0, out.stderr
    srun = (tmp_path / "srun.args").read_text().split("\n")
    logs = tmp_path / "logs"
    for option in ("--nodes=4", "--ntasks-per-node=1", "--container-image=/images/finllama-ngc.sqsh",
                   f"--container-mounts={ROOT}:{ROOT},/data:/data", f"--container-workdir={ROOT}",
                   f"--output={logs}/%x-%j-node%n.log"):
        assert option in srun
    assert srun[-4:] == [os.path.join(ROOT, "scripts/llama_30B.sh"), "--exit-signal-handler",
                         "--micro-batch-size", "4"]
    # Slurm's SIGTERM 120 s before the time limit becomes a saved checkpoint (--exit-signal-handler)
    with open(os.path.join(ROOT, "scripts/slurm/pretrain.sbatch")) as f:
        assert "#SBATCH --signal=TERM@120\n" in f.read()

    for node in range(4):
        line = (logs / f"llama-4242-node{node}.log").read_text().strip().splitlines()[-1]
        options, flags = _torchrun_command(line)
        assert options == {"--nproc_per_node": "8", "--nnodes": "4", "--node_rank": str(node),
                           "--master_addr": "node001", "--master_port": str(20000 + 4242 % 20000)}
        assert flags[-3:] == ["--exit-signal-handler", "--micro-batch-size", "4"]


def test_sbatch_wrapper_needs_a_container_image(tmp_path):
    env = _slurm_env(tmp_path)
    del env["CONTAINER_IMAGE"]
    out = _run(["bash", "scripts/slurm/pretrain.sbatch", "scripts/llama_30B.sh"], env)
    assert out.returncode == 1 and "export CONTAINER_IMAGE=" in out.stderr

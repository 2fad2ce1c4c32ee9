"""The training driver: `pretrain(...)` reads top to bottom as
flags -> processes -> tokenizer -> model -> optimizer -> checkpoint -> data -> loop.

It keeps Megatron-LM's callable contract: the entry point hands over a model
provider, a dataset provider and a forward step; the forward step returns
`(output_tensor, loss_func)` so megatron-core's pipeline schedule applies the
loss on the last stage.
"""

import dataclasses
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron.training import arguments as arguments_module
from megatron.training import initialize, kernels
from megatron.training.checkpoint import save_load
from megatron.training.checkpoint.iterations import require_checkpoint
from megatron.training.checkpoint.settings import flag, take_checkpoint_settings, vocabulary_difference
from megatron.training.exit_signal import ExitSignalHandler
from megatron.training.flops import ModelShape, iteration_work
from megatron.training.peft.arguments import adapters_enabled
from megatron.training.peft.checkpoint import load_adapter_checkpoint
from megatron.training.sizes import padded_vocab_size
from megatron.training.tokenizer import TokenizerError, model_vocabulary, tokenizer_and_vocab_size
from megatron.training.training_log import TrainingLogger, print_rank_0


@dataclasses.dataclass
class TrainingState:
    iteration: int = 0
    consumed_train_samples: int = 0
    exited_early: bool = False  # stopped by --exit-interval / --exit-duration-in-mins / --exit-signal-handler
    history: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    evaluations: List[Dict[str, float]] = dataclasses.field(default_factory=list)  # + "iteration", "split"


def pretrain(train_valid_test_datasets_provider: Callable, model_provider: Callable, forward_step_func: Callable,
             argv: Optional[List[str]] = None, extra_args_provider: Optional[Callable] = None,
             eval_metrics_func: Optional[Callable] = None) -> TrainingState:
    """Train a model as the flags in `argv` (default: sys.argv) say.

    model_provider(args, config, pre_process, post_process, vp_stage) -> model chunk
    train_valid_test_datasets_provider(args, tokenizer) -> (train, valid, test) datasets
    forward_step_func(args, data_iterator, model) -> (output_tensor, loss_func)
    eval_metrics_func(averaged values) -> reported values: turns what the loss
        function reports in evaluation (e.g. counts) into metrics (accuracy, F1)
    """
    args = setup_args(argv, extra_args_provider)
    tokenizer = build_tokenizer_from_args(args)
    model = build_model(args, model_provider)
    optimizer, scheduler = build_optimizer(args, model)
    save_load.prepare_saves(args)
    state = TrainingState()
    if args.load:
        state.iteration, state.consumed_train_samples = load_checkpoint(args, model, optimizer, scheduler)
    train_iter, valid_iter, test_iter = build_data_iterators(args, tokenizer, train_valid_test_datasets_provider,
                                                             state.consumed_train_samples)
    step = _bind_forward_step(forward_step_func, args, eval_metrics_func)
    if not args.skip_train and state.iteration < args.train_iters:
        train(args, step, model, optimizer, scheduler, train_iter, valid_iter, state)
    elif args.save and args.train_iters == 0:
        save(args, state, model, optimizer, scheduler)  # an initial checkpoint
        save_load.finalize_async_saves(args, blocking=True)
    if state.exited_early:
        return state  # as Megatron-LM: an early exit saves and stops, without the final evaluations
    evaluated_just_now = args.eval_interval and state.iteration % args.eval_interval == 0 and not args.skip_train
    if args.eval_iters and valid_iter is not None and not evaluated_just_now:
        evaluate_and_log(args, step, model, valid_iter, state.iteration, "validation", state=state)
    if args.eval_iters and test_iter is not None:
        evaluate_and_log(args, step, model, test_iter, state.iteration, "test", state=state)
    return state


# ---------------------------------------------------------------- set-up steps

def setup_args(argv=None, extra_args_provider=None):
    """Parse and validate flags, start the process groups, seed the RNGs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = arguments_module.parse_args(argv, extra_args_provider)
    initialize.initialize_distributed(args.distributed_backend, args.distributed_timeout_minutes)
    if args.finetune or args.use_checkpoint_args:
        require_checkpoint(args.load, "--finetune" if args.finetune else "--use-checkpoint-args")
    if args.use_checkpoint_args:
        _take_settings_from_checkpoint(args, arguments_module.flags_given(argv, extra_args_provider))
    arguments_module.validate_args(args, torch.distributed.get_world_size())
    initialize.initialize_model_parallel(args)
    initialize.set_seeds(args.seed)
    if args.train_iters is None:
        args.train_iters = args.train_samples // args.global_batch_size
    kernels.configure(args)
    _print_args(args)
    return args


def _take_settings_from_checkpoint(args, given) -> None:
    """--use-checkpoint-args: the checkpoint's model settings, unless `given` on the command line."""
    note = take_checkpoint_settings(args, save_load.read_checkpoint_args(args.load, args.ckpt_step), given,
                                    args.load)
    if note:
        print_rank_0(note)


def _print_args(args) -> None:
    from megatron.training.models.llama import attention_backend_name

    print_rank_0(
        f"> world size {args.world_size}: TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size}"
        f" VP={args.virtual_pipeline_model_parallel_size or 1} DP={args.data_parallel_size}; "
        f"{args.num_microbatches} micro-batches of {args.micro_batch_size} per iteration; "
        f"backend {args.distributed_backend}; attention: {attention_backend_name(args)}"
    )
    print_rank_0(f"> kernels: {args.kernel_selection.describe()}")


def build_tokenizer_from_args(args):
    """The tokenizer named by the flags (None for --mock-data without one);
    sets args.padded_vocab_size and args.unpadded_vocab_size (the real
    vocabulary, recorded in checkpoints: its padding rows are excluded from
    the softmax, models/padded_vocab.py)."""
    if (args.use_checkpoint_args and args.tokenizer_model and not os.path.exists(args.tokenizer_model)
            and save_load.read_checkpoint_args(args.load).get("tokenizer_model") == args.tokenizer_model):
        raise TokenizerError(f"the tokenizer {args.tokenizer_model} that {args.load} records (--use-checkpoint-args) "
                             "is not on this machine: pass --tokenizer-model PATH to a copy of it")
    tokenizer, vocab = tokenizer_and_vocab_size(args)
    padded = padded_vocab_size(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    if args.use_checkpoint_args:
        padded, vocab = _check_checkpoint_vocabulary(args, vocab, padded)
    args.padded_vocab_size = padded
    args.unpadded_vocab_size = vocab
    return tokenizer


def _check_checkpoint_vocabulary(args, vocab: int, padded: int) -> Tuple[int, int]:
    """--use-checkpoint-args: the tokenizer must have the checkpoint's vocabulary;
    its padding may differ (another TP or --make-vocab-size-divisible-by): the
    loaders add or drop padding rows, which no token id reaches, so this only says so.
    A converted model with more rows than its tokenizer has tokens (Qwen2.5:
    152,064 for 151,665) keeps its own vocabulary (tokenizer.model_vocabulary).
    Returns (padded, vocabulary) for the model."""
    saved = save_load.read_checkpoint_args(args.load, args.ckpt_step)
    model = model_vocabulary(vocab, saved)
    if model != vocab:
        vocab, padded = model, padded_vocab_size(model, args.make_vocab_size_divisible_by,
                                                 args.tensor_model_parallel_size)
    difference = vocabulary_difference(saved, vocab)
    if difference is not None:
        tokenizer = " ".join(f"{flag(k)} {getattr(args, k)}" for k in ("tokenizer_type", "tokenizer_model",
                                                                        "vocab_file", "vocab_size")
                             if getattr(args, k, None) is not None)
        raise arguments_module.ArgumentError(
            f"{args.load} was trained with another tokenizer: its vocabulary has {difference}, the tokenizer of this "
            f"run ({tokenizer}) {vocab}: use the tokenizer the checkpoint was trained with (leave the tokenizer flags "
            "out to take the checkpoint's)")
    rows = saved.get("padded_vocab_size")
    if rows is not None and rows != padded:
        print_rank_0(f"> vocabulary: the checkpoint's {vocab} ids padded to {rows} rows, here to {padded} "
                     f"(--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} x TP="
                     f"{args.tensor_model_parallel_size}): padding rows are refitted on load")
    return padded, vocab


def build_model(args, model_provider) -> list:
    """This rank's model chunks (one per virtual stage), wrapped in
    megatron-core's DistributedDataParallel (ddp.py: its grad buffer zeroed
    lazily where every writer allows it)."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    from megatron.training.ddp import DistributedDataParallel, lazy_zero_applies

    config = arguments_module.transformer_config_from_args(args)
    vp = args.virtual_pipeline_model_parallel_size
    chunks = [model_provider(args, config, None, None, vp_stage) for vp_stage in (range(vp) if vp else [None])]
    if adapters_enabled(args):  # freeze the base and attach adapters before Float16Module and DDP see the model
        from megatron.training.peft.model import apply_adapters

        apply_adapters(args, config, chunks)
    device = initialize.device()
    for chunk in chunks:
        chunk.to(device)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    if args.fp16 or args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = arguments_module.ddp_config_from_args(args)
    lazy_zero = lazy_zero_applies(args)
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(i > 0), lazy_zero=lazy_zero)
        for i, chunk in enumerate(chunks)
    ]
    for chunk in model:
        chunk.broadcast_params()
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
        config.grad_sync_func = [c.start_grad_sync for c in model] if len(model) > 1 else model[0].start_grad_sync
    if args.overlap_param_gather:
        config.param_sync_func = [c.start_param_sync for c in model] if len(model) > 1 else model[0].start_param_sync
    print_rank_0(f"> parameters on rank 0 (TP x PP shard): {n_params:,}")
    return model


def build_optimizer(args, model: list):
    """megatron-core's optimizer (distributed if asked) and LR/WD scheduler."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(arguments_module.optimizer_config_from_args(args), model)
    kernels.configure_optimizer(args, optimizer)
    model[0].config.grad_scale_func = optimizer.scale_loss
    train_samples, warmup, decay = arguments_module.lr_schedule_samples(args)
    if warmup >= decay:
        # No training step (an initial checkpoint; validate_args rejects the
        # other cases): the schedule is never used, but must be well-formed.
        decay = warmup + 1
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=train_samples, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
    return optimizer, scheduler



def load_checkpoint(args, model: list, optimizer, scheduler):
    """args.load into the run: (iteration, consumed_train_samples). With
    adapters (--lora-rank) the frozen base and the adapters come from two
    checkpoints (peft/checkpoint.py)."""
    load = load_adapter_checkpoint if adapters_enabled(args) else save_load.load_checkpoint
    return load(args, model, optimizer, scheduler)

def build_data_iterators(args, tokenizer, provider, consumed_train_samples: int):
    """Iterators for train / valid / test; a list of them per virtual stage
    under interleaved pipelining (each chunk reads the same micro-batches)."""
    from megatron.core import parallel_state

    from megatron.training.data.pretrain import build_data_iterator

    print_rank_0("> building train, validation, and test datasets ...")
    train_ds, valid_ds, test_ds = provider(args, tokenizer)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = args.data_parallel_size
    copies = args.virtual_pipeline_model_parallel_size or 1

    def make(ds, consumed, cyclic):
        iters = [build_data_iterator(ds, consumed, args, dp_rank, dp, cyclic) for _ in range(copies)]
        if iters[0] is None:
            return None
        return iters if copies > 1 else iters[0]

    return make(train_ds, consumed_train_samples, False), make(valid_ds, 0, True), make(test_ds, 0, False)


def _bind_forward_step(forward_step_func, args, eval_metrics_func=None):
    """The schedule's forward step (data_iterator, model); `evaluate` reads its `eval_metrics`."""
    def step(data_iterator, model):
        return forward_step_func(args, data_iterator, model)

    step.eval_metrics = eval_metrics_func
    return step


# ---------------------------------------------------------------- the loop

def train_step(args, forward_step_func, data_iterator, model: list, optimizer, scheduler):
    """One iteration: forward/backward over all micro-batches (pipelined), then
    the optimizer step. Returns (losses averaged over micro-batches and DP, skipped,
    grad_norm)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model if len(model) > 1 else model[0],
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size * args.sequences_per_sample,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=args.global_batch_size)
    return average_losses_across_data_parallel(losses), not update_successful, grad_norm


def average_losses_across_data_parallel(losses: List[dict]) -> Dict[str, torch.Tensor]:
    """Mean of each loss over micro-batches, then over data-parallel replicas.
    Only the last pipeline stage has losses; other stages return {}."""
    from megatron.core import parallel_state

    if not losses:
        return {}
    out = {}
    for key in losses[0]:
        value = torch.stack([d[key].float() for d in losses]).mean()
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
        out[key] = value / parallel_state.get_data_parallel_world_size()
    return out


def train(args, forward_step_func, model, optimizer, scheduler, train_iter, valid_iter, state: TrainingState):
    """Iterate until --train-iters (or --exit-interval / --exit-duration-in-mins /
    the --exit-signal with --exit-signal-handler)."""
    if train_iter is None:
        raise arguments_module.ArgumentError("no training data: --split gives the training split no share; "
                                             "give it a share (e.g. --split 98,1,1)")
    with ExitSignalHandler(args.exit_signal if args.exit_signal_handler else None) as exit_signal:
        return _train_loop(args, forward_step_func, model, optimizer, scheduler, train_iter, valid_iter, state,
                           exit_signal)


def _train_loop(args, forward_step_func, model, optimizer, scheduler, train_iter, valid_iter, state: TrainingState,
                exit_signal: ExitSignalHandler):
    for chunk in model:
        chunk.train()
    shape = ModelShape.from_args(args)
    flops, tokens_per_iteration = iteration_work(shape, args.global_batch_size, args.seq_length,
                                                 args.sequences_per_sample, args.trained_sequences_per_sample)
    logger = TrainingLogger(args, flops)
    start_time = time.time()
    saved_at = None
    print_rank_0(f"> training from iteration {state.iteration} to {args.train_iters}")
    while state.iteration < args.train_iters:
        t0 = time.time()
        losses, skipped, grad_norm = train_step(args, forward_step_func, train_iter, model, optimizer, scheduler)
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        logger.add(losses, skipped, time.time() - t0)
        if state.iteration % args.log_interval == 0:
            values = logger.log(state.iteration, state.consumed_train_samples, scheduler.get_lr(
                optimizer.param_groups[0]), grad_norm, optimizer.get_loss_scale().item(), tokens_per_iteration)
            state.history.append(dict(values, iteration=state.iteration))
        if args.eval_interval and state.iteration % args.eval_interval == 0 and valid_iter is not None \
                and args.eval_iters:
            evaluate_and_log(args, forward_step_func, model, valid_iter, state.iteration, "validation", logger, state)
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save(args, state, model, optimizer, scheduler)
            saved_at = state.iteration
        save_load.finalize_async_saves(args)
        if exit_signal.received_anywhere():
            print_rank_0(f"exiting at iteration {state.iteration}: received {args.exit_signal} "
                         f"(--exit-signal-handler){'' if args.save else '; no --save: nothing is saved'}")
            state.exited_early = True
            break
        if _should_exit(args, state.iteration, start_time):
            state.exited_early = True
            break
    if args.save and saved_at != state.iteration:
        save(args, state, model, optimizer, scheduler)
    save_load.finalize_async_saves(args, blocking=True)
    logger.close()
    return state


def _should_exit(args, iteration: int, start_time: float) -> bool:
    if args.exit_interval and iteration % args.exit_interval == 0:
        print_rank_0(f"exiting at iteration {iteration} (--exit-interval {args.exit_interval})")
        return True
    if args.exit_duration_in_mins:
        elapsed = torch.tensor([(time.time() - start_time) / 60.0])
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        if elapsed.item() > args.exit_duration_in_mins:
            print_rank_0(f"exiting at iteration {iteration} (--exit-duration-in-mins {args.exit_duration_in_mins})")
            return True
    return False


def save(args, state: TrainingState, model, optimizer, scheduler) -> None:
    t0 = time.time()
    path = save_load.save_checkpoint(args, state.iteration, model, optimizer, scheduler,
                                         state.consumed_train_samples)
    if args.async_save:
        print_rank_0(f"started the asynchronous save of {path}: training blocked {time.time() - t0:.2f} s")
    else:
        print_rank_0(f"saved checkpoint {path} in {time.time() - t0:.1f} s")


@torch.no_grad()
def evaluate(args, forward_step_func, model: list, data_iterator) -> Dict[str, float]:
    """Mean loss over --eval-iters batches (forward only), turned into metrics
    by the forward step's `eval_metrics` when it has one."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.eval()
    sums: Dict[str, torch.Tensor] = {}
    for _ in range(args.eval_iters):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=data_iterator,
            model=model if len(model) > 1 else model[0], num_microbatches=args.num_microbatches,
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size * args.sequences_per_sample,
            forward_only=True)
        for key, value in average_losses_across_data_parallel(losses).items():
            sums[key] = sums.get(key, 0.0) + value
    for chunk in model:
        chunk.train()
    means = {k: float(v) / args.eval_iters for k, v in sums.items()}
    metrics = getattr(forward_step_func, "eval_metrics", None)
    return metrics(means) if metrics is not None and means else means


def evaluate_and_log(args, forward_step_func, model, data_iterator, iteration: int, prefix: str,
                     logger: Optional[TrainingLogger] = None,
                     state: Optional[TrainingState] = None) -> Dict[str, float]:
    losses = evaluate(args, forward_step_func, model, data_iterator)
    (logger or TrainingLogger(args, 0.0)).log_validation(iteration, losses, prefix)
    if state is not None and losses:
        state.evaluations.append(dict(losses, iteration=iteration, split=prefix))
    return losses

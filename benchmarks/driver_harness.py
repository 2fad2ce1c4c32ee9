"""The training driver set up in-process for benchmarks: one model, optimizer,
scheduler and mock-data iterator, advanced in timed blocks through
`megatron.training.training.train` (its log lines silenced); and exact counts
of the bytes it holds (training state) and keeps for backward (activations)."""

import contextlib
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class DriverHarness:
    def __init__(self, argv):
        import pretrain_gpt
        from megatron.training import training
        from megatron.training.data.pretrain import build_data_iterator

        self._training = training
        self.args = training.setup_args(argv)
        tokenizer = training.build_tokenizer_from_args(self.args)
        self.model = training.build_model(self.args, pretrain_gpt.model_provider)
        self.optimizer, self.scheduler = training.build_optimizer(self.args, self.model)
        train_ds, _, _ = pretrain_gpt.train_valid_test_datasets_provider(self.args, tokenizer)
        self.data_iterator = build_data_iterator(train_ds, 0, self.args, 0, 1)
        self.state = training.TrainingState()
        self._step = lambda it, m: pretrain_gpt.forward_step(self.args, it, m)

    def train_block(self, iterations: int) -> None:
        """`iterations` more iterations of the driver's own loop."""
        self.args.train_iters = self.state.iteration + iterations
        with contextlib.redirect_stdout(io.StringIO()):
            self._training.train(self.args, self._step, self.model, self.optimizer, self.scheduler,
                                 self.data_iterator, None, self.state)


def _storage_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind `tensors` not counted yet (views and shared buffers count once)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def training_state_bytes(model, optimizer) -> dict:
    """Exact bytes held by the model chunks (parameters, DDP buffers, module buffers such as
    quantized weights), the gradient buffers and the optimizer (main params and states)."""
    seen = set()
    params = [p for chunk in model for p in chunk.parameters()]
    module_buffers = [b for chunk in model for b in chunk.module.buffers()]
    ddp_buffers = [b for chunk in model for b in chunk.buffers]
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    main = [p for o in inner for g in o.param_groups for p in g["params"]]
    states = [v for o in inner for s in o.state.values() for v in s.values() if hasattr(v, "untyped_storage")]
    weights = _storage_bytes(params + module_buffers + [b.param_data for b in ddp_buffers], seen)
    gradients = _storage_bytes([b.grad_data for b in ddp_buffers] + [p.grad for p in params], seen)
    optimizer_bytes = _storage_bytes(main + [p.grad for p in main] + [v for v in states if v.dim() > 0], seen)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer_bytes}


def saved_activation_bytes(harness: "DriverHarness") -> float:
    """Bytes autograd keeps for backward per micro-batch (one training iteration observed through
    saved_tensors_hooks; each storage once; parameters and buffers, which exist anyway, left out)."""
    import torch

    held = {t.untyped_storage().data_ptr() for chunk in harness.model
            for t in list(chunk.parameters()) + list(chunk.module.buffers())}
    seen = {}  # data_ptr -> storage, kept alive so that no later tensor reuses the address

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        harness.train_block(1)
    return sum(s.nbytes() for s in seen.values()) / harness.args.num_microbatches

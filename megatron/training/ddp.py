"""megatron-core's DistributedDataParallel with its grad buffer zeroed lazily.

megatron-core zeroes the whole grad buffer at the start of every iteration
(4 bytes per fp32 gradient: a 540 MB memset for a 135M-parameter model,
about 2% of a CPU fine-tuning step) so that every weight gradient can be
added into it. With `lazy_zero`, `zero_grad_buffer` marks each parameter's
main grad unwritten instead, and the first write of the iteration
overwrites it:

- the weight-gradient GEMM of megatron-core's linears runs with beta=0
  (kernels/grad_accum.py, our gradient-accumulation shim);
- the backward hook copies `param.grad` where megatron-core's adds it;
- later micro-batches add, as before;
- a main grad still unwritten when the gradients are synchronised (a
  parameter that got no gradient this iteration) is zeroed then, before any
  reduction reads the buffer.

The buffer's padding is never written and stays zero from its allocation.
Only where every writer knows the mark: megatron-core's own linears (the
local spec) with our shim. apex's extension and Transformer Engine's GEMMs
always accumulate, so there (and with --no-gradient-accumulation-fusion)
this is megatron-core's class unchanged.
"""

from megatron.core.distributed import DistributedDataParallel as _CoreDDP
from megatron.core.transformer.cuda_graphs import is_graph_capturing

from megatron.training.kernels import grad_accum


def lazy_zero_applies(args) -> bool:
    """Does every main-grad writer of this run honour the unwritten mark?"""
    return args.transformer_impl == "local" and args.kernel_selection.get("grad_accum") == "addmm"


class DistributedDataParallel(_CoreDDP):
    lazy_zero = False

    def __init__(self, config, ddp_config, module, disable_bucketing: bool = False, lazy_zero: bool = False):
        super().__init__(config, ddp_config, module, disable_bucketing=disable_bucketing)
        self.lazy_zero = lazy_zero

    def zero_grad_buffer(self):
        if not self.lazy_zero:
            return super().zero_grad_buffer()
        for param in self.params_with_grad:
            param.grad_added_to_main_grad = False
            grad_accum.mark_unwritten(param.main_grad)
        for bucket_group in self.bucket_groups + self.expert_parallel_bucket_groups:
            bucket_group.reset()

    def _zero_unwritten(self) -> None:
        for param in self.params_with_grad:
            grad_accum.zero_if_unwritten(param.main_grad)

    def start_grad_sync(self, *unused):
        self._zero_unwritten()
        super().start_grad_sync(*unused)

    def finish_grad_sync(self, force_all_reduce: bool = False):
        self._zero_unwritten()
        super().finish_grad_sync(force_all_reduce=force_all_reduce)

    def _make_backward_post_hook(self, param):
        """megatron-core's hook, with `param.grad` copied into an unwritten main grad instead of added."""

        def hook(*unused):
            if is_graph_capturing() or param not in self.param_to_bucket_group:
                return
            if self.ddp_config.overlap_grad_reduce and param.grad is None:
                raise RuntimeError("param.grad is None: unsafe with overlap_grad_reduce")
            # A fused linear's weight gradient is already in main_grad; a tied weight's dummy is
            # zeros beside the other use's real gradient, which still has to be added.
            tied_dummy = getattr(param, "zero_out_wgrad", False)
            if param.grad is not None and (not param.grad_added_to_main_grad or tied_dummy):
                grad_accum.add_or_copy(param.main_grad, param.grad.data)
            param.grad = None
            if self.ddp_config.overlap_grad_reduce:
                self.param_to_bucket_group[param].register_grad_ready(param, self.force_all_reduce)

        return hook

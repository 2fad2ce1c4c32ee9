"""The training driver set up in-process for benchmarks: one model, optimizer,
scheduler and mock-data iterator, advanced in timed blocks through
`megatron.training.training.train` (its log lines silenced)."""

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

"""A Megatron checkpoint as a conversion source, in whichever format it was
saved: the per-rank torch format (megatron_format.MegatronSource) or
torch_dist (torch_dist_format.TorchDistSource). An adapter-only checkpoint
(always the torch format) opens its base here too, since the base may be in
either format.
"""

import os
from typing import Optional

from megatron.training.checkpoint.iterations import is_torch_dist, iteration_dir, read_tracker
from megatron.training.checkpoint_convert.core import ModelSource
from megatron.training.checkpoint_convert.megatron_format import MegatronSource


def open_checkpoint(load_dir: str, tokenizer_model: Optional[str] = None) -> ModelSource:
    """A checkpoint root of this driver or Megatron-LM in either format."""
    path = os.path.abspath(load_dir)
    iteration, release = read_tracker(path) if os.path.isdir(path) else (None, False)
    if iteration is None:
        return _PerRankSource(load_dir, tokenizer_model)  # it names what is missing
    return open_iteration(path, iteration_dir(path, iteration, release), tokenizer_model)


def open_iteration(load_dir: str, iter_dir: str, tokenizer_model: Optional[str] = None) -> ModelSource:
    """One iteration directory of a checkpoint root, in the format it was saved in."""
    if is_torch_dist(iter_dir):
        from megatron.training.checkpoint_convert.torch_dist_format import TorchDistSource  # imports megatron.core

        return TorchDistSource(load_dir, iter_dir, os.path.basename(iter_dir) == "release", tokenizer_model)
    return _PerRankSource(load_dir, tokenizer_model, iter_dir)


class _PerRankSource(MegatronSource):
    """A per-rank checkpoint whose adapters' base opens in either format."""

    def base(self) -> ModelSource:
        """The base checkpoint an adapter-only checkpoint names, at the iteration it names."""
        return open_iteration(self.adapter_base["load"], self.base_iteration_dir(), self._tokenizer_model)

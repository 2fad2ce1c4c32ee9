"""Whole (unsharded) tensors of a torch_dist checkpoint, one layer at a time,
under this driver's model names with global layer indices
(`decoder.layers.<i>.input_layernorm.weight`; a BERT model's `encoder.layers.<i>.`): what the checkpoint tools
convert, and what loads that need full tensors take (a QLoRA base is
quantised whole; an adapter base goes through the same path).

A torch_dist checkpoint stores each layer tensor of a GPTModel (BertModel) under one key
with the layers stacked on a leading axis, the norms under Transformer
Engine's fused names (megatron-core's local spec maps them so); a layer is
read as its slice of every stacked key. Reading is megatron-core's
`dist_checkpointing.load` through the safe strategies, so it is collective
over the process group that exists (`full_groups` keeps the ranks' calls in
step).
"""

from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch

from megatron.training import sharding
from megatron.training.errors import CheckpointError

LAYERS = "decoder.layers."
BLOCKS = (LAYERS, "encoder.layers.")  # GPTModel's, BertModel's
# Entries of a checkpoint that are not model tensors.
NOT_MODEL = ("optimizer.", "rng_state")


def global_key(local_suffix: str, layers: str = LAYERS) -> str:
    """`input_layernorm.weight` -> `decoder.layers.self_attention.linear_qkv.layer_norm_weight`
    (`layers`: the block's prefix)."""
    return layers + sharding.rename_suffixes({"x." + local_suffix: None}, sharding.TE_FUSED_NORMS).popitem()[0][2:]


def local_suffix(key: str, layers: str = LAYERS) -> str:
    """Inverse of global_key."""
    return sharding.rename_suffixes({"x." + key[len(layers):]: None}, sharding.FROM_TE_NORMS).popitem()[0][2:]


class GlobalTensors:
    """The model tensors of one torch_dist iteration directory: their global
    shapes and dtypes, and reads of one layer or of whole tensors."""

    def __init__(self, iter_dir: str, num_layers: int):
        from megatron.training.checkpoint.torch_dist.safe_load import SafeShardedLoadStrategy

        self.iter_dir, self.num_layers = iter_dir, num_layers
        metadata = SafeShardedLoadStrategy().load_tensors_metadata(iter_dir)
        self.shapes = {k: (tuple(v.global_shape), v.dtype) for k, v in metadata.items()
                       if not k.startswith(NOT_MODEL)}
        self.layers = next((b for b in BLOCKS if any(k.startswith(b) for k in self.shapes)), None)
        if self.layers is None:
            raise CheckpointError(f"{iter_dir} holds no decoder or encoder layers: it is not a checkpoint of a GPT "
                                  "or BERT model")
        self.layer_keys = [k for k in self.shapes if k.startswith(self.layers)]
        self.other_keys = [k for k in self.shapes if not k.startswith(BLOCKS)]  # embeddings, final norm, heads
        stacked = sorted({self.shapes[k][0][0] for k in self.layer_keys})
        if stacked != [num_layers]:
            raise CheckpointError(f"{iter_dir} stacks {stacked} layers per key, its args say {num_layers}: "
                                  "the checkpoint is inconsistent")

    def read(self, requests: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
        """{key: tensor} for {key: (sharded offsets, local shape, dtype)}; collective."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor
        from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

        from megatron.training.checkpoint.torch_dist.safe_load import (
            SafeCommonLoadStrategy, SafeShardedLoadStrategy, reading_error,
        )

        # A slice of a key is asked for as a tensor of the key's full rank (a
        # leading 1 for the layer axis): megatron-core reads arbitrary chunks of
        # those, while a prepended axis assumes the other chunks live on other ranks.
        wanted = {key: ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), *offsets, replica_id=0)
                  for key, (offsets, shape, dtype) in requests.items()}
        try:
            loaded = dist_checkpointing.load(wanted, self.iter_dir, SafeShardedLoadStrategy(),
                                             SafeCommonLoadStrategy(), validate_access_integrity=False)
        except DcpCheckpointException as e:  # a reader's error (a cut or missing file) as one line
            raise reading_error(e, self.iter_dir) from None
        return {key: loaded[key] for key in requests}  # without the common state merged in

    def layer_request(self, index: int) -> Dict[str, tuple]:
        return {k: (((0, index, self.num_layers),), (1,) + self.shapes[k][0][1:], self.shapes[k][1])
                for k in self.layer_keys}

    def whole_request(self, names: Iterable[str]) -> Dict[str, tuple]:
        return {n: ((), self.shapes[n][0], self.shapes[n][1]) for n in names if n in self.shapes}

    def layer(self, index: int) -> Dict[str, torch.Tensor]:
        """Layer `index`'s tensors under local-spec names with the global index."""
        return {f"{self.layers}{index}.{local_suffix(k, self.layers)}": v[0]
                for k, v in self.read(self.layer_request(index)).items()}

    def whole(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """The non-layer tensors among `names` that the checkpoint has."""
        return self.read(self.whole_request(names))


def full_groups(iter_dir: str, num_layers: int, layers: Sequence[int],
                other_names: Iterable[str]) -> Iterator[Tuple[Optional[int], Dict[str, torch.Tensor]]]:
    """(layer index, its full tensors) for each of this rank's `layers`, then
    (None, the full tensors among `other_names`). Collective: the ranks read
    different layers, in as many calls each (the longest list sets the count)."""
    tensors = GlobalTensors(iter_dir, num_layers)
    count = torch.tensor([len(layers)], dtype=torch.int64)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    for k in range(int(count.item())):
        if k < len(layers):
            yield layers[k], tensors.layer(layers[k])
        else:
            tensors.read({})  # keeps this rank in step with those that read more layers
    yield None, tensors.whole(other_names)

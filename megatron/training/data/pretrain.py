"""Pretraining data: megatron-core's GPTDataset / BlendedMegatronDatasetBuilder
over indexed `.bin/.idx` files (or its MockGPTDataset), and a sampler that
resumes exactly from a count of consumed samples.

Every rank reads its own micro-batches (tensor-parallel peers read the same
samples), which needs no broadcast and keeps the pipeline simple; the cost is
redundant reads of a few MB per iteration.
"""

from typing import Iterator, List, Optional, Tuple

import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron.training.errors import UserError


class _VocabOnly:
    """The part of a tokenizer GPTDataset needs, for --mock-data without one."""

    pad = -1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.unique_identifiers = {"class": "VocabOnly", "vocab_size": vocab_size}


def gpt_dataset_config(args, tokenizer) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=get_blend_from_list(args.data_path) if args.data_path else None,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer if tokenizer is not None else _VocabOnly(args.vocab_size),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.reset_attention_mask,
        mid_level_dataset_surplus=0.005,
    )


def train_valid_test_num_samples(args) -> List[int]:
    """How many samples each split must provide for the whole run."""
    train_iters = args.train_iters if args.train_iters is not None else args.train_samples // args.global_batch_size
    eval_runs = (train_iters // args.eval_interval + 1) if args.eval_interval else 1
    return [
        train_iters * args.global_batch_size,
        eval_runs * args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
    ]


class DataError(UserError, ValueError):
    """Data that cannot train as asked; the message says what to change."""


def check_prefix(prefix: str, written_as: str):
    """The index header of a --data-path prefix whose .bin and .idx exist and
    belong together (indexed_writer.read_index_header); else a DataError.
    `written_as`: the files tools/preprocess_data.py writes for this model."""
    import os

    from megatron.training.data.indexed_writer import DatasetFormatError, read_index_header

    if not any(os.path.isfile(prefix + ext) for ext in (".bin", ".idx")):
        raise DataError(f"--data-path {prefix}: {prefix}.bin and {prefix}.idx not found; give the prefix without "
                        f".bin/.idx (tools/preprocess_data.py writes {written_as})")
    try:
        return read_index_header(prefix)
    except DatasetFormatError as e:
        raise DataError(f"--data-path {prefix}: {e}")


def check_data_prefixes(args, config: GPTDatasetConfig) -> None:
    """Every prefix of the config's blend has a complete, matching .bin/.idx
    pair (indexed_writer.read_index_header), and every split
    that must provide samples gets at least one document of each dataset
    (megatron-core would otherwise loop forever looking for tokens in an empty
    split). Reads the blend and split matrix `config` derived from --data-path
    and --split, so the check sees the same datasets and bounds the builder
    will."""
    prefixes = config.blend[0] if config.blend is not None else []
    needed = train_valid_test_num_samples(args)
    for prefix in prefixes:
        n_docs = check_prefix(prefix, "PREFIX_text_document.bin/.idx").sequences  # as GPTDataset splits them
        for name, bounds, samples in zip(("train", "validation", "test"), config.split_matrix, needed):
            if bounds is None or samples == 0:
                continue
            docs = int(round(bounds[1] * n_docs)) - int(round(bounds[0] * n_docs))
            if docs == 0:
                raise DataError(
                    f"--split {args.split} leaves the {name} split of {prefix} ({n_docs} documents) with no "
                    f"document: give that split a larger share (e.g. --split 90,8,2), use more data, or set "
                    f"{'--eval-iters 0' if name != 'train' else 'a non-zero training share'}")


def build_pretraining_datasets(args, tokenizer):
    """(train, valid, test) datasets; a split with no share in --split is None."""
    config = gpt_dataset_config(args, tokenizer)
    # Validation and test splits that no sample is asked of (--eval-iters 0) are not built:
    # megatron-core's GPTDataset loops forever looking for tokens in a split that owns no
    # document (a small corpus's share of --split 969,30,1).
    needed = train_valid_test_num_samples(args)
    config.split_matrix = [bounds if i == 0 or needed[i] else None for i, bounds in enumerate(config.split_matrix)]
    if not args.mock_data:
        check_data_prefixes(args, config)
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        cls, train_valid_test_num_samples(args), lambda: True, config
    ).build()


class ResumableBatchSampler:
    """Yields this data-parallel rank's micro-batch indices, starting after
    `consumed_samples`. Global order is sequential (GPTDataset shuffles
    internally), so a run resumed at N samples sees exactly the samples an
    uninterrupted run would have seen after N."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True):
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp_size)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.mbs * self.dp_size
        start = self.consumed
        while start + step <= self.total:
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += step


def build_data_iterator(dataset, consumed_samples: int, args, dp_rank: int, dp_size: int,
                        cyclic: bool = False) -> Optional[Iterator]:
    """A loader over `dataset` from `consumed_samples` on; None without a dataset.
    `cyclic` restarts from the beginning when exhausted (validation)."""
    if dataset is None:
        return None

    def make(start):
        sampler = ResumableBatchSampler(len(dataset), start % max(len(dataset), 1), args.micro_batch_size,
                                        dp_rank, dp_size)
        # Its own generator: a DataLoader iterator otherwise draws a seed from the
        # global RNG, and a resumed run (RNG restored before the loaders exist)
        # would then see different dropout masks than an uninterrupted one.
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                           pin_memory=torch.cuda.is_available(),
                                           persistent_workers=args.num_workers > 0,
                                           generator=torch.Generator().manual_seed(args.seed))

    if not cyclic:
        return iter(make(consumed_samples))

    def cycle():
        start = consumed_samples
        while True:
            for batch in make(start):
                yield batch
            start = 0

    return cycle()


def split_batch(batch: dict, device) -> Tuple[torch.Tensor, ...]:
    """tokens, labels, loss_mask, attention_mask (or None), position_ids on `device`."""
    move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
    return (
        move(batch["tokens"]).long(),
        move(batch["labels"]).long(),
        move(batch["loss_mask"]).float(),
        move(batch.get("attention_mask")),
        move(batch["position_ids"]).long(),
    )

"""The SFT dataset the training driver reads: preprocessed examples (token ids
+ loss mask, sft_preprocess.py) laid into samples of --seq-length tokens.

A sample holds a window of seq_length + 1 tokens; `tokens` are its first
seq_length, `labels` its last seq_length, and `loss_mask[p]` is 1 when
labels[p] is a response token. Batches are the dicts `split_batch` reads
(tokens, labels, loss_mask, position_ids, and attention_mask when packing).

Padding (default): one example per sample, padded with id 0 (loss 0); causal
attention as in pretraining, so the padding never affects the example.

Packing (--sft-packing): examples are laid end to end in epoch order
(next-fit: a sample is closed when the next example does not fit), so that
shuffling is kept. megatron-core's local attention has no variable-length
(cu_seqlens) path, so examples are kept apart with a dense block-diagonal
causal mask ([1, s, s], True = masked) and position ids restart at 0 for
each example; the label that would predict the next example's first token
is masked. A packed example thus sees exactly what it sees padded: its
per-example loss is the same. Cost: one s x s boolean mask per sample
(16 MB at s = 4096), and fused attention kernels fall back to their masked path.

Over-long examples (more than seq_length + 1 tokens), --sft-truncation:
- truncate (default): keep the first seq_length + 1 tokens (the prompt and
  the start of the response); an example whose kept part has no response
  token is dropped.
- drop: skip the example.
Both are counted and reported when the dataset is built.

Order: every epoch is a permutation of the kept examples drawn from
numpy's generator seeded with (--seed, epoch), the same on every rank and on
resume; validation data is read in file order.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from megatron.training.data.sft_preprocess import sft_dataset_prefixes
from megatron.training.errors import UserError

TRUNCATION_POLICIES = ("truncate", "drop")
PAD_ID = 0


class SFTDataError(UserError, ValueError):
    pass


@dataclass
class TruncationStats:
    examples: int = 0
    over_long: int = 0
    truncated: int = 0
    dropped: int = 0  # over-long and dropped (policy drop, or no response token left)

    def text(self, window: int, policy: str) -> str:
        return (f"{self.examples:,} examples, {self.over_long:,} longer than {window} tokens (seq_length + 1): "
                f"{self.truncated:,} truncated, {self.dropped:,} dropped (--sft-truncation {policy})")


def apply_truncation_policy(lengths: np.ndarray, masks, window: int, policy: str):
    """(kept example ids, tokens used per kept example, stats); `masks(i)`
    gives example i's loss mask (read only for over-long examples)."""
    if policy not in TRUNCATION_POLICIES:
        raise SFTDataError(f"unknown --sft-truncation {policy!r}: choose one of {', '.join(TRUNCATION_POLICIES)}")
    stats = TruncationStats(examples=len(lengths))
    keep = np.ones(len(lengths), dtype=bool)
    for i in np.flatnonzero(lengths > window):
        stats.over_long += 1
        # a response token must remain among the labels (positions 1..window-1)
        if policy == "drop" or not masks(i)[1:window].any():
            keep[i] = False
            stats.dropped += 1
        else:
            stats.truncated += 1
    kept = np.flatnonzero(keep)
    return kept, np.minimum(lengths[kept], window), stats


def pack_next_fit(order: np.ndarray, used: Dict[int, int], window: int) -> List[np.ndarray]:
    """Split `order` into consecutive groups of total length <= window."""
    bins, start, fill = [], 0, 0
    for k, ex in enumerate(order):
        n = used[int(ex)]
        if fill + n > window and k > start:
            bins.append(order[start:k])
            start, fill = k, 0
        fill += n
    if len(order) > start:
        bins.append(order[start:])
    return bins


class SFTDataset(torch.utils.data.Dataset):
    """`num_samples` samples (None: one epoch) from a preprocessed SFT prefix."""

    def __init__(self, prefix: str, seq_length: int, num_samples: Optional[int] = None, packing: bool = False,
                 truncation: str = "truncate", shuffle: bool = True, seed: int = 1234):
        from megatron.training.data.indexed_writer import DatasetFormatError, checked_indexed_dataset

        tokens_prefix, mask_prefix = sft_dataset_prefixes(prefix)
        for p in (tokens_prefix, mask_prefix):
            if not os.path.exists(p + ".idx") and not os.path.exists(p + ".bin"):
                raise SFTDataError(f"{p}.idx not found: give --data-path / --valid-data-path the --output-prefix "
                                   "of tools/preprocess_sft_data.py (without the _text_document suffix)")
        self.prefix = prefix
        try:
            self.tokens = checked_indexed_dataset(tokens_prefix)
            self.masks = checked_indexed_dataset(mask_prefix)
        except DatasetFormatError as e:
            raise SFTDataError(str(e))
        lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(lengths, self.masks.sequence_lengths):
            raise SFTDataError(f"{tokens_prefix} and {mask_prefix} differ in example lengths: "
                               "preprocess the jsonl again (both come from one tools/preprocess_sft_data.py run)")
        self.seq_length = seq_length
        self.window = seq_length + 1
        self.packing, self.truncation, self.shuffle, self.seed = packing, truncation, shuffle, seed
        self.kept, used, self.stats = apply_truncation_policy(lengths, self.masks.__getitem__, self.window,
                                                              truncation)
        if len(self.kept) == 0:
            raise SFTDataError(f"{prefix}: no example fits --seq-length {seq_length} "
                               f"({self.stats.text(self.window, truncation)}): raise --seq-length or use "
                               "--sft-truncation truncate")
        self.used = dict(zip(self.kept.tolist(), used.tolist()))
        self._epochs: List[List[np.ndarray]] = []  # samples (example ids) of each epoch built so far
        self._starts = [0]  # first sample index of each epoch
        self.num_samples = num_samples if num_samples is not None else self.samples_in_epoch(0)
        while self._starts[-1] < self.num_samples:
            self._build_epoch()

    # ---- order and sample layout

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.kept
        return np.random.default_rng([self.seed, epoch]).permutation(self.kept)

    def _epoch_samples(self, epoch: int) -> List[np.ndarray]:
        order = self.epoch_order(epoch)
        if self.packing:
            return pack_next_fit(order, self.used, self.window)
        return [order[k:k + 1] for k in range(len(order))]

    def _build_epoch(self) -> None:
        samples = self._epoch_samples(len(self._epochs))
        self._epochs.append(samples)
        self._starts.append(self._starts[-1] + len(samples))

    def samples_in_epoch(self, epoch: int) -> int:
        if epoch < len(self._epochs):
            return len(self._epochs[epoch])
        return len(self._epoch_samples(epoch))

    @property
    def epochs(self) -> float:
        """How many passes over the data `num_samples` samples make."""
        full = int(np.searchsorted(self._starts, self.num_samples, side="right")) - 1
        if full >= len(self._epochs):
            return float(full)
        return full + (self.num_samples - self._starts[full]) / len(self._epochs[full])

    def sample_examples(self, index: int) -> np.ndarray:
        """The example ids in sample `index`, in order."""
        epoch = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._epochs[epoch][index - self._starts[epoch]]

    def __len__(self) -> int:
        return self.num_samples

    # ---- one sample

    def __getitem__(self, index: int) -> dict:
        s = self.seq_length
        ids = np.full(self.window, PAD_ID, dtype=np.int64)
        mask = np.zeros(self.window, dtype=np.float32)
        positions = np.arange(self.window, dtype=np.int64)
        segment = np.full(self.window, -1, dtype=np.int64)  # example number per position; -1 padding
        pos = 0
        for k, ex in enumerate(self.sample_examples(index)):
            n = self.used[int(ex)]
            ids[pos:pos + n] = self.tokens[int(ex)][:n]
            mask[pos:pos + n] = self.masks[int(ex)][:n]
            mask[pos] = 0.0  # an example's first token is never a label of the previous one
            positions[pos:pos + n] = np.arange(n)
            segment[pos:pos + n] = k
            pos += n
        sample = {
            "tokens": torch.from_numpy(ids[:-1].copy()),
            "labels": torch.from_numpy(ids[1:].copy()),
            "loss_mask": torch.from_numpy(mask[1:].copy()),
            "position_ids": torch.from_numpy(positions[:-1].copy()),
        }
        if self.packing:
            seg = torch.from_numpy(segment[:-1].copy())
            seg[seg < 0] = s  # padding attends among itself
            same = seg.unsqueeze(0) == seg.unsqueeze(1)
            causal = torch.ones(s, s, dtype=torch.bool).tril()
            sample["attention_mask"] = (~(same & causal)).unsqueeze(0)
        return sample

    def describe(self, name: str) -> str:
        mode = "packed" if self.packing else "padded"
        tokens = sum(self.used.values())
        first = self.samples_in_epoch(0)
        return (f"SFT {name} data {self.prefix}: {self.stats.text(self.window, self.truncation)}; {mode}: "
                f"{first:,} samples per epoch ({tokens / (first * self.window):.0%} of the window holds tokens); "
                f"{self.num_samples:,} samples = {self.epochs:.2f} epochs")


# ---- driver integration (flags and the dataset provider)

def add_sft_args(parser):
    g = parser.add_argument_group("supervised fine-tuning")
    g.add_argument("--valid-data-path", type=str, default=None,
                   help="preprocessed held-out SFT prefix; validation loss over --eval-iters global batches of it")
    g.add_argument("--sft-packing", action="store_true",
                   help="pack several examples per sample (block-diagonal attention, position ids reset); "
                        "default: one example per sample, padded")
    g.add_argument("--sft-truncation", choices=TRUNCATION_POLICIES, default="truncate",
                   help="examples longer than --seq-length + 1 tokens: truncate (keep the start) or drop")
    return parser


def build_sft_datasets(args, tokenizer):
    """(train, valid, None): train shuffled per epoch for the whole run,
    valid in file order, --eval-iters x --global-batch-size samples (the same
    samples at every evaluation)."""
    from megatron.training.data.pretrain import train_valid_test_num_samples
    from megatron.training.training_log import print_rank_0

    if args.mock_data or not args.data_path or len(args.data_path) != 1:
        raise SFTDataError("fine-tuning reads one preprocessed SFT prefix: give --data-path PREFIX "
                           "(preprocess several jsonl files together: --input accepts a folder or a glob)")
    common = dict(seq_length=args.seq_length, packing=args.sft_packing, truncation=args.sft_truncation,
                  seed=args.seed)
    train = SFTDataset(args.data_path[0], num_samples=train_valid_test_num_samples(args)[0], shuffle=True, **common)
    print_rank_0("> " + train.describe("train"))
    valid = None
    if args.valid_data_path and args.eval_iters:
        valid = SFTDataset(args.valid_data_path, num_samples=args.eval_iters * args.global_batch_size,
                           shuffle=False, **common)
        print_rank_0("> " + valid.describe("validation"))
    return train, valid, None

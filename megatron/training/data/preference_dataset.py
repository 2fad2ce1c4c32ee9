"""The preference dataset the training driver reads: preprocessed pairs
(preference_preprocess.py), one pair per sample.

A sample holds both sides, each padded to a window of seq_length + 1 tokens
exactly as an SFT sample is (sft_dataset.py): `tokens`, `labels`,
`loss_mask` and `position_ids`, each [2, seq_length], row 0 chosen, row 1
rejected; with precomputed reference log-probs also `ref_logps` [2]
(float64). A micro-batch of m pairs thus carries both sides of every pair;
the forward step lays them out [chosen x m; rejected x m] as TRL does.

Pairs longer than the window were refused when preprocessing (with
--seq-length); a run with a shorter --seq-length than the data was prepared
for is refused here, naming the first pair that does not fit. Order: every
epoch is a permutation of the pairs drawn from numpy's generator seeded with
(--seed, epoch), the same on every rank and on resume; validation pairs are
read in file order.

Reference log-probs (--pref-reference precomputed) live beside the data in
{prefix}_ref_logps.npz: `logps` [pairs, 2] (chosen, rejected; float64),
`fingerprint` (a hash of the pair index files, so a file made for other data
is refused) and `load` (the checkpoint they were computed with).
"""

import hashlib
import os
from typing import Optional

import numpy as np
import torch

from megatron.training.data.preference_preprocess import preference_dataset_prefixes
from megatron.training.errors import UserError
from megatron.training.fileio import remove_quietly, temp_name

PAD_ID = 0
REF_LOGPS_SUFFIX = "_ref_logps.npz"


class PreferenceDataError(UserError, ValueError):
    pass


def ref_logps_path(prefix: str) -> str:
    return prefix + REF_LOGPS_SUFFIX


def data_fingerprint(prefix: str) -> str:
    """sha256 over the pair datasets' index files (lengths and layout of every pair) and their sizes."""
    digest = hashlib.sha256()
    for p in preference_dataset_prefixes(prefix):
        with open(p + ".idx", "rb") as f:
            digest.update(f.read())
        digest.update(str(os.path.getsize(p + ".bin")).encode())
    return digest.hexdigest()


def write_ref_logps(prefix: str, logps: np.ndarray, load: str) -> str:
    """Write {prefix}_ref_logps.npz under a temporary name, then rename it into place."""
    path = ref_logps_path(prefix)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, logps=np.asarray(logps, dtype=np.float64), fingerprint=np.array(data_fingerprint(prefix)),
                     load=np.array(os.path.abspath(load) if load else ""))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)
    return path


def read_ref_logps(prefix: str, pairs: int, load: Optional[str] = None) -> np.ndarray:
    """[pairs, 2] reference log-probs of `prefix`, checked against the data
    (and, when given, the checkpoint `load` they must come from)."""
    path = ref_logps_path(prefix)
    if not os.path.exists(path):
        raise PreferenceDataError(f"{path} not found: finetune_dpo.py --pref-reference precomputed computes it first "
                                  "when it knows the reference: --finetune from it, or --ref-load DIR")
    try:
        with np.load(path) as saved:
            logps, fingerprint, source = saved["logps"], str(saved["fingerprint"]), str(saved["load"])
    except (OSError, ValueError, KeyError) as e:
        raise PreferenceDataError(f"{path} cannot be read ({e}): delete it, and it is computed again")
    if fingerprint != data_fingerprint(prefix) or logps.shape != (pairs, 2):
        raise PreferenceDataError(f"{path} was computed for other data than {prefix}: delete it, and it is computed "
                                  "again")
    if load is not None and source and source != os.path.abspath(load):
        raise PreferenceDataError(f"{path} holds the log-probs of {source}, not of the reference {load}: delete it "
                                  "to compute them with this one")
    return logps


class PreferenceDataset(torch.utils.data.Dataset):
    """`num_samples` pairs (None: one epoch) from a preprocessed preference prefix."""

    def __init__(self, prefix: str, seq_length: int, num_samples: Optional[int] = None, shuffle: bool = True,
                 seed: int = 1234, ref_logps: Optional[np.ndarray] = None):
        from megatron.training.data.indexed_writer import DatasetFormatError, checked_indexed_dataset

        tokens_prefix, mask_prefix = preference_dataset_prefixes(prefix)
        if not os.path.exists(tokens_prefix + ".idx"):
            raise PreferenceDataError(f"{tokens_prefix}.idx not found: give --data-path / --valid-data-path the "
                                      "--output-prefix of tools/preprocess_preference_data.py")
        try:
            self.tokens = checked_indexed_dataset(tokens_prefix)
            self.masks = checked_indexed_dataset(mask_prefix)
        except DatasetFormatError as e:
            raise PreferenceDataError(str(e))
        lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if (not np.array_equal(lengths, self.masks.sequence_lengths)
                or not np.all(np.diff(self.tokens.document_indices) == 2)):
            raise PreferenceDataError(f"{prefix}: the pair datasets do not hold pairs of two matching sequences: "
                                      "preprocess the jsonl again with tools/preprocess_preference_data.py")
        self.prefix, self.seq_length, self.window = prefix, seq_length, seq_length + 1
        self.pairs = len(lengths) // 2
        self.lengths = lengths.reshape(self.pairs, 2)
        over = np.flatnonzero(self.lengths.max(axis=1) > self.window)
        if len(over):
            raise PreferenceDataError(
                f"{prefix}: {len(over):,} pairs do not fit --seq-length {seq_length} (pair {over[0]} has "
                f"{self.lengths[over[0]].max()} tokens on one side): raise --seq-length to "
                f"{self.lengths.max() - 1}, or preprocess with --seq-length {seq_length} to find their records")
        if ref_logps is not None and ref_logps.shape != (self.pairs, 2):
            raise PreferenceDataError(f"{prefix}: {len(ref_logps)} reference log-probs for {self.pairs} pairs")
        self.ref_logps = ref_logps
        self.shuffle, self.seed = shuffle, seed
        self.num_samples = self.pairs if num_samples is None else num_samples
        self._orders = {}

    @property
    def epochs(self) -> float:
        return self.num_samples / self.pairs

    def __len__(self) -> int:
        return self.num_samples

    def pair_index(self, index: int) -> int:
        epoch, k = divmod(index, self.pairs)
        if not self.shuffle:
            return k
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.pairs)}
        return int(self._orders[epoch][k])

    def _side(self, sequence: int):
        n = int(self.tokens.sequence_lengths[sequence])
        ids = np.full(self.window, PAD_ID, dtype=np.int64)
        mask = np.zeros(self.window, dtype=np.float32)
        ids[:n] = self.tokens[sequence]
        mask[:n] = self.masks[sequence]
        return ids, mask

    def __getitem__(self, index: int) -> dict:
        pair = self.pair_index(index)
        (chosen, chosen_mask), (rejected, rejected_mask) = self._side(2 * pair), self._side(2 * pair + 1)
        ids, mask = np.stack([chosen, rejected]), np.stack([chosen_mask, rejected_mask])
        sample = {
            "tokens": torch.from_numpy(ids[:, :-1].copy()),
            "labels": torch.from_numpy(ids[:, 1:].copy()),
            "loss_mask": torch.from_numpy(mask[:, 1:].copy()),
            "position_ids": torch.arange(self.seq_length).expand(2, self.seq_length).clone(),
        }
        if self.ref_logps is not None:
            sample["ref_logps"] = torch.from_numpy(self.ref_logps[pair].copy())
        return sample

    def describe(self, name: str) -> str:
        used = self.lengths.sum() / (2 * self.pairs * self.window)
        return (f"preference {name} data {self.prefix}: {self.pairs:,} pairs ({used:.0%} of the windows hold "
                f"tokens); {self.num_samples:,} samples = {self.epochs:.2f} epochs"
                + ("; reference log-probs precomputed" if self.ref_logps is not None else ""))


def build_preference_datasets(args, tokenizer):
    """(train, valid, None) as build_sft_datasets: train shuffled per epoch,
    valid in file order, --eval-iters x --global-batch-size pairs."""
    from megatron.training.data.pretrain import train_valid_test_num_samples
    from megatron.training.training_log import print_rank_0

    if not args.data_path or len(args.data_path) != 1:
        raise PreferenceDataError("preference tuning reads one preprocessed pair prefix: give --data-path PREFIX "
                                  "(preprocess several jsonl files together: --input accepts a folder or a glob)")

    def dataset(prefix, num_samples, shuffle):
        ref = None
        if args.pref_reference == "precomputed":
            pairs = PreferenceDataset(prefix, args.seq_length).pairs
            ref = read_ref_logps(prefix, pairs, args.ref_load)
        return PreferenceDataset(prefix, args.seq_length, num_samples, shuffle, args.seed, ref)

    train = dataset(args.data_path[0], train_valid_test_num_samples(args)[0], True)
    print_rank_0("> " + train.describe("train"))
    valid = None
    if args.valid_data_path and args.eval_iters:
        valid = dataset(args.valid_data_path, args.eval_iters * args.global_batch_size, False)
        print_rank_0("> " + valid.describe("validation"))
    return train, valid, None


def split_pair_batch(batch: dict, device):
    """A collated batch of m pairs -> tokens, labels, loss_mask, position_ids
    [2m, seq_length] (rows: chosen x m, then rejected x m, as TRL lays them out)
    and ref_logps [m, 2] (None without), on `device`."""
    def rows(t):
        return t.transpose(0, 1).reshape(-1, t.shape[-1]).to(device, non_blocking=True)

    ref = batch.get("ref_logps")
    return (rows(batch["tokens"]).long(), rows(batch["labels"]).long(), rows(batch["loss_mask"]).float(),
            rows(batch["position_ids"]).long(), ref.to(device) if ref is not None else None)

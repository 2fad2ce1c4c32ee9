"""The loader -> saver protocol and the pieces every converter shares."""

import contextlib
import os
import shutil
import sys
import weakref
from typing import Callable, Dict, Iterator, Optional

import torch

from megatron.training.errors import UserError
from megatron.training.sizes import divisors, tensor_parallel_sizes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(UserError, RuntimeError):
    """Input the converter cannot use as asked; the message says what to change."""


class ModelSource:
    """A model to convert, as loaders provide it and savers consume it.

    `args` holds the model's Megatron flags (argparse dest names: num_layers,
    hidden_size, num_query_groups, padded_vocab_size, vocab_size (the
    tokenizer's, None when unknown), tokenizer_type, tokenizer_model,
    rotary_seq_len_interpolation_factor, ...). The readers return full
    tensors under megatron-core's GPTModel (or BertModel) state-dict names
    with global layer indices; the embedding and output rows may include
    vocabulary padding. `embedding()` holds the `embedding.*` entries, `final()`
    everything after the last layer (final norm, and the heads: output layer
    when untied, BERT's LM head, pooler, binary or classification head).
    """

    format: str = ""  # "hf" or "megatron": how --verify runs this side
    path: str = ""
    args: dict = {}
    iteration: Optional[int] = None  # None: a released model (no training state)
    vocab_size: Optional[int] = None  # the tokenizer's vocabulary (rows without padding); None: unknown
    has_output_layer: bool = True  # False for a model without an LM output layer (a BERT classifier)
    # what --verify compares for this model family (verify.Outputs); None: next-token logits
    verify_outputs = None
    # LoRA adapters (checkpoint_convert/peft.py AdapterSettings) when the source holds adapter
    # tensors only: then layer() returns them, embedding() and final() nothing, and base() the model
    # they apply to; `adapter_base` names that model as the driver's adapter checkpoints do.
    adapter = None
    adapter_base: Optional[dict] = None

    def embedding(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def layer(self, index: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def final(self) -> Dict[str, torch.Tensor]:
        """The final norm and the heads (the output layer's weight only when it is not tied to the embedding)."""
        raise NotImplementedError

    def base(self) -> "ModelSource":
        """The model this source's adapters apply to."""
        raise ConversionError(f"{self.path} holds no LoRA adapters")

    @property
    def num_layers(self) -> int:
        return self.args["num_layers"]

    @property
    def tied(self) -> bool:
        return not self.args.get("untie_embeddings_and_output_weights", False)


def dtype_and_tokenizer_flags(config: dict, tokenizer=None) -> list:
    """--bf16 / --fp16 for an HF config.json's dtype, and the tokenizer flags
    for a (--tokenizer-type, path) pair (None: no tokenizer)."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    flags = {"bfloat16": ["--bf16"], "float16": ["--fp16"]}.get(dtype, [])
    if tokenizer:
        flags += ["--tokenizer-type", tokenizer[0], "--tokenizer-model", tokenizer[1]]
    return flags


def check_target_layout(args: dict, tp: int, pp: int, vp_layers: Optional[int] = None) -> None:
    """Raise ConversionError when the model cannot be laid out over TP x PP (x VP)."""
    heads, groups, layers = args["num_attention_heads"], args["num_query_groups"], args["num_layers"]
    ffn = args["ffn_hidden_size"]
    if heads % tp or groups % tp or ffn % tp:
        raise ConversionError(
            f"--target-tensor-parallel-size {tp} does not divide the model's {heads} attention heads, {groups} "
            f"query groups and FFN size {ffn}: use a TP size that divides all three "
            f"({tensor_parallel_sizes(heads, groups, ffn)})")
    if layers % pp:
        raise ConversionError(f"--target-pipeline-parallel-size {pp} does not divide the model's {layers} layers: "
                              f"use one of {divisors(layers)}")
    if vp_layers is not None:
        per_stage = layers // pp
        if pp == 1 or per_stage % vp_layers or per_stage // vp_layers < 2:
            raise ConversionError(
                f"--target-num-layers-per-virtual-pipeline-stage {vp_layers} needs PP > 1 and a divisor of the "
                f"{per_stage} layers per stage below {per_stage} ({divisors(per_stage)})")


def cast(tensors: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


@contextlib.contextmanager
def staged_output(save_dir: str) -> Iterator[str]:
    """Yield a staging directory beside `save_dir`; rename it to `save_dir`
    when the block completes, delete it when the block fails, so nothing
    half-written is ever found at `save_dir`."""
    final = os.path.abspath(save_dir)
    if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
        raise ConversionError(f"the save directory {final} exists and is not empty: choose a new directory, "
                              "or remove the old one first")
    staging = final + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(final):
        os.rmdir(final)
    os.replace(staging, final)


def convert(source: ModelSource, save: Callable[[ModelSource, str], object], save_dir: str) -> None:
    """Run `save(source, staging_dir)` with the output staged beside `save_dir`
    and renamed when complete."""
    try:
        with staged_output(save_dir) as staging:
            save(source, staging)
    except BaseException:
        close_progress_bars()  # so that the error line starts a line of its own, not the bar's
        raise
    print(f"saved {os.path.abspath(save_dir)}", flush=True)


_BARS = weakref.WeakSet()  # the progress bars not yet garbage-collected


def progress(total: int, desc: str):
    """A progress bar for one phase of a conversion (on stderr)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, dynamic_ncols=True, leave=True)
    _BARS.add(bar)
    return bar


def close_progress_bars() -> None:
    """Close the bars a failed step left open (each ends its line; closing twice does nothing)."""
    for bar in list(_BARS):
        bar.close()

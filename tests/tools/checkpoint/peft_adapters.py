"""Helpers shared by the adapter tests: real peft adapters on tiny random HF Llama models."""

import json
import os

import torch

from tests.tools.checkpoint.test_conversion import make_hf_model  # noqa: F401 - shared with the adapter tests
from tools.checkpoint import util

# GQA (4 heads, 2 groups) so the q and k/v adapters have different shapes; untied or tied embeddings.
HF_MODELS = {
    "untied": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False),
    "tied": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True),
    # widths that are multiples of 64: transformers + bitsandbytes (0.50.2) dequantize NF4 right on CPU
    # only then, so this is the QLoRA reference's base
    "wide": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False),
}


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def make_peft_adapter(hf_dir, out_dir, seed=1, **lora):
    """A peft adapter over `hf_dir` with random non-zero A, B (and DoRA magnitudes
    away from the base's row norms), saved as peft saves it. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_hf(hf_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(out_dir))
    return model.eval()


def convert(loader, saver, load, save, *extra):
    """tools/checkpoint/util.py in-process; returns its exit code."""
    return util.main(["--model-type", "GPT", "--loader", loader, "--saver", saver, "--load-dir", str(load),
                      "--save-dir", str(save), *map(str, extra)])


def to_megatron_base(hf_dir, save):
    assert convert("llama2_hf", "megatron", hf_dir, save, "--target-tensor-parallel-size", 1,
                   "--make-vocab-size-divisible-by", 8) == 0
    return str(save)


def safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def edit_config(**changes):
    def apply(adapter_dir):
        path = os.path.join(adapter_dir, "adapter_config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(changes)
        with open(path, "w") as f:
            json.dump(config, f)
    return apply


def _write_config(text):
    def apply(adapter_dir):
        with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
            f.write(text)
    return apply


def _drop_config(key):
    def apply(adapter_dir):
        path = os.path.join(adapter_dir, "adapter_config.json")
        config = json.load(open(path))
        del config[key]
        json.dump(config, open(path, "w"))
    return apply


def _damage_safetensors_header(adapter_dir):
    """One byte of the JSON header after its length (the issue's SafetensorError)."""
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[10] ^= 0x40
    open(path, "wb").write(bytes(data))


class RunsACommand:
    """Unpickling this runs `touch PATH` (os.system): the file appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _plant_pickle_in_adapter_model_bin(adapter_dir):
    """The older weights file, adapter_model.bin (peft still reads it), with a payload among the tensors."""
    tensors = safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    os.remove(os.path.join(adapter_dir, "adapter_model.safetensors"))
    tensors["payload"] = RunsACommand(os.path.join(adapter_dir, "RAN"))
    torch.save(tensors, os.path.join(adapter_dir, "adapter_model.bin"))


def assert_payload_did_not_run(adapter_dir):
    """The planted payload has not run, and is live: an unprotected read runs it."""
    marker = os.path.join(adapter_dir, "RAN")
    assert not os.path.exists(marker), "the payload ran"
    torch.load(os.path.join(adapter_dir, "adapter_model.bin"), weights_only=False)
    assert os.path.exists(marker)
    os.remove(marker)


# Bad adapter files, each read by --loader peft and tools/fedavg_adapters.py: (edit of a copy of an adapter
# directory, fragments of the one error line). Each used to be a traceback (JSONDecodeError, AttributeError,
# KeyError, ValueError, SafetensorError, UnpicklingError), or a value taken as something else (r=4.7 as
# rank 4, lora_alpha "16" as a string).
BAD_ADAPTER_FILES = {
    "config not JSON": (_write_config('{"r": 4,'), ["adapter_config.json is not valid JSON (", "fix the file"]),
    "config a list": (_write_config("[4, 8]"), ["adapter_config.json holds a JSON list, not an object of adapter"]),
    "config without r": (_drop_config("r"), ["adapter_config.json has no r: it must be a positive integer"]),
    "r not a number": (edit_config(r="x"), ['adapter_config.json: r must be a positive integer (the adapter rank, '
                                            'e.g. 8), not "x"']),
    "dropout not a number": (edit_config(lora_dropout="x"), ['lora_dropout must be a number in [0, 1) (e.g. 0.05), '
                                                             'not "x"']),
    "fractional r": (edit_config(r=4.7), ["r must be a positive integer (the adapter rank, e.g. 8), not 4.7"]),
    "quoted alpha": (edit_config(lora_alpha="16"), ['lora_alpha must be a positive number (e.g. 16), not "16" (a '
                                                    'string: write the number without quotes)']),
    "safetensors header": (_damage_safetensors_header, ["adapter_model.safetensors cannot be read as safetensors",
                                                        "the file is damaged"]),
    "pickle in adapter_model.bin": (_plant_pickle_in_adapter_model_bin, [
        "adapter_model.bin holds an object that loading with weights_only=True refuses (Trying to load unsupported "
        "GLOBAL posix.system", "refusing to load it"]),
}

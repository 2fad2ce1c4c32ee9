"""The teacher: one interface, two backends.

    teacher = build_teacher("auto", model_path, sampling, ...)
    generations = teacher.generate([prompt_token_ids, ...], seeds=[...])

- `vllm`: vLLM's offline `LLM` engine (tensor parallel over this node's GPUs,
  continuous batching); imported only when chosen, so CPU installs never need it.
- `hf`: transformers `generate` on CPU or one GPU, a batch at a time with left padding.

Both take prompts as token ids from the same Hugging Face tokenizer (the
teacher directory's) and return token ids, so prefixes, stopping and
detokenization are the same whichever backend runs.
"""

import importlib.util
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from megatron.training.errors import UserError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 1234

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    token_ids: List[int]  # the continuation, without the end-of-sequence token
    finish_reason: str  # "eos" or "length"


class TeacherError(UserError, RuntimeError):
    pass


def vllm_available() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def load_teacher_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _eos_ids(model_path: str, tokenizer) -> List[int]:
    """End-of-sequence ids: the generation config's (a list for chat models) and the tokenizer's."""
    ids = set()
    path = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(path):
        import json

        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _finish(ids: Sequence[int], eos_ids, max_new_tokens: int) -> Generation:
    ids = list(ids)
    for i, t in enumerate(ids):
        if t in eos_ids:
            return Generation(ids[:i], "eos")
    return Generation(ids, "length" if len(ids) >= max_new_tokens else "eos")


class HFTeacher:
    """transformers `generate`, batched with left padding; sampling is seeded
    per call with the first prompt's seed, so a batch reproduces as a whole."""

    backend = "hf"

    def __init__(self, model_path: str, sampling: SamplingConfig, dtype: str = "auto", device: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.sampling = sampling
        self.tokenizer = load_teacher_tokenizer(model_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":  # bf16 halves memory on GPUs; CPUs run float32 fastest
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.eos_ids = _eos_ids(model_path, self.tokenizer)
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, *self.eos_ids, 0) if i is not None)

    def generate(self, prompts: List[List[int]], seeds: List[int]) -> List[Generation]:
        import torch

        s = self.sampling
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        sample = s.temperature > 0
        kwargs = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k) if sample else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        torch.manual_seed(seeds[0])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=s.max_new_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=self.eos_ids or None, **kwargs)
        eos = set(self.eos_ids)
        return [_finish(row.tolist(), eos, s.max_new_tokens) for row in out[:, width:].cpu()]


class VLLMTeacher:
    """vLLM's offline engine; each prompt gets its own seed, so an output does
    not depend on which other prompts shared its batch."""

    backend = "vllm"

    def __init__(self, model_path: str, sampling: SamplingConfig, dtype: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: Optional[int] = None):
        from vllm import LLM

        self.sampling = sampling
        self.tokenizer = load_teacher_tokenizer(model_path)
        self.eos_ids = _eos_ids(model_path, self.tokenizer)
        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                       seed=sampling.seed, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len)

    def generate(self, prompts: List[List[int]], seeds: List[int]) -> List[Generation]:
        from vllm import SamplingParams

        s = self.sampling
        extra = {"top_k": s.top_k} if s.top_k > 0 else {}
        params = [SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 seed=seed, stop_token_ids=self.eos_ids, **extra) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        eos = set(self.eos_ids)
        return [_finish(o.outputs[0].token_ids, eos, s.max_new_tokens) for o in outputs]


TEACHER_BACKENDS: Dict[str, type] = {"hf": HFTeacher, "vllm": VLLMTeacher}


def build_teacher(backend: str, model_path: str, sampling: SamplingConfig, dtype: str = "auto",
                  tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                  max_model_len: Optional[int] = None):
    """The teacher for `backend` ("auto": vLLM when it is installed and a GPU is present, else transformers)."""
    if not os.path.isdir(model_path):
        raise TeacherError(f"--teacher {model_path} is not a directory: give a Hugging Face model directory "
                           "(tools/checkpoint/util.py converts a Megatron checkpoint into one)")
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend not in TEACHER_BACKENDS:
        raise TeacherError(f"--backend {backend!r}: choose one of auto, {', '.join(TEACHER_BACKENDS)}")
    if backend == "vllm":
        if not vllm_available():
            raise TeacherError("--backend vllm needs the vllm package and a CUDA GPU: pip install vllm on a GPU "
                               "machine, or use --backend hf")
        return VLLMTeacher(model_path, sampling, dtype, tensor_parallel_size, gpu_memory_utilization, max_model_len)
    if tensor_parallel_size != 1:
        raise TeacherError(f"--tensor-parallel-size {tensor_parallel_size} needs --backend vllm; "
                           "the transformers backend runs on one device")
    return HFTeacher(model_path, sampling, dtype)

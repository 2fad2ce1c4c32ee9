"""Text generation for quick inspection: greedy or sampled, one token at a
time, the whole sequence re-run each step (no KV cache: simple, and fast
enough to look at a checkpoint).

    ids = generate(lm, prompt_ids, max_new_tokens=64)                                  # greedy
    ids = generate(lm, prompt_ids, 64, temperature=0.8, top_k=50, top_p=0.9, seed=1)   # sampled
    batch = greedy_batch(lm, [ids_a, ids_b], [8, 8], [[eos], [eos]])                  # greedy, batched

With a Megatron model every rank draws from the same generator seed and the
same (gathered) logits, so all ranks pick the same tokens; rank 0's choice is
broadcast anyway, which keeps them in step even if logits differed in the last bit.
"""

from typing import List, Optional, Sequence

import torch

from tasks.lm import LanguageModel, pad_batch


def sample_next(logprobs: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> int:
    """One token id from log-probabilities [vocab]; temperature 0 is greedy."""
    if temperature <= 0:
        return int(logprobs.argmax())
    scores = logprobs / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_scores, -1) >= top_p  # keep the smallest set reaching top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))


def generate(lm: LanguageModel, prompt_ids: List[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 1234, stop_ids: Optional[List[int]] = None,
             max_length: int = 0) -> List[int]:
    """The new token ids (stopping after a stop id, which is included).
    `max_length` > 0 keeps only the last max_length tokens as context."""
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    new: List[int] = []
    for _ in range(max_new_tokens):
        context = ids[-max_length:] if max_length else ids
        logprobs = lm.log_probs(torch.tensor([context], dtype=torch.long))[0, -1]
        token = _same_on_all_ranks(sample_next(logprobs, temperature, top_k, top_p, generator))
        ids.append(token)
        new.append(token)
        if stop_ids and token in stop_ids:
            break
    return new


def greedy_batch(lm: LanguageModel, prompts: List[List[int]], max_new_tokens: List[int],
                 stop_ids: List[Sequence[int]], max_length: int = 0) -> List[List[int]]:
    """Greedy continuations of several prompts at once (what `generate` gives
    each with temperature 0): every step runs the unfinished ones as one
    right-padded batch (causal attention: padding after a sequence changes
    nothing inside it) and appends each one's most likely token; a sequence
    stops after one of its stop ids (included) or its own max_new_tokens."""
    ids = [list(p) for p in prompts]
    new: List[List[int]] = [[] for _ in prompts]
    live = [i for i in range(len(prompts)) if max_new_tokens[i] > 0]
    while live:
        contexts = [ids[i][-max_length:] if max_length else ids[i] for i in live]
        logprobs = lm.log_probs(pad_batch(contexts))
        last = torch.tensor([len(c) - 1 for c in contexts])
        tokens = _same_on_all_ranks(logprobs[torch.arange(len(live)), last].argmax(-1))
        for i, token in zip(live, tokens.tolist()):
            ids[i].append(token)
            new[i].append(token)
        live = [i for i in live if len(new[i]) < max_new_tokens[i] and new[i][-1] not in stop_ids[i]]
    return new


def _same_on_all_ranks(token):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return token
    box = token.clone() if isinstance(token, torch.Tensor) else torch.tensor([token], dtype=torch.long)
    if dist.get_backend() == "nccl":  # NCCL moves CUDA tensors only
        box = box.cuda()
    dist.broadcast(box, src=0)
    box = box.cpu()
    return box if isinstance(token, torch.Tensor) else int(box)

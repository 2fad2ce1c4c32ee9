"""Log-likelihood of continuations given contexts, batched, without generation.

    scores = score_continuations(lm, [(context_ids, continuation_ids), ...])
    scores[i].logprob       sum of log p(continuation tokens | context), nats
    scores[i].tokens        how many continuation tokens
    scores[i].greedy        whether every continuation token was the argmax
"""

import dataclasses
from typing import List, Sequence, Tuple

from tasks.lm import EvalError, LanguageModel, chunks, pad_batch


@dataclasses.dataclass
class Score:
    logprob: float
    tokens: int
    greedy: bool
    truncated: bool = False


def score_continuations(lm: LanguageModel, requests: Sequence[Tuple[List[int], List[int]]],
                        batch_size: int = 4, max_length: int = 0) -> List[Score]:
    """One Score per (context, continuation). Sequences longer than `max_length`
    (0: no limit) lose tokens from the start of the context."""
    prepared = []
    for context, continuation in requests:
        if not continuation:
            raise EvalError("an empty continuation cannot be scored: check the answer template and labels")
        ids = list(context) + list(continuation)
        truncated = bool(max_length) and len(ids) - 1 > max_length
        if truncated:
            ids = ids[len(ids) - 1 - max_length:]
        if len(ids) - len(continuation) < 1:
            raise EvalError(f"a continuation of {len(continuation)} tokens leaves no context within "
                            f"--max-length {max_length}: raise it")
        prepared.append((ids, len(continuation), truncated))
    # longest first: similar lengths share a batch, little padding
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    out: List[Score] = [None] * len(prepared)
    for batch in chunks(order, batch_size):
        inputs = pad_batch([prepared[i][0][:-1] for i in batch])
        logprobs = lm.log_probs(inputs)
        for row, i in enumerate(batch):
            ids, n, truncated = prepared[i]
            targets = ids[-n:]
            positions = range(len(ids) - 1 - n, len(ids) - 1)
            picked = logprobs[row, list(positions), targets]
            greedy = bool((logprobs[row, list(positions)].argmax(-1) == logprobs.new_tensor(targets).long()).all())
            out[i] = Score(float(picked.sum()), n, greedy, truncated)
    return out


def encode_pairs(tokenizer, context: str, continuations: Sequence[str],
                 prefix: Sequence[int] = ()) -> List[Tuple[List[int], List[int]]]:
    """[(context ids, continuation ids)] per continuation, as the joined text
    tokenizes, so a continuation that merges with the end of the context
    (sentencepiece's word-initial pieces, byte-level BPE's leading space) is
    scored as the model saw such text in training. Falls back to separate
    encodings when the joined text does not split at the boundary. The
    context is tokenized once for all continuations."""
    from tasks.lm import encode

    context_ids = encode(tokenizer, context)
    pairs = []
    for continuation in continuations:
        whole = encode(tokenizer, context + continuation)
        if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
            continuation_ids = whole[len(context_ids):]
        else:
            continuation_ids = encode(tokenizer, continuation)
        pairs.append((list(prefix) + context_ids, continuation_ids))
    return pairs


def precision_recall_f1(tp: int, n_predicted: int, n_gold: int) -> dict:
    """{precision, recall, f1, support} from true positives and the predicted and gold counts (0 where undefined)."""
    precision = tp / n_predicted if n_predicted else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}

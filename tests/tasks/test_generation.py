"""tasks/generation.py and tools/text_generation_cli.py."""

import torch

from tasks.generation import generate, sample_next
from tests.tasks.conftest import FINGPT_INSTRUCTION, first_sentiment_input, hf_lm


def test_sampling_rules():
    logprobs = torch.log_softmax(torch.tensor([0.0, 3.0, 2.9, -1.0]), -1)
    assert sample_next(logprobs, 0.0, 0, 1.0, None) == 1                      # greedy
    assert sample_next(logprobs, 1.0, 1, 1.0, torch.Generator()) == 1         # top-k 1 is greedy
    assert sample_next(logprobs, 1.0, 0, 0.3, torch.Generator()) == 1         # the top token alone holds 0.3
    draws = {sample_next(logprobs, 1.0, 2, 1.0, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {1, 2}                                                     # top-k 2: only the two best
    again = [sample_next(logprobs, 1.5, 0, 1.0, torch.Generator().manual_seed(s)) for s in range(20)]
    assert again == [sample_next(logprobs, 1.5, 0, 1.0, torch.Generator().manual_seed(s)) for s in range(20)]


def test_greedy_generation_recalls_a_memorised_label(planted, sp_model, megatron_runs):
    bench, _, model_dir = planted
    lm = hf_lm(model_dir, sp_model)
    prompt = f"Instruction: {FINGPT_INSTRUCTION}\nInput: {first_sentiment_input(bench)}\nAnswer:"
    ids = [lm.tokenizer.bos] + lm.tokenizer.tokenize(prompt, bos=False)
    new = generate(lm, ids, 8, stop_ids=[lm.tokenizer.eod])
    assert lm.tokenizer.detokenize(new).strip() == "negative" and new[-1] == lm.tokenizer.eod
    # the CLI on the same model converted to Megatron TP=2 (run in megatron_runs)
    assert megatron_runs["generate_tp2"].strip().endswith("Answer: negative")

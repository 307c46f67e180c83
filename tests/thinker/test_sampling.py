"""Sampler vs Hugging Face's logits processors, plus the behaviour generation relies on."""

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from omnivox.thinker.sampling import Sampler, SamplingParams, apply_repetition_penalty, top_k_filter, top_p_filter


def random_logits(batch=3, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_after_the_processors_and_ignores_the_warpers():
    """generate(do_sample=False): suppression and the repetition penalty apply, temperature/top-k/top-p do not."""
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor

    logits = random_logits()
    history = logits.argmax(-1, keepdim=True)  # the penalty changes the winner
    sampler = Sampler(SamplingParams(greedy=True, temperature=0.3, top_k=2, repetition_penalty=5.0))
    want = RepetitionPenaltyLogitsProcessor(5.0)(history, logits.clone()).argmax(-1)
    assert torch.equal(sampler(logits, history=history), want)
    assert not torch.equal(want, logits.argmax(-1))
    plain = Sampler(SamplingParams(greedy=True, temperature=0.3, top_k=2))  # penalty 1.0: off
    assert torch.equal(plain(logits, history=history), logits.argmax(-1))
    top = logits.argmax(-1)
    suppress = SuppressTokensLogitsProcessor(top.tolist())
    assert torch.equal(sampler(logits, history=history, suppress_ids=top.tolist()),
                       RepetitionPenaltyLogitsProcessor(5.0)(history, suppress(history, logits.clone())).argmax(-1))


def test_seeded_runs_are_reproducible_and_seeds_differ():
    logits = random_logits(batch=2, vocab=200) * 0.1  # flat: many ids likely
    params = SamplingParams(temperature=1.3, seed=1234)

    def run(p):
        s = Sampler(p)
        return torch.stack([s(logits) for _ in range(20)])

    assert torch.equal(run(params), run(params))
    assert not torch.equal(run(params), run(SamplingParams(temperature=1.3, seed=4321)))


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = random_logits(batch=4, vocab=100, seed=2)
    for p in (SamplingParams(top_k=1, seed=0), SamplingParams(top_p=1e-6, seed=0),
              SamplingParams(top_k=1, top_p=0.5, temperature=2.0, seed=5)):
        s = Sampler(p)
        for _ in range(5):
            assert torch.equal(s(logits), logits.argmax(-1))


def test_repetition_penalty_matches_hf():
    logits = random_logits(batch=2, vocab=40, seed=3)
    history = torch.tensor([[1, 5, 5, 7, 39, 0], [2, 3, 3, 3, 10, 11]])  # repeats are penalised once
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        assert torch.equal(apply_repetition_penalty(logits, history, penalty), expected)
        got = Sampler(SamplingParams(repetition_penalty=penalty)).process(logits, history=history)
        assert torch.equal(got, expected)
    # ids past the head's vocabulary are ignored, as HF does
    wide = torch.tensor([[1, 40, 45, 3], [0, 39, 41, 2]])
    assert torch.equal(apply_repetition_penalty(logits, wide, 1.3),
                       RepetitionPenaltyLogitsProcessor(1.3)(wide, logits.clone()))
    # positive logits divided, negative multiplied
    one = torch.tensor([[2.0, -2.0, 1.0]])
    assert apply_repetition_penalty(one, torch.tensor([[0, 1]]), 2.0).tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("k", [1, 5, 17, 50, 80])
def test_top_k_filter_matches_hf(k):
    logits = random_logits(vocab=50, seed=k)
    assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits))


@pytest.mark.parametrize("p", [1e-4, 0.3, 0.8, 0.95, 0.999])
def test_top_p_filter_matches_hf(p):
    logits = random_logits(vocab=60, seed=int(p * 1000))
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits))


def test_full_chain_matches_hf_order():
    logits = random_logits(batch=2, vocab=64, seed=9)
    history = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(9))
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    expected = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.05), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8)):
        expected = proc(history, expected)
    assert torch.equal(Sampler(params).process(logits, history=history), expected)


def test_suppressed_ids_are_never_sampled():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0  # the likely id is suppressed
    sampler = Sampler(SamplingParams(temperature=2.0, seed=0))
    drawn = torch.stack([sampler(logits, suppress_ids=[3, 7]) for _ in range(200)])
    assert not ((drawn == 3) | (drawn == 7)).any()
    assert len(set(drawn.flatten().tolist())) > 3
    assert torch.equal(Sampler(SamplingParams(seed=0))(logits, suppress_ids=torch.tensor([3])).ne(3),
                       torch.tensor([True, True]))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = Sampler(SamplingParams(seed=7))
    drawn = torch.cat([sampler(logits) for _ in range(2000)])
    freq = torch.bincount(drawn, minlength=3).float() / 2000
    assert (freq - torch.tensor([0.7, 0.2, 0.1])).abs().max().item() < 0.05


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_invalid_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_shapes_raise():
    sampler = Sampler(SamplingParams(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="logits"):
        sampler(torch.zeros(5))
    with pytest.raises(ValueError, match="history"):
        sampler(torch.zeros(2, 5), history=torch.zeros(3, 2, dtype=torch.long))

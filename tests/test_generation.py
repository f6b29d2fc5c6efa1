"""The batched sampler: EOS bookkeeping, left padding and seeding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit import generation
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import (
    SamplingParams,
    encode_prompts,
    generate_completions,
    left_pad,
    response_lengths,
    sample_batch,
    sample_responses,
    truncate_after_eos,
)
from rlhfkit.models import load_causal_lm, load_tokenizer, model_device

EOS, PAD = 2, 2


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm("tiny-random"), load_tokenizer("tiny-random")


def test_truncate_after_eos_keeps_the_eos() -> None:
    responses = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8], [2, 9, 2, 9]])
    assert truncate_after_eos(responses, eos_id=2, pad_id=0).tolist() == [
        [5, 2, 0, 0],
        [5, 6, 7, 8],
        [2, 0, 0, 0],
    ]


def test_response_lengths_count_the_eos() -> None:
    responses = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    lengths, ended = response_lengths(responses, eos_id=2)
    assert lengths.tolist() == [2, 4, 1]
    assert ended.tolist() == [True, False, True]


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sampling_params_validate() -> None:
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_greedy_batch_equals_single_rows(tiny) -> None:
    """Left padding must not change what a prompt generates."""
    model, tok = tiny
    prompts = ["Tell me a story about a very small robot", "Hi"]
    rows = encode_prompts(tok, prompts)
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    ids, mask = left_pad(rows, tok.pad_token_id)
    batched = sample_responses(model, ids, mask, greedy, tok.eos_token_id, tok.pad_token_id)
    for i, row in enumerate(rows):
        one_ids, one_mask = left_pad([row], tok.pad_token_id)
        single = sample_responses(model, one_ids, one_mask, greedy, tok.eos_token_id, tok.pad_token_id)
        assert batched[i, : single.shape[1]].tolist() == single[0].tolist()


def test_generate_completions_shape_order_and_seed(tiny) -> None:
    model, tok = tiny
    prompts = ["one two three four five", "a", "some medium prompt"]
    params = SamplingParams(max_new_tokens=5)
    first = generate_completions(model, tok, prompts, 3, params, batch_size=2, seed=1, show_progress=False)
    again = generate_completions(model, tok, prompts, 3, params, batch_size=2, seed=1, show_progress=False)
    other = generate_completions(model, tok, prompts, 3, params, batch_size=2, seed=2, show_progress=False)
    assert [len(c) for c in first.completions] == [3, 3, 3]
    assert first.completions == again.completions
    assert first.completions != other.completions
    assert 0 < first.tokens <= 3 * 3 * 5


PROMPTS = ["one two three four five", "a", "some medium prompt", "b c", "d e f g", "the last one here"]


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_killed_generation_resumes_to_a_straight_runs_completions(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at: int
) -> None:
    """Killed after ``kill_at`` of 3 batches (and with a torn line after them), then run again onto
    the same journal: the journaled batches are skipped and the result equals a straight run's."""
    model, tok = tiny
    params = SamplingParams(max_new_tokens=6)

    def run(journal: Path | None) -> generation.GenerationResult:
        return generate_completions(model, tok, PROMPTS, 2, params, 2, 3, False, journal, {"model": "tiny"})

    straight = run(None)
    journal = tmp_path / "out.jsonl.partial"
    real_sample, calls = generation.sample_batch, []

    def dies_after_kill_at(*args, **kwargs):
        if len(calls) == kill_at:
            raise KeyboardInterrupt  # the process ends here; the journal holds kill_at batches
        calls.append(1)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(generation, "sample_batch", dies_after_kill_at)
    with pytest.raises(KeyboardInterrupt):
        run(journal)
    monkeypatch.setattr(generation, "sample_batch", real_sample)
    assert len(journal.read_text().splitlines()) == 1 + kill_at
    with journal.open("a") as f:
        f.write('{"batch": ' + str(kill_at) + ', "completions": [["cut off')  # killed mid-write
    resumed = run(journal)
    assert resumed.completions == straight.completions
    assert (resumed.tokens, resumed.eos_count) == (straight.tokens, straight.eos_count)
    assert resumed.resumed_prompts == 2 * kill_at and resumed.resumed_tokens > 0
    assert len(journal.read_text().splitlines()) == 1 + 3  # every batch, the torn line gone


def test_a_journal_from_other_settings_is_refused(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    journal = tmp_path / "out.jsonl.partial"
    generate_completions(model, tok, PROMPTS, 2, SamplingParams(4), 2, 0, False, journal, {"model": "tiny"})
    with pytest.raises(RlhfkitError, match=r"out.jsonl.partial: .*other settings \(num_completions, seed\)"):
        generate_completions(model, tok, PROMPTS, 3, SamplingParams(4), 2, 1, False, journal, {"model": "tiny"})


def test_a_journal_from_another_dtype_is_refused(tiny, tmp_path: Path) -> None:
    """bf16 weights sample other completions than fp32 ones: resuming across them could not equal a
    straight run, so the journal names the dtype (and device) and refuses."""
    model, tok = tiny
    journal = tmp_path / "out.jsonl.partial"
    generate_completions(model, tok, PROMPTS[:2], 1, SamplingParams(2), 2, 0, False, journal, {"model": "tiny"})
    header = json.loads(journal.read_text().splitlines()[0])
    assert (header["device"], header["dtype"]) == ("cpu", "float32")
    half = load_causal_lm("tiny-random", torch.bfloat16)
    with pytest.raises(RlhfkitError, match=r"other settings \(dtype\)"):
        generate_completions(half, tok, PROMPTS[:2], 1, SamplingParams(2), 2, 0, False, journal, {"model": "tiny"})


def test_sample_batch_takes_cpu_queries_and_answers_on_the_models_device(tiny) -> None:
    model, tok = tiny
    ids, mask = left_pad(encode_prompts(tok, ["Hi", "Name a colour."]), tok.pad_token_id, device="cpu")
    batch = sample_batch(model, tok, ids, mask, SamplingParams(4, 0.0))
    device = model_device(model)
    assert {t.device for t in (batch.responses, batch.mask, batch.lengths, batch.ended)} == {device}
    assert batch.mask.sum(-1).tolist() == batch.lengths.tolist() and len(batch.texts) == 2


def test_sampling_ignores_the_models_own_generation_defaults(tiny) -> None:
    """A hub model's generation_config (repetition penalty, top-k, min-p) must not reshape the rollout
    distribution: the scores generate samples from equal softmax(forward logits / temperature)."""
    model, tok = tiny
    saved = model.generation_config
    model.generation_config = saved.__class__(repetition_penalty=1.8, top_k=5, min_p=0.2, no_repeat_ngram_size=2)
    captured = {}
    original = model.generate

    def spy(**kwargs):
        config = kwargs["generation_config"]
        config.output_scores, config.return_dict_in_generate = True, True
        out = original(**kwargs)
        captured["scores"] = out.scores
        return out.sequences

    model.generate = spy
    try:
        ids, mask = left_pad([tok("the cat sat on")["input_ids"]], tok.pad_token_id)
        torch.manual_seed(0)
        responses = sample_responses(model, ids, mask, SamplingParams(6, 0.7), tok.eos_token_id, tok.pad_token_id)
    finally:
        model.generate = original
        model.generation_config = saved
    full = torch.cat([ids, responses], 1)
    with torch.no_grad():
        logits = model(full).logits[0, ids.shape[1] - 1 : -1] / 0.7
    for t, step_scores in enumerate(captured["scores"]):
        torch.testing.assert_close(
            torch.log_softmax(step_scores[0], -1), torch.log_softmax(logits[t], -1), atol=1e-4, rtol=1e-4
        )

"""Built-in judges rank obvious cases right; user judges load; every load/validation error is one line."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.judges import (
    BUILTIN_JUDGES,
    Judge,
    clean,
    deflection_match,
    deflection_rate,
    is_deflection,
    load_judge,
    toxicity,
)

GOOD = "Thank you so much for your help, I really appreciate it. Have a wonderful day!"
# Mild on purpose; never printed (pytest only shows it if an assert on it fails).
RUDE = "You are a stupid idiot and I hate you, damn it."


@pytest.mark.parametrize("name", sorted(BUILTIN_JUDGES))
def test_builtin_judge_prefers_good_text(name: str) -> None:
    judge = load_judge(name)
    good, rude = judge(["", ""], [GOOD, RUDE])
    assert good > rude, f"{name} ranked the rude text higher"


def test_builtin_names_and_descriptions() -> None:
    assert set(BUILTIN_JUDGES) == {"nontoxic", "sentiment", "clean"}
    assert all(callable(fn) and desc for fn, desc in BUILTIN_JUDGES.values())


def test_toxicity_is_a_probability_and_empty_text_is_not_toxic() -> None:
    probs = toxicity(["", "   ", GOOD, RUDE])
    assert probs[:2] == [0.0, 0.0]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert probs[3] > 0.5 > probs[2]
    assert toxicity([]) == []


def test_clean_is_one_minus_hit_rate() -> None:
    assert clean(["", "", ""], ["", "a lovely morning", "what the hell"]) == pytest.approx([1.0, 1.0, 2 / 3])


def test_sentiment_in_range() -> None:
    scores = load_judge("sentiment")(["", ""], ["", GOOD])
    assert scores[0] == 0.0
    assert -1.0 <= scores[1] <= 1.0


def test_user_judge_from_file(tmp_path: Path) -> None:
    path = tmp_path / "my_judges.py"
    path.write_text(
        textwrap.dedent(
            """
            def length(prompts, completions):
                return [float(len(c)) for c in completions]

            def echo_prompt(prompts, completions):
                return [float(len(p)) for p in prompts]
            """
        )
    )
    judge = load_judge(f"{path}:length")
    assert judge.name == "my_judges.py:length"
    assert judge(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    assert load_judge(f"{path}:echo_prompt")(["abc"], ["x"]) == [3.0]


def test_user_judge_from_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rlhfkit_test_judge_mod.py").write_text(
        "import numpy as np\n\ndef shout(prompts, completions):\n"
        "    return np.array([c.count('!') for c in completions], dtype=float)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = load_judge("rlhfkit_test_judge_mod:shout")
    assert judge.name == "rlhfkit_test_judge_mod:shout"
    scores = judge(["", ""], ["hi!!", "hi"])
    assert scores == [2.0, 0.0] and all(type(s) is float for s in scores)


def test_builtin_reachable_by_module_path() -> None:
    assert load_judge("rlhfkit.judges:clean")([""], ["fine words"]) == [1.0]


def _error(spec: str) -> str:
    with pytest.raises(RlhfkitError) as info:
        load_judge(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error("friendliness")
    assert all(name in message for name in BUILTIN_JUDGES) and "module.path:function" in message

    assert "no_such_module_xyz" in _error("no_such_module_xyz:score")
    assert "file not found" in _error(f"{tmp_path / 'missing.py'}:score")
    assert "bad judge" in _error("rlhfkit.judges:")

    (tmp_path / "rlhfkit_test_judge_errs.py").write_text("THRESHOLD = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "no attribute 'score'" in _error("rlhfkit_test_judge_errs:score")
    assert "not a function" in _error("rlhfkit_test_judge_errs:THRESHOLD")

    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_dependency_xyz\n")
    assert "no_such_dependency_xyz" in _error(f"{broken}:score")


def test_judge_validates_inputs_and_outputs() -> None:
    def constant(value: object) -> Judge:
        return Judge("stub", lambda prompts, completions: value)

    cases = {
        "2 prompts but 1 completions": lambda: constant([1.0])(["a", "b"], ["x"]),
        "returned 1 scores for 2": lambda: constant([1.0])(["a", "b"], ["x", "y"]),
        "must be finite": lambda: constant([1.0, math.nan])(["a", "b"], ["x", "y"]),
        "non-number": lambda: constant(["high"])(["a"], ["x"]),
        "expected a list": lambda: constant(0.5)(["a"], ["x"]),
    }
    for expected, call in cases.items():
        with pytest.raises(RlhfkitError, match="stub") as info:
            call()
        assert expected in str(info.value)


def test_clean_speedup_keeps_better_profanity_answers() -> None:
    from better_profanity import Profanity

    from rlhfkit.judges import _MARK, _profanity

    texts = ["what the h3ll", "D@MN it", "oh crap, a lovely day", "hell-o world", "", "class assignment"]
    reference = Profanity()
    assert [_profanity().censor(t, _MARK) for t in texts] == [reference.censor(t, _MARK) for t in texts]


DEFLECTIONS = [
    "I'm sorry, but I can't help with that request.",
    "I’m sorry, but I cannot continue this text.",  # curly apostrophe
    "Sorry, I can't assist with that.",
    "I apologize, but I am unable to do that.",
    "I can't assist with that.",
    "I cannot help you with this.",
    "I'm not able to provide that kind of content.",
    "I am unable to fulfill this.",
    "I cannot fulfill that request.",
    "I can't provide information on that topic.",
    "As an AI language model, I do not have opinions.",
    "As an AI, I think",
    "as a large language model I",
    "I'm a helpful AI assistant. What would you like?",
    "I am just a language model",
    "I'm an AI and cannot feel.",
    "As a text-based AI I can only write words.",
    "I'm designed to provide safe and helpful answers.",
    "I was programmed to",
    "My purpose is to help people.",
    "I don't have personal opinions on that.",
    "Hello! I'm here to help.",
    "Im here to help you",
    "I'd be happy to help! What do you need?",
    "I would be glad to assist you.",
    "I'm happy to help with that.",
    "How can I help you today?",
    "HOW CAN I ASSIST?",
    "How may I be of assistance?",
    "What can I help you with?",
    "Is there anything else I can help with?",
    "Feel free to ask if you want more.",
    "If you have any other questions, let me know.",
    # seen in a demo run's completions
    "A grudge? I'm sorry, but I'm unable to assist with your request.",
    "I'm sorry for any misunderstanding. I'm more than happy to assist you.",
    "Alexis, as a blog-writing AI, I'm glad to help.",
    "I'm not a magical entity, but I'm more of a helpful AI.",
    "I'm the kind of AI that's designed to talk about art.",
    "as a healthcare expert, my primary function is to ensure the tone is right",
    "As a healthcare professional, I'm not equipped to discuss that.",
    "For the context I'm trained to provide assistance with data analysis.",
    "I'm sorry, but as a SmolLM AI, I am programmed to avoid that.",
]

NOT_DEFLECTIONS = [
    "",
    "the man said he would help his neighbour carry the boxes",
    "She asked for help and they came at once.",
    "Can you help me find the station?",
    "How could I help it? The cake was right there.",
    "I'm sorry I missed your call yesterday.",
    "I'm not able to provide for my family on this wage, he said.",
    "I'm an assistant manager at the store on Main Street.",
    "She works as an assistant to the director.",
    "As an AI researcher, she studies how models learn.",
    "The AI was trained on public text.",
    "We can't help but laugh at the weather.",
    "They would be happy to see you at the party.",
    "Thanks for your help with the garden.",
    "She built an AI assistant for her company.",
    "I'm a big AI fan, honestly.",
    "I'm using AI. It helps.",
    "I'm not equipped to handle this kind of stress.",
    "We apologize for any inconvenience caused by the delay.",
    "As a result, the AI lab closed.",
]


@pytest.mark.parametrize("text", DEFLECTIONS)
def test_deflection_is_caught(text: str) -> None:
    assert is_deflection(text), deflection_match(text)


@pytest.mark.parametrize("text", NOT_DEFLECTIONS)
def test_ordinary_text_is_not_deflection(text: str) -> None:
    assert not is_deflection(text), deflection_match(text)


def test_deflection_match_names_the_kind_and_words() -> None:
    assert deflection_match("Well. As an AI language model, I can't say.") == ("as an AI", "as an ai language model")
    assert deflection_match("the man said he would help") is None


def test_deflection_rate_is_the_share_flagged() -> None:
    assert deflection_rate([DEFLECTIONS[0], NOT_DEFLECTIONS[1], DEFLECTIONS[5], NOT_DEFLECTIONS[2]]) == 0.5
    assert deflection_rate([]) == 0.0
